"""Typed configuration: dataclasses for the LLM, encoders, projectors and the assembled model.

Configs load from YAML/JSON/dicts strictly: an unknown field, a wrong type or a value outside a
``Literal`` raises ``ValueError`` naming the dotted field path (and the file when loaded from one).
Encoder and projector ``options`` are validated by the chosen class's own ``Options`` dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mm_llama.errors import MissingInputError, MMInputError

T = TypeVar("T")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")

Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "nf4"]
Template = Literal["chat", "plain"]


@dataclass
class LLMConfig:
    """Which causal LM to load and how."""

    name_or_path: str = "smollm2-135m"
    """Hub id, local folder, or a built-in alias (``smollm2-135m``). Also the tokenizer's source."""
    dtype: Dtype = "float32"
    """Weights dtype of the (non-quantized part of the) LLM."""
    quantization: Quantization = "none"
    """``nf4``: 4-bit NormalFloat with double quantization via bitsandbytes (QLoRA)."""
    from_config: dict[str, Any] | None = None
    """Build a randomly initialised LLM from this ``LlamaConfig``-style dict instead of loading weights
    (``vocab_size`` defaults to the tokenizer's). Used by tests and from-scratch experiments."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``)."""
    trust_remote_code: bool = False
    """Only for hub repositories whose code you trust. Never taken from a saved checkpoint's config:
    ``MultimodalLM.from_pretrained(..., trust_remote_code=True)`` must say it."""
    adapter: str | None = None
    """A PEFT (LoRA) adapter folder applied on top of the LLM when the model loads, relative to the
    checkpoint folder; ``save_pretrained`` sets it (``adapter``) when the LLM carries one, and loading
    then fails if the folder is missing."""


@dataclass
class EncoderConfig:
    """A modality encoder: a registry key and the options of that class."""

    type: str
    """Registry key, e.g. ``hf_vision``, ``open_clip``, ``timm``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Fields of the encoder class's ``Options`` dataclass."""
    freeze: bool | None = None
    """Freeze the encoder. ``None``: frozen when it loads pretrained weights, trainable when built from
    scratch (random weights), so that a from-scratch encoder can learn in stage 1."""
    owned: bool = False
    """Set by ``save_pretrained``: the checkpoint stores this encoder's weights in
    ``encoders/<modality>.safetensors`` because they are the model's own (built from scratch, or
    trained at some point, even if frozen now); loading then requires that file."""


@dataclass
class ProjectorConfig:
    """The learned bridge from encoder features to LLM embeddings."""

    type: str = "mlp2x_gelu"
    """Registry key, e.g. ``linear``, ``mlp2x_gelu``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Fields of the projector class's ``Options`` dataclass."""


@dataclass
class ModalityConfig:
    """One input modality: its encoder and its projector."""

    encoder: EncoderConfig
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class ModelConfig:
    """The assembled any-to-text model."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    """Modality name (``image``, ``audio``, ``video``, ``imu`` or a registered plugin) -> its parts."""
    template: Template = "chat"
    """``chat``: the tokenizer's chat template (a fallback when it has none); ``plain``: LLaVA's stage-1
    format, media followed directly by the caption and EOS."""
    system_prompt: str | None = None
    """System prompt for the chat template; ``None`` lets the template use its default."""
    max_length: int = 2048
    """Longest token sequence the processor emits; longer conversations drop whole turns."""
    chat_template: str | None = None
    """``None``: the tokenizer's own chat template (a Vicuna-style USER/ASSISTANT fallback when it has
    none); ``fallback``: that fallback; ``vicuna_v1``: LLaVA-1.5's conversation (``USER: ... ASSISTANT:
    ...</s>``, what its checkpoints were trained with); ``chatml``: ChatML turns (SmolLM2, Qwen) without the
    system turn those tokenizers' templates always add; any other string: a Jinja chat template."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ValueError as e:
                errors.append(str(e))
        raise MMInputError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise MMInputError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        return from_dict(tp, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise MMInputError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, path): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MMInputError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise MMInputError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise MMInputError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly: unknown fields and wrong types raise ``ValueError``."""
    name = path or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise MMInputError(
            f"{name}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MMInputError(
            f"{name}: unknown field(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"valid fields: {', '.join(fields)}"
        )
    kwargs = {}
    for key, f in fields.items():
        if key in data:
            kwargs[key] = _convert(data[key], hints[key], f"{path}.{key}" if path else key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MMInputError(f"{name}: missing required field {key!r} of {cls.__name__}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML/JSON-safe) form of a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise MMInputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise MMInputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load dataclass ``cls`` from a YAML/JSON file; ``section`` picks a top-level key when present."""
    data = read_mapping(path)
    if section is not None and section in data:
        data = data[section]
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise MMInputError(f"{path}: {e}") from e


def save_config(obj: Any, path: str | Path) -> None:
    """Write a dataclass tree as YAML (or JSON when the suffix is ``.json``)."""
    path = Path(path)
    data = to_dict(obj)
    path.write_text(
        json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    )


def build_options(options_cls: type[T], options: dict[str, Any], where: str) -> T:
    """Validate a component's ``options`` dict against its ``Options`` dataclass."""
    return from_dict(options_cls, options, where)
