"""Feature cache: frozen encoders' outputs computed once, read back instead of running the encoder.

Stage 1 trains only projectors (and encoders built from scratch), so a frozen encoder produces the
same features every epoch; caching them removes media decoding and the encoder's forward pass from
the training loop. Layout of a cache folder::

    index.json                                  {"version", "encoders": {identity: {...}},
                                                 "entries": {identity: {media path:
                                                             [shard, key, size, mtime_ns]}}}
    <modality>-<identity>-00000.safetensors     (N, D_enc) tensors keyed "0", "1", ...

Entries are keyed by the media file's absolute path and by the encoder's identity: a hash of its
class, options and weights, so a different checkpoint or setting never reads stale features. Each
entry also records the file's size and modification time: a media file rewritten in place is encoded
again, never read from the cache. Caching
is incremental (only missing entries are computed) and the index is rewritten atomically after each
shard, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mm_llama.data.dataset import ConversationDataset
from mm_llama.llm import DTYPES
from mm_llama.model import MultimodalLM
from mm_llama.processor import MediaHandler, MultimodalProcessor
from mm_llama.projectors.base import Projector

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_VERSION = 2
SHARD_BYTES = 1 << 30
"""Start a new shard once the current one holds this many bytes of features."""
DEFAULT_BATCH_SIZE = 32
IDENTITY_CHARS = 16


def file_stamp(path: str) -> list[int]:
    """[size in bytes, modification time in ns] of a media file: what tells a rewritten file."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def encoder_identity(model: MultimodalLM, modality: str) -> str:
    """Hash of the encoder's registry type, class, options and weights (hex, ``IDENTITY_CHARS`` long)."""
    encoder = model.encoders[modality]
    h = hashlib.sha256()
    options = dataclasses.asdict(encoder.options) if dataclasses.is_dataclass(encoder.options) else {}
    spec = {
        "type": model.config.modalities[modality].encoder.type,
        "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "options": options,
    }
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:IDENTITY_CHARS]


class FeatureCache:
    """Read access to a cache folder; shards open lazily (memory-mapped) in each process."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            self.index = json.loads(index_path.read_text())
            if self.index.get("version") == 1:  # entries without file stamps: computed again
                logger.warning("%s: a version-1 feature cache; its features are computed again", index_path)
                self.index = {"version": INDEX_VERSION, "encoders": {}, "entries": {}}
            elif self.index.get("version") != INDEX_VERSION:
                raise ValueError(
                    f"{index_path}: feature cache version {self.index.get('version')!r}, expected "
                    f"{INDEX_VERSION}; delete the folder to rebuild it"
                )
        else:
            self.index = {"version": INDEX_VERSION, "encoders": {}, "entries": {}}
        self._handles: dict[str, Any] = {}

    def entries(self, identity: str) -> dict[str, list[str]]:
        return self.index["entries"].get(identity, {})

    def is_fresh(self, identity: str, path: str) -> bool:
        """Whether ``path`` (absolute) has features cached for this encoder, from its current contents."""
        entry = self.entries(identity).get(path)
        return entry is not None and entry[2:] == file_stamp(path)

    def get(self, identity: str, path: str | Path) -> torch.Tensor:
        """The (N, D_enc) features of one media file."""
        key = str(Path(path).resolve())
        entry = self.entries(identity).get(key)
        if entry is None:
            raise KeyError(
                f"feature cache {self.directory}: no features for {key} from encoder {identity}; "
                "run `mm-llama cache-features` for this data (or delete the cache to rebuild it)"
            )
        if entry[2:] != file_stamp(key):
            raise KeyError(
                f"feature cache {self.directory}: {key} changed since its features were cached; run "
                "`mm-llama cache-features` for this data again (training does so before each stage)"
            )
        shard, name = entry[:2]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
        return self._handles[shard].get_tensor(name)

    def write_index(self) -> None:
        """Atomically replace ``index.json`` with the in-memory index."""
        tmp = self.directory / f".{INDEX_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.directory / INDEX_FILE)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open shards themselves: file handles do not cross processes.
        return {**self.__dict__, "_handles": {}}


class CachedFeatures:
    """A processor media handler that reads features instead of preprocessing: path -> ((N, D_enc), M)."""

    def __init__(self, cache: FeatureCache, identity: str, projector: Projector) -> None:
        self.cache, self.identity = cache, identity
        self.count = (type(projector), projector.options)  # the token count; no weights carried

    def __call__(self, item: Any) -> tuple[torch.Tensor, int]:
        if not isinstance(item, (str, Path)):
            raise TypeError(f"the feature cache is keyed by media paths, got a {type(item).__name__}")
        features = self.cache.get(self.identity, item)  # (N, D_enc)
        projector, options = self.count
        return features, projector.count_tokens(options, int(features.shape[0]))


def frozen_modalities(model: MultimodalLM) -> list[str]:
    """Modalities whose encoder has no trainable parameter (their features can be cached)."""
    return [m for m, enc in model.encoders.items() if not any(p.requires_grad for p in enc.parameters())]


def cache_features(
    model: MultimodalLM,
    files: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    data_root: str | Path | None = None,
    modalities: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str | None = None,
) -> FeatureCache:
    """Encode every media file referenced by ``files`` with the frozen encoders and store the features.

    ``modalities`` defaults to those whose encoder is frozen; ``dtype`` (``float32``, ``bfloat16``,
    ``float16``) defaults to the encoder's output dtype. Already cached entries are skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(out_dir)
    names = list(modalities) if modalities is not None else frozen_modalities(model)
    for m in names:
        if m not in model.encoders:
            raise ValueError(f"cache_features: the model has no {m} encoder (it has {list(model.encoders)})")
        if any(p.requires_grad for p in model.encoders[m].parameters()):
            raise ValueError(
                f"cache_features: the {m} encoder is trainable, so its features change during training; "
                "freeze it (encoder.freeze: true) or leave it out of the cache"
            )
    dataset = ConversationDataset(files, model.processor, data_root=data_root)
    wanted: dict[str, set[str]] = {m: set() for m in names}
    for i in range(len(dataset)):
        for m, paths in dataset.media(i).items():
            if m in wanted:
                wanted[m].update(paths)
    for m in names:
        _cache_modality(model, m, sorted(wanted[m]), cache, batch_size, dtype)
    return cache


@torch.no_grad()
def _cache_modality(
    model: MultimodalLM,
    modality: str,
    paths: list[str],
    cache: FeatureCache,
    batch_size: int,
    dtype: str | None,
) -> None:
    encoder = model.encoders[modality]
    identity = encoder_identity(model, modality)
    todo = [p for p in paths if not cache.is_fresh(identity, p)]
    logger.info(
        "feature cache %s: %s: %d cached, %d to compute",
        cache.directory, modality, len(paths) - len(todo), len(todo),
    )  # fmt: skip
    if not todo:
        return
    out_dtype = DTYPES[dtype] if dtype is not None else None
    cache.index["encoders"][identity] = {
        "modality": modality,
        "type": model.config.modalities[modality].encoder.type,
        "output_dim": encoder.output_dim,
    }
    entries = cache.index["entries"].setdefault(identity, {})
    prefix = f"{modality}-{identity}-"
    shard_no = sum(1 for _ in cache.directory.glob(f"{prefix}*.safetensors"))
    pending: dict[str, torch.Tensor] = {}
    pending_paths: list[str] = []
    pending_bytes = 0
    was_training = encoder.training
    encoder.eval()

    def flush() -> None:
        nonlocal shard_no, pending, pending_paths, pending_bytes
        shard = f"{prefix}{shard_no:05d}.safetensors"
        save_file(pending, str(cache.directory / shard))
        entries.update({p: [shard, str(k), *file_stamp(p)] for k, p in enumerate(pending_paths)})
        cache.write_index()
        shard_no, pending, pending_paths, pending_bytes = shard_no + 1, {}, [], 0

    for start in tqdm(range(0, len(todo), batch_size), desc=f"caching {modality} features", unit="batch"):
        chunk = todo[start : start + batch_size]
        items = [encoder.preprocess(p) for p in chunk]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault(tuple(x.shape), []).append(i)
        features: list[torch.Tensor | None] = [None] * len(chunk)
        for indices in groups.values():
            batch = torch.stack([items[i] for i in indices]).to(encoder.device)  # (B, ...)
            out = encoder(batch)  # (B, N, D_enc)
            for j, i in enumerate(indices):
                features[i] = out[j]
        for path, f in zip(chunk, features):
            f = (f.to(out_dtype) if out_dtype is not None else f).detach().cpu().contiguous()  # (N, D_enc)
            pending[str(len(pending_paths))] = f
            pending_paths.append(path)
            pending_bytes += f.numel() * f.element_size()
        if pending_bytes >= SHARD_BYTES:
            flush()
    if pending:
        flush()
    encoder.train(was_training)


def cached_processor(
    model: MultimodalLM, cache: FeatureCache, modalities: Sequence[str]
) -> MultimodalProcessor:
    """A copy of ``model.processor`` whose ``modalities`` read features from ``cache`` (by media path)
    instead of preprocessing media; its examples carry (N, D_enc) features for those modalities."""
    return model.processor.with_handlers(
        {m: CachedFeatures(cache, encoder_identity(model, m), model.projectors[m]) for m in modalities}
    )


class MediaMemo:
    """Preprocessed media kept in memory, by media path, up to ``max_bytes`` of tensors in all: a training
    stage that reads the same files every epoch decodes and preprocesses each once (preprocessors are pure,
    ``mm_llama.encoders.base.MediaPreprocessor``). Items past the budget are preprocessed afresh each time.
    One per process (and per DataLoader worker); files must not change during the stage."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.entries: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}

    def wrap(self, modality: str, handler: MediaHandler) -> MediaHandler:
        """``handler`` reading through this memo."""
        return _Memoized(self, modality, handler)


class _Memoized:
    """One modality's handler reading through a :class:`MediaMemo` (a class, so workers can pickle it)."""

    def __init__(self, memo: MediaMemo, modality: str, handler: MediaHandler) -> None:
        self.memo, self.modality, self.handler = memo, modality, handler

    def __call__(self, item: Any) -> tuple[torch.Tensor, int]:
        if not isinstance(item, (str, Path)):
            return self.handler(item)
        key = (self.modality, str(item))
        hit = self.memo.entries.get(key)
        if hit is not None:
            return hit
        tensor, count = self.handler(item)
        size = tensor.numel() * tensor.element_size()
        if self.memo.used + size <= self.memo.max_bytes:
            self.memo.entries[key] = (tensor, count)
            self.memo.used += size
        return tensor, count


def memoized_processor(
    processor: MultimodalProcessor, modalities: Sequence[str], max_bytes: int
) -> MultimodalProcessor:
    """A copy of ``processor`` whose ``modalities`` keep their preprocessed media in one
    :class:`MediaMemo` of ``max_bytes``."""
    memo = MediaMemo(max_bytes)
    return processor.with_handlers({m: memo.wrap(m, processor.handlers[m]) for m in modalities})
