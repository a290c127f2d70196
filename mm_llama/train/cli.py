"""Command-line functions for ``mm-llama train`` and ``mm-llama cache-features`` (the ``mm-llama`` entry
point wires them in; ``python -m mm_llama.train`` runs training alone, e.g. under ``accelerate launch``)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from mm_llama.data.feature_cache import DEFAULT_BATCH_SIZE, cache_features, frozen_modalities
from mm_llama.plugins import add_plugin_arg, import_plugins
from mm_llama.train.config import TrainConfig, load_train_config
from mm_llama.train.loop import train
from mm_llama.train.stage import build_stage_model


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


def _config(args: argparse.Namespace) -> TrainConfig:
    cfg = load_train_config(args.config)
    if getattr(args, "output_dir", None):
        cfg = replace(cfg, output_dir=args.output_dir)
    if getattr(args, "no_resume", False):
        cfg = replace(cfg, resume=False)
    return cfg


def run_train(args: argparse.Namespace) -> Path:
    """Train as the parsed arguments say; returns the last stage's model folder."""
    import_plugins(args.plugin)
    return train(_config(args), args.stages)


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
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="media per encoder batch")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype (default: the encoder's)"
    )
    return parser


def run_cache_features(args: argparse.Namespace) -> list[Path]:
    """Precompute the frozen encoders' features of the selected stages' data; returns the cache folders.
    (``mm-llama cache-features`` imports the ``--plugin`` files first, in ``mm_llama.cli.main``.)"""
    cfg = load_train_config(args.config)
    names = args.stages or [n for n, s in cfg.stages.items() if s.feature_cache is not None]
    if not names:
        raise ValueError(
            f"{args.config}: no stage sets feature_cache; name the stages with --stages and give --out"
        )
    folders = []
    for name in names:
        if name not in cfg.stages:
            raise ValueError(
                f"{args.config}: unknown stage {name!r}; this config has: {', '.join(cfg.stages)}"
            )
        stage = cfg.stages[name]
        out = args.out or (Path(stage.feature_cache) if stage.feature_cache is not None else None)
        if out is None:
            raise ValueError(f"{args.config}: stages.{name}.feature_cache is not set; pass --out DIR")
        model = build_stage_model(cfg, name)
        model.encoders.to("cuda" if torch.cuda.is_available() else "cpu")
        cache_features(
            model, stage.data, out, stage.data_root, frozen_modalities(model), args.batch_size, args.dtype
        )
        folders.append(out)
    return folders
