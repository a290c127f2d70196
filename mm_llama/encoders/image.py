"""Image encoders: Hugging Face vision towers (CLIP, SigLIP, ...), OpenCLIP and timm backbones.

Inputs: a path, bytes, PIL image, numpy array (H, W, C) or tensor (C, H, W); every one becomes an RGB
PIL image and then goes through the backbone's own resizing and normalization. Feature selection
follows LLaVA: take the hidden states of ``select_layer`` (-2: the penultimate layer) and drop the CLS
token (``select_feature="patch"``) or keep it (``"cls_patch"``).

``select_layer`` indexes the hidden states the LLaVA way, ``[embeddings, block 1, ..., block L]``:
-1 is the last block's output, -2 the penultimate one, ``i`` (1..L) block ``i``'s. The OpenCLIP and timm
backends read block outputs through their libraries' ``forward_intermediates``, so they offer blocks
only (not index 0, the embeddings), and they never download anything: weights come from local files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tempfile
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import open_clip
import timm
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPImageProcessor
from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

from mm_llama.encoders.base import MediaPreprocessor, ModalityEncoder, load_weights, read_bytes
from mm_llama.errors import MissingInputError, MMInputError
from mm_llama.hub import load_pretrained

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
PROBE_SIDE = 64
"""Side of the blank image pushed through a backbone's transform to learn the input size it makes."""
OPEN_CLIP_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
"""Keys every open_clip model config holds (see open_clip's ``model_configs/*.json``)."""
CHECKPOINT_ERRORS = (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError)
"""What torch / safetensors raise on a checkpoint file that is corrupt or does not fit the model."""

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
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MMInputError(
            f"image {name}: not an image file that PIL can read (PNG, JPEG, WebP, ...): {type(e).__name__}"
        ) from e
    limit = max_image_pixels()
    if image.width * image.height > limit:
        raise MMInputError(
            f"image {name}: {image.width} x {image.height} pixels, more than the limit of {limit:,} "
            f"(raise it with {MAX_PIXELS_ENV}=N if you mean it; decoding it would take "
            f"{image.width * image.height * 4 / 2**20:,.0f} MB)"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise MMInputError(f"image {name}: the file is damaged or truncated ({e})") from e
    return image.convert("RGB")


MAX_PIXELS_ENV = "MM_LLAMA_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000
"""Images larger than this (width x height, read from the header) are refused before decoding."""


def max_image_pixels() -> int:
    """The pixel limit: ``$MM_LLAMA_MAX_IMAGE_PIXELS`` or ``DEFAULT_MAX_PIXELS``."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise MMInputError(f"{MAX_PIXELS_ENV}: expected a positive whole number of pixels, got {value!r}")
    return int(value)


def pad_to_square(image: Image.Image, fill: tuple[float, float, float]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: pad the short side, centred, with the normalization mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(c * 255) for c in fill))  # LLaVA truncates too
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
    image_processor: dict[str, Any] | None = None
    """A transformers image processor's settings (its ``to_dict()``, with ``image_processor_type``) to use
    instead of the checkpoint's own or CLIP's defaults: how an imported llava-hf model keeps its resizing
    and normalization."""


def hf_tower_config(options: HFVisionOptions) -> Any:
    """The tower's transformers config: built from ``options.config``, or read from the checkpoint's
    ``config.json`` (its ``vision_config`` for a full CLIP / SigLIP checkpoint)."""
    if (options.name_or_path is None) == (options.config is None):
        raise ValueError("hf_vision encoder: set exactly one of options.name_or_path or options.config")
    if options.config is not None:
        spec = dict(options.config)
        model_type = spec.pop("model_type", "clip_vision_model")
        return AutoConfig.for_model(model_type, **spec)
    config = load_pretrained(options.name_or_path, "hf_vision encoder", AutoConfig.from_pretrained)
    return getattr(config, "vision_config", config)


class HFVisionPreprocessor(MediaPreprocessor):
    """The checkpoint's image processor (a folder without one, or a random tower: CLIP's resize + centre crop
    at the tower's resolution with the family's normalization), after LLaVA-1.5's padding with
    ``aspect: pad``: (3, H, W). Patches and CLS come from the tower's embeddings, built on the meta device."""

    def __init__(self, options: HFVisionOptions) -> None:
        super().__init__(options)
        config = hf_tower_config(options)
        if options.image_processor is not None:
            self.image_processor = image_processor_from_dict(options.image_processor)
        elif options.config is not None:
            self.image_processor = _default_processor(config)
        else:
            self.image_processor = _load_processor(options.name_or_path, config)
        with torch.device("meta"):  # shapes only: no weights, nothing read
            tower = AutoModel.from_config(config)
        embeddings = getattr(tower, "vision_model", tower).embeddings
        self.num_patches = int(embeddings.num_patches)
        self.has_cls = int(embeddings.num_positions) > self.num_patches
        if options.select_feature == "cls_patch" and not self.has_cls:
            raise ValueError(f"{type(tower).__name__} has no CLS token; use select_feature='patch'")
        num_blocks = int(config.num_hidden_layers)
        if not -(num_blocks + 1) <= options.select_layer <= num_blocks:
            raise ValueError(
                f"hf_vision encoder: options.select_layer={options.select_layer} is out of range for a tower "
                f"with {num_blocks} blocks: use -1..-{num_blocks + 1} or 0..{num_blocks} (0: the embeddings)"
            )
        self.run_blocks = options.select_layer % (num_blocks + 1)
        """How many blocks the selected hidden state needs (0: the embeddings); the ones after it never run."""

    def __call__(self, item: Any) -> torch.Tensor:
        image = load_image(item)
        if self.options.aspect == "pad":
            image = pad_to_square(image, tuple(self.image_processor.image_mean))
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0]  # (3, H, W)

    def num_tokens(self, x: torch.Tensor) -> int:
        return self.num_patches + int(self.options.select_feature == "cls_patch")


class HFVisionEncoder(ModalityEncoder):
    """A transformers vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, ...) as an image encoder."""

    modality = "image"
    Options = HFVisionOptions
    Preprocessor = HFVisionPreprocessor

    def __init__(self, options: HFVisionOptions) -> None:
        super().__init__(options)
        config = hf_tower_config(options)
        if options.config is not None:
            self.tower = AutoModel.from_config(config)
        else:
            self.tower = _load_tower(options.name_or_path, config)
        self._blocks_at = _block_list(self.tower, int(config.num_hidden_layers))

    @property
    def output_dim(self) -> int:
        return int(self.tower.config.hidden_size)

    @property
    def is_pretrained(self) -> bool:
        return self.options.name_or_path is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self._selected_hidden_state(x.to(self.dtype))  # (B, [1 +] P, D)
        if self.preprocessor.has_cls and self.options.select_feature == "patch":
            hidden = hidden[:, 1:]
        return hidden

    def _selected_hidden_state(self, x: torch.Tensor) -> torch.Tensor:
        """``hidden_states[select_layer]``, running the tower's blocks only up to it (LLaVA's penultimate
        layer: all but the last block), the way prismatic-vlms cuts its towers: a hook on the selected
        block takes its output and stops the forward there. The tower is never changed, so transformers'
        own output hooks and any other caller still see every block. Towers whose blocks are not one
        ModuleList run whole, and so does select_layer 0 (the embeddings)."""
        run_blocks = self.preprocessor.run_blocks
        if self._blocks_at is None or run_blocks == 0:
            out = self.tower(pixel_values=x, output_hidden_states=True)
            return out.hidden_states[self.options.select_layer]
        block = self.tower.get_submodule(self._blocks_at)[run_blocks - 1]
        taken: list[torch.Tensor] = []

        def take(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            taken.append(output[0] if isinstance(output, tuple) else output)
            raise _TowerStop

        handle = block.register_forward_hook(take)
        try:
            self.tower(pixel_values=x)
        except _TowerStop:
            pass
        finally:
            handle.remove()
        return taken[0]


class _TowerStop(Exception):
    """Raised by the hook on the selected block: the rest of the tower is not needed."""


def _block_list(tower: torch.nn.Module, num_blocks: int) -> str | None:
    """The dotted name of the tower's transformer blocks (the one ``ModuleList`` of ``num_blocks``), or
    None when there is not exactly one."""
    found = [
        name
        for name, module in tower.named_modules()
        if name and isinstance(module, torch.nn.ModuleList) and len(module) == num_blocks
    ]
    return found[0] if len(found) == 1 else None


def _load_tower(source: str, vision_config: Any) -> torch.nn.Module:
    model_cls = AutoModel._model_mapping[type(vision_config)]
    return load_pretrained(source, "hf_vision encoder", model_cls.from_pretrained, dtype=torch.float32)


def _load_processor(source: str, vision_config: Any) -> Any:
    if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
        return _default_processor(vision_config)
    return load_pretrained(source, "hf_vision image processor", AutoImageProcessor.from_pretrained)


def image_processor_from_dict(settings: dict[str, Any]) -> Any:
    """The transformers image processor that ``settings`` (a processor's ``to_dict()``) describe."""
    name = settings.get("image_processor_type")
    cls = get_image_processor_class_from_name(name) if isinstance(name, str) else None
    if cls is None:
        raise MMInputError(
            "hf_vision encoder: options.image_processor.image_processor_type must name a transformers image "
            f"processor class (e.g. 'CLIPImageProcessor'), got {name!r}"
        )
    return cls.from_dict(settings)


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


# ---- OpenCLIP and timm backbones ------------------------------------------------------------------------
Intermediate = tuple[torch.Tensor, torch.Tensor | None]
"""One block's output: the spatial map (B, C, H', W') and the prefix tokens (B, P, C) when asked for."""


def block_index(select_layer: int, num_blocks: int, where: str) -> int:
    """LLaVA's hidden-state index (``[embeddings, block 1, ..., block L]``) -> a 0-based block index."""
    block = num_blocks + select_layer if select_layer < 0 else select_layer - 1
    if not 0 <= block < num_blocks:
        raise ValueError(
            f"{where}: options.select_layer={select_layer} is out of range for a backbone with {num_blocks} "
            f"blocks: use -1..-{num_blocks} (from the last block) or 1..{num_blocks}; 0 (the patch embeddings) "
            "is not available in this backend"
        )
    return block


def local_checkpoint(value: str, field_name: str, where: str, allow_pickle: bool = False) -> str:
    """The absolute path of an existing local weights file; anything else raises (nothing is downloaded).
    A file that is not safetensors (``.pt``, ``.pth``, ``.bin``: pickles) is refused unless the user set
    ``allow_pickle`` (the libraries then read it with ``torch.load(weights_only=True)``)."""
    path = Path(value).expanduser()
    if not path.is_file():
        found = "a folder" if path.is_dir() else "nothing"
        raise MissingInputError(
            f"{where}: options.{field_name} must be an existing local weights file, found {found} at {path}; "
            "this encoder never downloads weights (hub tags and ids are not accepted)"
        )
    if path.suffix != ".safetensors" and not allow_pickle:
        raise MMInputError(
            f"{where}: options.{field_name} {path} is a pickle-based file ({path.suffix or 'no suffix'}), "
            "which can run code when read; convert it to .safetensors, or set options.allow_pickle: true "
            "to read it (with torch.load(weights_only=True))"
        )
    return str(path.resolve())


def reject_remote_name(model_name: str, where: str) -> None:
    """Refuse schema names (``hf-hub:...``, ``local-dir:...``): the encoders take an architecture name and,
    for weights, a local file, so that nothing is ever fetched."""
    if ":" in model_name:
        raise ValueError(
            f"{where}: options.model_name must be a plain architecture name, got {model_name!r}; schema "
            "prefixes such as 'hf-hub:' are not accepted: give the weights as a local file (this encoder "
            "never downloads anything)"
        )


def has_cls_token(backbone: nn.Module) -> bool:
    """Whether a ViT-style backbone prepends a CLS token (timm: ``cls_token``; OpenCLIP: ``class_embedding``)."""
    return getattr(backbone, "cls_token", None) is not None or hasattr(backbone, "class_embedding")


class IntermediatesPreprocessor(MediaPreprocessor):
    """Shared by the ``open_clip`` and ``timm`` preprocessors: the library's eval transform (any image ->
    (3, H, W)), the validated block, and token counts from a shape-only pass of the backbone built on the meta
    device (no weights, no file read), cached per input shape.

    A subclass builds that weightless backbone and the transform (``build``), reads block outputs with its
    library's ``forward_intermediates`` (``take``, which the encoder runs on its real backbone too) and says
    whether the backbone has a CLS token (``cls_token``)."""

    where: ClassVar[str]
    """The encoder's name in error messages."""

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        backbone, self.transform = self.build()
        self.keep_cls = options.select_feature == "cls_patch"
        if self.keep_cls and not self.cls_token(backbone):
            raise ValueError(
                f"{self.where}: {options.model_name!r} has no CLS token, so options.select_feature must be "
                "'patch', got 'cls_patch'"
            )
        probe = self(Image.new("RGB", (PROBE_SIDE, PROBE_SIDE)))  # (3, H, W), the size every image gets
        maps = self.take(backbone, probe.to("meta").unsqueeze(0), None, False)
        self.block = block_index(options.select_layer, len(maps), self.where)
        self.width = int(maps[self.block][0].shape[1])  # D_enc: the selected block's channels
        self._backbone: nn.Module | None = backbone
        self._counts: dict[tuple[int, ...], int] = {}
        self.num_tokens(probe)

    @abstractmethod
    def build(self) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor]]:
        """The backbone on the meta device in eval mode (batch norm refuses a batch of one in training mode)
        and the library's eval transform; raises on options that name no buildable model."""

    @staticmethod
    @abstractmethod
    def take(
        backbone: nn.Module, x: torch.Tensor, indices: list[int] | None, keep_cls: bool
    ) -> list[Intermediate]:
        """(B, 3, H, W) -> the outputs of blocks ``indices`` (all when None), with prefix tokens if asked."""

    @staticmethod
    @abstractmethod
    def cls_token(backbone: nn.Module) -> bool:
        """Whether the backbone puts a CLS token before its patches."""

    def __call__(self, item: Any) -> torch.Tensor:
        return self.transform(load_image(item))  # (3, H, W)

    def num_tokens(self, x: torch.Tensor) -> int:
        shape = tuple(x.shape)
        if shape not in self._counts:
            if self._backbone is None:  # after unpickling
                self._backbone = self.build()[0]
            probe = torch.empty((1, *shape), device="meta")
            spatial, _ = self.take(self._backbone, probe, [self.block], False)[0]  # (1, C, H', W')
            self._counts[shape] = int(spatial.shape[2] * spatial.shape[3]) + int(self.keep_cls)
        return self._counts[shape]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_backbone"] = None  # a module, even a weightless one, does not travel; rebuilt when needed
        return state


class IntermediatesEncoder(ModalityEncoder):
    """Shared body of the ``open_clip`` and ``timm`` encoders: a subclass builds ``self.backbone`` (with its
    weights); the preprocessor picked the block and reads it (``take``)."""

    modality = "image"
    Preprocessor: ClassVar[type[IntermediatesPreprocessor]]

    @property
    def output_dim(self) -> int:
        return self.preprocessor.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preprocessor
        spatial, prefix = pre.take(self.backbone, x.to(self.dtype), [pre.block], pre.keep_cls)[0]
        tokens = spatial.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'W', C), row-major patches
        if pre.keep_cls:
            tokens = torch.cat([prefix[:, :1], tokens], dim=1)  # (B, 1 + H'W', C): CLS first, as in the ViT
        return tokens


@dataclass
class OpenCLIPOptions:
    """Options of the ``open_clip`` encoder (the vision tower of an OpenCLIP model)."""

    model_name: str
    """An OpenCLIP architecture (``open_clip.list_models()``, e.g. ``ViT-L-14-336``), or the name under which
    ``model_config`` is registered."""
    pretrained: str | None = None
    """A local checkpoint file (``.safetensors``, ``.pt``, ``.bin``) of the whole OpenCLIP model; ``None``:
    random weights. Never a pretrained tag: nothing is downloaded."""
    allow_pickle: bool = False
    """Read a ``.pt`` / ``.bin`` (pickle) ``pretrained`` file; refused otherwise."""
    pretrained_tag: str | None = None
    """The open_clip tag that file was published under (``open_clip.list_pretrained_tags_by_model``), e.g.
    ``openai`` or ``webli``: applies that tag's preprocessing (mean, std, interpolation, resize mode) and
    QuickGELU from open_clip's table, which a bare file does not carry. ``None``: open_clip's defaults
    (OpenAI CLIP's mean and std, GELU)."""
    model_config: dict[str, Any] | None = None
    """A custom architecture, registered with open_clip as ``model_name``: ``embed_dim``, ``vision_cfg``,
    ``text_cfg`` as in open_clip's ``model_configs/*.json``. Its text tower is built (a checkpoint holds it)
    and dropped."""
    select_layer: int = -2
    """Which block's output to take (LLaVA: -2, the penultimate block)."""
    select_feature: SelectFeature = "patch"
    """``patch``: drop the CLS token; ``cls_patch``: keep it (ViT towers only)."""


def register_open_clip_config(name: str, config: dict[str, Any], where: str) -> None:
    """Make ``config`` an open_clip architecture called ``name``; re-registering the same config is a no-op."""
    missing = [k for k in OPEN_CLIP_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"{where}: options.model_config lacks {', '.join(missing)}; an open_clip model config holds "
            f"{', '.join(OPEN_CLIP_CONFIG_KEYS)}"
        )
    config = json.loads(json.dumps(config))  # the form open_clip stores (tuples -> lists)
    known = open_clip.get_model_config(name)
    if known == config:
        return
    if known is not None:
        raise ValueError(
            f"{where}: open_clip already knows an architecture {name!r} with a different config; give "
            "options.model_config a new options.model_name"
        )
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / f"{name}.json"
        file.write_text(json.dumps(config))
        open_clip.add_model_config(file)  # reads the file now; the registry keeps the config


def open_clip_tag_settings(model_name: str, tag: str, where: str) -> dict[str, Any]:
    """The ``create_model_and_transforms`` arguments an open_clip pretrained tag implies: its preprocessing
    and QuickGELU, read from open_clip's table (nothing is downloaded)."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise ValueError(
            f"{where}: options.pretrained_tag={tag!r} is not an open_clip tag of {model_name!r}; its tags: "
            f"{open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    return {
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"),
        "image_resize_mode": cfg.get("resize_mode"),
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
    }


def open_clip_settings(options: OpenCLIPOptions, where: str) -> dict[str, Any]:
    """Check the architecture (registering ``model_config``) and return the extra arguments of
    ``create_model_and_transforms`` that ``pretrained_tag`` implies (none without a tag)."""
    reject_remote_name(options.model_name, where)
    if options.model_config is not None:
        register_open_clip_config(options.model_name, options.model_config, where)
    elif options.model_name not in open_clip.list_models():
        raise ValueError(
            f"{where}: unknown open_clip architecture {options.model_name!r}; see open_clip.list_models(), "
            "or describe a custom one in options.model_config"
        )
    if options.pretrained_tag is None:
        return {}
    return open_clip_tag_settings(options.model_name, options.pretrained_tag, where)


def _not_a_random_init_notice(record: logging.LogRecord) -> bool:
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" for a weightless build."""
    return not record.getMessage().startswith("No pretrained weights loaded")


class OpenCLIPPreprocessor(IntermediatesPreprocessor):
    """open_clip's eval transform for the architecture (and ``pretrained_tag``); counts from a meta build."""

    where = "open_clip encoder"

    def build(self) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor]]:
        settings = open_clip_settings(self.options, self.where)
        root = logging.getLogger()  # open_clip logs to the root logger
        root.addFilter(_not_a_random_init_notice)
        try:
            with torch.device("meta"):
                model, _, transform = open_clip.create_model_and_transforms(
                    self.options.model_name, pretrained=None, pretrained_text=False, device="meta", **settings
                )
        finally:
            root.removeFilter(_not_a_random_init_notice)
        return model.visual.eval(), transform

    @staticmethod
    def take(
        backbone: nn.Module, x: torch.Tensor, indices: list[int] | None, keep_cls: bool
    ) -> list[Intermediate]:
        out = backbone.forward_intermediates(
            x, indices=indices, stop_early=True, intermediates_only=True, output_extra_tokens=keep_cls
        )
        spatial = out["image_intermediates"]  # per block: (B, C, H', W')
        prefix = out.get("image_intermediates_prefix", [None] * len(spatial))  # per block: (B, P, C)
        return list(zip(spatial, prefix))

    @staticmethod
    def cls_token(backbone: nn.Module) -> bool:
        return has_cls_token(getattr(backbone, "trunk", backbone))  # timm-based towers wrap a trunk


class OpenCLIPEncoder(IntermediatesEncoder):
    """The vision tower of an OpenCLIP model (ViT, timm-based ViT such as SigLIP, or ModifiedResNet)."""

    Options = OpenCLIPOptions
    Preprocessor = OpenCLIPPreprocessor

    def __init__(self, options: OpenCLIPOptions) -> None:
        super().__init__(options)
        where = self.preprocessor.where
        settings = open_clip_settings(options, where)
        checkpoint = None
        if options.pretrained is not None:
            checkpoint = local_checkpoint(options.pretrained, "pretrained", where, options.allow_pickle)
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                options.model_name, pretrained=checkpoint, pretrained_text=False, **settings
            )
        except CHECKPOINT_ERRORS as e:
            if checkpoint is None:
                raise
            raise ValueError(
                f"{where}: cannot load {checkpoint} into open_clip {options.model_name!r} (expected a checkpoint "
                f"of that whole model): {e}"
            ) from e
        self.backbone = model.visual

    @property
    def is_pretrained(self) -> bool:
        return self.options.pretrained is not None


@dataclass
class TimmOptions:
    """Options of the ``timm`` encoder (any timm backbone with ``forward_intermediates``)."""

    model_name: str
    """A timm model, optionally with a pretrained tag that picks its preprocessing config, e.g.
    ``vit_large_patch14_clip_336.openai`` (``timm.list_models()``)."""
    pretrained_file: str | None = None
    """A local weights file (``.safetensors``, ``.pth``, ``.bin``) in timm's format for that model, classifier
    head included when the model has one (set ``model_kwargs.num_classes`` to the file's head size; 0 for
    none); ``None``: random weights. Nothing is downloaded."""
    allow_pickle: bool = False
    """Read a ``.pth`` / ``.bin`` (pickle) ``pretrained_file``; refused otherwise."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``timm.create_model``, e.g. ``{"img_size": 32, "patch_size": 8, "depth": 2}``."""
    select_layer: int = -2
    """Which block's output to take (LLaVA: -2, the penultimate block)."""
    select_feature: SelectFeature = "patch"
    """``patch``: drop the CLS token (and any register tokens); ``cls_patch``: keep the CLS token."""


def timm_arguments(options: TimmOptions, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the model name; ``timm.create_model``'s keyword arguments and its ``pretrained_cfg_overlay``
    (the input size the model is built for, so that the preprocessing config follows it)."""
    reject_remote_name(options.model_name, where)
    if not timm.is_model(options.model_name):
        raise ValueError(f"{where}: unknown timm model {options.model_name!r}; see timm.list_models()")
    kwargs = dict(options.model_kwargs)
    overlay: dict[str, Any] = {}
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        overlay["input_size"] = (3, *(size if isinstance(size, (list, tuple)) else (size, size)))
    return kwargs, overlay


class TimmPreprocessor(IntermediatesPreprocessor):
    """timm's eval transform from the model's pretrained config (at ``img_size``); counts from a meta build."""

    where = "timm encoder"

    def build(self) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor]]:
        name = self.options.model_name
        kwargs, overlay = timm_arguments(self.options, self.where)
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
        except TypeError as e:
            raise ValueError(f"{self.where}: options.model_kwargs do not fit {name!r}: {e}") from e
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{self.where}: timm {name!r} has no forward_intermediates; pick another")
        transform = timm.data.create_transform(
            **timm.data.resolve_model_data_config(model), is_training=False
        )
        return model.eval(), transform

    @staticmethod
    def take(
        backbone: nn.Module, x: torch.Tensor, indices: list[int] | None, keep_cls: bool
    ) -> list[Intermediate]:
        if not keep_cls:  # per block: (B, C, H', W')
            maps = backbone.forward_intermediates(
                x, indices=indices, stop_early=True, intermediates_only=True
            )
            return [(m, None) for m in maps]
        return backbone.forward_intermediates(  # per block: ((B, C, H', W'), (B, P, C))
            x, indices=indices, stop_early=True, intermediates_only=True, return_prefix_tokens=True
        )

    @staticmethod
    def cls_token(backbone: nn.Module) -> bool:
        return has_cls_token(backbone)


class TimmEncoder(IntermediatesEncoder):
    """A timm backbone (ViT, EVA, DeiT, ConvNeXt, ...) as an image encoder."""

    Options = TimmOptions
    Preprocessor = TimmPreprocessor

    def __init__(self, options: TimmOptions) -> None:
        super().__init__(options)
        where = self.preprocessor.where
        kwargs, overlay = timm_arguments(options, where)
        checkpoint = None
        if options.pretrained_file is not None:
            checkpoint = local_checkpoint(
                options.pretrained_file, "pretrained_file", where, options.allow_pickle
            )
            overlay["file"] = checkpoint
            if "num_classes" in kwargs:  # timm loads strictly only when the file's head matches the model's
                overlay["num_classes"] = kwargs["num_classes"]
        try:
            self.backbone = timm.create_model(
                options.model_name,
                pretrained=checkpoint is not None,
                pretrained_cfg_overlay=overlay,
                **kwargs,
            )
        except CHECKPOINT_ERRORS as e:
            if checkpoint is None:
                raise
            raise ValueError(
                f"{where}: cannot load {checkpoint} into timm {options.model_name!r} with model_kwargs "
                f"{options.model_kwargs}: {e}"
            ) from e

    @property
    def is_pretrained(self) -> bool:
        return self.options.pretrained_file is not None


@dataclass
class ConvImageOptions:
    """Options of the ``image_cnn`` encoder: a small CNN built from scratch (no pretrained weights needed)."""

    image_size: int = 64
    """Square input side in pixels; images are resized to it (aspect ratio not kept)."""
    channels: tuple[int, ...] = (32, 64, 128)
    """Output channels of the stride-2 3x3 convolution stages; the last is D_enc."""
    blocks: int = 1
    """Convolutions per stage: the stride-2 one, then ``blocks - 1`` residual stride-1 3x3 blocks (more
    depth to tell shapes apart at the same resolution)."""
    grid: int | None = 4
    """Average-pool the feature map to ``grid x grid`` tokens; ``None`` keeps every cell."""
    coords: bool = True
    """Append x/y coordinate channels to the input (CoordConv), so pooled tokens can still say where."""
    weights: str | None = None
    """A safetensors file of this encoder's ``state_dict``; the encoder then counts as pretrained."""


class ConvImagePreprocessor(MediaPreprocessor):
    """Resize to ``image_size`` x ``image_size`` (bilinear, aspect not kept), pixels scaled to [-1, 1]:
    (3, S, S); ``grid`` x ``grid`` tokens, or one per cell of the last stage's map (S halved per stage)."""

    MEAN = 0.5
    STD = 0.5

    def __init__(self, options: ConvImageOptions) -> None:
        super().__init__(options)
        if not options.channels:
            raise ValueError("image_cnn encoder: options.channels must list at least one stage")
        side = options.image_size
        for _ in options.channels:
            side = (side + 1) // 2
        if options.grid is not None and options.grid > side:
            raise ValueError(
                f"image_cnn encoder: options.grid ({options.grid}) exceeds the feature map side ({side})"
            )
        self.side = options.grid or side  # tokens per side of the output grid

    def __call__(self, item: Any) -> torch.Tensor:
        image = load_image(item).resize((self.options.image_size,) * 2, Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        return (pixels - self.MEAN) / self.STD

    def num_tokens(self, x: torch.Tensor) -> int:
        return self.side * self.side


class _ResidualConv(nn.Module):
    """x + GELU(GroupNorm(Conv3x3(x))): a stride-1 block of ``image_cnn`` (same shape in and out)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(1, channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.conv(x)))


class ConvImageEncoder(ModalityEncoder):
    """[pixels; x, y] -> stride-2 conv stages (GroupNorm + GELU) -> grid pooling -> a learned position per cell.

    For laptops and toy worlds: it learns in minutes on a CPU, where a ViT from scratch would not."""

    modality = "image"
    Options = ConvImageOptions
    Preprocessor = ConvImagePreprocessor

    def __init__(self, options: ConvImageOptions) -> None:
        super().__init__(options)
        layers: list[nn.Module] = []
        in_ch = 5 if options.coords else 3
        if options.blocks < 1:
            raise ValueError(f"image_cnn encoder: options.blocks must be >= 1, got {options.blocks}")
        for ch in options.channels:
            layers += [nn.Conv2d(in_ch, ch, 3, stride=2, padding=1), nn.GroupNorm(1, ch), nn.GELU()]
            layers += [_ResidualConv(ch) for _ in range(options.blocks - 1)]
            in_ch = ch
        self.body = nn.Sequential(*layers)
        side = self.preprocessor.side
        self.position = nn.Parameter(torch.zeros(side * side, in_ch))
        nn.init.normal_(self.position, std=0.02)
        if options.weights is not None:
            load_weights(self, options.weights, "image_cnn encoder (options.weights)")

    @property
    def output_dim(self) -> int:
        return int(self.options.channels[-1])

    @property
    def is_pretrained(self) -> bool:
        return self.options.weights is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)  # (B, 3, H, W)
        if self.options.coords:
            b, _, h, w = x.shape
            ys = (
                torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
                .view(1, 1, h, 1)
                .expand(b, 1, h, w)
            )
            xs = (
                torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
                .view(1, 1, 1, w)
                .expand(b, 1, h, w)
            )
            x = torch.cat([x, xs, ys], dim=1)  # (B, 5, H, W)
        fmap = self.body(x)  # (B, C, h, w)
        if self.options.grid is not None:
            fmap = nn.functional.adaptive_avg_pool2d(fmap, self.options.grid)
        return fmap.flatten(2).transpose(1, 2) + self.position  # (B, grid*grid, C)
