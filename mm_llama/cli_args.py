"""The arguments of every ``mm-llama`` subcommand, kept apart from the code that runs them.

This module is light on purpose: it imports argparse, the modality registry, the ``--plugin`` flag and
the eval task names, nothing that loads torch, transformers or media libraries, so that building the
whole parser (``mm-llama --help``, ``mm-llama train --help``) stays fast. The modules that run the
subcommands (``mm_llama.train.cli``, ``mm_llama.eval.cli``, ``mm_llama.data.toyworld``, ``mm_llama.demo``)
import their argument definitions from here, never the other way round.

Defaults that belong to a heavy module (the toy world's sample counts, the feature cache's batch size)
are ``None`` here and filled in by the function that runs the subcommand; the help text states them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_llama.eval.tasks import TASKS  # light: the task classes and their metrics, no model
from mm_llama.modality import BUILTIN_MODALITIES, modalities
from mm_llama.plugins import add_plugin_arg

CHAT_OPTIONS: frozenset[str] = frozenset({"checkpoint", "media", "temperature", "plugin", "help"})
"""``chat`` options a modality's own flag may not shadow: a modality with one of these names is given
with ``--media NAME=PATH`` only."""


def media_dest(name: str) -> str:
    """Where ``chat --NAME PATH`` stores its paths in the parsed arguments (``image`` -> ``media_image``)."""
    return f"media_{name}"


def add_chat_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--checkpoint DIR``, one ``--NAME PATH`` flag per registered modality (``--image``, ``--audio``,
    ..., and a plugin's, e.g. ``--depth``, once its ``--plugin`` is imported), ``--media NAME=PATH``,
    sampling options and the question."""
    add_plugin_arg(parser)
    parser.add_argument("--checkpoint", required=True, help="a folder written by training or save_pretrained")
    for name in modalities():
        if name in CHAT_OPTIONS:
            continue
        parser.add_argument(
            f"--{name}",
            action="append",
            default=[],
            dest=media_dest(name),
            metavar="PATH",
            help=f"a file of the {name} modality (repeatable)",
        )
    parser.add_argument(
        "--media",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a file of any modality the checkpoint has, e.g. depth=scan.npy for a plugin (repeatable)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument(
        "question", nargs="?", help="the question; markers are added for the media when missing"
    )
    return parser


def add_export_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--checkpoint DIR --out DIR [--format mm_llama|llava-hf]``."""
    add_plugin_arg(parser)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--out", required=True, help="folder for a self-contained copy (LLM with LoRA merged)"
    )
    parser.add_argument(
        "--format",
        choices=["mm_llama", "llava-hf"],
        default="mm_llama",
        help="mm_llama: a checkpoint with llm/ (default); llava-hf: for transformers' "
        "LlavaForConditionalGeneration + AutoProcessor (and vLLM); image models with an hf_vision encoder "
        "and a linear or mlp2x_gelu projector",
    )
    return parser


def add_import_llava_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``SRC --out DIR [--llm NAME] [--vision-tower NAME] [--allow-pickle] [--dtype D]``."""
    parser.add_argument(
        "source",
        help="a llava-hf folder, or a LLaVA-1.5 projector checkpoint (its folder or mm_projector.bin)",
    )
    parser.add_argument("--out", required=True, help="folder for the mm_llama checkpoint")
    parser.add_argument("--llm", help="LLM path or id (default: _name_or_path in LLaVA's config.json)")
    parser.add_argument(
        "--vision-tower", help="vision tower path or id (default: mm_vision_tower in LLaVA's config.json)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a pickle mm_projector.bin (with torch.load(weights_only=True)); refused otherwise",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the LLM's dtype"
    )
    return parser


def add_demo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--checkpoint DIR [--host H] [--port P] [--share]``."""
    add_plugin_arg(parser)
    parser.add_argument("--checkpoint", required=True, help="a folder written by training or save_pretrained")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    return parser


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config FILE [--stages align instruct] [--output-dir DIR] [--no-resume] [--plugin FILE ...]``."""
    parser.add_argument("--config", required=True, type=Path, help="training YAML (see training/configs/)")
    add_plugin_arg(parser)
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="stages to run, in order (default: all)")
    parser.add_argument("--output-dir", help="run folder; overrides output_dir in the config")
    parser.add_argument(
        "--no-resume", action="store_true", help="start the stages over instead of resuming from checkpoints"
    )
    return parser


def add_cache_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config FILE [--stages align] [--out DIR] [--batch-size N] [--dtype float16] [--plugin FILE ...]``."""
    parser.add_argument("--config", required=True, type=Path, help="training YAML whose stage data to cache")
    add_plugin_arg(parser)
    parser.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        help="stages whose data to cache (default: those with feature_cache)",
    )
    parser.add_argument("--out", type=Path, help="cache folder; overrides each stage's feature_cache")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="media per encoder batch (default: 32)",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype (default: the encoder's)"
    )
    return parser


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--checkpoint DIR --task NAME --data PATH [--media-root DIR] [--limit N] ...``."""
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
    return parser


def add_toyworld_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``mm-llama toyworld`` options to ``parser``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, help="train samples per modality (default: 1000)")
    parser.add_argument("--n-val", type=int, help="val samples per modality (default: 100)")
    parser.add_argument("--n-test", type=int, help="test samples per modality (default: 200)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        choices=BUILTIN_MODALITIES,  # the toy world has every built-in modality (toyworld.MODALITIES)
        help="the modalities to generate (default: all)",
    )
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--video-size", type=int, default=64, help="video frame side in pixels (even)")
    parser.add_argument(
        "--single-turn",
        action="store_true",
        help="one question per training record (default: follow-up turns ask every question type)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="processes rendering the media (default: one per usable core; any number gives the same bytes)",
    )
    return parser


def add_realworld_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``mm-llama realworld`` options to ``parser``."""
    parser.add_argument(
        "--config", type=Path, help="the training config (default: training/configs/realworld.yaml)"
    )
    parser.add_argument("--n-images", type=int, help="Fashion-MNIST training images (default: 1500)")
    parser.add_argument("--n-test-images", type=int, help="Fashion-MNIST test images (default: 200)")
    parser.add_argument(
        "--imu-repeats", type=int, help="records per BasicMotions training recording (default: 10)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser
