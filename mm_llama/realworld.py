"""The real-data run: real recordings -> stage 1 -> stage 2 (QLoRA) -> evaluation next to chance and a linear probe.

``mm-llama realworld`` builds the data of :mod:`mm_llama.data.realworld` (Fashion-MNIST, espeak-ng speech,
BasicMotions), trains the ``training/configs/realworld.yaml`` model (EfficientNet-Lite0 with ImageNet
weights, frozen; SmolLM2-135M) stage by stage, answers the held-out questions, and fits a linear probe
(logistic regression) on each trained encoder's mean-pooled features of the training items: the accuracy
a projector could reach from those features. Writes ``<output_dir>/metrics.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mm_llama.data.realworld import MODALITY_SOURCES, build_realworld
from mm_llama.errors import MMInputError
from mm_llama.eval import evaluate
from mm_llama.model import MultimodalLM
from mm_llama.quickstart import forget_stages, train_stages
from mm_llama.train import load_train_config

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "realworld.yaml"
N_IMAGES = 1500
N_TEST_IMAGES = 200
IMU_REPEATS = 10
EVAL_BATCH = 50
EVAL_MAX_NEW_TOKENS = 5
PROBE_BATCH = 64


def _media_labels(records: list[dict[str, Any]], root: Path) -> dict[tuple[str, str], dict[Path, str]]:
    """(modality, question_type) -> {media file: answer}, for every single-media question in the records."""
    labels: dict[tuple[str, str], dict[Path, str]] = defaultdict(dict)
    for record in records:
        modality = next(k for k in ("image", "audio", "video", "imu") if k in record)
        turns = record.get("turns") or [
            {"question_type": record["question_type"], "answer": record["answer"]}
        ]
        for turn in turns:
            labels[(modality, turn["question_type"])][root / record[modality]] = turn["answer"]
    return labels


@torch.no_grad()
def _features(model: MultimodalLM, modality: str, files: list[Path]) -> np.ndarray:
    """Each file's encoder tokens, mean-pooled: (N, D_enc)."""
    encoder = model.encoders[modality].eval()
    out = []
    for i in range(0, len(files), PROBE_BATCH):
        x = torch.stack([encoder.preprocess(f) for f in files[i : i + PROBE_BATCH]])
        out.append(encoder(x).float().mean(dim=1))
    return torch.cat(out).numpy()


def _questions_for(data: Path, modalities: list[str], out: Path) -> Path:
    """The held-out questions about the model's modalities: ``instruct_test.json`` itself when it has them
    all, else those questions written to ``<out>/questions.json`` (e.g. an image-only model)."""
    path = data / "instruct_test.json"
    records = json.loads(path.read_text())
    kept = [r for r in records if all(m in modalities for m in MODALITY_SOURCES if m in r)]
    if len(kept) == len(records):
        return path
    if not kept:
        raise MMInputError(f"{path}: no question is about the model's modalities {modalities}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "questions.json").write_text(json.dumps(kept, indent=1) + "\n")
    return out / "questions.json"


def linear_probe(model: MultimodalLM, data: Path) -> dict[str, float]:
    """Test accuracy (%) of a logistic regression on each encoder's pooled features, per question type whose
    answer is a label of the item (the multiple-choice question reuses its open question's labels; it is
    reported as the 10-way probe, a lower bound for choosing among 2 to 4)."""
    from sklearn.linear_model import LogisticRegression  # the pretrained extra (a dependency of pyts)

    train = _media_labels(json.loads((data / "instruct_train.json").read_text()), data)
    test = _media_labels(json.loads((data / "instruct_test.json").read_text()), data)
    probes: dict[str, float] = {}
    for (modality, qtype), test_labels in sorted(test.items()):
        source = "clothing_kind" if qtype == "clothing_choice" else qtype
        train_labels = train.get((modality, source))
        if not train_labels or modality not in model.encoders:
            continue
        x_train = _features(model, modality, list(train_labels))
        x_test = _features(model, modality, list(test_labels))
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        clf = LogisticRegression(max_iter=2000).fit((x_train - mean) / std, list(train_labels.values()))
        probes[qtype] = 100.0 * float(clf.score((x_test - mean) / std, list(test_labels.values())))
    return probes


def table(metrics: dict[str, Any]) -> str:
    """A Markdown table: accuracy per question type next to chance and the linear probe."""
    lines = ["| question type | accuracy % | chance % | linear probe % |", "|---|---:|---:|---:|"]
    for qtype, row in metrics["per_question_type"].items():
        probe = metrics["linear_probe"].get(qtype)
        lines.append(
            f"| {qtype} | {row['accuracy']:.1f} | {row.get('chance', float('nan')):.1f} | "
            + (f"{probe:.1f} |" if probe is not None else "- |")
        )
    lines.append(f"| **overall** | **{metrics['accuracy']:.1f}** | | |")
    return "\n".join(lines)


def run(
    config: str | Path = CONFIG,
    n_images: int = N_IMAGES,
    n_test_images: int = N_TEST_IMAGES,
    imu_repeats: int = IMU_REPEATS,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the data (when its settings changed), train every stage, evaluate, probe; returns the metrics."""
    started = time.perf_counter()
    cfg = load_train_config(config)
    out = Path(cfg.output_dir)
    data = Path(next(iter(cfg.stages.values())).data[0]).parent
    wanted = {"n_images": n_images, "n_test_images": n_test_images, "imu_repeats": imu_repeats, "seed": seed}
    stamp = data / "settings.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        print(f"[realworld] building the data in {data} ...", flush=True)
        forget_stages(cfg)
        build_realworld(data, n_images, n_test_images, imu_repeats=imu_repeats, seed=seed)
        stamp.write_text(json.dumps(wanted))
    timings = {"data_s": time.perf_counter() - started}
    final = train_stages(cfg, "realworld", timings)
    t0 = time.perf_counter()
    model = MultimodalLM.from_pretrained(final).eval()
    shutil.rmtree(out / "eval", ignore_errors=True)  # answers of an earlier model must not be resumed
    metrics = evaluate(
        model,
        "toy",
        _questions_for(data, list(cfg.model.modalities), out),
        output_dir=out / "eval",
        batch_size=EVAL_BATCH,
        max_new_tokens=EVAL_MAX_NEW_TOKENS,
        media_root=data,
    )
    chance = json.loads((data / "realworld.json").read_text())["chance"]
    for qtype, row in metrics["per_question_type"].items():  # mean over the questions, not the last one's
        row["chance"] = 100.0 * chance[qtype]
    timings["eval_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probes = linear_probe(model, data)
    timings["probe_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started - timings["probe_s"]
    result = {
        "checkpoint": str(final),
        "accuracy": metrics["accuracy"],
        "per_question_type": metrics["per_question_type"],
        "per_modality": metrics["per_modality"],
        "linear_probe": probes,
        "num_questions": metrics["num_questions"],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print("\n" + table(result))
    print(
        f"\n[realworld] done in {timings['total_s'] / 60:.1f} min (probe not counted); metrics in {out / 'metrics.json'}"
    )
    print(
        f"Chat with it:\n  mm-llama chat --checkpoint {final} --image {data}/images/test/00000.png 'What kind of clothing is this?'"
    )
    return result


def run_realworld(args: argparse.Namespace) -> dict[str, Any]:
    """``mm-llama realworld``: the whole run with the command line's settings."""
    return run(
        args.config or CONFIG,
        args.n_images or N_IMAGES,
        args.n_test_images or N_TEST_IMAGES,
        args.imu_repeats or IMU_REPEATS,
        args.seed,
    )
