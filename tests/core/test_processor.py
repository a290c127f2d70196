"""The standalone processor: built from a config without the LLM, saved and loaded by itself, pickled
into spawned DataLoader workers (plugin modalities included)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mm_llama.llm
from mm_llama.data.dataset import Collator, ConversationDataset
from mm_llama.model import MultimodalLM
from mm_llama.processor import PROCESSOR_FILE, MultimodalProcessor
from tests.conftest import tiny_config

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "new_modality.py"
PROMPT = [
    {"role": "user", "content": "<image>\nWhat colour?"},
    {"role": "assistant", "content": "red"},
]


@pytest.fixture
def no_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading or building an LLM fails: what passes under this fixture never needed one."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the processor loaded an LLM")

    monkeypatch.setattr(mm_llama.llm, "load_llm", refuse)
    monkeypatch.setattr("mm_llama.model.load_llm", refuse)


def same_example(a, b) -> None:
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert a.media.keys() == b.media.keys()
    for name in a.media:
        assert all(torch.equal(x, y) for x, y in zip(a.media[name], b.media[name], strict=True))


def test_processor_from_config_needs_no_llm_and_matches_the_model(no_llm: None, rgb_image) -> None:
    processor = MultimodalProcessor.from_config(tiny_config())
    example = processor(PROMPT, {"image": [rgb_image]})
    # the tiny CLIP tower: 32 px / 8 px patches = 16 patch tokens (CLS dropped), mlp2x_gelu keeps 16
    assert example.input_ids.count(processor.placeholder_ids["image"]) == 16
    assert example.media["image"][0].shape == (3, 32, 32)
    supervised = [t for t in example.labels if t != -100]
    assert processor.tokenizer.decode(supervised).startswith("red")


def test_model_processor_is_the_standalone_one(tiny_model: MultimodalLM, rgb_image) -> None:
    standalone = MultimodalProcessor.from_config(tiny_model.config, tiny_model.tokenizer)
    same_example(
        standalone(PROMPT, {"image": [rgb_image]}), tiny_model.processor(PROMPT, {"image": [rgb_image]})
    )


def test_round_trip_without_the_llm(tmp_path: Path, rgb_image, no_llm: None) -> None:
    processor = MultimodalProcessor.from_config(tiny_config(max_length=300, template="plain"))
    processor.save_pretrained(tmp_path / "proc")
    assert (tmp_path / "proc" / PROCESSOR_FILE).is_file()
    loaded = MultimodalProcessor.from_pretrained(tmp_path / "proc")
    assert (loaded.template, loaded.max_length, loaded.system_prompt) == ("plain", 300, "Be brief.")
    assert loaded.placeholder_ids == processor.placeholder_ids
    same_example(loaded(PROMPT, {"image": [rgb_image]}), processor(PROMPT, {"image": [rgb_image]}))


def test_loads_from_a_model_checkpoint_without_the_llm(
    tiny_model: MultimodalLM, tmp_path: Path, rgb_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(mm_llama.llm, "load_llm", lambda *a, **k: pytest.fail("loaded an LLM"))
    loaded = MultimodalProcessor.from_pretrained(tmp_path / "ckpt")
    same_example(loaded(PROMPT, {"image": [rgb_image]}), tiny_model.processor(PROMPT, {"image": [rgb_image]}))
    (tmp_path / "ckpt" / PROCESSOR_FILE).unlink()  # a checkpoint of before processor.yaml: mm_llama.yaml
    same_example(
        MultimodalProcessor.from_pretrained(tmp_path / "ckpt")(PROMPT, {"image": [rgb_image]}),
        tiny_model.processor(PROMPT, {"image": [rgb_image]}),
    )


def test_bad_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer/ not found"):
        MultimodalProcessor.from_pretrained(tmp_path)
    processor = MultimodalProcessor.from_config(tiny_config())
    processor.save_pretrained(tmp_path)
    (tmp_path / PROCESSOR_FILE).write_text("template: chat\nmax_lenght: 5\n")
    with pytest.raises(ValueError, match=r"processor\.yaml.*max_lenght"):
        MultimodalProcessor.from_pretrained(tmp_path)


def test_pickles(rgb_image) -> None:
    processor = MultimodalProcessor.from_config(tiny_config())
    copy = pickle.loads(pickle.dumps(processor))
    same_example(copy(PROMPT, {"image": [rgb_image]}), processor(PROMPT, {"image": [rgb_image]}))


def test_a_conversation_is_rendered_and_tokenized_once(rgb_image, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch after epoch a record's text gives the same tokens: the processor remembers them, keyed by all
    they depend on (a new chat template tokenizes again), and hands out copies."""
    processor = MultimodalProcessor.from_config(tiny_config())
    calls: list[int] = []
    real = processor._encode_uncached
    monkeypatch.setattr(processor, "_encode_uncached", lambda *a: calls.append(1) or real(*a))
    first = processor(PROMPT, {"image": [rgb_image]})
    first.input_ids.append(-1)  # the caller's own list
    again = processor(PROMPT, {"image": [rgb_image]})
    assert calls == [1] and again.input_ids == first.input_ids[:-1]
    processor.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert processor(PROMPT, {"image": [rgb_image]}).input_ids != again.input_ids and calls == [1, 1]
    monkeypatch.undo()
    assert processor._encoded and pickle.loads(pickle.dumps(processor))._encoded == {}


def write_records(root: Path, n: int = 8) -> Path:
    (root / "img").mkdir(parents=True)
    records = []
    for i in range(n):
        value = 30 * i
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        records.append(
            {
                "id": str(i),
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nHow bright?"},
                    {"from": "gpt", "value": "dark" if value < 120 else "bright"},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def test_spawned_dataloader_workers_train(tmp_path: Path) -> None:
    """num_workers=2 with the spawn start method (macOS's default, Linux's from Python 3.14): the
    dataset and collator carry the standalone processor, not the model; the batches equal in-process
    ones and a few optimizer steps lower the loss."""
    torch.manual_seed(0)
    model = MultimodalLM(tiny_config())
    processor = MultimodalProcessor.from_config(model.config, model.tokenizer)
    dataset = ConversationDataset(write_records(tmp_path), processor)
    collate = Collator(processor)
    spawned = DataLoader(
        dataset, batch_size=4, collate_fn=collate, num_workers=2, multiprocessing_context="spawn"
    )
    in_process = DataLoader(dataset, batch_size=4, collate_fn=collate)
    batches = list(spawned)
    for a, b in zip(batches, in_process, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert all(torch.equal(x, y) for x, y in zip(a["media"]["image"], b["media"]["image"], strict=True))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        for batch in spawned:
            out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(out.loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


PICKLE_DEPTH_PROCESSOR = """
import pickle, sys
from mm_llama.config import EncoderConfig, ModalityConfig, ProjectorConfig
from mm_llama.plugins import import_plugins
from mm_llama.processor import MultimodalProcessor, ProcessorConfig
from tests.conftest import tiny_config
import_plugins([sys.argv[1]])
spec = ModalityConfig(
    encoder=EncoderConfig(type="depth_cnn", options={"size": 16, "width": 8, "grid": 2}),
    projector=ProjectorConfig(type="mlp2x_gelu"),
)
tokenizer = MultimodalProcessor.from_config(tiny_config()).tokenizer
processor = MultimodalProcessor.from_config(ProcessorConfig(modalities={"depth": spec}), tokenizer)
open(sys.argv[2], "wb").write(pickle.dumps(processor))
"""
UNPICKLE_AND_USE = """
import pickle, sys
import numpy as np
assert not any(m.startswith("mm_llama_plugin_") for m in sys.modules)
processor = pickle.loads(open(sys.argv[1], "rb").read())
example = processor("<depth>\\nNear or far?", {"depth": [np.full((20, 20), 2.0, dtype=np.float32)]})
print(example.input_ids.count(processor.placeholder_ids["depth"]), tuple(example.media["depth"][0].shape))
"""


def test_plugin_modality_processor_unpickles_in_a_fresh_process(tmp_path: Path) -> None:
    """A spawned worker has not imported the plugin file: unpickling the processor imports it first.
    (Both sides run in fresh interpreters, so this test registers nothing in the test process.)"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    file = tmp_path / "processor.pkl"
    subprocess.run(
        [sys.executable, "-c", PICKLE_DEPTH_PROCESSOR, str(EXAMPLE_PLUGIN), str(file)],
        check=True,
        env=env,
        cwd=root,
    )
    out = subprocess.run(
        [sys.executable, "-c", UNPICKLE_AND_USE, str(file)],
        check=True,
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.stdout.split("\n")[-2] == "4 (1, 16, 16)"


def conversation(turns: int) -> list[dict[str, str]]:
    """``turns`` exchanges, each with one image: a question of ~25 words and a short reply."""
    out = []
    for i in range(turns):
        out.append({"role": "user", "content": f"<image>\nQuestion {i}: " + "words " * 25})
        out.append({"role": "assistant", "content": f"reply {i}"})
    return out


def test_long_prompts_drop_their_oldest_whole_turns(rgb_image) -> None:
    processor = MultimodalProcessor.from_config(tiny_config(max_length=160, system_prompt="Be brief."))
    images = [np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    prompt = conversation(4)[:-1]  # the 4th question is being asked
    example = processor(prompt, {"image": images}, add_generation_prompt=True)
    assert example.dropped_turns > 0 and len(example.input_ids) <= 160
    text = processor.tokenizer.decode(example.input_ids)
    assert "Question 3" in text and "Be brief." in text  # the newest question and the system prompt
    assert "Question 0" not in text
    kept = 4 - example.dropped_turns
    assert example.input_ids.count(processor.placeholder_ids["image"]) == 16 * kept  # whole media blocks
    # the images that remain are those of the kept turns, the newest ones
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            example.media["image"], [processor.handlers["image"](x)[0] for x in images[-kept:]], strict=True
        )
    )
    assert processor(prompt[-1:], {"image": images[-1:]}, add_generation_prompt=True).dropped_turns == 0


def test_long_training_conversations_drop_their_last_turns() -> None:
    processor = MultimodalProcessor.from_config(tiny_config(max_length=160))
    images = [np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    example = processor(conversation(4), {"image": images})
    assert example.dropped_turns > 0 and len(example.input_ids) <= 160
    text = processor.tokenizer.decode(example.input_ids)
    assert "Question 0" in text and "Question 3" not in text
    supervised = processor.tokenizer.decode([t for t in example.labels if t != -100])
    assert "reply 0" in supervised and "reply 3" not in supervised


def test_a_question_that_cannot_fit_is_refused_by_name(rgb_image) -> None:
    from mm_llama.errors import MMInputError

    processor = MultimodalProcessor.from_config(tiny_config(max_length=60))
    with pytest.raises(
        MMInputError, match=r"chat turn 2: \d+ tokens exceed max_length=60 even with the newest"
    ):
        processor(
            "<image>\n" + "word " * 200,
            {"image": [rgb_image]},
            add_generation_prompt=True,
            where="chat turn 2",
        )


def test_building_a_processor_draws_no_random_numbers() -> None:
    """A seeded model build gives the same weights whether or not processors were built first."""
    state = torch.random.get_rng_state()
    MultimodalProcessor.from_config(tiny_config())
    assert torch.equal(torch.random.get_rng_state(), state)
