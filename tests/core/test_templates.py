"""Label masks under any chat template: the processor finds the replies by construction, and the check a
training stage runs at start (``check_labels``) fails with a named error when labels and replies disagree.

The templates below are written here in the shapes of Llama 3, Mistral (v0.1: roles must alternate, no
system role) and one without a generation-prompt marker (the assistant header is written with the
reply only); ChatML is SmolLM2's own, the Vicuna-style fallback is used when a tokenizer has none, and
``vicuna_v1`` is the built-in LLaVA-1.5 conversation (its ``conv_vicuna_v1``: one line, ``USER: ...
ASSISTANT: ...</s>``).
Gemma 3's is tested on the real Gemma in ``tests/train/test_gemma.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mm_llama.data.dataset import ConversationDataset
from mm_llama.errors import ConversationError, LabelMaskError, MMInputError
from mm_llama.llm import load_tokenizer
from mm_llama.processor import (
    IGNORE_INDEX,
    PLAIN_SEPARATOR,
    VICUNA_V1_CHAT_TEMPLATE,
    MultimodalProcessor,
    ProcessorConfig,
    check_labels,
)
from tests.conftest import tiny_config

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
NO_GENERATION_MARKER = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Human: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}### Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)
TEMPLATES = {
    "chatml": (None, "", "<|im_end|>\n"),
    "chatml_preset": ("chatml", "", "<|im_end|>\n"),
    "fallback": ("fallback", " ", "<|im_end|>\n"),
    "llama3": (LLAMA3, "", "<|eot_id|>"),
    "mistral": (MISTRAL, "", "<|im_end|>"),
    "vicuna_v1": ("vicuna_v1", " ", "<|im_end|>"),
    "no_generation_marker": (NO_GENERATION_MARKER, " ", "<|im_end|>\n"),
}
"""name -> (chat_template option, what starts a supervised reply: the space after a header such as
"ASSISTANT:", what ends an assistant turn with SmolLM2's tokenizer, whose EOS is ``<|im_end|>``)."""
ALTERNATING_ONLY = {"mistral"}
NO_SYSTEM = {"mistral"}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(tiny_config().llm)


def processor_for(tokenizer, name: str, system_prompt: str | None = None) -> MultimodalProcessor:
    chat_template = TEMPLATES[name][0]
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)  # each test its own copy
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
        replace_extra_special_tokens=False,
    )
    config = ProcessorConfig(
        modalities=tiny_config().modalities, system_prompt=system_prompt, chat_template=chat_template
    )
    return MultimodalProcessor.from_config(config, tokenizer)


def supervised_runs(processor: MultimodalProcessor, example) -> list[str]:
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if run:
                runs.append(processor.tokenizer.decode(run))
            run = []
        else:
            assert label == token
            run.append(label)
    return [*runs, processor.tokenizer.decode(run)] if run else runs


CONVERSATIONS = {
    "multi_turn": [
        {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "Three circles."},
    ],
    "system": [
        {"from": "system", "value": "Answer in one word."},
        {"from": "human", "value": "<image> Shape?"},
        {"from": "gpt", "value": "Circle"},
    ],
    "empty_reply": [
        {"from": "human", "value": "<image> Anything?"},
        {"from": "gpt", "value": ""},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "blue"},
    ],
    "assistant_first": [
        {"from": "gpt", "value": "Hello, send me a picture."},
        {"from": "human", "value": "<image> here"},
        {"from": "gpt", "value": "A square."},
    ],
}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_labels_are_exactly_the_replies(smollm2_tokenizer, template: str, conversation: str) -> None:
    processor = processor_for(smollm2_tokenizer, template)
    turns = CONVERSATIONS[conversation]
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    refused = (conversation == "assistant_first" and template in ALTERNATING_ONLY) or (
        conversation == "system" and template in NO_SYSTEM
    )
    if refused:
        with pytest.raises(ConversationError, match="chat template refused a .* conversation"):
            processor(turns, {"image": [image]})
        return
    example = processor(turns, {"image": [image]})
    _, start, end = TEMPLATES[template]
    replies = [t["value"] for t in turns if t["from"] == "gpt"]
    runs = supervised_runs(processor, example)
    assert "".join(runs) == "".join(start + r + end for r in replies)
    check_labels(processor, turns, example, "test")
    # the prompt to answer ends with the header the replies were trained after
    prompt = processor(turns[:-1], {"image": [image]}, add_generation_prompt=True)
    trained = example.input_ids[: len(prompt.input_ids)]
    assert prompt.input_ids == trained
    assert example.labels[len(prompt.input_ids) - 1] == IGNORE_INDEX
    assert example.labels[len(prompt.input_ids)] != IGNORE_INDEX or replies[-1] == ""


def test_generation_prompt_of_a_template_without_marker(smollm2_tokenizer) -> None:
    processor = processor_for(smollm2_tokenizer, "no_generation_marker")
    prompt = processor("What is it?", add_generation_prompt=True)
    assert processor.tokenizer.decode(prompt.input_ids) == "### Human: What is it?\n### Assistant:"
    assert processor.end_of_turn_ids() == [processor.tokenizer.eos_token_id]


def test_end_of_turn_tokens(smollm2_tokenizer) -> None:
    llama3 = processor_for(smollm2_tokenizer, "llama3")
    assert llama3.end_of_turn_ids() == [llama3.tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    chatml = processor_for(smollm2_tokenizer, "chatml")
    assert chatml.end_of_turn_ids() == [chatml.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_plain_is_llava_preprocess_plain(smollm2_tokenizer) -> None:
    """LLaVA's ``preprocess_plain``: the human turn becomes its media alone, then caption + separator."""
    config = ProcessorConfig(modalities=tiny_config().modalities, template="plain")
    processor = MultimodalProcessor.from_config(config, smollm2_tokenizer)
    turns = [
        {"from": "human", "value": "Describe this picture briefly: <image>"},
        {"from": "gpt", "value": "a red circle"},
    ]
    example = processor(turns, {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]})
    pid = processor.placeholder_ids["image"]
    n = example.input_ids.count(pid)
    assert example.input_ids[: 1 + n] == [smollm2_tokenizer.bos_token_id] + [pid] * n
    assert processor.tokenizer.decode(example.input_ids[1 + n :]) == "a red circle" + PLAIN_SEPARATOR
    assert supervised_runs(processor, example) == ["a red circle\n"]
    check_labels(processor, turns, example, "test")
    assert processor.end_of_turn_ids() == smollm2_tokenizer("\n", add_special_tokens=False)["input_ids"]


def test_a_template_that_rewrites_replies_is_refused(smollm2_tokenizer) -> None:
    shouting = NO_GENERATION_MARKER.replace("{{ m['content'] }}{{ eos_token }}", "{{ m['content'] | upper }}")
    processor = processor_for(smollm2_tokenizer, "chatml")
    processor.tokenizer.chat_template = shouting
    with pytest.raises(MMInputError, match="chat template drops the assistant's reply text"):
        processor(CONVERSATIONS["multi_turn"], {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]})


def test_a_reply_without_end_of_turn_fails_the_check(smollm2_tokenizer) -> None:
    processor = processor_for(smollm2_tokenizer, "chatml")
    processor.tokenizer.chat_template = NO_GENERATION_MARKER.replace("{{ eos_token }}\n", "")
    turns = CONVERSATIONS["multi_turn"]
    example = processor(turns, {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]})
    with pytest.raises(LabelMaskError, match="rec-7: .*has no end-of-turn token"):
        check_labels(processor, turns, example, "rec-7")


def test_a_mask_that_supervises_the_header_fails_the_check(smollm2_tokenizer) -> None:
    processor = processor_for(smollm2_tokenizer, "chatml")
    turns = CONVERSATIONS["multi_turn"]
    example = processor(turns, {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]})
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    example.labels[first - 2 : first] = example.input_ids[first - 2 : first]  # "assistant\n" supervised
    with pytest.raises(LabelMaskError, match="not what is supervised"):
        check_labels(processor, turns, example, "rec")
    example = processor(turns, {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]})
    example.labels = [IGNORE_INDEX if i > first + 5 else label for i, label in enumerate(example.labels)]
    with pytest.raises(LabelMaskError, match="not supervised|not what is supervised|no end-of-turn"):
        check_labels(processor, turns, example, "rec")


def test_a_training_dataset_checks_its_labels_at_build_time(smollm2_tokenizer, tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    records = [{"id": i, "image": "a.png", "conversations": CONVERSATIONS["multi_turn"]} for i in range(3)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    processor = processor_for(smollm2_tokenizer, "vicuna_v1")
    ConversationDataset(tmp_path / "data.json", processor).check_labels()
    processor.tokenizer.chat_template = VICUNA_V1_CHAT_TEMPLATE.replace(
        "m['content'] + eos_token", "m['content'] | lower"
    )
    with pytest.raises(LabelMaskError, match=r"data.json:0: the label mask does not match"):
        ConversationDataset(tmp_path / "data.json", processor).check_labels()


def test_chat_template_option_round_trips(smollm2_tokenizer, tmp_path: Path) -> None:
    processor = processor_for(smollm2_tokenizer, "llama3")
    processor.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)
    assert again.tokenizer.chat_template == LLAMA3
    assert (
        again("hi", add_generation_prompt=True).input_ids
        == processor("hi", add_generation_prompt=True).input_ids
    )


def test_chatml_preset_adds_a_system_turn_only_when_there_is_one(smollm2_tokenizer) -> None:
    """SmolLM2's own template always opens with a system turn (its default prompt, or an empty one); the
    ``chatml`` preset renders the same turns without it unless a system prompt is given."""
    turns = CONVERSATIONS["multi_turn"]
    own = processor_for(smollm2_tokenizer, "chatml", system_prompt="")
    preset = processor_for(smollm2_tokenizer, "chatml_preset")
    decode = preset.tokenizer.decode
    own_text = decode(own(turns, {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]}).input_ids)
    preset_text = decode(preset(turns, {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]}).input_ids)
    assert own_text == "<|im_start|>system\n<|im_end|>\n" + preset_text
    assert preset_text.startswith("<|im_start|>user\n")
    with_system = processor_for(smollm2_tokenizer, "chatml_preset", system_prompt="Be brief.")
    assert decode(with_system("hi", add_generation_prompt=True).input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
