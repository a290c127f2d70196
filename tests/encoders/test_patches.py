"""Fuyu-style raw patches: aspect-preserving resize, padding, patch layout with row breaks, and variable
resolutions batched through a tiny MultimodalLM."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama import EncoderConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig
from mm_llama.encoders import build_encoder
from mm_llama.encoders.patches import PAD_VALUE, PatchEncoder, fit_size
from tests.conftest import tiny_llm_config

P = 8
MAX_SIDE = 64
FEATURE_DIM = P * P * 3 + 1


def patch_encoder(**overrides: Any) -> PatchEncoder:
    options = {"patch_size": P, "max_height": MAX_SIDE, "max_width": MAX_SIDE, **overrides}
    return build_encoder("image", EncoderConfig(type="patches", options=options))


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_fit_size_keeps_aspect_and_never_upscales_unless_asked() -> None:
    assert fit_size(40, 50, 64, 64, upscale=False) == (40, 50)
    assert fit_size(40, 50, 64, 64, upscale=True) == (51, 64)
    assert fit_size(200, 100, 64, 64, upscale=False) == (64, 32)
    assert fit_size(1000, 3, 64, 64, upscale=False) == (64, 1)  # never a zero-width image


@pytest.mark.parametrize(
    ("size", "upscale", "padded"),
    [((40, 50), False, (40, 56)), ((40, 50), True, (56, 64)), ((200, 100), False, (64, 32))],
)
def test_preprocess_resizes_normalizes_and_pads(size: tuple[int, int], upscale: bool, padded: tuple) -> None:
    encoder = patch_encoder(upscale=upscale)
    x = encoder.preprocess(image(*size))
    assert x.shape == (3, *padded)
    h, w = fit_size(*size, MAX_SIDE, MAX_SIDE, upscale)
    assert x.min() >= -1.0 and x.max() <= 1.0  # mean 0.5, std 0.5: pixels land in [-1, 1]
    assert (x[:, h:, :] == PAD_VALUE).all() and (x[:, :, w:] == PAD_VALUE).all()


def test_normalization_and_input_kinds() -> None:
    encoder = patch_encoder()
    white = np.full((8, 16, 3), 255, dtype=np.uint8)
    torch.testing.assert_close(encoder.preprocess(white), torch.ones(3, 8, 16))
    buffer = io.BytesIO()
    Image.fromarray(image(12, 20)).save(buffer, format="PNG")
    from_bytes = encoder.preprocess(buffer.getvalue())
    torch.testing.assert_close(encoder.preprocess(image(12, 20)), from_bytes)
    torch.testing.assert_close(
        encoder.preprocess(torch.from_numpy(image(12, 20)).permute(2, 0, 1)), from_bytes
    )


def test_patch_layout_with_row_breaks() -> None:
    encoder = patch_encoder()
    x = encoder.preprocess(image(20, 30))  # padded to 24 x 32: 3 rows of 4 patches
    tokens = encoder(x[None])
    rows, cols = 3, 4
    assert tokens.shape == (1, rows * (cols + 1), FEATURE_DIM)
    assert encoder.num_tokens(x) == rows * (cols + 1)
    grid = tokens[0].view(rows, cols + 1, FEATURE_DIM)
    row_break = torch.zeros(FEATURE_DIM)
    row_break[-1] = 1.0
    for r in range(rows):
        torch.testing.assert_close(grid[r, cols], row_break)
        for c in range(cols):
            block = x[:, r * P : (r + 1) * P, c * P : (c + 1) * P]  # (3, P, P)
            torch.testing.assert_close(
                grid[r, c, :-1], block.permute(1, 2, 0).flatten()
            )  # row-major, RGB last
            assert grid[r, c, -1] == 0


def test_no_parameters_not_pretrained() -> None:
    encoder = patch_encoder()
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    assert not encoder.is_pretrained and encoder.output_dim == FEATURE_DIM
    assert encoder.device == torch.device("cpu")


def test_bad_options_and_inputs() -> None:
    with pytest.raises(ValueError, match=r"options.patch_size must be >= 1, got 0"):
        patch_encoder(patch_size=0)
    with pytest.raises(ValueError, match=r"must be >= patch_size=8, got 4 x 64"):
        patch_encoder(max_height=4)
    with pytest.raises(ValueError, match=r"options.std must be positive"):
        patch_encoder(std=[0.5, 0.0, 0.5])
    with pytest.raises(
        ValueError, match=r"expected \(B, 3, H, W\) with H and W multiples of 8.*\(1, 3, 10, 16\)"
    ):
        patch_encoder()(torch.zeros(1, 3, 10, 16))


def fuyu_model() -> MultimodalLM:
    torch.manual_seed(0)
    options = {"patch_size": P, "max_height": MAX_SIDE, "max_width": MAX_SIDE}
    config = ModelConfig(
        llm=tiny_llm_config(),
        modalities={
            "image": ModalityConfig(
                encoder=EncoderConfig(type="patches", options=options),
                projector=ProjectorConfig(type="linear"),
            )
        },
        system_prompt="Be brief.",
    )
    return MultimodalLM(config)


def test_variable_resolutions_in_one_batch() -> None:
    model = fuyu_model()
    sizes = [(20, 30), (64, 16), (20, 30)]  # 3 x 5 = 15, 8 x 3 = 24 and 15 tokens
    examples = [
        model.processor(
            [{"role": "user", "content": "<image> Describe."}, {"role": "assistant", "content": "Noise."}],
            {"image": [image(*size, seed=i)]},
        )
        for i, size in enumerate(sizes)
    ]
    pid = model.processor.placeholder_ids["image"]
    assert [e.input_ids.count(pid) for e in examples] == [15, 24, 15]
    batch = model.processor.collate(examples)
    out = model(**batch, return_logits=True)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape
    out.loss.backward()
    weight_grad = model.projectors["image"].proj.weight.grad  # (D_llm, P*P*3 + 1)
    assert weight_grad[:, -1].abs().sum() > 0  # the row-break column learns
    alone = model(**model.processor.collate(examples[1:2]), return_logits=True)
    n = len(examples[1].input_ids)
    torch.testing.assert_close(out.logits[1, :n], alone.logits[0], atol=1e-4, rtol=1e-4)
    answers = model.generate(
        ["<image> What is it?", "Compare <image> and <image>."],
        images=[[image(20, 30)], [image(64, 16), image(40, 50)]],
        max_new_tokens=3,
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_save_load_round_trip(tmp_path) -> None:
    model = fuyu_model().eval()
    model.save_pretrained(tmp_path / "fuyu", copy_llm=True)
    loaded = MultimodalLM.from_pretrained(tmp_path / "fuyu").eval()
    batch = model.prepare(["<image> Hi"], {"image": [[image(20, 30)]]})
    with torch.no_grad():
        expected = model(
            batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True
        )
        got = loaded(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True)
    torch.testing.assert_close(got.logits, expected.logits)
