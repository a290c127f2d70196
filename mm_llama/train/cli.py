"""Command-line functions for ``mm-llama train`` and ``mm-llama cache-features`` (the ``mm-llama`` entry
point wires them in; ``python -m mm_llama.train`` runs training alone, e.g. under ``accelerate launch``)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from mm_llama.cli_args import add_cache_args, add_train_args  # defined there: `--help` loads no torch
from mm_llama.data.feature_cache import DEFAULT_BATCH_SIZE, cache_features, frozen_modalities
from mm_llama.plugins import import_plugins
from mm_llama.train.config import TrainConfig, load_train_config
from mm_llama.train.loop import train
from mm_llama.train.stage import build_stage_model

__all__ = ["add_cache_args", "add_train_args", "run_cache_features", "run_train"]


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
        batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
        cache_features(
            model, stage.data, out, stage.data_root, frozen_modalities(model), batch_size, args.dtype
        )
        folders.append(out)
    return folders
