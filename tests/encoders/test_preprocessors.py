"""The standalone preprocessors (``build_preprocessor``): for every registered encoder, on tiny configs, the
same tensors and token counts as the encoder, a pickle round trip (also into a spawned process), no
weights inside, and none read: pretrained folders and files still preprocess once their weights are gone."""

from __future__ import annotations

import copy
import io
import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    SiglipImageProcessor,
    WhisperConfig,
    WhisperModel,
)

from mm_llama import EncoderConfig, ModalityEncoder
from mm_llama.encoders import ENCODERS, build_encoder
from mm_llama.encoders.base import MediaPreprocessor, build_preprocessor
from tests.conftest import TINY_CLIP
from tests.encoders.test_audio import (
    TINY_AUDIO_TRANSFORMER,
    TINY_CLAP_AUDIO,
    TINY_CLAP_TOKENS,
    TINY_WHISPER,
    write_audio,
)
from tests.encoders.test_image import (
    OPEN_CLIP_RESNET_NAME,
    TINY_OPEN_CLIP_RESNET,
    TINY_SIGLIP,
    open_clip_options,
    save_hf,
    save_open_clip,
    save_timm,
    timm_options,
)
from tests.encoders.test_imu import COLUMNS, signal, write_csv
from tests.encoders.test_video import square_frames, write_video

TINY_CONVNEXT: dict[str, Any] = {
    "model_name": "convnext_atto",
    "model_kwargs": {"dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "num_classes": 0},
}
"""A timm backbone without a fixed input size: its token count follows the image size."""
FRAMES = {"type": "hf_vision", "options": {"config": TINY_CLIP}}

CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # id: (encoder type, input kind, options)
    "hf_vision_clip": ("hf_vision", "image", {"config": TINY_CLIP, "select_feature": "cls_patch"}),
    "hf_vision_siglip_pad": ("hf_vision", "image", {"config": TINY_SIGLIP, "aspect": "pad"}),
    "open_clip_vit": ("open_clip", "image", open_clip_options(select_feature="cls_patch")),
    "open_clip_resnet": (
        "open_clip",
        "image",
        {"model_name": OPEN_CLIP_RESNET_NAME, "model_config": TINY_OPEN_CLIP_RESNET, "select_layer": -3},
    ),
    "timm_vit": ("timm", "image", timm_options(model_kwargs={"reg_tokens": 2})),
    "timm_convnext": ("timm", "image", TINY_CONVNEXT),
    "image_cnn": ("image_cnn", "image", {"image_size": 32, "channels": [8, 16], "grid": 2}),
    "efficientnet_lite0": ("efficientnet_lite0", "image", {"image_size": 64, "crop": False}),
    "patches": ("patches", "image", {"patch_size": 8, "max_height": 32, "max_width": 48}),
    "video_keep": ("video", "video", {"frame_encoder": FRAMES, "num_frames": 4}),
    "video_pool_fps": (
        "video",
        "video",
        {
            "frame_encoder": {"type": "patches", "options": {"patch_size": 16}},
            "num_frames": 6,
            "sampling": "fps",
            "fps": 4.0,
            "aggregation": "pool",
            "pooled_tokens": 5,
        },
    ),
    "whisper_chunks": ("whisper", "audio", {"config": TINY_WHISPER, "max_seconds": 0.4, "chunk": True}),
    "clap": ("clap", "audio", {"config": TINY_CLAP_AUDIO}),
    "audio_transformer": ("audio_transformer", "audio", {**TINY_AUDIO_TRANSFORMER, "max_seconds": 0.6}),
    "resemblyzer": ("resemblyzer", "audio", {"max_seconds": 0.5}),
    "imu_transformer_chunks": (
        "imu_transformer",
        "imu",
        {"window": 128, "width": 32, "depth": 1, "heads": 2, "chunk": True, "max_chunks": 2},
    ),
    "imu_cnn": ("imu_cnn", "imu", {"window": 200, "width": 16, "layers": 3, "normalize": "none"}),
}


def config(case: str) -> EncoderConfig:
    kind, _, options = CASES[case]
    return EncoderConfig(type=kind, options=copy.deepcopy(options))


def encoder(case: str) -> ModalityEncoder:
    torch.manual_seed(0)
    return build_encoder("x", config(case)).eval()


def tiny(kind: str, options: dict[str, Any]) -> ModalityEncoder:
    torch.manual_seed(0)
    return build_encoder("x", EncoderConfig(type=kind, options=options))


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real file per input kind: a 40 x 50 PNG, a 1 s stereo 44.1 kHz WAV, a 2 s IMU CSV at 100 Hz
    with timestamps, a 12-frame 12 fps mp4."""
    folder = tmp_path_factory.mktemp("media")
    image = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "image.png")
    times = np.arange(200) / 100.0
    return {
        "image": folder / "image.png",
        "audio": write_audio(folder / "tone.wav", "WAV", "PCM_16"),
        "imu": write_csv(folder / "walk.csv", times, signal(times), ["time", *COLUMNS]),
        "video": write_video(folder / "square.mp4", square_frames(), "libx264", "mp4"),
    }


def test_every_registered_encoder_is_covered() -> None:
    assert {kind for kind, _, _ in CASES.values()} == set(ENCODERS.names())


@pytest.mark.parametrize("case", CASES)
def test_standalone_preprocessor_matches_the_encoder(case: str, media: dict[str, Path]) -> None:
    enc = encoder(case)
    pre = build_preprocessor("x", config(case))
    assert type(pre) is type(enc.preprocessor) and isinstance(pre, MediaPreprocessor)
    item = media[CASES[case][1]]
    x = pre(item)
    assert torch.equal(x, enc.preprocess(item))
    with torch.no_grad():
        features = enc(x.unsqueeze(0))
    assert features.shape[0] == 1 and features.shape[2] == enc.output_dim
    assert pre.num_tokens(x) == enc.num_tokens(x) == features.shape[1] > 0


def test_token_counts_follow_the_options(media: dict[str, Path]) -> None:
    """The counts the parametrized test checks against forward are the ones each option implies."""
    expected = {
        "hf_vision_clip": 16 + 1,  # (32 / 8)^2 patches + CLS
        "hf_vision_siglip_pad": 16,
        "open_clip_vit": 16 + 1,
        "timm_vit": 16,  # CLS and register tokens dropped
        "image_cnn": 2 * 2,
        "efficientnet_lite0": 2 * 2,  # 64 px / 32 per cell
        "patches": 4 * (5 + 1),  # 40 x 50 px -> 32 x 40: 4 rows of 5 patches and a row break
        "video_keep": 4 * 16,
        "whisper_chunks": 3 * 20,  # 1 s in 0.4 s windows: 3 windows of 20 tokens (50 a second)
        "clap": TINY_CLAP_TOKENS,
        "audio_transformer": 15,  # 60 fbank frames / 4
        "resemblyzer": 1,  # one speaker embedding per clip
        "imu_transformer_chunks": 2 * (1 + 128 // 8),  # 200 samples at 100 Hz -> 399 at 200 Hz: 2 windows
        "imu_cnn": 25,  # 200 / 2^3
    }
    for case, tokens in expected.items():
        pre = build_preprocessor("x", config(case))
        assert pre.num_tokens(pre(media[CASES[case][1]])) == tokens, case


class WeightSpy(pickle.Pickler):
    """Pickles into nothing and notes every module with parameters and every meta tensor on the way."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO())
        self.weights: list[str] = []

    def persistent_id(self, obj: Any) -> None:
        if isinstance(obj, nn.Module) and any(True for _ in obj.parameters()):
            self.weights.append(type(obj).__name__)
        if isinstance(obj, torch.Tensor) and obj.is_meta:
            self.weights.append(f"meta tensor {tuple(obj.shape)}")
        return None  # pickle it as usual


@pytest.mark.parametrize("case", CASES)
def test_preprocessor_pickles_without_weights(case: str, media: dict[str, Path]) -> None:
    pre = build_preprocessor("x", config(case))
    item = media[CASES[case][1]]
    x = pre(item)
    spy = WeightSpy()
    spy.dump(pre)
    assert spy.weights == []
    clone = pickle.loads(pickle.dumps(pre))
    assert type(clone) is type(pre)
    assert torch.equal(clone(item), x)
    assert clone.num_tokens(x) == pre.num_tokens(x)


@pytest.mark.parametrize(("case", "side"), [("timm_convnext", 48), ("open_clip_resnet", 64)])
def test_an_unpickled_preprocessor_counts_new_shapes(case: str, side: int) -> None:
    """Its meta backbone stays behind when pickled; a shape it has not counted rebuilds it, weightless."""
    enc = encoder(case)
    clone = pickle.loads(pickle.dumps(enc.preprocessor))
    x = torch.zeros(3, side, side + 16)
    with torch.no_grad():
        assert clone.num_tokens(x) == enc(x.unsqueeze(0)).shape[1]
    assert clone.num_tokens(x) != clone.num_tokens(clone(Image.new("RGB", (8, 8))))  # the transform's size


def preprocess_in_child(payload: bytes) -> list[tuple[torch.Tensor, int, int]]:
    """In a fresh process: unpickle (preprocessor, item, other shape) triples and run them."""
    results = []
    for pre, item, other in pickle.loads(payload):
        x = pre(item)
        results.append((x, pre.num_tokens(x), pre.num_tokens(torch.zeros(other))))
    return results


def test_preprocessors_work_in_a_spawned_process(media: dict[str, Path]) -> None:
    """What DataLoader(num_workers=..., multiprocessing_context="spawn") does: the child imports nothing of
    the parent's state (open_clip there has never heard of the custom architecture)."""
    work = []
    for case in ("hf_vision_clip", "open_clip_resnet", "timm_convnext", "video_keep", "clap", "imu_cnn"):
        pre = build_preprocessor("x", config(case))
        item = media[CASES[case][1]]
        other = (3, 96, 96) if case in ("open_clip_resnet", "timm_convnext") else tuple(pre(item).shape)
        work.append((pre, item, other))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.apply(preprocess_in_child, (pickle.dumps(work),))
    for (pre, item, other), (x, tokens, other_tokens) in zip(work, results):
        assert torch.equal(x, pre(item))
        assert tokens == pre.num_tokens(x) and other_tokens == pre.num_tokens(torch.zeros(other))


# ---- no weights are read --------------------------------------------------------------------------------
def saved_whisper(folder: Path) -> dict[str, Any]:
    WhisperModel(WhisperConfig(**TINY_WHISPER)).save_pretrained(folder)  # no preprocessor_config.json
    return {"name_or_path": str(folder), "max_seconds": 0.5}


def saved_clap(folder: Path) -> dict[str, Any]:
    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    config = ClapConfig(text_config=text, audio_config=TINY_CLAP_AUDIO, projection_dim=16)
    ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(feature_size=16, max_length_s=2).save_pretrained(folder)  # fits spec_size 64
    return {"name_or_path": str(folder)}


def saved_siglip(folder: Path) -> dict[str, Any]:
    options = save_hf(encoder("hf_vision_siglip_pad"), folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)  # the checkpoint's own
    return {**options, "aspect": "pad"}


SAVED = {
    "hf_vision": ("hf_vision", "image", lambda folder: save_hf(encoder("hf_vision_clip"), folder)),
    "hf_vision_siglip": ("hf_vision", "image", saved_siglip),
    "open_clip": ("open_clip", "image", lambda folder: save_open_clip(encoder("open_clip_vit"), folder)),
    "timm": ("timm", "image", lambda folder: save_timm(tiny("timm", timm_options()), folder)),
    "whisper": ("whisper", "audio", saved_whisper),
    "clap": ("clap", "audio", saved_clap),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@pytest.mark.parametrize("saved", SAVED)
def test_pretrained_preprocessors_read_no_weights(saved: str, tmp_path: Path, media: dict[str, Path]) -> None:
    kind, modality, save = SAVED[saved]
    torch.manual_seed(0)
    cfg = EncoderConfig(type=kind, options=save(tmp_path))
    loaded = build_encoder("x", cfg).eval()
    assert loaded.is_pretrained
    item = media[modality]
    x = loaded.preprocess(item)
    weights = [f for f in tmp_path.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    assert weights, f"no weights file written in {sorted(p.name for p in tmp_path.iterdir())}"
    for file in weights:
        file.unlink()
    pre = build_preprocessor("x", cfg)
    assert torch.equal(pre(item), x)
    with torch.no_grad():
        assert pre.num_tokens(x) == loaded(x.unsqueeze(0)).shape[1]
    with pytest.raises(OSError):  # the encoder does need the weights that are gone
        build_encoder("x", cfg)


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "options", "match"),
    [
        ("hf_vision", {"config": TINY_SIGLIP, "select_feature": "cls_patch"}, "no CLS token"),
        ("hf_vision", {}, "set exactly one of options.name_or_path or options.config"),
        ("open_clip", open_clip_options(select_layer=4), r"select_layer=4 is out of range .* 3 blocks"),
        (
            "timm",
            timm_options(
                model_kwargs={"class_token": False, "global_pool": "avg"}, select_feature="cls_patch"
            ),
            "no CLS token",
        ),
        ("timm", timm_options(model_kwargs={"no_such_kwarg": 1}), "model_kwargs do not fit.*no_such_kwarg"),
        ("image_cnn", {"image_size": 32, "channels": [8, 16], "grid": 9}, r"grid \(9\) exceeds .* \(8\)"),
        ("patches", {"patch_size": 0}, "options.patch_size must be >= 1, got 0"),
        ("video", {"frame_encoder": {"type": "vit"}}, "unknown encoder 'vit'; valid choices"),
        ("video", {"frame_encoder": FRAMES, "num_frames": 0}, "options.num_frames must be >= 1, got 0"),
        ("whisper", {"config": TINY_WHISPER, "max_seconds": 2.0}, r"max_seconds must be in \(0, 1\] s"),
        ("clap", {"config": TINY_CLAP_AUDIO, "max_seconds": 10.0}, "max_seconds"),
        ("imu_transformer", {"window": 100, "patch_size": 8}, r"patch_size \(8\) must divide options.window"),
        ("imu_cnn", {"kernel_size": 4}, "kernel_size odd"),
    ],
)
def test_bad_options_fail_the_same_without_the_encoder(
    kind: str, options: dict[str, Any], match: str
) -> None:
    cfg = EncoderConfig(type=kind, options=copy.deepcopy(options))
    with pytest.raises(ValueError, match=match) as standalone:
        build_preprocessor("x", cfg)
    with pytest.raises(ValueError, match=match) as with_encoder:
        build_encoder("x", cfg)
    assert str(standalone.value) == str(with_encoder.value)


def test_a_folder_of_another_model_is_named(tmp_path: Path) -> None:
    ClapConfig(audio_config=TINY_CLAP_AUDIO).save_pretrained(tmp_path)  # a config.json only
    with pytest.raises(ValueError, match=rf"whisper encoder: {tmp_path} holds a 'clap' model, not whisper"):
        build_preprocessor("x", EncoderConfig(type="whisper", options={"name_or_path": str(tmp_path)}))


def test_an_encoder_without_a_preprocessor_is_told_what_it_lacks() -> None:
    class Bare(ModalityEncoder):
        modality = "image"
        output_dim = 1
        is_pretrained = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(TypeError, match="Bare sets no Preprocessor: give it a MediaPreprocessor subclass"):
        Bare(None)
