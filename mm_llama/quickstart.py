"""The laptop quickstart: toy world -> encoder pretraining -> stage 1 -> stage 2 (QLoRA) -> evaluation.

``python -m mm_llama.quickstart`` (what ``make quickstart`` runs) builds the toy world, trains the
``training/configs/quickstart.yaml`` model on the real SmolLM2-135M for image, audio, video and IMU,
answers the held-out test questions, writes ``runs/quickstart/metrics.json`` (accuracy per question type
next to chance) and prints how to chat with the result and open the demo.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_llama.data.toyworld import generate_toyworld, usable_cores

if TYPE_CHECKING:
    from mm_llama.train import TrainConfig

# torch, the model and the trainer are imported where they are used: the toy world's worker processes
# import this module again (spawn), and need none of them.

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "quickstart.yaml"
N_TRAIN = 2000
"""Toy-world samples per modality for training (each gives one caption and one question)."""
N_TEST = 100
"""Held-out questions per modality."""
EVAL_BATCH = 50
EVAL_MAX_NEW_TOKENS = 4


def add_quickstart_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=str(CONFIG), help="the training config (default: the quickstart)")
    parser.add_argument(
        "--n-train", type=int, default=N_TRAIN, help="toy-world training samples per modality"
    )
    parser.add_argument("--n-test", type=int, default=N_TEST, help="held-out questions per modality")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def table(metrics: dict[str, Any]) -> str:
    """A Markdown table of accuracy per question type next to chance."""
    lines = ["| question type | accuracy % | chance % |", "|---|---:|---:|"]
    for qtype, row in metrics["per_question_type"].items():
        lines.append(f"| {qtype} | {row['accuracy']:.1f} | {row.get('chance', float('nan')):.1f} |")
    lines.append(f"| **overall** | **{metrics['accuracy']:.1f}** | |")
    return "\n".join(lines)


def forget_stages(cfg: TrainConfig) -> None:
    """Delete the stages' checkpoints and feature caches: they were trained on other data, so the next run
    starts over rather than resumes them."""
    for name in cfg.stages:
        shutil.rmtree(Path(cfg.output_dir) / name, ignore_errors=True)
    for stage in cfg.stages.values():
        if stage.feature_cache is not None:
            shutil.rmtree(stage.feature_cache, ignore_errors=True)


def train_stages(cfg: TrainConfig, tag: str, timings: dict[str, float]) -> Path:
    """Train every stage in turn (each resumes when its checkpoint is there), recording each one's wall
    time in ``timings`` as ``<stage>_s``; returns the last stage's checkpoint."""
    from mm_llama.train import train

    for name in cfg.stages:
        t0 = time.perf_counter()
        print(f"[{tag}] stage {name} ...", flush=True)
        final = train(cfg, stages=[name])
        timings[f"{name}_s"] = time.perf_counter() - t0
    return final


def run(
    config: str | Path = CONFIG, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0
) -> dict[str, Any]:
    """Run the whole quickstart; returns the metrics written to ``<output_dir>/metrics.json``."""
    import torch

    from mm_llama.eval import evaluate
    from mm_llama.model import MultimodalLM
    from mm_llama.train import load_train_config

    started = time.perf_counter()
    cfg = load_train_config(config)
    out = Path(cfg.output_dir)
    data = Path(next(iter(cfg.stages.values())).data[0]).parent  # where the toy world goes
    world = data / "world.json"
    wanted = {"seed": seed, "n_train": n_train, "n_test": n_test}
    if (
        not world.is_file()
        or json.loads(
            (data / "quickstart.json").read_text() if (data / "quickstart.json").is_file() else "{}"
        )
        != wanted
    ):
        print(f"[quickstart] generating the toy world in {data} ...", flush=True)
        forget_stages(cfg)
        workers = usable_cores()  # the media are rendered in parallel, with the same bytes
        generate_toyworld(data, seed=seed, n_train=n_train, n_val=0, n_test=n_test, workers=workers)
        (data / "quickstart.json").write_text(json.dumps(wanted))
    timings = {"toyworld_s": time.perf_counter() - started}
    final = train_stages(cfg, "quickstart", timings)
    t0 = time.perf_counter()
    model = MultimodalLM.from_pretrained(final).eval()
    shutil.rmtree(out / "eval", ignore_errors=True)  # answers of an earlier model must not be resumed
    metrics = evaluate(
        model,
        "toy",
        data / "instruct_test.json",
        output_dir=out / "eval",
        batch_size=EVAL_BATCH,
        max_new_tokens=EVAL_MAX_NEW_TOKENS,
    )
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    result = {
        "checkpoint": str(final),
        "accuracy": metrics["accuracy"],
        "per_question_type": metrics["per_question_type"],
        "per_modality": metrics["per_modality"],
        "num_questions": metrics["num_questions"],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print("\n" + table(metrics))
    print(f"\n[quickstart] done in {timings['total_s'] / 60:.1f} min; metrics in {out / 'metrics.json'}")
    print("Chat with it:")
    print(
        f"  .venv/bin/mm-llama chat --checkpoint {final} --image {data}/images/test/00000.png 'How many shapes are there?'"
    )
    print("Open the demo (http://127.0.0.1:7860):")
    print(f"  .venv/bin/mm-llama demo --checkpoint {final}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = add_quickstart_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    run(args.config, args.n_train, args.n_test, args.seed)


if __name__ == "__main__":
    main()
