"""``MultimodalLM.generate``'s media keywords come from the modality registry: ``media={name: ...}`` or the
``<name>s=`` of any registered modality; other keywords reach transformers' ``generate`` or raise clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mm_llama import modality
from mm_llama.errors import MMInputError
from mm_llama.model import MultimodalLM

PROMPT = "<image>\nWhat is it?"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Modalities registered in the test are dropped afterwards."""
    monkeypatch.setattr(modality, "_MODALITIES", modality.modalities())


def spy_on_llm_generate(model: MultimodalLM, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    original = model.llm.generate

    def generate(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model.llm, "generate", generate)
    return calls


def test_media_keywords_and_media_dict_are_the_same(tiny_model: MultimodalLM, rgb_image: np.ndarray) -> None:
    by_keyword = tiny_model.generate(PROMPT, images=[rgb_image], max_new_tokens=4)
    assert tiny_model.generate(PROMPT, media={"image": [rgb_image]}, max_new_tokens=4) == by_keyword
    assert tiny_model.generate(PROMPT, images=[rgb_image], audios=None, max_new_tokens=4) == by_keyword
    with pytest.raises(ValueError, match="image inputs given twice"):
        tiny_model.generate(PROMPT, images=[rgb_image], media={"image": [rgb_image]})
    with pytest.raises(TypeError, match="positional"):
        tiny_model.generate(PROMPT, [rgb_image])  # type: ignore[misc]


def test_a_registered_plugin_modality_has_its_keyword(
    tiny_model: MultimodalLM, rgb_image: np.ndarray, registry: None
) -> None:
    with pytest.raises(TypeError, match="'depths'.*registered modality.*once its plugin is imported"):
        tiny_model.generate(PROMPT, images=[rgb_image], depths=[np.ones((4, 4))])
    modality.register_modality("depth")
    # depths= is now media: the processor says this image-only model has no depth encoder
    with pytest.raises(ValueError, match="got depth inputs but the model has no depth encoder"):
        tiny_model.generate(PROMPT, images=[rgb_image], depths=[np.ones((4, 4))])
    with pytest.raises(ValueError, match="got depth inputs"):
        tiny_model.generate(PROMPT, images=[rgb_image], media={"depth": [np.ones((4, 4))]})


def test_other_keywords_reach_transformers(
    tiny_model: MultimodalLM, rgb_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on_llm_generate(tiny_model, monkeypatch)
    tiny_model.generate(PROMPT, images=[rgb_image], max_new_tokens=2, num_beams=1, repetition_penalty=1.0)
    assert calls[-1]["num_beams"] == 1 and calls[-1]["repetition_penalty"] == 1.0
    assert "images" not in calls[-1]
    with pytest.raises(ValueError, match="model_kwargs.*not used.*'colour'"):  # transformers' own check
        tiny_model.generate(PROMPT, images=[rgb_image], max_new_tokens=2, colour="red")


def test_a_modality_keyword_that_transformers_also_takes_is_refused(
    tiny_model: MultimodalLM, rgb_image: np.ndarray, registry: None
) -> None:
    modality.register_modality("num_beam")
    with pytest.raises(ValueError, match="num_beams= is both .* modality 'num_beam'.*media="):
        tiny_model.generate(PROMPT, images=[rgb_image], num_beams=1)


def test_a_flat_list_for_several_prompts_is_named(
    tiny_model: MultimodalLM, rgb_image: np.ndarray, tmp_path: Path
) -> None:
    """A flat list of items for a batch of prompts is refused as such (a path string was once iterated
    character by character and reported as "53 image inputs")."""
    photo = tmp_path / "a_rather_long_photo_name_for_the_test.png"
    Image.fromarray(rgb_image).save(photo)
    prompts = [PROMPT, PROMPT]
    expected = (
        r"images= for 2 prompts must hold one list per prompt, e\.g\. \[\[a\], \[b\]\]; got a flat list"
    )
    for flat in ([str(photo), str(photo)], [photo, photo], [rgb_image, rgb_image]):
        with pytest.raises(MMInputError, match=expected):
            tiny_model.generate(prompts, images=flat, max_new_tokens=2)
    with pytest.raises(MMInputError, match=r"images= for 2 prompts .*got a single str"):
        tiny_model.generate(prompts, images=str(photo), max_new_tokens=2)
    with pytest.raises(MMInputError, match=r"images= for 2 prompts .*flat list"):
        tiny_model.generate(prompts, media={"image": [str(photo), str(photo)]}, max_new_tokens=2)


def test_one_prompt_takes_a_bare_item_as_one_item(
    tiny_model: MultimodalLM, rgb_image: np.ndarray, tmp_path: Path
) -> None:
    """One prompt: ``images="a.png"`` (or one Path, bytes, array) is that one image, not its characters."""
    photo = tmp_path / "photo.png"
    Image.fromarray(rgb_image).save(photo)
    expected = tiny_model.generate(PROMPT, images=[str(photo)], max_new_tokens=3)
    for bare in (str(photo), photo, photo.read_bytes(), rgb_image):
        assert tiny_model.generate(PROMPT, images=bare, max_new_tokens=3) == expected
