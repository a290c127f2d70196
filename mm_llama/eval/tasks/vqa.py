"""Short-answer VQA benchmarks: VQAv2, TextVQA, VizWiz and GQA.

Layouts read (``data`` is a file or folder):

- VQAv2, official: the questions JSON (``v2_OpenEnded_mscoco_val2014_questions.json``); the annotations
  (``v2_mscoco_val2014_annotations.json``) are picked up beside it or in the official layout's
  ``../Annotations/`` folder when present (none for test-dev);
  images ``COCO_val2014_000000000042.jpg`` under ``media_root`` (default: the ``val2014/`` folder beside
  the JSON; ``test2015/`` for the test splits).
- GQA, official: ``testdev_balanced_questions.json`` (``{question_id: {imageId, question, answer, ...}}``)
  with images ``{imageId}.jpg`` under ``media_root`` (default: ``images/`` beside the JSON).
- lmms-lab parquet (a ``.parquet`` file or a folder of them): ``lmms-lab/VQAv2`` (question_id, question,
  image, answers = [{answer, answer_confidence, answer_id}], answer_type, question_type),
  ``lmms-lab/textvqa`` (question_id, question, image, answers = [str]), ``lmms-lab/VizWiz-VQA``
  (question_id, question, image, answers = [str], category) and ``lmms-lab/GQA`` (a folder holding the
  ``testdev_balanced_instructions`` parquet: id, imageId, question, answer; and the
  ``testdev_balanced_images`` parquet: id, image).

Scoring: VQAv2 with the official vqaEval.py accuracy on the EvalAI-normalised prediction (what LLaVA
submits, so the local val number equals the server's); TextVQA and VizWiz with the EvalAI processor on
both sides (LLaVA's m4c evaluator); GQA with exact match after LLaVA's conversion.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mm_llama.eval.metrics import evalai_normalize, evalai_vqa_accuracy, gqa_exact_match, vqa_accuracy
from mm_llama.eval.readers import (
    check_file,
    image_item,
    media_path,
    parquet_files,
    read_json,
    read_parquet,
    require_fields,
)
from mm_llama.eval.tasks.base import SHORT_ANSWER_PROMPT, Prediction, Sample, Task, question_prompt

VIZWIZ_PROMPT = (
    "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER_PROMPT
)


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


class VQAv2Task(Task):
    """VQA v2 (val or test-dev), official JSON or lmms-lab parquet."""

    name = "vqav2"
    max_new_tokens = 16

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        self._parquet = None
        self._ann_path: Path | None = None
        if self.data.suffix == ".json":
            self._questions, self._annotations, self._image_dir, self._image_prefix = self._read_official()
        else:
            self._parquet = read_parquet(parquet_files(self.data), ["question_id", "question", "image"])

    def _read_official(self) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], Path, str]:
        doc = read_json(self.data)
        if not isinstance(doc, dict) or "questions" not in doc:
            raise ValueError(
                f"{self.data}: expected the official VQAv2 questions JSON with a 'questions' list"
            )
        subtype = str(doc.get("data_subtype", "val2014"))
        image_subtype = "test2015" if subtype.startswith("test") else subtype
        annotations: dict[int, dict[str, Any]] = {}
        ann_name = f"v2_mscoco_{subtype}_annotations.json"
        candidates = [self.data.parent / ann_name, self.data.parent.parent / "Annotations" / ann_name]
        ann_path = next((c for c in candidates if c.is_file()), None)
        self._ann_path = ann_path
        if ann_path is not None:
            ann_doc = read_json(ann_path)
            if not isinstance(ann_doc, dict) or "annotations" not in ann_doc:
                raise ValueError(f"{ann_path}: expected the official VQAv2 annotations JSON")
            for i, ann in enumerate(ann_doc["annotations"]):
                require_fields(ann, ["question_id", "answers"], f"{ann_path} annotation {i}")
                annotations[ann["question_id"]] = ann
        image_dir = self.media_root or self.data.parent / image_subtype
        return doc["questions"], annotations, image_dir, f"COCO_{image_subtype}_"

    def __len__(self) -> int:
        return len(self._parquet) if self._parquet is not None else len(self._questions)

    def data_files(self) -> list[Path]:
        """The questions file and the annotations beside it (the references), or the parquet folder."""
        return [*super().data_files(), *([self._ann_path] if self._ann_path is not None else [])]

    def load(self) -> Iterator[Sample]:
        if self._parquet is not None:
            for row in self._parquet:
                where = f"{self.data} question {row['question_id']}"
                answers = [a["answer"] for a in row.get("answers") or []]
                meta = {"answer_type": row.get("answer_type"), "question_type": row.get("question_type")}
                media = {"image": [image_item(row["image"], where)]}
                prompt = question_prompt(row["question"], ["<image>"], SHORT_ANSWER_PROMPT)
                yield Sample(row["question_id"], prompt, answers, media, meta)
            return
        for i, q in enumerate(self._questions):
            require_fields(q, ["question_id", "image_id", "question"], f"{self.data} question {i}")
            ann = self._annotations.get(q["question_id"], {})
            image = self._image_dir / f"{self._image_prefix}{q['image_id']:012d}.jpg"
            check_file(image, f"VQAv2 question {q['question_id']}")
            yield Sample(
                question_id=q["question_id"],
                prompt=question_prompt(q["question"], ["<image>"], SHORT_ANSWER_PROMPT),
                answers=[a["answer"] for a in ann.get("answers", [])],
                media={"image": [str(image)]},
                meta={"answer_type": ann.get("answer_type"), "question_type": ann.get("question_type")},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Overall and per-answer-type accuracy (%) over the questions that have annotations."""
        per_type: dict[str, list[float]] = defaultdict(list)
        scores = []
        for p in predictions:
            if not p.answers:
                continue
            acc = vqa_accuracy(evalai_normalize(p.prediction), p.answers)
            scores.append(acc)
            per_type[str(p.meta.get("answer_type"))].append(acc)
        return {
            "accuracy": _mean_percent(scores),
            "per_answer_type": {t: _mean_percent(v) for t, v in sorted(per_type.items())},
            "scored": len(scores),
            "unannotated": len(predictions) - len(scores),
        }

    def results_files(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """The EvalAI submission: ``[{"question_id", "answer"}]`` with EvalAI-normalised answers (as LLaVA)."""
        return {
            "vqav2_results.json": [
                {"question_id": p.question_id, "answer": evalai_normalize(p.prediction)} for p in predictions
            ]
        }


class _EvalAITask(Task):
    """Shared by TextVQA and VizWiz: lmms-lab parquet, EvalAI normalisation on both sides."""

    max_new_tokens = 16
    suffix: str

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        self._parquet = read_parquet(parquet_files(self.data), ["question_id", "question", "image"])

    def __len__(self) -> int:
        return len(self._parquet)

    def load(self) -> Iterator[Sample]:
        for row in self._parquet:
            where = f"{self.data} question {row['question_id']}"
            yield Sample(
                question_id=row["question_id"],
                prompt=question_prompt(row["question"], ["<image>"], self.suffix),
                answers=list(row.get("answers") or []),
                media={"image": [image_item(row["image"], where)]},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Accuracy (%) over the questions that have reference answers."""
        scores = [evalai_vqa_accuracy(p.prediction, p.answers) for p in predictions if p.answers]
        return {"accuracy": _mean_percent(scores), "scored": len(scores)}


class TextVQATask(_EvalAITask):
    """TextVQA (val), lmms-lab parquet; prompt without OCR tokens."""

    name = "textvqa"
    suffix = SHORT_ANSWER_PROMPT

    def results_files(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """The EvalAI submission: ``[{"question_id", "answer"}]``."""
        return {
            "textvqa_results.json": [
                {"question_id": p.question_id, "answer": evalai_normalize(p.prediction)} for p in predictions
            ]
        }


class VizWizTask(_EvalAITask):
    """VizWiz-VQA, lmms-lab parquet, with LLaVA's "respond with 'Unanswerable'" instruction."""

    name = "vizwiz"
    suffix = VIZWIZ_PROMPT

    def results_files(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """The EvalAI submission: ``[{"image": "<question_id>.jpg", "answer"}]``."""
        return {
            "vizwiz_results.json": [
                {"image": f"{p.question_id}.jpg", "answer": evalai_normalize(p.prediction)}
                for p in predictions
            ]
        }


class GQATask(Task):
    """GQA testdev-balanced, official questions JSON or the lmms-lab parquet folder."""

    name = "gqa"
    max_new_tokens = 16

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        self._official: list[tuple[str, dict[str, Any]]] | None = None
        if self.data.suffix == ".json":
            doc = read_json(self.data)
            if not isinstance(doc, dict):
                raise ValueError(f"{self.data}: expected the official GQA questions JSON, {{id: question}}")
            self._official = list(doc.items())
            self._image_dir = self.media_root or self.data.parent / "images"
        elif self.data.is_dir():
            files = parquet_files(self.data)
            questions = [f for f in files if "instructions" in str(f.relative_to(self.data))]
            images = [f for f in files if "images" in str(f.relative_to(self.data))]
            if not questions or not images:
                raise ValueError(
                    f"{self.data}: expected lmms-lab/GQA parquet files under 'testdev_balanced_instructions' "
                    f"and 'testdev_balanced_images' folders, found {[str(f) for f in files]}"
                )
            self._questions = read_parquet(questions, ["id", "imageId", "question", "answer"])
            image_table = read_parquet(images, ["id", "image"])
            self._image_rows = {image_id: i for i, image_id in enumerate(image_table["id"])}
            self._images = image_table
        else:
            raise ValueError(f"{self.data}: expected the GQA questions .json or the lmms-lab/GQA folder")

    def __len__(self) -> int:
        return len(self._official) if self._official is not None else len(self._questions)

    def load(self) -> Iterator[Sample]:
        if self._official is not None:
            for qid, q in self._official:
                require_fields(q, ["imageId", "question", "answer"], f"{self.data} question {qid}")
                image = media_path(self._image_dir, f"{q['imageId']}.jpg", f"GQA question {qid}", "imageId")
                prompt = question_prompt(q["question"], ["<image>"], SHORT_ANSWER_PROMPT)
                yield Sample(qid, prompt, [q["answer"]], {"image": [str(image)]})
            return
        for row in self._questions:
            where = f"{self.data} question {row['id']}"
            if row["imageId"] not in self._image_rows:
                raise ValueError(
                    f"{where}: image {row['imageId']!r} is not in the testdev_balanced_images parquet"
                )
            image = self._images[self._image_rows[row["imageId"]]]["image"]
            prompt = question_prompt(row["question"], ["<image>"], SHORT_ANSWER_PROMPT)
            yield Sample(row["id"], prompt, [row["answer"]], {"image": [image_item(image, where)]})

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Exact-match accuracy (%)."""
        hits = [gqa_exact_match(p.prediction, p.answers[0]) for p in predictions]
        return {"accuracy": _mean_percent(hits), "scored": len(hits)}

    def results_files(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """The predictions file of GQA's ``eval.py``: ``[{"questionId", "prediction"}]``."""
        return {
            "gqa_predictions.json": [
                {"questionId": p.question_id, "prediction": p.prediction.strip().rstrip(".").lower()}
                for p in predictions
            ]
        }
