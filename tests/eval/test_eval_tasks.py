"""Readers and per-task scoring on benchmark files in the official and lmms-lab layouts (see eval_fixtures)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mm_llama import modality
from mm_llama.eval import Prediction, Sample, Task, get_task
from mm_llama.eval.tasks import MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT
from tests.eval.eval_fixtures import (
    write_clotho_aqa,
    write_depth_qa,
    write_gqa_official,
    write_gqa_parquet,
    write_mmbench_parquet,
    write_mme_parquet,
    write_pope_official,
    write_pope_parquet,
    write_scienceqa_parquet,
    write_textvqa_parquet,
    write_toy_world,
    write_vizwiz_parquet,
    write_vqav2_official,
    write_vqav2_parquet,
)


def answer_all(task: Task, outputs: dict[str, str], default: str = "") -> list[Prediction]:
    """Pretend a model answered: ``outputs`` by str(question id), else ``default``."""
    return [
        Prediction(s.question_id, s.prompt, outputs.get(str(s.question_id), default), s.answers, s.meta)
        for s in task.load()
    ]


def open_image(item: bytes | str) -> Image.Image:
    return Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)


def test_unknown_task_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown eval task 'vqa3'.*vqav2.*toy"):
        get_task("vqa3", tmp_path)


def test_vqav2_official_json(tmp_path: Path) -> None:
    task = get_task("vqav2", write_vqav2_official(tmp_path))
    samples = list(task.load())
    assert len(task) == len(samples) == 5
    first = samples[0]
    assert first.question_id == 1
    assert first.prompt == f"<image>\nWhat color is the cat?\n{SHORT_ANSWER_PROMPT}"
    assert Path(first.media["image"][0]).name == "COCO_val2014_000000000042.jpg"
    assert len(first.answers) == 10 and first.meta["answer_type"] == "other"
    # Outputs -> EvalAI-normalised -> vqaEval:
    # q1 "Black." -> "black", 9 of 10 -> 1.0; q2 "Yes" -> "yes" vs ten "yes" -> 1.0 (normalising first
    # is what rescues it); q3 "two" -> "2", nine "2" -> 1.0; q4 "1,000" -> "1000", three -> 0.9;
    # q5 "grass" six -> 1.0. Mean 4.9 / 5 = 98%; per type: other (1 + 0.9 + 1) / 3.
    outputs = {"1": "Black.", "2": "Yes", "3": "two", "4": "1,000", "5": "grass"}
    metrics = task.score(answer_all(task, outputs))
    assert metrics["accuracy"] == pytest.approx(98.0)
    assert metrics["per_answer_type"] == pytest.approx({"number": 100.0, "other": 290 / 3, "yes/no": 100.0})
    results = task.results_files(answer_all(task, outputs))["vqav2_results.json"]
    assert results[1] == {"question_id": 2, "answer": "yes"}
    assert results[3] == {"question_id": 4, "answer": "1000"}


def test_vqav2_official_folder_layout(tmp_path: Path) -> None:
    """The VQA repo's layout: Questions/ and Annotations/ side by side, images given as media_root."""
    flat = write_vqav2_official(tmp_path / "flat")
    (tmp_path / "Questions").mkdir()
    (tmp_path / "Annotations").mkdir()
    questions = flat.rename(tmp_path / "Questions" / flat.name)
    (flat.parent / "v2_mscoco_val2014_annotations.json").rename(
        tmp_path / "Annotations" / "v2_mscoco_val2014_annotations.json"
    )
    task = get_task("vqav2", questions, media_root=flat.parent / "val2014")
    assert [len(s.answers) for s in task.load()] == [10] * 5


def test_vqav2_test_dev_without_annotations(tmp_path: Path) -> None:
    task = get_task("vqav2", write_vqav2_official(tmp_path, with_annotations=False))
    samples = list(task.load())
    assert all(s.answers == [] for s in samples)
    assert task.score(answer_all(task, {}, "yes"))["scored"] == 0


def test_vqav2_missing_image_names_the_file(tmp_path: Path) -> None:
    data = write_vqav2_official(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="VQAv2 question 1.*COCO_val2014_000000000042.jpg"):
        next(iter(get_task("vqav2", data).load()))


def test_vqav2_lmms_lab_parquet(tmp_path: Path) -> None:
    task = get_task("vqav2", write_vqav2_parquet(tmp_path / "VQAv2"))
    samples = list(task.load())
    assert [s.question_id for s in samples] == [1, 2, 3, 4, 5]
    image = samples[0].media["image"][0]
    assert isinstance(image, bytes)  # embedded PNG, passed on undecoded
    assert open_image(image).size == (8, 6)
    assert samples[2].answers == ["two"] * 5 + ["2"] * 4 + ["3"]
    assert samples[2].meta["answer_type"] == "number"
    assert task.score(answer_all(task, {"3": "2"}, "x"))["per_answer_type"]["number"] == 100.0


def test_parquet_with_wrong_columns_says_what_is_missing(tmp_path: Path) -> None:
    data = write_textvqa_parquet(tmp_path)
    with pytest.raises(
        ValueError, match=r"missing columns \['index', 'hint', 'A', 'B'\].*found \['question_id'"
    ):
        get_task("mmbench", data)


def test_gqa_official_and_parquet_agree(tmp_path: Path) -> None:
    official = get_task("gqa", write_gqa_official(tmp_path / "official"))
    parquet = get_task("gqa", write_gqa_parquet(tmp_path / "GQA"))
    for task in (official, parquet):
        samples = list(task.load())
        assert [s.question_id for s in samples] == ["201307251", "201640614"]
        assert samples[1].prompt == f"<image>\nWho is wearing a shirt?\n{SHORT_ANSWER_PROMPT}"
        assert samples[1].answers == ["girl"]
        # "No." -> "no" right; "The girl" != "girl" wrong -> 50%.
        metrics = task.score(answer_all(task, {"201307251": "No.", "201640614": "The girl"}))
        assert metrics["accuracy"] == 50.0
    assert open_image(list(parquet.load())[0].media["image"][0]).size == (8, 6)
    predictions = official.results_files(answer_all(official, {"201307251": "No."}))["gqa_predictions.json"]
    assert predictions[0] == {"questionId": "201307251", "prediction": "no"}


def test_pope_official_files(tmp_path: Path) -> None:
    task = get_task("pope", write_pope_official(tmp_path))
    samples = list(task.load())
    # Files sorted: adversarial before random; ids made unique per category.
    assert [s.question_id for s in samples] == [
        "adversarial/1",
        "adversarial/2",
        "random/1",
        "random/2",
        "random/3",
    ]
    assert samples[0].prompt == f"<image>\nIs there a thing 1?\n{SHORT_ANSWER_PROMPT}"
    # adversarial: gold no, yes; random: gold yes, no, yes. Answer "Yes" everywhere:
    # overall TP 3, FP 2 -> accuracy 60, precision 60, recall 100, F1 75, yes-ratio 100.
    metrics = task.score(answer_all(task, {}, "Yes"))
    assert metrics["accuracy"] == pytest.approx(60.0)
    assert metrics["precision"] == pytest.approx(60.0)
    assert metrics["recall"] == pytest.approx(100.0)
    assert metrics["f1"] == pytest.approx(75.0)
    assert metrics["per_category"]["adversarial"]["accuracy"] == pytest.approx(50.0)


def test_pope_parquet(tmp_path: Path) -> None:
    task = get_task("pope", write_pope_parquet(tmp_path))
    ids = [s.question_id for s in task.load()]
    assert ids == ["adversarial/1", "adversarial/2", "popular/1"]
    metrics = task.score(answer_all(task, {"adversarial/1": "Yes, there is."}, "No."))
    assert metrics["accuracy"] == 100.0
    assert metrics["yes_ratio"] == pytest.approx(100 / 3)


def test_textvqa_and_vizwiz_parquet(tmp_path: Path) -> None:
    textvqa = get_task("textvqa", write_textvqa_parquet(tmp_path / "textvqa"))
    # "coca-cola" -> "coca cola" (4 of 10 -> 1.0); "Go" vs ten "stop" -> 0. Mean 50%.
    assert textvqa.score(answer_all(textvqa, {"34602": "coca-cola", "34603": "Go"}))["accuracy"] == 50.0
    vizwiz = get_task("vizwiz", write_vizwiz_parquet(tmp_path / "vizwiz"))
    sample = next(iter(vizwiz.load()))
    assert sample.prompt.endswith("respond with 'Unanswerable'.\n" + SHORT_ANSWER_PROMPT)
    # "Unanswerable" -> 1.0; "Blue." -> "blue", 3 of 10 -> 0.9. Mean 95%.
    outputs = {"VizWiz_val_00000000": "Unanswerable", "VizWiz_val_00000001": "Blue."}
    assert vizwiz.score(answer_all(vizwiz, outputs))["accuracy"] == pytest.approx(95.0)
    results = vizwiz.results_files(answer_all(vizwiz, outputs))["vizwiz_results.json"]
    assert results[0] == {"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"}


def test_scienceqa_parquet(tmp_path: Path) -> None:
    task = get_task("scienceqa", write_scienceqa_parquet(tmp_path))
    with_image, text_only = list(task.load())
    assert with_image.prompt == (
        "<image>\nContext: Look at the picture.\nWhich is a mammal?\nA. frog\nB. whale\nC. trout\n"
        + MULTIPLE_CHOICE_PROMPT
    )
    assert with_image.answers == ["B"] and len(with_image.media["image"]) == 1
    assert text_only.media == {} and text_only.prompt.startswith("Which is heavier?\nA. feather\nB. brick\n")
    # "B" right; "The answer is A." parsed but wrong -> 50%, nothing unparsed.
    metrics = task.score(answer_all(task, {"0": "B", "1": "The answer is A."}))
    assert metrics == {"accuracy": 50.0, "unparsed": 0, "scored": 2}


def test_mme_parquet(tmp_path: Path) -> None:
    task = get_task("mme", write_mme_parquet(tmp_path))
    samples = list(task.load())
    assert [s.question_id for s in samples] == [
        "code_reasoning/0020.png#0",
        "code_reasoning/0020.png#1",
        "OCR/0001.jpg#0",
        "OCR/0001.jpg#1",
    ]
    assert samples[0].prompt == "<image>\nIs the output 3? Please answer yes or no."
    # code_reasoning both right -> 200 (cognition); OCR one right -> 50 + 0 = 50 (perception).
    outputs = {samples[0].question_id: "Yes", samples[1].question_id: "No", samples[2].question_id: "No"}
    metrics = task.score(answer_all(task, outputs, "No"))
    assert metrics["cognition"] == 200.0
    assert metrics["perception"] == 50.0
    files = task.results_files(answer_all(task, outputs, "No"))
    assert (
        files["mme_results/OCR.txt"].splitlines()[0]
        == "0001.jpg\tIs the word STOP? Please answer yes or no.\tYes\tNo"
    )


def test_mmbench_circular(tmp_path: Path) -> None:
    task = get_task("mmbench", write_mmbench_parquet(tmp_path))
    samples = list(task.load())
    # Question 241 has 3 options -> 3 shifts, question 242 has 2 -> 2 shifts.
    assert len(task) == len(samples) == 5
    assert [s.question_id for s in samples] == ["241@0", "241@1", "241@2", "242@0", "242@1"]
    assert samples[0].prompt == (
        f"<image>\nWhich animal is shown?\nA. cat\nB. dog\nC. bird\n{MULTIPLE_CHOICE_PROMPT}"
    )
    # Shift 1 shows dog, bird, cat: the gold "dog" is now A.
    assert samples[1].prompt.split("\n")[2:5] == ["A. dog", "B. bird", "C. cat"]
    assert [s.answers[0] for s in samples] == ["B", "A", "C", "A", "B"]
    assert samples[3].prompt.startswith(
        "<image>\nLook at the sky.\nWhat is the weather?\nA. sunny\nB. rainy\n"
    )
    # 241 right in every shift (letters and text answers); 242 right in shift 0 only -> circular 50%,
    # single pass (shift 0) 100%.
    outputs = {"241@0": "B", "241@1": "(A) dog", "241@2": "It is a dog.", "242@0": "A", "242@1": "A"}
    metrics = task.score(answer_all(task, outputs))
    assert metrics["accuracy"] == 50.0
    assert metrics["single_pass_accuracy"] == 100.0
    assert metrics["unparsed"] == 0
    single = get_task("mmbench", tmp_path, circular=False)
    assert len(single) == 2 and [s.question_id for s in single.load()] == ["241@0", "242@0"]


def test_clotho_aqa_csv(tmp_path: Path) -> None:
    task = get_task("clotho_aqa", write_clotho_aqa(tmp_path))
    samples = list(task.load())
    assert [s.question_id for s in samples] == ["birds.wav/0", "birds.wav/1"]
    assert samples[0].prompt == f"<audio>\nAre birds singing?\n{SHORT_ANSWER_PROMPT}"
    assert samples[0].answers == ["yes", "yes", "no"]
    assert Path(samples[0].media["audio"][0]).name == "birds.wav"
    # Majority "yes": "Yes, they are." is yes/no-right but not an exact match; "Bird." matches "bird".
    metrics = task.score(answer_all(task, {"birds.wav/0": "Yes, they are.", "birds.wav/1": "Bird."}))
    assert metrics == {"accuracy": 50.0, "yes_no_accuracy": 100.0, "yes_no_questions": 1, "scored": 2}


def test_toy_world(tmp_path: Path) -> None:
    task = get_task("toy", write_toy_world(tmp_path))
    image_q, audio_q = list(task.load())
    assert image_q == Sample(
        question_id="test-image-00000",
        prompt="<image>\nWhat colour is the circle?",
        answers=["red"],
        media={"image": [str(tmp_path / "images" / "test" / "00000.png")]},
        meta={
            "question_type": "image_color",
            "modalities": ["image"],
            "choices": ["red", "green", "blue", "yellow"],
        },
    )
    assert audio_q.media == {"audio": [str(tmp_path / "audio" / "test" / "00000.wav")]}
    metrics = task.score(answer_all(task, {"test-image-00000": "Red."}, "three"))
    assert metrics["accuracy"] == 50.0
    assert metrics["per_question_type"]["image_color"] == {"accuracy": 100.0, "chance": 25.0}
    assert metrics["per_modality"] == {"audio": 0.0, "image": 100.0}


def test_toy_world_rejects_records_without_conversations(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "x", "image": "a.png"}]))
    with pytest.raises(ValueError, match=r"bad.json record 0: missing fields \['conversations'\]"):
        get_task("toy", path)


@pytest.fixture
def depth_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """``depth`` registered as a modality for this test only."""
    monkeypatch.setattr(modality, "_MODALITIES", modality.modalities())
    modality.register_modality("depth")


def test_llava_qa_reads_any_registered_modality(tmp_path: Path, depth_registered: None) -> None:
    task = get_task("llava_qa", write_depth_qa(tmp_path))
    assert len(task) == 4
    d0, d1, d01, i0 = task.load()
    assert d0 == Sample(
        question_id="d0",
        prompt="<depth>\nIs it near or far?",
        answers=["Near."],
        media={"depth": [str(tmp_path / "maps" / "0.npy")]},
        meta={"modalities": ["depth"]},
    )
    assert d01.media == {"depth": [str(tmp_path / "maps" / "0.npy"), str(tmp_path / "maps" / "1.npy")]}
    assert (
        i0.media == {"image": [str(tmp_path / "red.png")]} and d1.prompt == "How many boxes are in <depth>?"
    )
    # the official VQA normalisation: case, end punctuation, number words, articles
    predictions = answer_all(task, {"d0": "near", "d1": "2 Boxes.", "d01": "the right one", "i0": "Red"})
    assert task.score(predictions) == {
        "accuracy": 75.0,
        "per_modality": {"depth": 100.0 * 2 / 3, "image": 100.0},
        "scored": 4,
    }


def test_llava_qa_names_an_unregistered_modality(tmp_path: Path) -> None:
    task = get_task("llava_qa", write_depth_qa(tmp_path))
    with pytest.raises(
        ValueError, match=r"record 'd0': the prompt has <depth>.*no modality 'depth'.*--plugin"
    ):
        next(iter(task.load()))


def test_llava_qa_takes_json_lines_and_needs_a_reference(tmp_path: Path, depth_registered: None) -> None:
    records = json.loads(write_depth_qa(tmp_path).read_text())
    lines = tmp_path / "qa.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records[:2]))
    assert [s.question_id for s in get_task("llava_qa", lines).load()] == ["d0", "d1"]
    records[0]["conversations"] = records[0]["conversations"][:1]
    lines.write_text(json.dumps(records[:1]))
    with pytest.raises(ValueError, match="record 'd0': no gpt turn after the first human turn"):
        list(get_task("llava_qa", lines).load())
    (tmp_path / "maps" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="record 'd1' depth: file not found"):
        list(get_task("llava_qa", tmp_path / "qa.json").load())
