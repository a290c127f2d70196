"""One prompt mixing image, audio, video and IMU, from files on disk, through the tiny and the real LLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm_llama import LLMConfig, ModelConfig, MultimodalLM
from mm_llama.config import load_config
from mm_llama.data.toyworld import MODALITIES, generate_toyworld
from tests.conftest import tiny_llm_config

QUICKSTART = Path(__file__).resolve().parents[1] / "training" / "configs" / "quickstart.yaml"
PROMPT = "<image> <audio> <video> <imu>\nWhat is happening?"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One toy-world file per modality: a PNG, a WAV, an MP4 and an IMU CSV with timestamps."""
    root = tmp_path_factory.mktemp("world")
    paths = generate_toyworld(root, seed=3, n_train=1, n_val=0, n_test=0)
    records = json.loads(Path(paths["align_train"]).read_text())
    files = {m: [str(root / r[m]) for r in records if m in r] for m in MODALITIES}
    assert all(len(v) == 1 for v in files.values())
    return files


def quickstart_model(llm: LLMConfig) -> MultimodalLM:
    config = load_config(ModelConfig, QUICKSTART, section="model")
    config.llm = llm
    torch.manual_seed(0)
    return MultimodalLM(config).eval()


def test_mixed_prompt_tiny(media: dict[str, list[str]]) -> None:
    model = quickstart_model(tiny_llm_config())
    example = model.processor(PROMPT, media)
    counts = {m: example.input_ids.count(pid) for m, pid in model.processor.placeholder_ids.items()}
    assert counts == {"image": 20, "audio": 8, "video": 4, "imu": 4}
    batch = model.processor.collate(
        [model.processor([{"from": "human", "value": PROMPT}, {"from": "gpt", "value": "a cat"}], media)]
    )
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.projectors.parameters())
    answer = model.generate(
        PROMPT,
        images=media["image"],
        audios=media["audio"],
        videos=media["video"],
        imus=media["imu"],
        max_new_tokens=4,
    )
    reordered = model.generate(
        "<imu> then <video>, <audio> and <image>?",
        images=media["image"],
        audios=media["audio"],
        videos=media["video"],
        imus=media["imu"],
        max_new_tokens=4,
    )
    assert isinstance(answer, str) and isinstance(reordered, str)
    assert model.generate(PROMPT, media=media, max_new_tokens=4) == answer  # by name: the same inputs
    with pytest.raises(ValueError, match="1 <imu> marker"):
        model.generate(
            PROMPT, images=media["image"], audios=media["audio"], videos=media["video"], imus=media["imu"] * 2
        )


@pytest.mark.slow
def test_mixed_prompt_real_smollm2(media: dict[str, list[str]]) -> None:
    model = quickstart_model(LLMConfig(name_or_path="smollm2-135m"))
    answer = model.generate(
        PROMPT,
        images=media["image"],
        audios=media["audio"],
        videos=media["video"],
        imus=media["imu"],
        max_new_tokens=8,
    )
    assert isinstance(answer, str) and answer
    imu_only = model.generate("<imu>\nWhat is the person doing?", imus=media["imu"], max_new_tokens=8)
    assert isinstance(imu_only, str)
