"""Image inputs and the three image-encoder backends (hf_vision CLIP / SigLIP, open_clip, timm) on tiny
random models: input kinds, normalization, LLaVA feature selection, token counts, freezing, loading
weights back from local files, bad options, and one MultimodalLM training step per backend."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase, SiglipImageProcessor

from mm_llama import EncoderConfig, ModalityConfig, ModelConfig, MultimodalLM, ProjectorConfig
from mm_llama.encoders import build_encoder, load_image
from mm_llama.encoders.base import ModalityEncoder, build_preprocessor
from mm_llama.encoders.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, open_clip_tag_settings
from mm_llama.errors import MMInputError
from mm_llama.llm import load_tokenizer
from tests.conftest import TINY_CLIP, tiny_llm_config

SIDE = 32
PATCH = 8
NUM_PATCHES = (SIDE // PATCH) ** 2
WIDTH = 32
DEPTH = 3

TINY_SIGLIP: dict[str, Any] = {**TINY_CLIP, "model_type": "siglip_vision_model"}
OPEN_CLIP_NAME = "mm-llama-test-vit"
TINY_OPEN_CLIP: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIDE, "patch_size": PATCH, "width": WIDTH, "layers": DEPTH, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
OPEN_CLIP_RESNET_NAME = "mm-llama-test-resnet"
TINY_OPEN_CLIP_RESNET: dict[str, Any] = {
    **TINY_OPEN_CLIP,
    "vision_cfg": {"image_size": SIDE, "layers": [1, 1, 1, 1], "width": 8},
}
TIMM_NAME = "vit_tiny_patch16_224"
TINY_TIMM: dict[str, Any] = {
    "img_size": SIDE,
    "patch_size": PATCH,
    "embed_dim": WIDTH,
    "depth": DEPTH,
    "num_heads": 2,
    "num_classes": 5,
}


def open_clip_options(**overrides: Any) -> dict[str, Any]:
    return {"model_name": OPEN_CLIP_NAME, "model_config": copy.deepcopy(TINY_OPEN_CLIP), **overrides}


def timm_options(**overrides: Any) -> dict[str, Any]:
    kwargs = {**TINY_TIMM, **overrides.pop("model_kwargs", {})}
    return {"model_name": TIMM_NAME, "model_kwargs": kwargs, **overrides}


def save_hf(encoder: Any, folder: Path) -> dict[str, Any]:
    """A transformers checkpoint folder: the tower and its image processor, as save_pretrained writes them."""
    encoder.tower.save_pretrained(folder)
    encoder.preprocessor.image_processor.save_pretrained(folder)
    return {"name_or_path": str(folder)}


def save_open_clip(encoder: Any, folder: Path) -> dict[str, Any]:
    """A whole-model OpenCLIP checkpoint (text tower included) holding the encoder's vision weights."""
    model = open_clip.create_model(OPEN_CLIP_NAME)
    model.visual.load_state_dict(encoder.backbone.state_dict())
    file = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
    return open_clip_options(pretrained=str(file))


def save_timm(encoder: Any, folder: Path) -> dict[str, Any]:
    """A timm state dict (classifier head included) in a torch file."""
    file = folder / "vit.pth"
    torch.save(encoder.backbone.state_dict(), file)
    return timm_options(pretrained_file=str(file), allow_pickle=True)


@dataclass
class Backend:
    """One encoder backend under test: its registry key, from-scratch options and checkpoint writer."""

    type: str
    options: Callable[..., dict[str, Any]]
    save: Callable[[Any, Path], dict[str, Any]]
    has_cls: bool


BACKENDS = {
    "hf_clip": Backend("hf_vision", lambda **o: {"config": copy.deepcopy(TINY_CLIP), **o}, save_hf, True),
    "hf_siglip": Backend(
        "hf_vision", lambda **o: {"config": copy.deepcopy(TINY_SIGLIP), **o}, save_hf, False
    ),
    "open_clip": Backend("open_clip", open_clip_options, save_open_clip, True),
    "timm": Backend("timm", timm_options, save_timm, True),
}
CLS_BACKENDS = [name for name, b in BACKENDS.items() if b.has_cls]


def encoder(kind: str, freeze: bool | None = None, seed: int = 0, **options: Any) -> ModalityEncoder:
    """Build a backend through the registry (as a model config would), seeded, in eval mode."""
    backend = BACKENDS[kind]
    torch.manual_seed(seed)
    cfg = EncoderConfig(type=backend.type, options=backend.options(**options), freeze=freeze)
    return build_encoder("image", cfg).eval()


def images(n: int = 2) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, size=(40, 50, 3), dtype=np.uint8) for i in range(n)]


def encode(enc: ModalityEncoder, items: list[Any]) -> torch.Tensor:
    with torch.no_grad():
        return enc(torch.stack([enc.preprocess(item) for item in items]))  # (B, N, D)


# ---- load_image ----------------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_accepts_every_input_kind(tmp_path: Path, rgb_image: np.ndarray) -> None:
    pil = Image.fromarray(rgb_image)
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(pil))
    inputs = {
        "str path": str(path),
        "Path": path,
        "bytes": png_bytes(pil),
        "file object": io.BytesIO(png_bytes(pil)),
        "PIL": pil,
        "uint8 array": rgb_image,
        "float array": rgb_image.astype(np.float32) / 255.0,
        "uint8 tensor": torch.from_numpy(rgb_image).permute(2, 0, 1),  # (C, H, W)
        "float tensor": torch.from_numpy(rgb_image).permute(2, 0, 1).float() / 255.0,
    }
    for name, item in inputs.items():
        image = load_image(item)
        assert image.mode == "RGB" and image.size == (50, 40), name
        np.testing.assert_array_equal(np.asarray(image), rgb_image, err_msg=name)


def test_load_image_converts_grayscale_and_rgba_to_rgb(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for item in (gray, gray[:, :, None], Image.fromarray(gray, mode="L"), png_bytes(Image.fromarray(gray))):
        rgb = np.asarray(load_image(item))
        assert rgb.shape == (3, 4, 3)
        np.testing.assert_array_equal(rgb, np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.dstack([np.full((3, 4, 3), 200, dtype=np.uint8), np.full((3, 4), 128, dtype=np.uint8)])
    for item in (rgba, Image.fromarray(rgba, mode="RGBA"), png_bytes(Image.fromarray(rgba, mode="RGBA"))):
        image = load_image(item)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), rgba[:, :, :3])


def test_load_image_errors_name_the_input(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG this is not an image")
    with pytest.raises(ValueError, match="corrupt.png"):
        load_image(str(corrupt))
    with pytest.raises(ValueError, match="image bytes"):
        load_image(b"not an image either")
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 1\|3\|4\).*\(2, 3, 5\)"):
        load_image(np.zeros((2, 3, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="list"):
        load_image([1, 2, 3])


# ---- every backend -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_shapes_and_num_tokens_agree(kind: str) -> None:
    enc = encoder(kind)
    x = enc.preprocess(images(1)[0])
    assert x.shape == (3, SIDE, SIDE)
    features = encode(enc, images(2))
    assert features.shape == (2, NUM_PATCHES, WIDTH)
    assert enc.num_tokens(x) == NUM_PATCHES and enc.output_dim == WIDTH
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("kind", BACKENDS)
def test_preprocessing_is_the_backbones_own(kind: str, rgb_image: np.ndarray) -> None:
    """A white image lands at (1 - mean) / std of the backbone's normalization, whatever the input form."""
    enc = encoder(kind)
    mean, std = {
        "hf_clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        "hf_siglip": ((0.5,) * 3, (0.5,) * 3),
        "open_clip": (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
        "timm": ((0.5,) * 3, (0.5,) * 3),  # vit_tiny_patch16_224's pretrained config
    }[kind]
    expected = (1 - torch.tensor(mean)) / torch.tensor(std)  # (3,)
    x = enc.preprocess(np.full((20, 30, 3), 255, dtype=np.uint8))
    torch.testing.assert_close(x, expected[:, None, None].expand(3, SIDE, SIDE), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        enc.preprocess(rgb_image), enc.preprocess(png_bytes(Image.fromarray(rgb_image)))
    )


@pytest.mark.parametrize("kind", BACKENDS)
def test_select_layer_picks_different_blocks(kind: str) -> None:
    last, penultimate = encode(encoder(kind, select_layer=-1), images()), encode(encoder(kind), images())
    assert last.shape == penultimate.shape
    assert not torch.allclose(last, penultimate)


@pytest.mark.parametrize("kind", CLS_BACKENDS)
def test_cls_patch_prepends_the_cls_token(kind: str) -> None:
    patch = encoder(kind)
    with_cls = encoder(kind, select_feature="cls_patch")
    with_cls.load_state_dict(patch.state_dict())
    x = patch.preprocess(images(1)[0])
    features = encode(with_cls, images())
    assert features.shape == (2, NUM_PATCHES + 1, WIDTH) and with_cls.num_tokens(x) == NUM_PATCHES + 1
    torch.testing.assert_close(features[:, 1:], encode(patch, images()))


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("hf_siglip", {}),
        ("timm", {"model_kwargs": {"class_token": False, "global_pool": "avg"}}),
        ("open_clip", {"model_name": OPEN_CLIP_RESNET_NAME, "model_config": TINY_OPEN_CLIP_RESNET}),
    ],
)
def test_cls_patch_needs_a_cls_token(kind: str, options: dict[str, Any]) -> None:
    enc = encoder(kind, **options)
    x = enc.preprocess(images(1)[0])
    assert encode(enc, images()).shape[1] == enc.num_tokens(x)
    with pytest.raises(ValueError, match="CLS token"):
        encoder(kind, select_feature="cls_patch", **options)


@pytest.mark.parametrize("kind", BACKENDS)
def test_frozen_when_pretrained_trainable_from_scratch(kind: str, tmp_path: Path) -> None:
    scratch = encoder(kind)
    assert not scratch.is_pretrained
    assert all(p.requires_grad for p in scratch.parameters())
    options = BACKENDS[kind].save(scratch, tmp_path)
    cfg = EncoderConfig(type=BACKENDS[kind].type, options=options)
    loaded = build_encoder("image", cfg)
    assert loaded.is_pretrained
    assert not any(p.requires_grad for p in loaded.parameters())
    unfrozen = build_encoder("image", EncoderConfig(type=BACKENDS[kind].type, options=options, freeze=False))
    assert all(p.requires_grad for p in unfrozen.parameters())


@pytest.mark.parametrize("kind", BACKENDS)
def test_weights_saved_to_disk_load_back_identical(kind: str, tmp_path: Path) -> None:
    source = encoder(kind, seed=1)
    options = BACKENDS[kind].save(source, tmp_path)
    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded = build_encoder("image", EncoderConfig(type=BACKENDS[kind].type, options=options)).eval()
    torch.testing.assert_close(loaded.preprocess(images(1)[0]), source.preprocess(images(1)[0]))
    torch.testing.assert_close(encode(loaded, images()), encode(source, images()), atol=0, rtol=0)


@pytest.mark.parametrize("kind", BACKENDS)
def test_encoder_state_dict_round_trip(kind: str) -> None:
    """What MultimodalLM.save_pretrained does for encoders that train: state_dict into a fresh build."""
    source, target = encoder(kind, seed=1), encoder(kind, seed=2)
    assert not torch.allclose(encode(source, images()), encode(target, images()))
    target.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(encode(target, images()), encode(source, images()), atol=0, rtol=0)


# ---- open_clip and timm specifics ----------------------------------------------------------------------
def block_outputs(enc: Any, blocks: torch.nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, (B, 1 + P, D), captured with hooks during the library's own forward."""
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in blocks]
    with torch.no_grad():
        enc.backbone(x)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
@pytest.mark.parametrize("select_layer", [-1, -2, 1])
def test_select_layer_is_llavas_hidden_state_index(kind: str, select_layer: int) -> None:
    enc = encoder(kind, select_layer=select_layer, select_feature="cls_patch")
    blocks = enc.backbone.transformer.resblocks if kind == "open_clip" else enc.backbone.blocks
    x = torch.stack([enc.preprocess(item) for item in images()])  # (B, 3, H, W)
    hidden = [None, *block_outputs(enc, blocks, x)]  # hidden[i]: block i's output, as HF's hidden_states
    with torch.no_grad():
        torch.testing.assert_close(enc(x), hidden[select_layer])


HF_DEPTH = TINY_CLIP["num_hidden_layers"]


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1, 0, -(HF_DEPTH + 1)])
def test_hf_vision_runs_the_blocks_up_to_select_layer_only(kind: str, select_layer: int) -> None:
    """The output is the whole tower's ``hidden_states[select_layer]``, the blocks after it never run, and
    the tower is left as it was: a later whole run (HF Llava's, sharing the tower) still records every
    block's hidden state."""
    enc = encoder(
        kind, select_layer=select_layer, select_feature="cls_patch" if kind == "hf_clip" else "patch"
    )
    x = torch.stack([enc.preprocess(item) for item in images()])
    ran: list[int] = []
    blocks = enc.tower.get_submodule("encoder.layers")
    hooks = [b.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        out = enc(x)  # first: transformers installs its output hooks on the first call
    for hook in hooks:
        hook.remove()
    needed = select_layer % (HF_DEPTH + 1)
    assert ran == list(range(needed or HF_DEPTH))  # the embeddings (0): the whole tower, as transformers does
    with torch.no_grad():
        whole = enc.tower(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(whole) == HF_DEPTH + 1 and all(h is not None for h in whole)
    torch.testing.assert_close(out, whole[select_layer])
    with torch.no_grad():
        torch.testing.assert_close(enc(x), out)


@pytest.mark.parametrize("select_layer", [-(HF_DEPTH + 2), HF_DEPTH + 1])
def test_hf_vision_select_layer_out_of_range(select_layer: int) -> None:
    """Refused by the preprocessor (before any weight is read), as an input error naming the field."""
    with pytest.raises(
        MMInputError,
        match=rf"modalities\.image\.encoder\.options: .*select_layer={select_layer}.*{HF_DEPTH} blocks",
    ):
        encoder("hf_clip", select_layer=select_layer)
    with pytest.raises(MMInputError, match=rf"select_layer={select_layer}"):
        build_preprocessor(
            "image",
            EncoderConfig(type="hf_vision", options=BACKENDS["hf_clip"].options(select_layer=select_layer)),
        )


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
@pytest.mark.parametrize("select_layer", [0, -(DEPTH + 1), DEPTH + 1])
def test_select_layer_out_of_range(kind: str, select_layer: int) -> None:
    with pytest.raises(ValueError, match=rf"select_layer={select_layer}.*{DEPTH} blocks"):
        encoder(kind, select_layer=select_layer)


def test_timm_register_tokens_are_dropped() -> None:
    kwargs = {"model_kwargs": {"reg_tokens": 2}}
    patch, with_cls = encoder("timm", **kwargs), encoder("timm", select_feature="cls_patch", **kwargs)
    with_cls.load_state_dict(patch.state_dict())
    x = torch.stack([patch.preprocess(item) for item in images()])
    outputs = block_outputs(with_cls, with_cls.backbone.blocks, x)
    hidden = outputs[-2]  # (B, 1 + 2 + P, D): CLS, 2 registers, patches
    with torch.no_grad():
        torch.testing.assert_close(patch(x), hidden[:, 3:])
        torch.testing.assert_close(with_cls(x), torch.cat([hidden[:, :1], hidden[:, 3:]], dim=1))


def test_open_clip_tag_settings_come_from_open_clips_table() -> None:
    siglip = open_clip_tag_settings("ViT-B-16-SigLIP", "webli", "here")
    assert siglip["image_mean"] == (0.5, 0.5, 0.5) and siglip["image_resize_mode"] == "squash"
    assert not siglip["force_quick_gelu"]
    assert open_clip_tag_settings("ViT-L-14-336", "openai", "here")["force_quick_gelu"]  # LLaVA-1.5's tower
    with pytest.raises(ValueError, match=r"pretrained_tag='webli' is not .*'ViT-L-14-336'.*\['openai'\]"):
        open_clip_tag_settings("ViT-L-14-336", "webli", "here")


def test_open_clip_pretrained_tag_sets_preprocessing_and_quick_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    tag = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bilinear", "quick_gelu": True}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "tiny-tag" else {})
    plain, tagged = encoder("open_clip"), encoder("open_clip", pretrained_tag="tiny-tag")
    white = np.full((20, 30, 3), 255, dtype=np.uint8)
    torch.testing.assert_close(tagged.preprocess(white), torch.full((3, SIDE, SIDE), 2.0))
    assert not torch.allclose(plain.preprocess(white), tagged.preprocess(white))
    assert type(tagged.backbone.transformer.resblocks[0].mlp.gelu) is open_clip.model.QuickGELU
    assert type(plain.backbone.transformer.resblocks[0].mlp.gelu) is not open_clip.model.QuickGELU


@pytest.mark.parametrize(
    ("kind", "options", "error", "match"),
    [
        ("open_clip", {"pretrained": "openai"}, FileNotFoundError, "options.pretrained.*never downloads"),
        ("open_clip", {"model_name": "hf-hub:org/repo"}, ValueError, "never downloads"),
        ("open_clip", {"model_name": "no-such-arch", "model_config": None}, ValueError, "list_models"),
        ("open_clip", {"model_config": {"embed_dim": 8}}, ValueError, "lacks vision_cfg, text_cfg"),
        ("open_clip", {"model_name": "ViT-B-32"}, ValueError, "'ViT-B-32' with a different config"),
        ("timm", {"pretrained_file": "timm/vit_tiny"}, FileNotFoundError, "options.pretrained_file.*never"),
        ("timm", {"model_name": "hf-hub:timm/vit_tiny"}, ValueError, "never downloads"),
        ("timm", {"model_name": "no_such_model"}, ValueError, "unknown timm model 'no_such_model'"),
        (
            "timm",
            {"model_kwargs": {"no_such_kwarg": 1}},
            ValueError,
            "model_kwargs do not fit.*no_such_kwarg",
        ),
    ],
)
def test_bad_options_raise_clear_errors(kind: str, options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        encoder(kind, **options)


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
def test_bad_weights_files_name_the_file(kind: str, tmp_path: Path) -> None:
    options = BACKENDS[kind].save(encoder(kind), tmp_path)
    field = "pretrained" if kind == "open_clip" else "pretrained_file"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        encoder(kind, **{**options, field: str(corrupt)})
    other_depth = {
        "model_config": {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "layers": 2}}
    }
    if kind == "timm":
        other_depth = {"model_kwargs": {"depth": 2}}
    name = {"model_name": "mm-llama-test-vit-2"} if kind == "open_clip" else {}
    with pytest.raises(ValueError, match=rf"cannot load .*{Path(options[field]).name}"):
        encoder(kind, **{**options, **other_depth, **name})


def test_siglip_folder_without_cls_loads_with_its_processor(tmp_path: Path) -> None:
    source = encoder("hf_siglip")
    source.tower.save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(tmp_path)
    loaded = build_encoder("image", EncoderConfig(type="hf_vision", options={"name_or_path": str(tmp_path)}))
    assert type(loaded.preprocessor.image_processor).__name__.startswith("SiglipImageProcessor")
    assert encode(loaded.eval(), images()).shape == (2, NUM_PATCHES, WIDTH)
    with pytest.raises(ValueError, match="no CLS token"):
        build_encoder(
            "image",
            EncoderConfig(
                type="hf_vision", options={"name_or_path": str(tmp_path), "select_feature": "cls_patch"}
            ),
        )


# ---- in a MultimodalLM ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    """One tokenizer for the module's models (each adds the same <image> marker token)."""
    return load_tokenizer(tiny_llm_config())


@pytest.mark.parametrize("kind", BACKENDS)
def test_multimodal_lm_forward_with_loss(
    kind: str, rgb_image: np.ndarray, tokenizer: PreTrainedTokenizerBase
) -> None:
    backend = BACKENDS[kind]
    torch.manual_seed(0)
    config = ModelConfig(
        llm=tiny_llm_config(),
        modalities={
            "image": ModalityConfig(
                encoder=EncoderConfig(type=backend.type, options=backend.options()),
                projector=ProjectorConfig(type="mlp2x_gelu"),
            )
        },
        system_prompt="Be brief.",
    )
    model = MultimodalLM(config, tokenizer=tokenizer)
    conversation = [
        {"role": "user", "content": "<image>\nWhat is in the picture?"},
        {"role": "assistant", "content": "Coloured noise."},
    ]
    batch = model.processor.collate([model.processor(conversation, {"image": [rgb_image]})])
    n_placeholders = int((batch["input_ids"] == model.processor.placeholder_ids["image"]).sum())
    assert n_placeholders == NUM_PATCHES  # mlp2x_gelu keeps one token per feature
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss) and out.num_label_tokens > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.projectors["image"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders["image"].parameters())


def test_image_cnn_tokens_weights_and_freezing(tmp_path) -> None:
    from safetensors.torch import save_file

    from mm_llama.config import EncoderConfig
    from mm_llama.encoders import build_encoder

    torch.manual_seed(0)
    options = {"image_size": 32, "channels": [8, 16], "grid": 2}
    encoder = build_encoder("image", EncoderConfig(type="image_cnn", options=options))
    assert all(p.requires_grad for p in encoder.parameters())  # from scratch: trainable
    x = encoder.preprocess(np.zeros((40, 50, 3), dtype=np.uint8))
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, -1.0))
    feats = encoder(torch.stack([x, -x]))
    assert feats.shape == (2, 4, 16) == (2, encoder.num_tokens(x), encoder.output_dim)
    save_file(encoder.state_dict(), tmp_path / "cnn.safetensors")
    loaded = build_encoder(
        "image",
        EncoderConfig(type="image_cnn", options={**options, "weights": str(tmp_path / "cnn.safetensors")}),
    )
    assert loaded.is_pretrained and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(torch.stack([x, -x])), feats)
    keep_all = build_encoder("image", EncoderConfig(type="image_cnn", options={**options, "grid": None}))
    assert keep_all(x[None]).shape == (1, 64, 16)  # 32 px / 2 / 2 = 8 x 8 cells
    with pytest.raises(ValueError, match="grid"):
        build_encoder("image", EncoderConfig(type="image_cnn", options={**options, "grid": 9}))
    deeper = build_encoder("image", EncoderConfig(type="image_cnn", options={**options, "blocks": 3}))
    assert deeper(x[None]).shape == (1, 4, 16)  # residual blocks keep every shape
    extra = sum(p.numel() for p in deeper.parameters()) - sum(p.numel() for p in encoder.parameters())
    assert extra == 2 * ((8 * 8 * 9 + 8 + 2 * 8) + (16 * 16 * 9 + 16 + 2 * 16))  # 2 blocks per stage
    with pytest.raises(ValueError, match="options.blocks must be >= 1, got 0"):
        build_encoder("image", EncoderConfig(type="image_cnn", options={**options, "blocks": 0}))


def test_pickle_weights_files_need_allow_pickle(tmp_path: Path) -> None:
    encoder = build_encoder("image", EncoderConfig(type="timm", options=timm_options()))
    options = save_timm(encoder, tmp_path)
    options.pop("allow_pickle")
    with pytest.raises(MMInputError, match=r"vit\.pth is a pickle-based file \(\.pth\).*allow_pickle: true"):
        build_encoder("image", EncoderConfig(type="timm", options=options))
    assert build_encoder("image", EncoderConfig(type="timm", options={**options, "allow_pickle": True}))
