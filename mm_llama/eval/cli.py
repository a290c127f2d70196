"""The ``mm-llama eval`` subcommand: arguments and the function it runs.

    mm-llama eval --checkpoint runs/stage2 --task vqav2 \\
        --data data/vqav2/v2_OpenEnded_mscoco_val2014_questions.json --limit 500

The CLI module wires these in with ``add_eval_args(subparser)`` and ``run_eval(args)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mm_llama.eval.runner import evaluate, metrics_table
from mm_llama.eval.tasks import TASKS
from mm_llama.plugins import add_plugin_arg


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Add the eval options to ``parser``."""
    add_plugin_arg(parser)
    parser.add_argument("--checkpoint", required=True, type=Path, help="run folder saved by training")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="benchmark to run")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="local benchmark file or folder (official JSON/CSV, or an lmms-lab parquet file or folder)",
    )
    parser.add_argument(
        "--media-root", type=Path, default=None, help="folder of the images/audio (default: per task)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length cap (default: the task's own)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder for predictions, results and metrics; rerunning resumes (default: CHECKPOINT/eval/TASK)",
    )


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Load the checkpoint, evaluate, print a table of the metrics; returns the metrics."""
    from mm_llama import MultimodalLM  # imported here so `mm-llama --help` stays fast

    model = MultimodalLM.from_pretrained(args.checkpoint)
    output = args.output if args.output is not None else args.checkpoint / "eval" / args.task
    metrics = evaluate(
        model,
        args.task,
        args.data,
        output_dir=output,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        media_root=args.media_root,
    )
    print(f"{args.task}: {metrics['num_questions']} questions, files in {output}\n")
    print(metrics_table({k: v for k, v in metrics.items() if k not in ("num_questions", "max_new_tokens")}))
    return metrics
