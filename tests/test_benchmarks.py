"""Smoke test of ``benchmarks/bench_llava.py`` on the tiny config: one repeat, through the CLI.

It checks the structure of the results and that mm_llama and HF Llava computed the same thing (loss,
logits, generated text). Timings are recorded but never asserted on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import bench_index
from benchmarks.bench_llava import HF_LLAVA, MM_LLAMA, BenchSettings, main, markdown_table, parse_args

TINY_ARGS = [
    "--llm",
    "tiny",
    "--vision",
    "tiny",
    "--image-size",
    "28",
    "--batch",
    "2",
    "--repeats",
    "1",
    "--gen-batch",
    "1",
    "2",
    "--new-tokens",
    "4",
]


def test_parse_args_maps_flags_onto_settings(tmp_path: Path) -> None:
    settings, out = parse_args([*TINY_ARGS, "--dtype", "bfloat16", "--out", str(tmp_path / "r.json")])
    assert settings == BenchSettings(
        llm="tiny",
        vision="tiny",
        image_size=28,
        batch=2,
        repeats=1,
        dtype="bfloat16",
        gen_batches=(1, 2),
        new_tokens=4,
    )
    assert out == tmp_path / "r.json"


def test_benchmark_cli_on_tiny_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    main([*TINY_ARGS, "--out", str(out)])
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert markdown_table(results) in printed

    assert {"cpu", "cpu_count", "torch", "transformers", "device"} <= set(results["machine"])
    assert results["settings"]["image_tokens"] == 4  # (28 / 14) ** 2 patches, CLS dropped
    assert results["settings"]["label_tokens_per_sample"] > 0

    parity = results["parity"]
    assert math.isclose(parity["loss_mm_llama"], parity["loss_hf_llava"], rel_tol=1e-5)
    assert parity["max_abs_logit_diff"] <= 1e-5

    train = results["train_step"]
    for name in (MM_LLAMA, HF_LLAVA):
        assert len(train[name]["times_s"]) == 1
        assert train[name]["median_s"] > 0
        assert results["train_peak_memory_mib"][name] > 0
    assert math.isclose(train[MM_LLAMA]["loss"], train[HF_LLAVA]["loss"], rel_tol=1e-5)

    assert set(results["generate"]) == {"batch_1", "batch_2"}
    for key, batch in (("batch_1", 1), ("batch_2", 2)):
        entry = results["generate"][key]
        assert entry["same_texts"]
        for name in (MM_LLAMA, HF_LLAVA):
            assert len(entry[name]["texts"]) == batch
            assert entry[name]["tokens_per_s"] > 0


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
