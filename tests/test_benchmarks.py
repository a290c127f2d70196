"""Smoke tests of the benchmarks on tiny configs: ``benchmarks/bench.py`` through its CLI (one repeat)
and ``benchmarks/bench_index.py`` on 120 records.

They check the structure of the results and that mm_llama and HF Llava computed the same thing (losses,
logits, generated text). Timings are recorded but never asserted on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks import bench_index
from benchmarks.bench import (
    HF_LLAVA,
    LLM_PRESETS,
    MM_LLAMA,
    QUICK,
    RATIO_KEYS,
    BenchSettings,
    answer,
    build_model,
    check_settings,
    main,
    markdown_table,
    pair_for,
    parse_args,
    random_images,
    training_batch,
)
from mm_llama.errors import MMInputError

TINY_ARGS = ["--llm", "tiny", "--vision", "tiny", "--image-size", "28", "--batch", "2", "--repeats", "1"]
TINY_ARGS += ["--new-tokens", "6", "--lora-r", "4", "--lora-alpha", "8"]


def test_parse_args_maps_flags_onto_settings(tmp_path: Path) -> None:
    settings, json_path, png_path = parse_args(
        [
            *TINY_ARGS,
            "--dtype",
            "bfloat16",
            "--json",
            str(tmp_path / "r.json"),
            "--png",
            str(tmp_path / "c.png"),
        ]
    )
    assert settings == BenchSettings(
        llm="tiny", vision="tiny", image_size=28, batch=2, repeats=1, dtype="bfloat16", lora_r=4, lora_alpha=8,
        new_tokens=6,
    )  # fmt: skip
    assert (json_path, png_path) == (tmp_path / "r.json", tmp_path / "c.png")


def test_quick_sets_its_defaults_and_explicit_flags_win() -> None:
    quick, _, _ = parse_args(["--quick"])
    assert {key: getattr(quick, key) for key in QUICK} == QUICK
    assert quick.llm == "smollm2-135m"
    assert parse_args(["--quick", "--batch", "3"])[0].batch == 3
    default, _, _ = parse_args([])  # LLaVA-1.5's shape
    assert (default.vision, default.image_size, default.batch) == ("vit-l", 336, 8)


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        (BenchSettings(image_size=30), "--image-size"),
        (BenchSettings(repeats=0), "--repeats"),
        (BenchSettings(new_tokens=1), "--new-tokens"),
        (BenchSettings(seq_len=1000), "--seq-len"),  # 576 image tokens at 336 px
        (BenchSettings(llm="llama3-8b"), "--llm llama3-8b"),
    ],
)
def test_settings_that_cannot_run_are_refused_naming_the_flag(settings: BenchSettings, flag: str) -> None:
    with pytest.raises(MMInputError, match=flag):
        check_settings(settings)


def test_llama3_8b_preset_has_llama_3_8b_shape() -> None:
    """Built on the meta device only: its 8.03 B random weights are for GPU runs."""
    config = AutoConfig.for_model("llama", **LLM_PRESETS["llama3-8b"])
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in llm.parameters()) == 8_030_261_248  # Meta-Llama-3-8B's count


@pytest.fixture
def one_thread() -> Iterator[None]:
    """``--threads 1`` for the benchmark (OpenMP stalls on a shared CPU), PyTorch's count restored after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_benchmark_cli_on_tiny_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out, chart = tmp_path / "results.json", tmp_path / "chart.png"
    main([*TINY_ARGS, "--threads", "1", "--json", str(out), "--png", str(chart)])
    results = json.loads(out.read_text())
    assert markdown_table(results) in capsys.readouterr().out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert {
        "cpu",
        "cpu_count",
        "torch_threads",
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "device",
    } <= set(results["machine"])
    settings = results["settings"]
    assert settings["image_tokens"] == 4  # (28 / 14) ** 2 patches, CLS dropped
    assert settings["label_tokens_per_sample"] > 0 and settings["decode_batches"] == [1, 8]

    assert list(results["ratios"]) == list(RATIO_KEYS)
    for key, ratio in results["ratios"].items():
        assert math.isfinite(ratio) and ratio > 0, key

    parity = results["parity"]
    assert math.isclose(parity["loss_mm_llama"], parity["loss_hf_llava"], rel_tol=1e-5)
    assert parity["max_abs_logit_diff"] <= 1e-5
    assert parity["cached_batch_same_ids"]
    steps = results["steps"]
    assert set(steps) == {"stage1_step", "stage1_cached_step", "stage2_lora_step", "stage2_qlora_step"}
    for key, step in steps.items():
        assert step["loss_rel_diff"] <= 1e-5, key
        for name in (MM_LLAMA, HF_LLAVA):
            assert len(step[name]["times_s"]) == 1 and step[name]["peak_memory_mib"] > 0
    # the QLoRA step runs on 4-bit weights: less weight memory than the full-precision LoRA step
    assert steps["stage2_qlora_step"]["weights_mib"] < steps["stage2_lora_step"]["weights_mib"]

    for batch in (1, 8):
        entry = results["generation"][f"batch_{batch}"]
        assert entry["same_texts"], batch
        for name in (MM_LLAMA, HF_LLAVA):
            assert len(entry[name]["texts"]) == batch
            assert entry[name]["tokens_per_s"] > 0 and entry[name]["median_prefill_s"] > 0


def test_index_benchmark_builds_then_reads_the_cache(tmp_path: Path) -> None:
    """``benchmarks/bench_index.py`` on 120 records: structure only, never speed."""
    out = tmp_path / "index.json"
    results = bench_index.main(
        ["--data-dir", str(tmp_path / "mix"), "--records", "120", "--distinct-images", "5", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == results
    assert results["records"] == 120 and 0 < results["text_only_records"] < 120
    assert not results["build_from_cache"] and results["cached_from_cache"]
    assert results["distinct_media_files"] > 5 and results["mean_length"] > 576  # 576 tokens per image
    assert results["build_s"] > 0 and results["peak_rss_mib"] > 0


def test_seq_len_makes_every_training_sample_that_long(one_thread: None) -> None:
    torch.set_num_threads(1)
    settings = BenchSettings(llm="tiny", vision="tiny", image_size=28, batch=2, seq_len=40)
    check_settings(settings)
    model = build_model(settings)
    images = random_images(2, 28, 0)
    batch = training_batch(pair_for(model, answer(settings)), images)
    assert batch["input_ids"].shape == (2, 40) and bool(batch["attention_mask"].all())
    short = training_batch(pair_for(model), images)
    assert short["input_ids"].shape[1] < 40
    # the longer answer is supervised up to the cut: every token past the short sample's prompt
    labelled = int((batch["labels"] != -100).sum(1).min())
    prompt = short["input_ids"].shape[1] - int((short["labels"][0] != -100).sum())
    assert labelled == 40 - prompt
