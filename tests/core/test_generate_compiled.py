"""``generate(compile=True)``: transformers' static KV cache and compiled decoding step give the same greedy
text as the default path (a growing cache, eager): one prompt, streamed, a left-padded batch, stop tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mm_llama.model import MultimodalLM

PROMPTS = ["<image>\nWhat is it?", "Describe <image> in a long and detailed answer, please."]


def test_compiled_decoding_gives_the_same_greedy_text(
    tiny_model: MultimodalLM, rgb_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = {"images": [rgb_image], "max_new_tokens": 8}
    plain = tiny_model.generate(PROMPTS[0], **one)
    assert tiny_model.generate(PROMPTS[0], compile=True, **one) == plain
    assert hasattr(tiny_model.llm, "_compiled_call"), "the decoding step was not compiled on this device"
    assert "".join(tiny_model.generate(PROMPTS[0], compile=True, stream=True, **one)).strip() == plain

    batch = {"images": [[rgb_image], [rgb_image[::-1].copy()]], "max_new_tokens": 8}
    outputs: list[torch.Tensor] = []
    original = tiny_model.llm.generate

    def recording(**kwargs: Any) -> torch.Tensor:
        outputs.append(original(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(tiny_model.llm, "generate", recording)
    plain_batch = tiny_model.generate(PROMPTS, **batch)  # the prompts' lengths differ: left padding
    assert tiny_model.generate(PROMPTS, compile=True, **batch) == plain_batch
    assert torch.equal(outputs[-1], outputs[-2])

    stop = int(outputs[-2][0, 2])  # the first reply's third token ends it; the other reply runs on or not
    monkeypatch.setattr(tiny_model.llm.generation_config, "eos_token_id", stop)
    stopped = tiny_model.generate(PROMPTS, **batch)
    assert stopped[0] != plain_batch[0]
    assert tiny_model.generate(PROMPTS, compile=True, **batch) == stopped
    assert torch.equal(outputs[-1], outputs[-2])
