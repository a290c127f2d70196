"""Property tests of the processor: any interleaving of markers, text, turns (system / user / assistant, the
assistant first, empty replies) and media counts gives either a consistent Example or an input error with a
message, never another exception.

Consistent: the placeholder count is the sum of the items' token counts, ``len(input_ids) == len(labels) <=
max_length``, labels are -100 or the token itself and -100 on every placeholder and wherever no assistant
reply is, and collate's attention mask sums are the lengths (left and right padding)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mm_llama.processor import IGNORE_INDEX, MultimodalProcessor  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

MARKER = "<image>"
SHORT_MAX_LENGTH = 56
"""Short enough that a few images (16 tokens each) and turns overflow, to exercise turn dropping."""


@pytest.fixture(scope="module")
def processors() -> dict[str, MultimodalProcessor]:
    return {
        "long": MultimodalProcessor.from_config(tiny_config()),
        "short": MultimodalProcessor.from_config(tiny_config(max_length=SHORT_MAX_LENGTH)),
    }


IMAGE = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
text = st.text(alphabet="ab <>/imgeu\n.", max_size=10)
content = st.lists(st.one_of(text, st.just(MARKER)), max_size=4).map("".join)
turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content})
case = st.fixed_dictionaries(
    {
        "prompt": st.one_of(content, st.lists(turn, max_size=6), st.lists(turn, min_size=3, max_size=6)),
        "extra_items": st.sampled_from([0, 0, 0, -1, 1]),
        "generation": st.booleans(),
        "processor": st.sampled_from(["long", "short"]),
    }
)


def _check_example(processor: MultimodalProcessor, example: Any, prompt: Any) -> None:
    ids, labels = example.input_ids, example.labels
    assert len(ids) == len(labels) <= processor.max_length
    placeholder = processor.placeholder_ids["image"]
    kept = example.media.get("image", [])
    per_item = [processor.handlers["image"](IMAGE)[1]] * len(kept)
    assert ids.count(placeholder) == sum(per_item)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == placeholder)
    replies = [] if isinstance(prompt, str) else [t for t in prompt if t["role"] == "assistant"]
    if not replies:
        assert set(labels) <= {IGNORE_INDEX}


TWO_TURNS = [
    {"role": "user", "content": "<image>a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "<image><image>c"},
    {"role": "assistant", "content": ""},
]


@settings(max_examples=50, deadline=None)
@given(case=case)
@example(case={"prompt": TWO_TURNS[:3], "extra_items": 0, "generation": True, "processor": "short"})
@example(case={"prompt": TWO_TURNS, "extra_items": 0, "generation": False, "processor": "short"})
@example(case={"prompt": TWO_TURNS[1:], "extra_items": 0, "generation": False, "processor": "long"})
def test_any_prompt_gives_a_consistent_example_or_an_input_error(
    processors: dict[str, MultimodalProcessor], case: dict[str, Any]
) -> None:
    processor = processors[case["processor"]]
    prompt = case["prompt"]
    text_of = prompt if isinstance(prompt, str) else "".join(t["content"] for t in prompt)
    count = max(text_of.count(MARKER) + case["extra_items"], 0)
    try:
        example = processor(prompt, {"image": [IMAGE] * count}, add_generation_prompt=case["generation"])
    except ValueError as e:  # MMInputError is one
        assert str(e), "an input error must say what is wrong"
        event(f"input error: {type(e).__name__}")
        return
    event(f"example (dropped turns: {example.dropped_turns > 0}, images: {bool(example.media)})")
    _check_example(processor, example, prompt)
    for side in ("right", "left"):
        batch = processor.collate([example, example], padding_side=side)
        assert batch["attention_mask"].sum(dim=1).tolist() == [len(example.input_ids)] * 2
        assert len(batch["media"].get("image", [])) == 2 * len(example.media.get("image", []))
