"""The modality-encoder contract.

An encoder has two halves. Its **preprocessor** (a :class:`MediaPreprocessor`, built from the encoder's
options alone: no weights, picklable, so a processor and DataLoader workers carry it without the model)
turns one raw input (a path, bytes, array, tensor...) into a tensor and says how many tokens the encoder
will make of it; the **encoder** module turns a batch of such tensors into features:

    Preprocessor(options)(item)      -> Tensor          one item, e.g. (C, H, W) for an image, (T,) for audio
    Preprocessor(options).num_tokens(x) -> N            for one preprocessed item (variable-size inputs differ)
    encoder.forward(x)               -> (B, N, D_enc)   x stacks B preprocessed items of the same shape

``encoder.preprocess`` and ``encoder.num_tokens`` call the encoder's own preprocessor. Concrete encoders
declare an ``Options`` dataclass (their config fields) and a ``Preprocessor`` class, and say whether they
loaded pretrained weights (``is_pretrained``): pretrained encoders are frozen by default, encoders built
from scratch train with the projector.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from mm_llama.config import EncoderConfig, build_options
from mm_llama.errors import MissingInputError, MMInputError
from mm_llama.registry import Registry

ENCODERS: Registry[type[ModalityEncoder]] = Registry("encoder")


@dataclass
class NoOptions:
    """An encoder without options."""


class MediaPreprocessor(ABC):
    """Raw item -> tensor, and tensor -> token count, for one encoder configuration.

    Built from the encoder's ``Options`` only (it may read small config files such as an image
    processor's, never weights); picklable (options, plain numbers and library transforms, no modules
    with weights); pure (no learned state, no randomness)."""

    def __init__(self, options: Any) -> None:
        self.options = options

    @abstractmethod
    def __call__(self, item: Any) -> torch.Tensor:
        """One raw input -> one tensor ready to batch."""

    @abstractmethod
    def num_tokens(self, x: torch.Tensor) -> int:
        """N, the encoder's output tokens for one preprocessed item ``x``."""


class ModalityEncoder(nn.Module, ABC):
    """Base class of every encoder. Subclasses set ``modality``, ``Options`` and ``Preprocessor`` and
    implement the rest."""

    modality: ClassVar[str]
    """The modality this encoder is made for (documentation; any modality slot may use it)."""
    Options: ClassVar[type] = NoOptions
    Preprocessor: ClassVar[type[MediaPreprocessor]]
    """Built from the options by :func:`build_preprocessor` (the standalone processor) and by the encoder."""

    def __init__(self, options: Any) -> None:
        super().__init__()
        self.options = options
        self.preprocessor = make_preprocessor(type(self), options)

    @property
    @abstractmethod
    def output_dim(self) -> int:
        """D_enc, the width of each output token."""

    @property
    @abstractmethod
    def is_pretrained(self) -> bool:
        """Whether the weights came from a checkpoint (frozen by default) or are random (trainable)."""

    def preprocess(self, item: Any) -> torch.Tensor:
        """One raw input -> one tensor ready to batch (this encoder's preprocessor)."""
        return self.preprocessor(item)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) preprocessed batch -> (B, N, D_enc) features."""

    def num_tokens(self, x: torch.Tensor) -> int:
        """N for one preprocessed item (this encoder's preprocessor)."""
        return self.preprocessor.num_tokens(x)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the encoder. Encoders that put new learned parts on top of a pretrained
        backbone (e.g. a video encoder's temporal embedding) override this to freeze the backbone only."""
        self.requires_grad_(not frozen)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def read_bytes(item: Any, what: str) -> tuple[bytes, str]:
    """The bytes of a path / bytes / file-like input and a name for error messages."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item), f"<{what} bytes>"
    if isinstance(item, io.IOBase):
        return item.read(), f"<{what} file object>"
    if isinstance(item, (str, Path)):
        path = Path(item)
        if path.is_dir():
            raise MMInputError(f"{what} {path}: expected a file, found a folder")
        if not path.is_file():
            raise MissingInputError(f"{what} file not found: {path}")
        try:
            return path.read_bytes(), str(path)
        except OSError as e:
            raise MMInputError(f"cannot read {what} file {path}: {e.strerror or e}") from e
    raise TypeError(f"expected a path, bytes or a file object for the {what}, got {type(item).__name__}")


def load_weights(module: nn.Module, path: str, what: str) -> None:
    """Load a safetensors state dict (as ``state_dict()`` names it) into ``module``, strictly."""
    file = Path(path)
    if not file.is_file():
        raise MissingInputError(f"{what}: weights file not found: {file}")
    try:
        state = load_file(file)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{what}: {file} is not a readable safetensors file: {e}") from e
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            ", ".join(
                f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}" for k in wrong[:5]
            ),
        ]
        raise ValueError(
            f"{what}: {file} does not match the configured architecture: {'; '.join(d for d in details if d)}"
        )
    module.load_state_dict(state, strict=True)


def pre_norm_transformer(width: int, heads: int, depth: int) -> nn.TransformerEncoder:
    """The from-scratch encoders' trunk: ``depth`` pre-norm GELU layers, batch first, no dropout, FFN 4x."""
    layer = nn.TransformerEncoderLayer(
        width,
        heads,
        dim_feedforward=4 * width,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def make_preprocessor(cls: type[ModalityEncoder], options: Any) -> MediaPreprocessor:
    """``cls.Preprocessor(options)``, without drawing from the global random generators: a preprocessor
    may build a weightless model to count tokens, and a processor (or an encoder's own preprocessor)
    must not change the weights that a seeded model build gives."""
    with torch.random.fork_rng(devices=[]):
        return preprocessor_class(cls)(options)


def preprocessor_class(cls: type[ModalityEncoder]) -> type[MediaPreprocessor]:
    """``cls.Preprocessor``, or a ``TypeError`` that says what an encoder class lacks."""
    preprocessor = getattr(cls, "Preprocessor", None)
    if not (isinstance(preprocessor, type) and issubclass(preprocessor, MediaPreprocessor)):
        raise TypeError(
            f"encoder {cls.__name__} sets no Preprocessor: give it a MediaPreprocessor subclass (built from its "
            "Options: the preprocessing and the token count), see docs/new_modality.md"
        )
    return preprocessor


def build_preprocessor(modality: str, cfg: EncoderConfig) -> MediaPreprocessor:
    """The preprocessor of the encoder named by ``cfg.type``, from its validated options (no weights)."""
    cls = ENCODERS.get(cfg.type)
    where = f"modalities.{modality}.encoder.options"
    options = build_options(cls.Options, cfg.options, where)
    with _options_named(where):
        return make_preprocessor(cls, options)


def build_encoder(modality: str, cfg: EncoderConfig) -> ModalityEncoder:
    """Instantiate the encoder named by ``cfg.type`` with its validated options, and freeze it if asked."""
    cls = ENCODERS.get(cfg.type)
    where = f"modalities.{modality}.encoder.options"
    options = build_options(cls.Options, cfg.options, where)
    with _options_named(where):
        encoder = cls(options)
    freeze = cfg.freeze if cfg.freeze is not None else encoder.is_pretrained
    encoder.set_frozen(freeze)
    return encoder


@contextmanager
def _options_named(where: str) -> Iterator[None]:
    """An option value an encoder or its preprocessor refuses (a ``ValueError``, e.g. a ``select_layer``
    out of range) becomes an input error naming the config field: one line from the command line."""
    try:
        yield
    except MMInputError:
        raise
    except ValueError as e:
        raise MMInputError(f"{where}: {e}") from e
