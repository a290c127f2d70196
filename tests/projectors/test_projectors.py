"""Projectors: the Perceiver resampler and the pooling projector on their own, then every built-in
projector with every built-in encoder (iterating over the registries) inside a tiny MultimodalLM."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mm_llama import EncoderConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig
from mm_llama.encoders import ENCODERS
from mm_llama.llm import load_llm, load_tokenizer
from mm_llama.projectors import PROJECTORS, build_projector
from mm_llama.projectors.base import AuxBatch, ProjectorContext
from mm_llama.projectors.pool import PoolProjector
from mm_llama.projectors.resampler import ResamplerProjector
from mm_llama.projectors.words import WordMixProjector, caption_vocabulary, word_count_loss
from tests.conftest import TINY_CLIP, tiny_llm_config

D_IN = 24
D_OUT = 32
SEED = 0


def resampler(**options: Any) -> ResamplerProjector:
    torch.manual_seed(SEED)
    spec = {"num_latents": 4, "depth": 2, "heads": 4, "dim": 16, **options}
    return build_projector("video", ProjectorConfig(type="resampler", options=spec), D_IN, D_OUT)


def pool(output_tokens: int) -> PoolProjector:
    torch.manual_seed(SEED)
    spec = ProjectorConfig(type="pool", options={"output_tokens": output_tokens})
    return build_projector("image", spec, D_IN, D_OUT)


def test_resampler_emits_m_tokens_for_any_n() -> None:
    proj = resampler()
    for n in (1, 5, 17):
        assert proj(torch.randn(2, n, D_IN)).shape == (2, 4, D_OUT)
        assert proj.num_tokens(n) == 4
    x = torch.randn(3, 9, D_IN)
    torch.testing.assert_close(proj(x)[1:2], proj(x[1:2]))  # items do not see each other


def test_resampler_ignores_token_order_and_trains() -> None:
    proj = resampler()
    x = torch.randn(2, 10, D_IN)
    out = proj(x)
    torch.testing.assert_close(proj(x[:, torch.randperm(10)]), out)  # no positions: a set of features
    assert not torch.allclose(proj(x + 1.0), out)  # but it reads them
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_resampler_layer_matches_flamingo_reference() -> None:
    proj = resampler(depth=1, heads=1).eval()
    x = torch.randn(1, 6, D_IN)
    layer = proj.layers[0]
    media, latents = proj.in_proj(x), proj.latents[None]  # (1, N, dim), (1, M, dim)
    latents_n = layer.norm_latents(latents)
    keys, values = layer.to_kv(torch.cat([layer.norm_media(media), latents_n], dim=1)).chunk(2, dim=-1)
    query = layer.to_q(latents_n)
    weights = torch.softmax(query @ keys.transpose(1, 2) / math.sqrt(query.shape[-1]), dim=-1)  # (1, M, N+M)
    latents = latents + layer.to_out(weights @ values)
    latents = latents + layer.ff(latents)
    torch.testing.assert_close(proj(x), proj.out_proj(proj.norm(latents)))


def test_resampler_bad_options() -> None:
    with pytest.raises(ValueError, match=r"options.dim=10 must be divisible by options.heads=4"):
        resampler(dim=10)
    with pytest.raises(ValueError, match=r"options.num_latents must be >= 1, got 0"):
        resampler(num_latents=0)
    with pytest.raises(ValueError, match=r"modalities.video.projector.options: unknown field\(s\) 'latents'"):
        resampler(latents=8)


def test_pool_2d_on_square_grids() -> None:
    proj = pool(4)
    x = torch.randn(2, 16, D_IN)  # a 4 x 4 grid -> 2 x 2
    grid = x.view(2, 4, 4, D_IN)
    blocks = [grid[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)]
    torch.testing.assert_close(proj.pool(x), torch.stack(blocks, dim=1))
    assert proj(x).shape == (2, 4, D_OUT) and proj.num_tokens(16) == 4


def test_pool_1d_otherwise_and_never_upsamples() -> None:
    proj = pool(4)
    x = torch.randn(1, 8, D_IN)  # not a square: consecutive pairs
    torch.testing.assert_close(proj.pool(x), x.view(1, 4, 2, D_IN).mean(dim=2))
    square_to_non_square = pool(8)
    y = torch.randn(1, 16, D_IN)
    torch.testing.assert_close(square_to_non_square.pool(y), y.view(1, 8, 2, D_IN).mean(dim=2))
    short = torch.randn(1, 3, D_IN)
    torch.testing.assert_close(proj.pool(short), short)
    assert proj(short).shape == (1, 3, D_OUT) and proj.num_tokens(3) == 3
    expected = proj.linear_2(F.gelu(proj.linear_1(short)))
    torch.testing.assert_close(proj(short), expected)
    with pytest.raises(ValueError, match=r"options.output_tokens must be >= 1, got 0"):
        pool(0)


def test_mlp_writes_k_tokens_per_feature_kept_together() -> None:
    torch.manual_seed(SEED)
    spec = ProjectorConfig(type="mlp2x_gelu", options={"tokens_per_feature": 3})
    proj = build_projector("image", spec, D_IN, D_OUT)
    x = torch.randn(2, 5, D_IN)
    out = proj(x)
    assert out.shape == (2, 15, D_OUT) and proj.num_tokens(5) == 15
    hidden = proj.linear_2(F.gelu(proj.linear_1(x[:, 1])))  # (2, 3 * D_OUT): feature 1's three tokens
    torch.testing.assert_close(out[:, 3:6], hidden.view(2, 3, D_OUT))
    with pytest.raises(ValueError, match=r"options.tokens_per_feature must be >= 1, got 0"):
        build_projector(
            "image", ProjectorConfig(type="mlp2x_gelu", options={"tokens_per_feature": 0}), D_IN, D_OUT
        )


# ---- every projector x every encoder --------------------------------------------------------------------

AUDIO_RATE = 16000
IMU_RATE = 200
TINY_FRAME_ENCODER: dict[str, Any] = {"type": "hf_vision", "options": {"config": TINY_CLIP}}
TINY_OPEN_CLIP: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
TINY_TIMM: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 0,
}
TINY_WHISPER: dict[str, Any] = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 16,
    "max_source_positions": 50,  # a 1 s window: 100 mel frames -> 50 tokens
    "max_target_positions": 16,
    "vocab_size": 64,
}
TINY_CLAP_AUDIO: dict[str, Any] = {
    "spec_size": 64,
    "num_mel_bins": 16,
    "depths": [1, 1],
    "num_attention_heads": [2, 2],
    "patch_embeds_hidden_size": 16,
    "hidden_size": 32,
    "window_size": 4,
}
TINY_ENCODERS: dict[str, tuple[dict[str, Any], Callable[[], Any]]] = {
    "hf_vision": ({"config": TINY_CLIP}, lambda: image(40, 50)),
    "open_clip": (
        {"model_name": "mm-llama-matrix-vit", "model_config": TINY_OPEN_CLIP},
        lambda: image(40, 50),
    ),
    "timm": ({"model_name": "vit_tiny_patch16_224", "model_kwargs": TINY_TIMM}, lambda: image(40, 50)),
    "image_cnn": ({"image_size": 32, "channels": (8, 16), "grid": 2}, lambda: image(40, 50)),
    "efficientnet_lite0": ({"pretrained": False, "image_size": 64, "grid": 2}, lambda: image(40, 50)),
    "patches": ({"patch_size": 8, "max_height": 32, "max_width": 32}, lambda: image(20, 30)),
    "video": ({"frame_encoder": TINY_FRAME_ENCODER, "num_frames": 2}, lambda: np.stack([image(24, 24)] * 3)),
    "whisper": ({"config": TINY_WHISPER}, lambda: (noise(AUDIO_RATE, 1), AUDIO_RATE)),
    "clap": ({"config": TINY_CLAP_AUDIO}, lambda: (noise(AUDIO_RATE, 1), AUDIO_RATE)),
    "resemblyzer": ({"pretrained": False, "max_seconds": 0.5}, lambda: (noise(AUDIO_RATE, 1), AUDIO_RATE)),
    "audio_transformer": (
        {"max_seconds": 1.0, "width": 32, "depth": 1, "heads": 2, "stem_channels": 4},
        lambda: (noise(AUDIO_RATE, 1), AUDIO_RATE),
    ),
    "imu_transformer": (
        {"window": 64, "width": 32, "depth": 1, "heads": 2, "min_samples": 8},
        lambda: (noise(IMU_RATE // 2, 6), IMU_RATE),
    ),
    "imu_cnn": (
        {"window": 64, "width": 16, "layers": 2, "min_samples": 8},
        lambda: (noise(IMU_RATE // 2, 6), IMU_RATE),
    ),
}
"""Registry key -> (tiny options, a raw input). Every encoder shipped in mm_llama needs an entry."""
TINY_PROJECTORS: dict[str, dict[str, Any]] = {
    "linear": {},
    "mlp2x_gelu": {"tokens_per_feature": 2},  # K = 1 is LLaVA's projector: tests/core/test_parity_llava.py
    "resampler": {"num_latents": 4, "depth": 1, "heads": 2, "dim": 16},
    "pool": {"output_tokens": 4},
    "word_mix": {"tokens_per_feature": 2, "vocab_size": 6},
}
"""Registry key -> tiny options. Every projector shipped in mm_llama needs an entry."""


def image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * width).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def noise(samples: int, channels: int) -> np.ndarray:
    """(samples,) or (samples, channels) float32 noise in [-0.5, 0.5]."""
    shape = (samples,) if channels == 1 else (samples, channels)
    return (np.random.default_rng(samples).random(shape, dtype=np.float32) - 0.5).astype(np.float32)


def builtin(names: list[str], get: Callable[[str], type]) -> list[str]:
    """The registered names whose class ships with mm_llama (plugins registered by other tests excluded)."""
    return [name for name in names if get(name).__module__.startswith("mm_llama.")]


@pytest.fixture(scope="module")
def shared_llm() -> tuple[Any, Any]:
    """One tiny LLM and tokenizer for the whole matrix (frozen, like the encoders: the projector is checked)."""
    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(tiny_llm_config())
    llm = load_llm(tiny_llm_config(), vocab_size=len(tokenizer))
    llm.requires_grad_(False)
    return llm, tokenizer


@pytest.mark.parametrize("projector", builtin(PROJECTORS.names(), PROJECTORS.get))
@pytest.mark.parametrize("encoder", builtin(ENCODERS.names(), ENCODERS.get))
def test_every_projector_with_every_encoder(
    encoder: str, projector: str, shared_llm: tuple[Any, Any]
) -> None:
    if encoder not in TINY_ENCODERS:
        pytest.fail(f"encoder {encoder!r} has no entry in TINY_ENCODERS ({__file__}); add one")
    if projector not in TINY_PROJECTORS:
        pytest.fail(f"projector {projector!r} has no entry in TINY_PROJECTORS ({__file__}); add one")
    options, make_input = TINY_ENCODERS[encoder]
    modality = ENCODERS.get(encoder).modality
    llm, tokenizer = shared_llm
    torch.manual_seed(SEED)
    config = ModelConfig(
        llm=tiny_llm_config(),
        modalities={
            modality: ModalityConfig(
                encoder=EncoderConfig(type=encoder, options=copy.deepcopy(options), freeze=True),
                projector=ProjectorConfig(type=projector, options=dict(TINY_PROJECTORS[projector])),
            )
        },
        system_prompt="Be brief.",
    )
    model = MultimodalLM(config, llm=llm, tokenizer=tokenizer).eval()  # eval: no dropout, batch equality
    if isinstance(model.projectors[modality], WordMixProjector):  # its vocabulary comes from training data
        model.projectors[modality].anchor([5, 9, 11, 20], llm.get_input_embeddings())
    conversation = [
        {"role": "user", "content": f"<{modality}>\nWhat is it?"},
        {"role": "assistant", "content": "Noise."},
    ]
    example = model.processor(conversation, {modality: [make_input()]})
    x = example.media[modality][0]
    expected = model.projectors[modality].num_tokens(model.encoders[modality].num_tokens(x))
    pid = model.processor.placeholder_ids[modality]
    assert example.input_ids.count(pid) == expected
    batch = model.processor.collate([example, example])
    embeds = model.embed(batch["input_ids"], batch["media"])  # scatters (B * M, D_llm) into the slots
    slots = batch["input_ids"] == pid
    assert embeds.shape == (*batch["input_ids"].shape, model.llm.config.hidden_size)
    torch.testing.assert_close(embeds[0][slots[0]], embeds[1][slots[1]])  # the same item, batched
    embeds[slots].square().mean().backward()
    grads = [p.grad for p in model.projectors[modality].parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def word_mix(**options: Any) -> WordMixProjector:
    torch.manual_seed(SEED)
    spec = ProjectorConfig(type="word_mix", options={"tokens_per_feature": 3, "vocab_size": 5, **options})
    return build_projector("image", spec, D_IN, D_OUT)


def test_word_mix_tokens_are_mixtures_of_its_word_embeddings() -> None:
    projector = word_mix()
    table = torch.nn.Embedding(50, D_OUT)
    x = torch.randn(2, 4, D_IN)
    torch.testing.assert_close(projector(x), torch.zeros(2, 12, D_OUT))  # no vocabulary yet: all null
    projector.anchor([7, 3, 42], table)  # 3 of the 5 slots: the other 2 stay unused
    assert projector.anchored and projector.word_ids.tolist() == [7, 3, 42, -1, -1]
    probs = projector.word_probs(x)
    assert probs.shape == (2, 4 * 3, 5 + 1) and projector.num_tokens(4) == 12
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 12))
    assert (probs[..., 3:5] == 0).all()  # unused slots get nothing
    rows = torch.cat([table.weight[[7, 3, 42]], table.weight[[7, 3, 42]].mean(0, keepdim=True)]).detach()
    torch.testing.assert_close(projector(x), probs[..., [0, 1, 2, 5]] @ rows)  # null starts at the mean
    with torch.no_grad():  # a confident distribution writes the word's own embedding
        projector.linear_2.bias.view(3, 6)[:, 2] = 100.0
    torch.testing.assert_close(projector(x), table.weight[42].detach().expand(2, 12, D_OUT))
    with pytest.raises(ValueError, match="expected 1 to 5 vocabulary ids, got 6"):
        projector.anchor(list(range(6)), table)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        word_mix(temperature=0.0)


def test_word_mix_vocabulary_is_saved_with_the_projector(tmp_path) -> None:
    torch.manual_seed(SEED)
    config = ModelConfig(
        llm=tiny_llm_config(),
        modalities={
            "image": ModalityConfig(
                encoder=EncoderConfig(type="hf_vision", options={"config": copy.deepcopy(TINY_CLIP)}),
                projector=ProjectorConfig(type="word_mix", options={"vocab_size": 8}),
            )
        },
    )
    model = MultimodalLM(config).eval()
    model.projectors["image"].anchor([100, 200, 300], model.llm.get_input_embeddings())
    model.save_pretrained(tmp_path / "run", copy_llm=True)
    loaded = MultimodalLM.from_pretrained(tmp_path / "run").eval()
    assert loaded.projectors["image"].word_ids.tolist() == [100, 200, 300] + [-1] * 5
    batch = model.prepare(["<image> what?"], {"image": [[image(40, 50)]]})
    with torch.no_grad():
        expected = model(
            batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True
        )
        got = loaded(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True)
    torch.testing.assert_close(got.logits, expected.logits)


def context(
    replies: list[list[str]], tokenizer: Any, table: torch.nn.Embedding, log: list[str]
) -> ProjectorContext:
    """A prepare context over fixed replies; counts how often they are read into ``log``."""

    def read() -> Any:
        log.append("read")
        yield from replies

    return ProjectorContext("image", "pre", tokenizer, table, read, log.append)


def test_the_hooks_do_nothing_by_default(shared_llm: tuple[Any, Any]) -> None:
    llm, tokenizer = shared_llm
    torch.manual_seed(SEED)
    projector = build_projector("image", ProjectorConfig(type="mlp2x_gelu"), D_IN, D_OUT)
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    log: list[str] = []
    projector.prepare(context([["a red circle"]], tokenizer, llm.get_input_embeddings(), log))
    assert log == []  # the replies were never read
    assert all(torch.equal(before[k], v) for k, v in projector.state_dict().items())
    x = torch.randn(2, 4, D_IN)
    tokens, aux = projector.project_with_aux(x)
    torch.testing.assert_close(tokens, projector(x))
    assert aux is None and projector.LOSS_TERMS == ()
    assert projector.loss_terms(AuxBatch([], torch.zeros(0, 1, dtype=torch.long))) == {}


def test_word_mix_prepare_anchors_on_the_replies_once(shared_llm: tuple[Any, Any]) -> None:
    llm, tokenizer = shared_llm
    table = llm.get_input_embeddings()
    projector = word_mix(vocab_size=4)
    replies = [["a red circle", "yes"], ["a blue circle"], ["two red squares"]]
    log: list[str] = []
    projector.prepare(context(replies, tokenizer, table, log))
    ids = caption_vocabulary(replies, tokenizer, 4)
    assert len(ids) == 4 and projector.word_ids.tolist() == ids
    words = [tokenizer.decode([i]) for i in ids]
    assert {" red", " circle", "a"} <= set(words)  # in 2 or 3 of the 3 records: the most frequent
    assert log == ["read", f"image projector vocabulary (4 words): {words}"]
    torch.testing.assert_close(projector.word_embeds, table.weight[ids].detach())
    projector.prepare(context([["other words entirely"]], tokenizer, table, log))  # anchored: kept
    assert projector.word_ids.tolist() == ids and log[2:] == []
    fresh = word_mix(vocab_size=4)
    fresh.prepare(context([], tokenizer, table, log))  # no records of its modality: left for a later stage
    assert not fresh.anchored


def test_word_mix_word_count_term_reads_its_word_distributions(shared_llm: tuple[Any, Any]) -> None:
    llm, _ = shared_llm
    projector = word_mix(vocab_size=4)
    projector.anchor([5, 9, 11, 20], llm.get_input_embeddings())
    x = torch.randn(2, 3, D_IN)
    tokens, probs = projector.project_with_aux(x)
    torch.testing.assert_close(tokens, projector(x))
    torch.testing.assert_close(probs, projector.word_probs(x))
    assert projector.LOSS_TERMS == ("word_count",)
    captions = torch.tensor([[5, 9, 9], [11, -1, -1]])
    terms = projector.loss_terms(AuxBatch(list(probs), captions))
    assert list(terms) == ["word_count"]
    torch.testing.assert_close(
        terms["word_count"], word_count_loss(list(probs), projector.word_ids, captions)
    )


def test_word_count_wants_each_caption_word_once_and_absent_words_never() -> None:
    word_ids = torch.tensor([3, 4, 5, 6, -1])  # vocabulary of 4 words, one unused slot
    caption_ids = torch.tensor([[3, 4, 4, 9], [3, 5, -1, -1], [3, 6, -1, -1]])  # 3 is in every caption
    exact = torch.zeros(3, 5, 6)  # per sample: 5 tokens over 5 slots + null
    exact[0, [0, 1, 2], [0, 1, 1]] = 1.0  # "3", "4", "4"
    exact[1, [0, 1], [0, 2]] = 1.0
    exact[2, [0, 1], [0, 3]] = 1.0
    exact[0, 3:, 5] = exact[1, 2:, 5] = exact[2, 2:, 5] = 1.0  # the rest: null
    assert word_count_loss(list(exact), word_ids, caption_ids).item() == pytest.approx(0.0)
    hedging = exact.clone()  # a null token of sample 1 says "6" (absent there): costs
    hedging[1, 4] = 0.0
    hedging[1, 4, 3] = 1.0
    assert word_count_loss(list(hedging), word_ids, caption_ids).item() > 0.1
    no_shared = exact.clone()  # dropping the word every caption holds costs nothing (idf 0)
    no_shared[:, 0] = 0.0
    no_shared[:, 0, 5] = 1.0
    assert word_count_loss(list(no_shared), word_ids, caption_ids).item() == pytest.approx(0.0)
    probs = torch.softmax(torch.randn(3, 5, 6), -1).requires_grad_()
    word_count_loss(list(probs), word_ids, caption_ids).backward()
    assert probs.grad is not None and probs.grad[..., 4].abs().sum() == 0  # the unused slot has no say


def test_resampler_and_pool_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(SEED)
    video = {"frame_encoder": TINY_FRAME_ENCODER, "num_frames": 2, "aggregation": "mean"}
    config = ModelConfig(
        llm=tiny_llm_config(),
        modalities={
            "image": ModalityConfig(
                encoder=EncoderConfig(type="hf_vision", options={"config": copy.deepcopy(TINY_CLIP)}),
                projector=ProjectorConfig(type="pool", options={"output_tokens": 4}),
            ),
            "video": ModalityConfig(
                encoder=EncoderConfig(type="video", options=copy.deepcopy(video)),
                projector=ProjectorConfig(type="resampler", options=dict(TINY_PROJECTORS["resampler"])),
            ),
        },
        system_prompt="Be brief.",
    )
    model = MultimodalLM(config).eval()
    model.save_pretrained(tmp_path / "run", copy_llm=True)
    loaded = MultimodalLM.from_pretrained(tmp_path / "run").eval()
    frames = np.stack([image(24, 24)] * 3)
    batch = model.prepare(["<image> and <video>"], {"image": [[image(40, 50)]], "video": [[frames]]})
    with torch.no_grad():
        expected = model(
            batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True
        )
        got = loaded(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True)
    torch.testing.assert_close(got.logits, expected.logits)
