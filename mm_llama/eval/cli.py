"""The ``mm-llama eval`` subcommand: arguments and the function it runs.

    mm-llama eval --checkpoint runs/stage2 --task vqav2 \\
        --data data/vqav2/v2_OpenEnded_mscoco_val2014_questions.json --limit 500

The CLI module wires these in with ``add_eval_args(subparser)`` (defined in the light
:mod:`mm_llama.cli_args`) and ``run_eval(args)``. A plugin modality's questions (a LLaVA-format file with
``"depth": "x.npy"`` records) evaluate with ``--plugin FILE --task llava_qa``.
"""

from __future__ import annotations

import argparse
from typing import Any

from mm_llama.cli_args import add_eval_args
from mm_llama.plugins import import_plugins

__all__ = ["add_eval_args", "run_eval"]


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Load the checkpoint, evaluate, print a table of the metrics; returns the metrics."""
    from mm_llama.eval.runner import evaluate, metrics_table  # imported here: `--help` stays fast
    from mm_llama.model import MultimodalLM

    import_plugins(args.plugin)  # (already done by `mm-llama`; a no-op then)
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
