"""Fuyu-style raw patches: an "encoder" without a network, for a linear projector to embed.

Preprocessing keeps the image's aspect ratio: it resizes it to fit ``max_height`` x ``max_width``
(never enlarging it unless ``upscale``), normalizes the pixels and pads the bottom and right edges
to a multiple of the patch size P with ``PAD_VALUE``. ``forward`` cuts the result into P x P x 3
patches in raster order and puts a row-break token after each patch row, so the LLM sees the 2-D
layout at any resolution. Every token has P*P*3 + 1 channels: a patch is its flattened pixels
(row-major, channels last, as Fuyu does) with a last channel of 0; a row break is all zeros with
the last channel set to 1, so the ``linear`` projector learns the row-break embedding as one column
of its weight. The token count depends on the image size: model.encode batches same-size images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mm_llama.encoders.base import MediaPreprocessor, ModalityEncoder
from mm_llama.encoders.image import load_image

FUYU_PATCH_SIZE = 30
FUYU_MAX_HEIGHT = 1080
FUYU_MAX_WIDTH = 1920
FUYU_MEAN = (0.5, 0.5, 0.5)
FUYU_STD = (0.5, 0.5, 0.5)
"""Fuyu-8B's processor: 30 px patches on a 1080 x 1920 canvas, pixels scaled to [-1, 1]."""
PAD_VALUE = 0.0
"""Padding in normalized units (the mean colour), so a padding patch is an all-zero feature."""
CHANNELS = 3
MAX_PIXEL = 255.0


@dataclass
class PatchOptions:
    """Options of the ``patches`` encoder (Fuyu-style raw pixel patches)."""

    patch_size: int = FUYU_PATCH_SIZE
    """P: the side of a square patch, in pixels."""
    max_height: int = FUYU_MAX_HEIGHT
    """Images taller than this are scaled down (aspect ratio kept)."""
    max_width: int = FUYU_MAX_WIDTH
    """Images wider than this are scaled down (aspect ratio kept)."""
    upscale: bool = False
    """Also enlarge smaller images until they touch ``max_height`` or ``max_width``."""
    mean: tuple[float, float, float] = FUYU_MEAN
    """Per-channel mean subtracted from pixels in [0, 1]."""
    std: tuple[float, float, float] = FUYU_STD
    """Per-channel standard deviation that pixels are divided by after the mean is subtracted."""


def fit_size(height: int, width: int, max_height: int, max_width: int, upscale: bool) -> tuple[int, int]:
    """(height, width) scaled by one factor to fit inside max_height x max_width; unchanged when it
    already fits, unless ``upscale``."""
    scale = min(max_height / height, max_width / width)
    if not upscale:
        scale = min(scale, 1.0)
    return max(1, min(max_height, round(height * scale))), max(1, min(max_width, round(width * scale)))


class PatchPreprocessor(MediaPreprocessor):
    """Image -> (3, H, W) normalized pixels, H and W multiples of the patch size (see the module docstring);
    ``rows * (cols + 1)`` tokens."""

    def __init__(self, options: PatchOptions) -> None:
        super().__init__(options)
        p = options.patch_size
        if p < 1:
            raise ValueError(f"patches encoder: options.patch_size must be >= 1, got {p}")
        if options.max_height < p or options.max_width < p:
            raise ValueError(
                f"patches encoder: options.max_height and options.max_width must be >= patch_size={p}, "
                f"got {options.max_height} x {options.max_width}"
            )
        if any(s <= 0 for s in options.std):
            raise ValueError(f"patches encoder: options.std must be positive, got {options.std}")

    def __call__(self, item: Any) -> torch.Tensor:
        o = self.options
        image = load_image(item)
        height, width = fit_size(image.height, image.width, o.max_height, o.max_width, o.upscale)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / MAX_PIXEL).permute(2, 0, 1)
        mean = torch.tensor(o.mean).view(CHANNELS, 1, 1)
        std = torch.tensor(o.std).view(CHANNELS, 1, 1)
        pixels = (pixels - mean) / std  # (3, h, w)
        p = o.patch_size
        padded = torch.full((CHANNELS, -(-height // p) * p, -(-width // p) * p), PAD_VALUE)
        padded[:, :height, :width] = pixels
        return padded  # (3, H, W)

    def num_tokens(self, x: torch.Tensor) -> int:
        p = self.options.patch_size
        return (x.shape[-2] // p) * (x.shape[-1] // p + 1)


class PatchEncoder(ModalityEncoder):
    """Raw pixel patches with row breaks: (B, 3, H, W) -> (B, rows * (cols + 1), P*P*3 + 1)."""

    modality = "image"
    Options = PatchOptions
    Preprocessor = PatchPreprocessor

    def __init__(self, options: PatchOptions) -> None:
        super().__init__(options)
        p = options.patch_size
        row_break = torch.zeros(p * p * CHANNELS + 1)
        row_break[-1] = 1.0
        # A buffer, not a parameter: it tells forward where the model lives and stays out of checkpoints.
        self.register_buffer("row_break", row_break, persistent=False)

    @property
    def output_dim(self) -> int:
        return self.options.patch_size**2 * CHANNELS + 1

    @property
    def is_pretrained(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.row_break.device

    @property
    def dtype(self) -> torch.dtype:
        return self.row_break.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.options.patch_size
        b, c, h, w = x.shape
        if c != CHANNELS or h % p or w % p:
            raise ValueError(
                f"patches encoder: expected (B, {CHANNELS}, H, W) with H and W multiples of {p} "
                f"(the output of preprocess), got {tuple(x.shape)}"
            )
        rows, cols = h // p, w // p
        x = x.to(self.row_break.dtype)
        patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, rows, cols, P, P)
        patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(b, rows, cols, p * p * c)
        flag = patches.new_zeros(b, rows, cols, 1)
        patches = torch.cat([patches, flag], dim=-1)  # (B, rows, cols, D)
        breaks = self.row_break.expand(b, rows, 1, self.output_dim)  # (B, rows, 1, D)
        return torch.cat([patches, breaks], dim=2).reshape(b, rows * (cols + 1), self.output_dim)
