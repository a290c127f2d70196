"""Image encoders: Hugging Face vision towers (CLIP, SigLIP, ...), OpenCLIP and timm backbones.

Inputs: a path, bytes, PIL image, numpy array (H, W, C) or tensor (C, H, W); every one becomes an RGB
PIL image and then goes through the backbone's own resizing and normalization. Feature selection
follows LLaVA: take the hidden states of ``select_layer`` (-2: the penultimate layer) and drop the CLS
token (``select_feature="patch"``) or keep it (``"cls_patch"``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPImageProcessor

from mm_llama.encoders.base import ModalityEncoder, read_bytes

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

SelectFeature = Literal["patch", "cls_patch"]
Aspect = Literal["crop", "pad"]


def load_image(item: Any) -> Image.Image:
    """Any supported image input -> an RGB PIL image.

    Accepts a path, bytes, a PIL image, a numpy array (H, W), (H, W, 3|4) of uint8 or floats in [0, 1],
    or a tensor (C, H, W) / (H, W) with values in [0, 1] (floats) or 0..255 (uint8).
    """
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, torch.Tensor):
        arr = item.detach().cpu()
        if arr.ndim == 3:
            arr = arr.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        item = arr.numpy()
    if isinstance(item, np.ndarray):
        arr = item
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image array must be (H, W) or (H, W, 1|3|4), got shape {tuple(arr.shape)}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return Image.fromarray(arr).convert("RGB")
    data, name = read_bytes(item, "image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[float, float, float]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: pad the short side, centred, with the normalization mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(round(c * 255)) for c in fill))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass
class HFVisionOptions:
    """Options of the ``hf_vision`` encoder (transformers vision towers: CLIP, SigLIP, ...)."""

    name_or_path: str | None = None
    """Hub id or local folder of a vision tower or a full CLIP/SigLIP checkpoint (its vision part is used)."""
    config: dict[str, Any] | None = None
    """Build a random tower from this config dict instead, e.g. ``{"model_type": "clip_vision_model",
    "hidden_size": 32, "image_size": 32, "patch_size": 8, ...}``."""
    select_layer: int = -2
    """Which hidden state to take (LLaVA: -2, the penultimate layer)."""
    select_feature: SelectFeature = "patch"
    """``patch``: drop the CLS token (LLaVA's default); ``cls_patch``: keep it."""
    aspect: Aspect = "crop"
    """``crop``: resize + centre crop (CLIP's processor); ``pad``: pad to square first (LLaVA-1.5)."""


class HFVisionEncoder(ModalityEncoder):
    """A transformers vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, ...) as an image encoder."""

    modality = "image"
    Options = HFVisionOptions

    def __init__(self, options: HFVisionOptions) -> None:
        super().__init__(options)
        if (options.name_or_path is None) == (options.config is None):
            raise ValueError("hf_vision encoder: set exactly one of options.name_or_path or options.config")
        if options.config is not None:
            spec = dict(options.config)
            model_type = spec.pop("model_type", "clip_vision_model")
            config = AutoConfig.for_model(model_type, **spec)
            self.tower = AutoModel.from_config(config)
            self.image_processor = _default_processor(config)
            self._pretrained = False
        else:
            source = options.name_or_path
            config = AutoConfig.from_pretrained(source)
            vision_config = getattr(config, "vision_config", config)
            self.tower = _load_tower(source, vision_config)
            self.image_processor = _load_processor(source, vision_config)
            self._pretrained = True
        embeddings = getattr(self.tower, "vision_model", self.tower).embeddings
        self._num_patches = int(embeddings.num_patches)
        self._has_cls = int(embeddings.num_positions) > self._num_patches
        if options.select_feature == "cls_patch" and not self._has_cls:
            raise ValueError(f"{type(self.tower).__name__} has no CLS token; use select_feature='patch'")

    @property
    def output_dim(self) -> int:
        return int(self.tower.config.hidden_size)

    @property
    def is_pretrained(self) -> bool:
        return self._pretrained

    def preprocess(self, item: Any) -> torch.Tensor:
        image = load_image(item)
        if self.options.aspect == "pad":
            image = pad_to_square(image, tuple(self.image_processor.image_mean))
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0]  # (3, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=x.to(self.dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.options.select_layer]  # (B, [1 +] P, D)
        if self._has_cls and self.options.select_feature == "patch":
            hidden = hidden[:, 1:]
        return hidden

    def num_tokens(self, x: torch.Tensor) -> int:
        keep_cls = self._has_cls and self.options.select_feature == "cls_patch"
        return self._num_patches + int(keep_cls)


def _load_tower(source: str, vision_config: Any) -> torch.nn.Module:
    model_cls = AutoModel._model_mapping[type(vision_config)]
    return model_cls.from_pretrained(source, dtype=torch.float32)


def _load_processor(source: str, vision_config: Any) -> Any:
    if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
        return _default_processor(vision_config)
    return AutoImageProcessor.from_pretrained(source)


def _default_processor(vision_config: Any) -> CLIPImageProcessor:
    """CLIP-style resize + centre crop at the tower's resolution, with the family's normalization."""
    size = int(vision_config.image_size)
    siglip = vision_config.model_type.startswith("siglip")
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(SIGLIP_MEAN if siglip else OPENAI_CLIP_MEAN),
        image_std=list(SIGLIP_STD if siglip else OPENAI_CLIP_STD),
    )
