"""Add a modality that mm_llama does not ship, depth maps, from your own file; train it; ask it a question.

Run it::

    python examples/new_modality.py --out runs/depth                        # SmolLM2-135M, ~5 min on a CPU
    python examples/new_modality.py --out runs/depth --llm tiny --steps 4   # a random 2-layer LLM, seconds

Importing this file is all a plugin needs: it registers the ``depth`` modality (marker ``<depth>``) and
the ``depth_cnn`` encoder. Running it also writes a toy depth dataset (a box on the left or the right,
near or far, in front of a wall) into ``--out``, writes the training config ``<out>/train.yaml``, trains
the projector and the from-scratch encoder with ``mm_llama.train.train``, loads the result with
``MultimodalLM.from_pretrained`` and asks it about a held-out near box and a held-out far box. The same config
trains from the command line once the plugin is imported::

    mm-llama train --plugin examples/new_modality.py --config runs/depth/train.yaml

See docs/new_modality.md.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mm_llama import (
    EncoderConfig,
    LLMConfig,
    ModalityConfig,
    ModalityEncoder,
    ModelConfig,
    MultimodalLM,
    ProjectorConfig,
    register_encoder,
    register_modality,
)
from mm_llama.config import save_config
from mm_llama.data.dataset import ConversationDataset
from mm_llama.encoders.base import MediaPreprocessor, read_bytes
from mm_llama.llm import load_llm, load_tokenizer
from mm_llama.train import StageConfig, TrainConfig, build_stage_model, train

# ---- the plugin: a modality, a preprocessor and an encoder, two registry lines -------------------------
MIN_DEPTH_M = 0.1
"""The encoder sees inverse depth (1/m, as depth networks such as MiDaS do): near surfaces stand out,
and missing readings (NaN, 0 or negative) become 0, "infinitely far". Closer depths are clipped here."""


@dataclass
class DepthOptions:
    """The ``encoder.options`` of ``depth_cnn``."""

    size: int = 32
    """Maps are resized to ``size`` x ``size`` pixels."""
    width: int = 64
    """D_enc: the width of each output token."""
    grid: int = 4
    """The feature map is pooled to ``grid`` x ``grid`` cells, one token each."""


class DepthPreprocessor(MediaPreprocessor):
    """A ``.npy`` path, bytes or file object, an array or a tensor (H, W) in metres -> (1, size, size) inverse
    depth; ``grid * grid`` tokens. Built from the options alone, so the processor (and DataLoader workers)
    carry it without the network."""

    def __call__(self, item: Any) -> torch.Tensor:
        name = "<depth array>"
        if isinstance(item, (str, Path, bytes, io.IOBase)):
            data, name = read_bytes(item, "depth map")
            item = np.load(io.BytesIO(data), allow_pickle=False)
        depth = torch.as_tensor(np.asarray(item), dtype=torch.float32)  # (H, W)
        if depth.ndim != 2:
            raise ValueError(f"depth map {name}: expected a 2-D (H, W) array, got shape {tuple(depth.shape)}")
        depth = torch.nan_to_num(depth, nan=0.0)
        inverse = torch.where(depth > 0, 1.0 / depth.clamp(min=MIN_DEPTH_M), 0.0)  # (H, W) in 1/m
        size = (self.options.size, self.options.size)
        return F.interpolate(inverse[None, None], size=size, mode="bilinear", align_corners=False)[0]

    def num_tokens(self, x: torch.Tensor) -> int:
        return self.options.grid**2


class DepthEncoder(ModalityEncoder):
    """(B, 1, size, size) inverse depth -> (B, grid * grid, width) tokens: two stride-2 convs, pooling,
    positions."""

    modality = "depth"
    Options = DepthOptions
    Preprocessor = DepthPreprocessor

    def __init__(self, options: DepthOptions) -> None:
        super().__init__(options)
        half = options.width // 2
        self.body = nn.Sequential(
            nn.Conv2d(1, half, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(half, options.width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(options.grid),
        )
        self.position = nn.Parameter(0.02 * torch.randn(options.grid**2, options.width))
        self.norm = nn.LayerNorm(options.width)  # O(1) tokens, whatever the scale of the input

    @property
    def output_dim(self) -> int:
        return self.options.width

    @property
    def is_pretrained(self) -> bool:
        return False  # random weights: trainable by default, saved with the projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.body(x.to(self.dtype))  # (B, width, grid, grid)
        return self.norm(cells.flatten(2).transpose(1, 2) + self.position)  # (B, grid * grid, width)


DEPTH_MARKER = register_modality("depth")  # "<depth>"
register_encoder("depth_cnn", DepthEncoder)

# ---- a toy dataset: a box on the left or the right, near or far, in front of a wall --------------------
MAP_SHAPE = (48, 64)
"""(H, W) pixels of the generated depth maps (the encoder resizes them)."""
NEAR_M, FAR_M, WALL_M = (0.6, 1.5), (2.5, 4.0), (5.0, 8.0)
"""Depth ranges in metres: a near box, a far box, the wall behind."""
NOISE = 0.02
"""Sensor noise, as a fraction of the depth."""
HOLES = 0.01
"""Fraction of pixels without a reading (NaN)."""
NEAR_OR_FAR = "Is the object near or far?"
LEFT_OR_RIGHT = "Is the object on the left or the right?"
DESCRIBE = "Describe the depth map."


def depth_scene(rng: np.random.Generator, side: str, distance: str) -> tuple[np.ndarray, str]:
    """One (H, W) float32 depth map in metres and its caption."""
    width = MAP_SHAPE[1]
    wall = rng.uniform(*WALL_M)
    box = rng.uniform(*(NEAR_M if distance == "near" else FAR_M))
    depth = np.full(MAP_SHAPE, wall)
    top, bottom = rng.integers(6, 16), rng.integers(32, 44)
    left = rng.integers(2, 10) if side == "left" else rng.integers(width // 2 + 2, width // 2 + 10)
    depth[top:bottom, left : left + rng.integers(16, 22)] = box
    depth *= 1.0 + NOISE * rng.standard_normal(MAP_SHAPE)
    depth[rng.random(MAP_SHAPE) < HOLES] = np.nan
    caption = f"A {distance} box on the {side}, about {round(box)} m away, in front of a wall."
    return depth.astype(np.float32), caption


def write_depth_world(root: Path, n_train: int, n_eval: int, seed: int = 0) -> dict[str, Path]:
    """Depth maps (``maps/*.npy``) and LLaVA-format ``train.json`` / ``eval.json``: three records per map
    (a caption, near or far, left or right). Returns the two data files by split name."""
    rng = np.random.default_rng(seed)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for i in range(n_train + n_eval):
        split = "train" if i < n_train else "eval"
        side, distance = ("left", "right")[i % 2], ("near", "far")[(i // 2) % 2]
        depth, caption = depth_scene(rng, side, distance)
        path = f"maps/{split}_{i:04d}.npy"
        np.save(root / path, depth)
        for kind, question, answer in (
            ("caption", DESCRIBE, caption),
            ("distance", NEAR_OR_FAR, f"{distance.capitalize()}."),
            ("side", LEFT_OR_RIGHT, f"{side.capitalize()}."),
        ):
            turns = [
                {"from": "human", "value": f"{DEPTH_MARKER}\n{question}"},
                {"from": "gpt", "value": answer},
            ]
            splits[split].append({"id": f"{i:04d}-{kind}", "depth": path, "conversations": turns})
    files = {split: root / f"{split}.json" for split in splits}
    for split, records in splits.items():
        files[split].write_text(json.dumps(records, indent=1))
    return files


# ---- the model, its training config, a loss to compare -------------------------------------------------
SEED = 0
SYSTEM_PROMPT = "Answer briefly."
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
"""``--llm tiny``: a random 2-layer Llama (as in the tests), with SmolLM2's tokenizer."""
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 1e-2, "steps": 4, "n_train": 16},
    "smollm2-135m": {"lr": 3e-3, "steps": 200, "n_train": 64},
}
"""Per LLM: the learning rate of the projector and the encoder, default steps, training maps."""
N_EVAL = 8
BATCH_SIZE = 8


def tiny_llm(folder: Path) -> LLMConfig:
    """Build the tiny random LLM with ``LLMConfig(from_config=...)`` and save it, with its tokenizer, as a
    transformers folder: a checkpoint refers to its LLM by id or path, so ``from_pretrained`` needs one."""
    spec = LLMConfig(from_config=dict(TINY_LLAMA))
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(SEED)
    load_llm(spec, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return LLMConfig(name_or_path=str(folder.resolve()))


def depth_train_config(llm: LLMConfig, data: Path, output_dir: Path, steps: int, lr: float) -> TrainConfig:
    """One stage that trains the depth projector and encoder (the LLM frozen) on ``data``."""
    depth = ModalityConfig(
        encoder=EncoderConfig(type="depth_cnn", options={"size": 32, "width": 64, "grid": 4}),
        projector=ProjectorConfig(type="mlp2x_gelu"),
    )
    model = ModelConfig(llm=llm, modalities={"depth": depth}, system_prompt=SYSTEM_PROMPT)
    stage = StageConfig(
        data=[str(data.resolve())],
        llm="frozen",
        lr=lr,
        batch_size=BATCH_SIZE,
        micro_batch_size=BATCH_SIZE,
        max_steps=steps,
        warmup_ratio=0.0,
        log_every=1,
    )
    return TrainConfig(
        model=model, stages={"align": stage}, output_dir=str(output_dir.resolve()), seed=SEED, resume=False
    )


@torch.no_grad()
def mean_loss(model: MultimodalLM, data: Path) -> float:
    """The mean answer-token loss of ``model`` over the records of ``data``, in one batch."""
    model.eval()
    records = ConversationDataset(data, model.processor)
    batch = model.processor.collate([records[i] for i in range(len(records))])
    return float(model(**batch).loss)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/depth"), help="folder for data, config, run")
    parser.add_argument("--llm", choices=list(SETTINGS), default="smollm2-135m")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 4 for tiny, 200 for SmolLM2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = SETTINGS[args.llm]

    files = write_depth_world(args.out / "data", settings["n_train"], N_EVAL, seed=SEED)
    llm = tiny_llm(args.out / "tiny_llm") if args.llm == "tiny" else LLMConfig(name_or_path=args.llm)
    steps = args.steps or settings["steps"]
    cfg = depth_train_config(llm, files["train"], args.out / "run", steps, settings["lr"])
    save_config(cfg, args.out / "train.yaml")  # the same run from the command line: see the docstring

    before = mean_loss(build_stage_model(cfg, "align"), files["eval"])  # the weights training starts from
    checkpoint = train(cfg)
    model = MultimodalLM.from_pretrained(checkpoint).eval()  # needs the plugin registered: it is, above
    after = mean_loss(model, files["eval"])

    print(f"eval loss before training: {before:.4f}")
    print(f"eval loss after training: {after:.4f}")
    print(f"checkpoint: {checkpoint}")
    questions = [r for r in json.loads(files["eval"].read_text()) if r["id"].endswith("-distance")]
    for expected in ("Near.", "Far."):  # one held-out map of each kind
        record = next(r for r in questions if r["conversations"][1]["value"] == expected)
        depth_map = files["eval"].parent / record["depth"]
        answer = model.generate(
            f"{DEPTH_MARKER}\n{NEAR_OR_FAR}", media={"depth": [depth_map]}, max_new_tokens=8
        )
        print(f"question: {NEAR_OR_FAR} ({record['depth']}; expected: {expected})")
        print(f"answer: {answer}")


if __name__ == "__main__":
    main()
