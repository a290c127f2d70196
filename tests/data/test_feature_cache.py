"""The feature cache: precomputed frozen-encoder features give the loss and the training of the
uncached path, are computed once, and are keyed by the encoder's identity."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.data.dataset import Collator, ConversationDataset
from mm_llama.data.feature_cache import (
    INDEX_FILE,
    FeatureCache,
    MediaMemo,
    cache_features,
    cached_processor,
    encoder_identity,
)
from mm_llama.model import MultimodalLM
from mm_llama.model_io import PROJECTORS_FILE
from mm_llama.processor import MediaTokens
from mm_llama.train import train
from tests.train.conftest import (
    NUM_RECORDS,
    align_stage,
    one_thread,  # noqa: F401  (autouse: tiny models run faster on one thread)
    tiny_model_config,
    tiny_train_config,
    write_colour_world,
)

LOSS_TOLERANCE = 1e-6


@pytest.fixture
def colour_world(tmp_path: Path) -> dict[str, Path]:
    return write_colour_world(tmp_path / "world")


@pytest.fixture
def frozen_model() -> MultimodalLM:
    torch.manual_seed(0)
    return MultimodalLM(replace(tiny_model_config(freeze_encoder=True), template="plain"))


def test_cached_features_give_the_same_loss_and_gradients(
    tmp_path: Path, colour_world: dict[str, Path], frozen_model: MultimodalLM
) -> None:
    files = [colour_world["align"]]
    cache = cache_features(frozen_model, files, tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / INDEX_FILE).read_text())
    identity = encoder_identity(frozen_model, "image")
    assert len(index["entries"][identity]) == NUM_RECORDS

    processor = cached_processor(frozen_model, cache, ["image"])
    direct = ConversationDataset(files, frozen_model.processor)
    cached = ConversationDataset(files, processor)
    batch = Collator(frozen_model.processor)([direct[i] for i in range(NUM_RECORDS)])
    cached_batch = Collator(processor, ["image"])([cached[i] for i in range(NUM_RECORDS)])
    assert torch.equal(batch["input_ids"], cached_batch["input_ids"])
    assert cached_batch["media"] == {} and len(cached_batch["features"]["image"]) == NUM_RECORDS

    frozen_model.eval()
    losses, grads = [], []
    for b in (batch, cached_batch):
        frozen_model.zero_grad()
        loss = frozen_model(**b).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in frozen_model.projectors.parameters()])
    torch.testing.assert_close(losses[1], losses[0], atol=LOSS_TOLERANCE, rtol=0)
    for cached_grad, direct_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(cached_grad, direct_grad, atol=LOSS_TOLERANCE, rtol=1e-5)


def test_cache_is_incremental_and_keyed_by_encoder_weights(
    tmp_path: Path, colour_world: dict[str, Path], frozen_model: MultimodalLM
) -> None:
    files = [colour_world["align"]]
    cache_features(frozen_model, files, tmp_path / "cache")
    shards = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    cache_features(frozen_model, files, tmp_path / "cache")  # everything cached: nothing new written
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == shards

    old = encoder_identity(frozen_model, "image")
    with torch.no_grad():
        next(frozen_model.encoders["image"].parameters()).add_(1.0)
    assert encoder_identity(frozen_model, "image") != old
    stale = cached_processor(frozen_model, FeatureCache(tmp_path / "cache"), ["image"])
    with pytest.raises(KeyError, match="run `mm-llama cache-features`"):
        ConversationDataset(files, stale)[0]


def test_a_media_file_rewritten_in_place_is_encoded_again(
    tmp_path: Path, colour_world: dict[str, Path], frozen_model: MultimodalLM
) -> None:
    from PIL import Image

    files = [colour_world["align"]]
    cache_features(frozen_model, files, tmp_path / "cache")
    image = colour_world["align"].parent / "images" / "0.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(image)  # same path, new contents
    stale = cached_processor(frozen_model, FeatureCache(tmp_path / "cache"), ["image"])
    with pytest.raises(KeyError, match="changed since its features were cached"):
        ConversationDataset(files, stale)[0]
    cache = cache_features(frozen_model, files, tmp_path / "cache")  # what every stage runs first
    fresh = cache.get(encoder_identity(frozen_model, "image"), image)
    with torch.no_grad():
        direct = frozen_model.encoders["image"].eval()(frozen_model.encoders["image"].preprocess(image)[None])
    torch.testing.assert_close(fresh, direct[0], atol=LOSS_TOLERANCE, rtol=0)


def test_trainable_encoders_are_not_cached(tmp_path: Path, colour_world: dict[str, Path]) -> None:
    torch.manual_seed(0)
    model = MultimodalLM(tiny_model_config())  # built from scratch: trainable
    with pytest.raises(ValueError, match="image encoder is trainable"):
        cache_features(model, [colour_world["align"]], tmp_path / "cache", modalities=["image"])


def test_stage1_with_the_cache_trains_like_stage1_without(
    tmp_path: Path, colour_world: dict[str, Path]
) -> None:
    stage = align_stage(colour_world, max_steps=4)
    plain = tiny_train_config(tmp_path / "plain", {"align": stage}, freeze_encoder=True)
    cached = replace(
        plain,
        output_dir=str(tmp_path / "cached"),
        stages={"align": replace(stage, feature_cache=str(tmp_path / "cache"))},
    )
    expected = load_file(str(train(plain) / PROJECTORS_FILE))
    got = load_file(str(train(cached) / PROJECTORS_FILE))
    assert (tmp_path / "cache" / INDEX_FILE).is_file()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=LOSS_TOLERANCE, rtol=0, msg=key)


def test_the_media_memo_preprocesses_each_file_once_within_its_budget(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(item: object) -> tuple[torch.Tensor, int]:
        calls.append(str(item))
        return torch.zeros(4), 2  # 16 bytes

    memo = MediaMemo(max_bytes=32)
    read = memo.wrap("image", handler)
    for _ in range(3):  # three epochs
        for path in ["a.png", "b.png", "c.png"]:
            tensor, count = read(tmp_path / path)
            assert tensor.shape == (4,) and count == 2
    # a and b fit the 32 bytes and are read once; c is past the budget and read every time
    assert sorted(calls) == sorted([str(tmp_path / p) for p in ["a.png", "b.png", "c.png", "c.png", "c.png"]])
    assert memo.used == 32
    read(torch.zeros(3))  # an item that is not a path (an array, an image) is never kept
    assert len(memo.entries) == 2


def test_a_stage_that_keeps_its_media_in_memory_reads_each_file_once_and_trains_the_same(
    tmp_path: Path, colour_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    preprocess = MediaTokens.__call__

    def counting(self: MediaTokens, item: object) -> tuple[torch.Tensor, int]:
        calls.append(item)
        return preprocess(self, item)

    monkeypatch.setattr(MediaTokens, "__call__", counting)
    stage = align_stage(colour_world, max_steps=None, epochs=3.0, train_encoders="all")
    plain = tiny_train_config(tmp_path / "plain", {"align": stage})
    expected = load_file(str(train(plain) / PROJECTORS_FILE))
    reads_without = len(calls)
    calls.clear()
    kept = replace(
        plain, output_dir=str(tmp_path / "kept"), stages={"align": replace(stage, cache_media_mb=1.0)}
    )
    got = load_file(str(train(kept) / PROJECTORS_FILE))
    assert reads_without >= 3 * NUM_RECORDS
    assert len(calls) == len(set(map(str, calls))) == NUM_RECORDS  # each file preprocessed once
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=LOSS_TOLERANCE, rtol=0, msg=key)
