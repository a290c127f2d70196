"""IMU encoders: an ImageBind-style patch transformer and a 1-D conv net over 6-axis IMU windows.

Input: 3-axis accelerometer + 3-axis gyroscope, six channels in file order (ImageBind / Ego4D order:
accel x, y, z, gyro x, y, z); ``channels`` configures another count. Readers:

- CSV (``.csv`` / ``.tsv`` / ``.txt``, comma, semicolon or tab separated): with a header, a column named
  ``t``, ``ts``, ``time`` or ``timestamp`` (a unit may follow) holds timestamps and every other column is a channel; without
  a header every column is a channel. The timestamp unit comes from the name (``time_ms``, ``t (s)``,
  ``timestamp_ns``...) or the option ``timestamp_unit``; ``auto`` picks the unit in which the median step means a rate
  between 5 Hz and 5 kHz.
- NPY: a (T, C) or (C, T) array. NPZ: the array under ``imu`` / ``data`` / ``values`` / ``x`` (or the only
  array), optional ``timestamps`` and ``sample_rate`` entries.
- Numpy arrays and tensors (T, C) or (C, T), taken to be at ``input_rate`` when it is set, else at the
  encoder's rate; ``(array, rate)`` tuples at any rate.

Files without timestamps need a declared rate (option ``input_rate`` or an NPZ ``sample_rate``).
Recordings are resampled to the encoder's rate by linear interpolation on their timestamps, normalized
per channel (z-score over the recording by default), then cut into fixed windows (ImageBind: 6 x 2000
samples, 10 s at 200 Hz). Window policy: a long recording keeps its first window (or, with ``chunk``,
consecutive windows up to ``max_chunks`` whose tokens are concatenated); a short one, or the last chunk,
is padded with zeros after normalization, i.e. with the channel mean.
"""

from __future__ import annotations

import csv
import io
import math
import re
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from mm_llama.encoders.audio import split_windows
from mm_llama.encoders.base import (
    MediaPreprocessor,
    ModalityEncoder,
    load_weights,
    pre_norm_transformer,
    read_bytes,
)

SAMPLE_RATE = 200.0
"""Hz; Ego4D's IMU rate, as ImageBind uses it."""
WINDOW = 2000
"""Samples per window: ImageBind's 6 x 2000 input."""
CHANNELS = 6
PATCH_SIZE = 8
"""Samples per patch of the ImageBind IMU stem."""
DEFAULT_MIN_SAMPLES = 32
"""Fewer samples than this (at the encoder's rate) is treated as an error, not padded."""
DEFAULT_MAX_CHUNKS = 4
NORM_EPS = 1e-6
UNIT_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
PLAUSIBLE_RATE_HZ = (5.0, 5000.0)
"""``timestamp_unit: auto`` picks the unit in which the median timestamp step means a rate in this range."""
TIMESTAMP_COLUMN = re.compile(r"^(?:t|ts|times?|timestamps?)(?:[_\s(\[]+(ns|us|ms|s)[)\]]?)?$", re.IGNORECASE)
"""Timestamp column names, with an optional unit: ``t``, ``ts``, ``time``, ``timestamp``, ``time_ms``, ``t (s)``..."""
NPZ_DATA_KEYS = ("imu", "data", "values", "x")
NPZ_TIMESTAMP_KEYS = ("timestamps", "timestamp", "times", "time", "t")
NPZ_RATE_KEYS = ("sample_rate", "rate", "fs")
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"

TimestampUnit = Literal["auto", "s", "ms", "us", "ns"]
Normalize = Literal["recording", "fixed", "none"]
SelectFeature = Literal["cls_patch", "patch", "cls"]


@dataclass
class _Recording:
    """What a reader found: samples (T, C), optional timestamps in the file's unit, a declared rate."""

    values: np.ndarray
    columns: list[str]
    timestamps: np.ndarray | None = None
    timestamp_column: str = ""
    rate: float | None = None


# ---- reading -------------------------------------------------------------------------------------------
def _item_name(item: Any) -> str:
    """How a notice names an IMU input: its path, or its kind."""
    return str(item) if isinstance(item, (str, Path)) else f"<{type(item).__name__}>"


def load_imu(
    item: Any,
    sample_rate: float = SAMPLE_RATE,
    channels: int = CHANNELS,
    input_rate: float | None = None,
    timestamp_unit: TimestampUnit = "auto",
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> torch.Tensor:
    """Any supported IMU input -> (channels, T) float32 at ``sample_rate`` (see the module docstring).

    ``input_rate`` is the rate of inputs without timestamps. Raises ``ValueError`` naming the input for a
    wrong channel count, NaN / infinite values, fewer than ``min_samples`` samples after resampling,
    timestamps that do not increase, or a file with neither timestamps nor a declared rate.
    """
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"an IMU tuple must be (array, sample_rate), got {len(item)} items")
        name = "<IMU array>"
        rec = _Recording(_channels_last(item[0], channels, name), [], rate=float(item[1]))
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        name = "<IMU array>"
        rec = _Recording(_channels_last(item, channels, name), [], rate=input_rate or sample_rate)
    else:
        data, name = read_bytes(item, "IMU")
        rec = _read_file(data, name, _file_kind(item, data), channels, input_rate)
    values = rec.values
    if values.shape[0] < 2:
        raise ValueError(
            f"IMU {name}: too few samples: {values.shape[0]}, need at least {max(2, min_samples)}"
        )
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        row, col = (int(v) for v in bad[0])
        where = f"column {rec.columns[col]!r}" if rec.columns else f"channel {col}"
        raise ValueError(
            f"IMU {name}: {len(bad)} NaN or infinite value(s), the first at sample {row}, {where}"
        )
    if rec.timestamps is not None:
        seconds = _timestamps_in_seconds(rec.timestamps, rec.timestamp_column, timestamp_unit, name)
    elif rec.rate is not None:
        if rec.rate <= 0:
            raise ValueError(f"IMU {name}: the sample rate must be > 0 Hz, got {rec.rate}")
        seconds = np.arange(values.shape[0]) / rec.rate
    else:
        raise ValueError(
            f"IMU {name}: no sample rate: the file has no timestamp column and no rate was declared; add a "
            "'timestamp' column, or set the encoder option input_rate (Hz)"
        )
    at_rate = rec.timestamps is None and rec.rate == sample_rate
    resampled = values.T if at_rate else _resample(values, seconds, sample_rate)  # (C, T)
    if resampled.shape[1] < min_samples:
        raise ValueError(
            f"IMU {name}: too few samples: {resampled.shape[1]} at {sample_rate:g} Hz "
            f"({values.shape[0]} in the input), need at least {min_samples}"
        )
    return torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32))


def _file_kind(item: Any, data: bytes) -> str:
    if isinstance(item, (str, Path)):
        suffix = Path(item).suffix.lower()
        if suffix in CSV_SUFFIXES:
            return "csv"
        if suffix in (".npy", ".npz"):
            return suffix[1:]
        raise ValueError(
            f"IMU file {item}: unsupported extension {suffix!r}; expected one of {', '.join(CSV_SUFFIXES)}, .npy, .npz"
        )
    if data.startswith(NPY_MAGIC):
        return "npy"
    return "npz" if data.startswith(ZIP_MAGIC) else "csv"


def _read_file(data: bytes, name: str, kind: str, channels: int, input_rate: float | None) -> _Recording:
    if kind == "csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"IMU {name}: not a UTF-8 text CSV file: {e}") from e
        rec = _parse_csv(text, name)
    else:
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"IMU {name}: cannot read it as {kind.upper()}: {e}") from e
        rec = _Recording(np.asarray(loaded), []) if kind == "npy" else _from_npz(loaded, name)
        rec.values = _channels_last(rec.values, channels, name)
    if rec.values.shape[1] != channels:
        hint = (
            "; if a column holds timestamps, give it a header named 'timestamp' (or t, ts, time; a unit "
            "may follow: 'timestamp_ms')"
            if rec.values.shape[1] == channels + 1 and rec.timestamps is None
            else ""
        )
        columns = f" (columns: {', '.join(rec.columns)})" if rec.columns else ""
        raise ValueError(
            f"IMU {name}: expected {channels} channels (accelerometer x/y/z + gyroscope x/y/z), found "
            f"{rec.values.shape[1]}{columns}{hint}; set the encoder option channels for other layouts"
        )
    if rec.rate is None:
        rec.rate = input_rate
    return rec


def _parse_csv(text: str, name: str) -> _Recording:
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise ValueError(f"IMU {name}: the CSV file is empty")
    delimiter = max(",;\t", key=lines[0][1].count)
    parsed = csv.reader((line for _, line in lines), delimiter=delimiter)
    rows = [(number, [cell.strip() for cell in cells]) for (number, _), cells in zip(lines, parsed)]
    header: list[str] | None = None
    if not all(_is_number(cell) for cell in rows[0][1]):
        header, rows = rows[0][1], rows[1:]
    width = len(header) if header is not None else len(rows[0][1]) if rows else 0
    for number, cells in rows:
        if len(cells) != width:
            raise ValueError(f"IMU {name}: line {number} has {len(cells)} fields, expected {width}")
    try:  # numpy converts the strings in one go (2.6x faster than float() per cell)
        values = np.array([cells for _, cells in rows], dtype=np.float64).reshape(len(rows), width)
    except ValueError:  # cell by cell: names the first one that is not a number
        values = np.empty((len(rows), width), dtype=np.float64)
        for r, (number, cells) in enumerate(rows):
            for c, cell in enumerate(cells):
                try:
                    values[r, c] = float(cell)
                except ValueError:
                    column = header[c] if header else f"column {c}"
                    raise ValueError(f"IMU {name}: line {number}, {column}: not a number: {cell!r}") from None
    columns = header if header is not None else [f"column {c}" for c in range(width)]
    time_cols = [c for c, h in enumerate(header or []) if TIMESTAMP_COLUMN.match(h)]
    if not time_cols:
        return _Recording(values, columns)
    t = time_cols[0]
    keep = [c for c in range(width) if c != t]
    return _Recording(values[:, keep], [columns[c] for c in keep], values[:, t], columns[t])


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _from_npz(archive: Any, name: str) -> _Recording:
    keys = list(archive.files)
    ts_key = next((k for k in NPZ_TIMESTAMP_KEYS if k in keys), None)
    rate_key = next((k for k in NPZ_RATE_KEYS if k in keys), None)
    data_key = next((k for k in NPZ_DATA_KEYS if k in keys), None)
    others = [k for k in keys if k not in (ts_key, rate_key)]
    if data_key is None and len(others) == 1:
        data_key = others[0]
    if data_key is None:
        raise ValueError(
            f"IMU {name}: cannot tell which NPZ entry holds the samples (entries: {', '.join(keys)}); "
            f"name it one of {', '.join(NPZ_DATA_KEYS)}"
        )
    rate = float(np.asarray(archive[rate_key]).reshape(-1)[0]) if rate_key else None
    timestamps = np.asarray(archive[ts_key], dtype=np.float64).reshape(-1) if ts_key else None
    return _Recording(np.asarray(archive[data_key]), [], timestamps, ts_key or "", rate)


def _channels_last(samples: Any, channels: int, name: str) -> np.ndarray:
    """(T, C) or (C, T) array / tensor -> (T, C) float64; the axis of size ``channels`` holds channels."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    arr = np.asarray(samples)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"IMU {name}: expected numeric samples, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"IMU {name}: expected a 2-D (T, C) or (C, T) array, got shape {arr.shape}")
    if arr.shape[1] == channels:
        return arr.astype(np.float64)
    if arr.shape[0] == channels:
        return arr.T.astype(np.float64)
    raise ValueError(
        f"IMU {name}: expected {channels} channels (accelerometer x/y/z + gyroscope x/y/z), found "
        f"{min(arr.shape)} (array shape {arr.shape}); set the encoder option channels for other layouts"
    )


def _timestamps_in_seconds(stamps: np.ndarray, column: str, unit: TimestampUnit, name: str) -> np.ndarray:
    steps = np.diff(stamps)
    if not np.isfinite(stamps).all() or (steps <= 0).any():
        row = int(np.argmax(~np.isfinite(stamps[1:]) | (steps <= 0))) + 1
        raise ValueError(
            f"IMU {name}: timestamps ({column!r}) must increase strictly; sample {row} has {float(stamps[row])!r} "
            f"after {float(stamps[row - 1])!r}"
        )
    if unit == "auto":
        named = TIMESTAMP_COLUMN.match(column)
        unit = (
            named.group(1).lower()
            if named and named.group(1)
            else _guess_unit(float(np.median(steps)), column, name)
        )
    return (stamps - stamps[0]) * UNIT_SECONDS[unit]


def _guess_unit(step: float, column: str, name: str) -> str:
    low, high = PLAUSIBLE_RATE_HZ
    for unit, scale in UNIT_SECONDS.items():
        if low <= 1.0 / (step * scale) <= high:
            return unit
    raise ValueError(
        f"IMU {name}: cannot infer the unit of timestamps {column!r} (median step {step:g}); name the column "
        "with a unit (e.g. 'timestamp_ms') or set the encoder option timestamp_unit"
    )


def _resample(values: np.ndarray, seconds: np.ndarray, rate: float) -> np.ndarray:
    """(T, C) samples at times ``seconds`` -> (C, n) on a uniform grid at ``rate``, linear interpolation."""
    count = math.floor(float(seconds[-1] - seconds[0]) * rate + 1e-6) + 1
    grid = seconds[0] + np.arange(count) / rate  # (n,)
    return np.stack([np.interp(grid, seconds, values[:, c]) for c in range(values.shape[1])])


# ---- preprocessing shared by both encoders ---------------------------------------------------------------
@dataclass
class IMUOptions:
    """Reading, resampling, normalization and windowing options shared by the IMU encoders."""

    sample_rate: float = SAMPLE_RATE
    """The encoder's rate (Hz); inputs are resampled to it."""
    window: int = WINDOW
    """Samples per window (ImageBind: 2000)."""
    channels: int = CHANNELS
    """Channels per sample (6: accelerometer x/y/z + gyroscope x/y/z)."""
    input_rate: float | None = None
    """Rate (Hz) of files without timestamps (and of arrays; these default to ``sample_rate``)."""
    timestamp_unit: TimestampUnit = "auto"
    """Unit of timestamp columns whose name carries none."""
    normalize: Normalize = "recording"
    """``recording``: z-score per channel over each recording; ``fixed``: with ``mean`` / ``std``; ``none``."""
    mean: list[float] | None = None
    """Per-channel means for ``normalize: fixed`` (dataset statistics)."""
    std: list[float] | None = None
    """Per-channel standard deviations for ``normalize: fixed``."""
    chunk: bool = False
    """Cut long recordings into consecutive windows and concatenate their tokens instead of keeping the first."""
    max_chunks: int = DEFAULT_MAX_CHUNKS
    """With ``chunk``: the most windows per input; later samples are dropped."""
    min_samples: int = DEFAULT_MIN_SAMPLES
    """Recordings shorter than this (after resampling) raise instead of being padded."""
    weights: str | None = None
    """A safetensors file of this encoder's ``state_dict`` (e.g. ``encoders/imu.safetensors`` of a saved
    model); the encoder then counts as pretrained (frozen by default)."""


class IMUPreprocessor(MediaPreprocessor):
    """Shared IMU preprocessing: read, resample, normalize, window -> (C, window), or (K, C, window) with
    ``chunk``. Subclasses set ``tokens_per_window``."""

    name: ClassVar[str]
    """The encoder's registry name, for error messages."""
    tokens_per_window: int
    """Output tokens of one window."""

    def __init__(self, options: IMUOptions) -> None:
        super().__init__(options)
        where = f"{self.name} encoder: options"
        if options.window < 1 or options.max_chunks < 1 or options.channels < 1 or options.sample_rate <= 0:
            raise ValueError(f"{where}.window, max_chunks, channels and sample_rate must be positive")
        if options.normalize == "fixed":
            for key in ("mean", "std"):
                stats = getattr(options, key)
                if stats is None or len(stats) != options.channels:
                    raise ValueError(
                        f"{where}.{key}: normalize: fixed needs {options.channels} values, got {stats!r}"
                    )
            if min(options.std) <= 0:
                raise ValueError(f"{where}.std: every value must be > 0, got {options.std}")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(C, T) -> (C, T), per channel."""
        opts = self.options
        if opts.normalize == "recording":
            return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, unbiased=False, keepdim=True).clamp_min(
                NORM_EPS
            )
        if opts.normalize == "fixed":
            return (x - torch.tensor(opts.mean).unsqueeze(1)) / torch.tensor(opts.std).unsqueeze(1)
        return x

    def __call__(self, item: Any) -> torch.Tensor:
        opts = self.options
        x = load_imu(
            item, opts.sample_rate, opts.channels, opts.input_rate, opts.timestamp_unit, opts.min_samples
        )
        x = self.normalize(x)  # (C, T)
        windows = [
            nn.functional.pad(w, (0, opts.window - w.shape[-1]))  # (C, window), zeros = the channel mean
            for w in split_windows(
                x,
                opts.window,
                opts.chunk,
                opts.max_chunks,
                name=f"imu {_item_name(item)}",
                rate=opts.sample_rate,
            )
        ]
        return torch.stack(windows) if opts.chunk else windows[0]

    def num_tokens(self, x: torch.Tensor) -> int:
        return (x.shape[0] if x.ndim == 3 else 1) * self.tokens_per_window


class IMUEncoder(ModalityEncoder):
    """Shared chunk handling: ``forward`` takes the preprocessor's output, batched: (B, C, window) or
    (B, K, C, window) -> (B, K * tokens_per_window, D_enc)."""

    modality = "imu"

    @property
    def is_pretrained(self) -> bool:
        return self.options.weights is not None

    @abstractmethod
    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        """(W, C, window) -> (W, tokens_per_window, D_enc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        windows = x.flatten(0, 1) if x.ndim == 4 else x  # (B * K, C, window)
        tokens = self.encode_windows(windows.to(self.dtype))  # (B * K, n, D)
        return tokens.reshape(batch, -1, tokens.shape[-1])  # (B, K * n, D)


# ---- ImageBind-style transformer -------------------------------------------------------------------------
@dataclass
class IMUTransformerOptions(IMUOptions):
    """Options of the ``imu_transformer`` encoder; defaults follow ImageBind's IMU tower."""

    patch_size: int = PATCH_SIZE
    """Samples per patch; must divide ``window``."""
    width: int = 512
    depth: int = 6
    heads: int = 8
    select_feature: SelectFeature = "cls_patch"
    """``cls_patch``: the CLS token then one token per patch; ``patch``: patches only; ``cls``: CLS only."""


class IMUTransformerPreprocessor(IMUPreprocessor):
    """IMU windows; tokens: one per ``patch_size`` samples, with the CLS token or it alone (``select_feature``)."""

    name = "imu_transformer"

    def __init__(self, options: IMUTransformerOptions) -> None:
        super().__init__(options)
        if options.patch_size < 1 or options.window % options.patch_size:
            raise ValueError(
                f"imu_transformer encoder: options.patch_size ({options.patch_size}) must divide options.window "
                f"({options.window})"
            )
        num_patches = options.window // options.patch_size
        select = options.select_feature
        self.tokens_per_window = 1 if select == "cls" else num_patches + int(select == "cls_patch")


class IMUTransformerEncoder(IMUEncoder):
    """ImageBind's IMU tower: patches of ``patch_size`` samples x C channels -> linear (no bias) + LayerNorm
    to the width -> CLS + learned positions -> pre-norm transformer -> LayerNorm."""

    Options = IMUTransformerOptions
    Preprocessor = IMUTransformerPreprocessor

    def __init__(self, options: IMUTransformerOptions) -> None:
        super().__init__(options)
        if options.width % options.heads:
            raise ValueError(
                f"imu_transformer encoder: options.heads ({options.heads}) must divide options.width "
                f"({options.width})"
            )
        num_patches = options.window // options.patch_size
        self.patch_embed = nn.Linear(options.channels * options.patch_size, options.width, bias=False)
        self.patch_norm = nn.LayerNorm(options.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, options.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, options.width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = pre_norm_transformer(options.width, options.heads, options.depth)
        self.norm = nn.LayerNorm(options.width)
        if options.weights is not None:
            load_weights(self, options.weights, "imu_transformer encoder (options.weights)")

    @property
    def output_dim(self) -> int:
        return self.options.width

    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        p = self.options.patch_size
        patches = x.unfold(-1, p, p).permute(0, 2, 1, 3).flatten(2)  # (W, C, n, p) -> (W, n, C * p)
        tokens = self.patch_norm(self.patch_embed(patches))  # (W, n, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (W, 1, D)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed  # (W, 1 + n, D)
        tokens = self.norm(self.blocks(tokens))
        select = self.options.select_feature
        return tokens[:, :1] if select == "cls" else tokens[:, 1:] if select == "patch" else tokens


# ---- 1-D conv net ----------------------------------------------------------------------------------------
@dataclass
class IMUConvOptions(IMUOptions):
    """Options of the ``imu_cnn`` encoder."""

    width: int = 128
    """Channels of every conv layer (D_enc)."""
    layers: int = 4
    """Stride-2 conv layers: one token per 2**layers samples."""
    kernel_size: int = 5
    """Odd kernel size of every layer."""


class IMUConvPreprocessor(IMUPreprocessor):
    """IMU windows; tokens: ``window`` halved (rounding up) by each stride-2 layer."""

    name = "imu_cnn"

    def __init__(self, options: IMUConvOptions) -> None:
        super().__init__(options)
        if options.layers < 1 or options.kernel_size % 2 == 0:  # an odd kernel keeps ceil(n / 2) per layer
            raise ValueError(
                f"imu_cnn encoder: options.layers must be >= 1 and options.kernel_size odd, got "
                f"{options.layers} and {options.kernel_size}"
            )
        n = options.window
        for _ in range(options.layers):
            n = math.ceil(n / 2)
        self.tokens_per_window = n


class IMUConvEncoder(IMUEncoder):
    """``layers`` x (Conv1d stride 2 -> GroupNorm -> GELU) over the (C, window) signal; one token per step."""

    Options = IMUConvOptions
    Preprocessor = IMUConvPreprocessor

    def __init__(self, options: IMUConvOptions) -> None:
        super().__init__(options)
        blocks: list[nn.Module] = []
        in_channels = options.channels
        for _ in range(options.layers):
            blocks += [
                nn.Conv1d(
                    in_channels,
                    options.width,
                    options.kernel_size,
                    stride=2,
                    padding=options.kernel_size // 2,
                ),
                nn.GroupNorm(1, options.width),
                nn.GELU(),
            ]
            in_channels = options.width
        self.net = nn.Sequential(*blocks)
        if options.weights is not None:
            load_weights(self, options.weights, "imu_cnn encoder (options.weights)")

    @property
    def output_dim(self) -> int:
        return self.options.width

    def encode_windows(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).transpose(1, 2)  # (W, width, n) -> (W, n, width)
