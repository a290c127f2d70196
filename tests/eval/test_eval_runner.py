"""The runner end to end with a fake model: batching, media arguments, output files, interrupt and resume."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mm_llama import MultimodalLM, modality
from mm_llama.errors import MMInputError
from mm_llama.eval import Prediction, Sample, Task, evaluate
from mm_llama.eval.cli import add_eval_args, run_eval
from mm_llama.eval.runner import PREDICTIONS_FILE
from tests.eval.eval_fixtures import write_depth_qa, write_toy_world, write_vqav2_official

# Answers of the fake model by question text; see test_vqav2_official_json for why they score 98%.
VQA_OUTPUTS = {
    "What color is the cat?": "Black.",
    "Is it sleeping?": "Yes",
    "How many dogs?": "two",
    "What is on the sign?": "1,000",
    "Where is the dog?": "grass",
}


class FakeModel:
    """Implements model.generate; answers from a table keyed by the question line; records every call."""

    def __init__(self, outputs: dict[str, str], interrupt_on_call: int | None = None) -> None:
        self.outputs = outputs
        self.interrupt_on_call = interrupt_on_call
        self.calls: list[dict[str, Any]] = []

    def generate(
        self,
        prompts: list[str],
        *,
        media: dict[str, list[list[Any]]] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
    ) -> list[str]:
        self.calls.append(
            {
                "prompts": list(prompts),
                "media": dict(media or {}),
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
            }
        )
        if len(self.calls) == self.interrupt_on_call:
            raise KeyboardInterrupt
        questions = [re.sub(r"^(<\w+>\n)+", "", p).split("\n")[0] for p in prompts]
        return [f" {self.outputs.get(q, 'no')}\n" for q in questions]

    def asked(self) -> list[str]:
        return [p for call in self.calls for p in call["prompts"]]


def test_end_to_end_files_and_metrics(tmp_path: Path) -> None:
    data = write_vqav2_official(tmp_path / "vqav2")
    model = FakeModel(VQA_OUTPUTS)
    out = tmp_path / "out"
    metrics = evaluate(model, "vqav2", data, output_dir=out, batch_size=2, progress=False)
    assert metrics["accuracy"] == pytest.approx(98.0)
    assert metrics["num_questions"] == 5 and metrics["task"] == "vqav2"
    # Batches of 2, 2, 1; greedy; the task's answer length; images as one list per prompt; no audio.
    assert [len(c["prompts"]) for c in model.calls] == [2, 2, 1]
    assert all(c["do_sample"] is False and c["max_new_tokens"] == 16 for c in model.calls)
    assert [Path(p[0]).name for p in model.calls[0]["media"]["image"]] == [
        "COCO_val2014_000000000042.jpg"
    ] * 2
    assert list(model.calls[0]["media"]) == ["image"]
    lines = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["prediction"] == "Black."  # stripped
    assert json.loads((out / "vqav2_results.json").read_text())[0] == {"question_id": 1, "answer": "black"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    summary = (out / "summary.md").read_text()
    assert "| accuracy | 98.00 |" in summary and "| per_answer_type.number | 100.00 |" in summary


def test_interrupted_run_resumes_without_repeating(tmp_path: Path) -> None:
    data = write_vqav2_official(tmp_path / "vqav2")
    reference = evaluate(
        FakeModel(VQA_OUTPUTS), "vqav2", data, output_dir=tmp_path / "ref", batch_size=2, progress=False
    )

    out = tmp_path / "out"
    crashing = FakeModel(VQA_OUTPUTS, interrupt_on_call=3)  # Ctrl-C during the 3rd batch
    with pytest.raises(KeyboardInterrupt):
        evaluate(crashing, "vqav2", data, output_dir=out, batch_size=2, progress=False)
    saved = [json.loads(line)["question_id"] for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert saved == [1, 2, 3, 4]  # the two finished batches were flushed
    assert not (out / "metrics.json").exists()

    resumed = FakeModel(VQA_OUTPUTS)
    metrics = evaluate(resumed, "vqav2", data, output_dir=out, batch_size=2, progress=False)
    assert resumed.asked() == [
        "<image>\nWhere is the dog?\nAnswer the question using a single word or phrase."
    ]
    assert metrics == reference
    assert (out / "vqav2_results.json").read_text() == (tmp_path / "ref" / "vqav2_results.json").read_text()

    again = FakeModel(VQA_OUTPUTS)
    assert evaluate(again, "vqav2", data, output_dir=out, batch_size=2, progress=False) == reference
    assert again.calls == []


def test_answers_of_another_run_are_not_resumed(tmp_path: Path) -> None:
    data = write_vqav2_official(tmp_path / "vqav2")
    out = tmp_path / "out"
    first = FakeModel(VQA_OUTPUTS)
    first.fingerprint = lambda: "model-a"
    evaluate(first, "vqav2", data, output_dir=out, limit=2, progress=False)
    assert json.loads((out / "run.json").read_text())["model"] == "model-a"

    retrained = FakeModel(VQA_OUTPUTS)
    retrained.fingerprint = lambda: "model-b"
    with pytest.raises(ValueError, match=r"answers of another run \(model changed"):
        evaluate(retrained, "vqav2", data, output_dir=out, progress=False)
    with pytest.raises(ValueError, match=r"max_new_tokens changed"):
        evaluate(first, "vqav2", data, output_dir=out, max_new_tokens=3, progress=False)
    assert retrained.calls == [] and len((out / PREDICTIONS_FILE).read_text().splitlines()) == 2
    same = FakeModel(VQA_OUTPUTS)
    same.fingerprint = lambda: "model-a"
    evaluate(same, "vqav2", data, output_dir=out, progress=False)  # the same run resumes
    assert len(same.asked()) == 3


def test_data_edited_in_place_is_not_resumed(tmp_path: Path) -> None:
    """run.json keys the run by the content of the data files, not their path: editing the references in
    place (same file name) refuses the resume instead of scoring against stale answers."""
    data = write_vqav2_official(tmp_path / "vqav2")
    out = tmp_path / "out"
    evaluate(FakeModel(VQA_OUTPUTS), "vqav2", data, output_dir=out, limit=2, progress=False)
    assert len(json.loads((out / "run.json").read_text())["data_sha256"]) == 64
    evaluate(FakeModel(VQA_OUTPUTS), "vqav2", data, output_dir=out, limit=2, progress=False)  # unchanged

    annotations = data.parent / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(annotations.read_text().replace('"answer": "black"', '"answer": "white"'))
    model = FakeModel(VQA_OUTPUTS)
    with pytest.raises(MMInputError, match=r"another run \(data_sha256 changed.*edited since.*--output"):
        evaluate(model, "vqav2", data, output_dir=out, progress=False)
    assert model.calls == []


def test_data_folder_is_hashed_file_by_file(tmp_path: Path) -> None:
    """A folder of data files is hashed over every file in it, in sorted order."""
    from mm_llama.eval.runner import data_hash

    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("1")
    (folder / "sub" / "b.json").write_text("2")
    task = _OneQuestion(folder)
    assert task.data_files() == [folder / "a.json", folder / "sub" / "b.json"]
    before = data_hash(task.data_files())
    (folder / "sub" / "b.json").write_text("3")
    assert data_hash(task.data_files()) != before


def test_line_cut_short_by_a_crash_is_redone(tmp_path: Path) -> None:
    data = write_vqav2_official(tmp_path / "vqav2")
    out = tmp_path / "out"
    evaluate(FakeModel(VQA_OUTPUTS), "vqav2", data, output_dir=out, limit=2, progress=False)
    with (out / PREDICTIONS_FILE).open("a") as fh:
        fh.write('{"question_id": 3, "prom')  # a write torn by a crash
    model = FakeModel(VQA_OUTPUTS)
    metrics = evaluate(model, "vqav2", data, output_dir=out, progress=False)
    assert len(model.asked()) == 3  # questions 3, 4, 5
    assert metrics["accuracy"] == pytest.approx(98.0)
    assert len((out / PREDICTIONS_FILE).read_text().splitlines()) == 5


def test_limit_then_extend(tmp_path: Path) -> None:
    data = write_vqav2_official(tmp_path / "vqav2")
    out = tmp_path / "out"
    first = evaluate(FakeModel(VQA_OUTPUTS), "vqav2", data, output_dir=out, limit=3, progress=False)
    assert first["num_questions"] == 3
    model = FakeModel(VQA_OUTPUTS)
    evaluate(model, "vqav2", data, output_dir=out, limit=10, progress=False)
    assert len(model.asked()) == 2


def test_mixed_modalities_and_no_output_dir(tmp_path: Path) -> None:
    data = write_toy_world(tmp_path / "toy")
    model = FakeModel({"What colour is the circle?": "red", "How many beeps?": "two"})
    metrics = evaluate(model, "toy", data, batch_size=4, max_new_tokens=5, progress=False)
    assert metrics["accuracy"] == 100.0
    (call,) = model.calls
    assert call["max_new_tokens"] == 5
    assert [len(items) for items in call["media"]["image"]] == [1, 0]
    assert [len(items) for items in call["media"]["audio"]] == [0, 1]
    assert list(call["media"]) == ["image", "audio"]
    assert not list(tmp_path.glob("**/predictions.jsonl"))


def test_plugin_modality_media_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered plugin modality's items reach generate as media={"depth": ...}, one list per prompt."""
    monkeypatch.setattr(modality, "_MODALITIES", modality.modalities())
    modality.register_modality("depth")
    model = FakeModel({"Is it near or far?": "near", "What colour is it?": "Red."})
    metrics = evaluate(model, "llava_qa", write_depth_qa(tmp_path), batch_size=4, progress=False)
    assert metrics["accuracy"] == 50.0 and metrics["per_modality"] == {"depth": 100.0 / 3, "image": 100.0}
    (call,) = model.calls
    assert list(call["media"]) == ["image", "depth"]  # registry order
    assert [len(items) for items in call["media"]["depth"]] == [1, 1, 2, 0]
    assert [len(items) for items in call["media"]["image"]] == [0, 0, 0, 1]


class _OneQuestion(Task):
    """A task whose single sample has two <image> markers but one image."""

    name = "broken"
    max_new_tokens = 4

    def __len__(self) -> int:
        return 1

    def load(self) -> Iterator[Sample]:
        yield Sample("q", "<image>\n<image>\nSame?", ["yes"], {"image": ["a.png"]})

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        return {}


def test_marker_count_mismatch_names_the_question(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"broken question q: prompt has 2 <image> marker\(s\) but 1 image"):
        evaluate(FakeModel({}), _OneQuestion(tmp_path), progress=False)


def test_task_object_with_data_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        evaluate(FakeModel({}), _OneQuestion(tmp_path), data=tmp_path, progress=False)


def write_color_questions(root: Path, n: int) -> Path:
    """A toy-world JSON of ``n`` image questions with 32x32 solid-colour PNGs."""
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 170, 60)).save(root / "images" / f"{i}.png")
        records.append(
            {
                "id": f"q{i}",
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the square?"},
                    {"from": "gpt", "value": "green"},
                ],
                "question_type": "image_color",
                "answer": "green",
            }
        )
    path = root / "instruct_test.json"
    path.write_text(json.dumps(records))
    return path


def test_real_tiny_model_on_three_toy_questions(tmp_path: Path, tiny_model: MultimodalLM) -> None:
    """The runner drives the real MultimodalLM (random tiny weights): batched, saved, resumable."""
    data = write_color_questions(tmp_path / "toy", 3)
    out = tmp_path / "out"
    metrics = evaluate(
        tiny_model, "toy", data, output_dir=out, batch_size=2, max_new_tokens=3, progress=False
    )
    assert metrics["num_questions"] == 3 and 0.0 <= metrics["accuracy"] <= 100.0
    lines = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [line["question_id"] for line in lines] == ["q0", "q1", "q2"]
    assert all(isinstance(line["prediction"], str) for line in lines)
    rerun = evaluate(tiny_model, "toy", data, output_dir=out, max_new_tokens=3, progress=False)
    assert rerun == metrics


def test_cli_eval_on_a_saved_checkpoint(
    tmp_path: Path, tiny_model: MultimodalLM, capsys: pytest.CaptureFixture[str]
) -> None:
    """The eval subcommand (add_eval_args + run_eval) loads the checkpoint, writes files, prints a table."""
    tiny_model.save_pretrained(tmp_path / "ckpt", copy_llm=True)
    data = write_color_questions(tmp_path / "toy", 3)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--task", "toy", "--data", str(data)]
    run_eval(
        parser.parse_args(
            [*args, "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2", "--output", str(out)]
        )
    )
    printed = capsys.readouterr().out
    assert "toy: 2 questions" in printed and "| accuracy |" in printed
    assert json.loads((out / "metrics.json").read_text())["num_questions"] == 2
