"""Yes/no hallucination and perception benchmarks: POPE and MME.

Layouts read:

- POPE, official: ``coco_pope_{random,popular,adversarial}.json`` (JSON lines of question_id, image, text,
  label), one file or a folder of them; the category comes from the file name. Images (COCO val2014) under
  ``media_root`` (default: the folder of the JSON files).
- POPE, lmms-lab parquet: question_id, question, answer, image, category.
- MME, lmms-lab parquet: question_id (the image's path, e.g. ``code_reasoning/0020.png``, shared by its
  two questions), question (ending in "Please answer yes or no."), answer, category, image.

Question ids are made unique across categories and question pairs: ``{category}/{question_id}`` for POPE,
``{image}#{n}`` (n = 0, 1) for MME.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mm_llama.errors import MissingInputError
from mm_llama.eval.metrics import MMEAnswer, mme_scores, pope_metrics
from mm_llama.eval.readers import (
    image_item,
    media_path,
    parquet_files,
    read_json_records,
    read_parquet,
    require_fields,
)
from mm_llama.eval.tasks.base import SHORT_ANSWER_PROMPT, Prediction, Sample, Task, question_prompt

POPE_FILE_PREFIX = "coco_pope_"


def _is_parquet(path: Path) -> bool:
    return path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet")))


class POPETask(Task):
    """POPE: accuracy, precision, recall, F1 and yes-ratio, per category and over all questions."""

    name = "pope"
    max_new_tokens = 128

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        self._parquet = None
        self._official: list[tuple[str, dict[str, Any], str]] = []
        self._files: list[Path] = []
        if _is_parquet(self.data):
            self._parquet = read_parquet(
                parquet_files(self.data), ["question_id", "question", "answer", "image"]
            )
            return
        files = sorted(self.data.glob("*.json*")) if self.data.is_dir() else [self.data]
        if not files:
            raise MissingInputError(f"{self.data}: no POPE .json/.jsonl files (e.g. coco_pope_random.json)")
        self._files = files
        image_dir = self.media_root or (self.data if self.data.is_dir() else self.data.parent)
        for path in files:
            stem = path.name.split(".")[0]
            file_category = stem[len(POPE_FILE_PREFIX) :] if stem.startswith(POPE_FILE_PREFIX) else None
            for i, record in enumerate(read_json_records(path)):
                require_fields(record, ["question_id", "image", "text", "label"], f"{path} line {i + 1}")
                category = file_category or str(record.get("category", "default"))
                self._official.append((category, record, str(record["image"])))
        self._image_dir = image_dir

    def __len__(self) -> int:
        return len(self._parquet) if self._parquet is not None else len(self._official)

    def data_files(self) -> list[Path]:
        """The question files only: the images may sit in the same folder."""
        return self._files or super().data_files()

    def load(self) -> Iterator[Sample]:
        if self._parquet is not None:
            for row in self._parquet:
                category = str(row.get("category") or "default")
                qid = f"{category}/{row['question_id']}"
                yield Sample(
                    question_id=qid,
                    prompt=question_prompt(row["question"].strip(), ["<image>"], SHORT_ANSWER_PROMPT),
                    answers=[row["answer"].strip().lower()],
                    media={"image": [image_item(row["image"], f"{self.data} question {qid}")]},
                    meta={"category": category},
                )
            return
        for category, record, image in self._official:
            qid = f"{category}/{record['question_id']}"
            yield Sample(
                question_id=qid,
                prompt=question_prompt(record["text"], ["<image>"], SHORT_ANSWER_PROMPT),
                answers=[record["label"]],
                media={"image": [str(media_path(self._image_dir, image, f"POPE question {qid}", "image"))]},
                meta={"category": category},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """eval_pope.py's numbers (as %), overall and per category."""
        by_category: dict[str, list[Prediction]] = defaultdict(list)
        for p in predictions:
            by_category[str(p.meta["category"])].append(p)

        def percent(preds: Sequence[Prediction]) -> dict[str, float]:
            raw = pope_metrics([p.prediction for p in preds], [p.answers[0] for p in preds])
            return {k: 100.0 * v for k, v in raw.items()}

        return {
            **percent(predictions),
            "per_category": {c: percent(v) for c, v in sorted(by_category.items())},
        }


class MMETask(Task):
    """MME: per-subtask acc / acc+ and the perception (max 2000) and cognition (max 800) totals."""

    name = "mme"
    max_new_tokens = 16

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        self._parquet = read_parquet(
            parquet_files(self.data), ["question_id", "question", "answer", "category", "image"]
        )

    def __len__(self) -> int:
        return len(self._parquet)

    def load(self) -> Iterator[Sample]:
        seen: dict[str, int] = defaultdict(int)
        for row in self._parquet:
            image_name = str(row["question_id"])
            qid = f"{image_name}#{seen[image_name]}"
            seen[image_name] += 1
            yield Sample(
                question_id=qid,
                prompt=question_prompt(row["question"], ["<image>"], None),
                answers=[row["answer"]],
                media={"image": [image_item(row["image"], f"{self.data} question {qid}")]},
                meta={"category": row["category"], "image": image_name, "question": row["question"]},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """The numbers of MME's ``calculation.py``."""
        return mme_scores(
            MMEAnswer(p.meta["category"], p.meta["image"], p.answers[0], p.prediction) for p in predictions
        )

    def results_files(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """MME's eval_tool input: ``mme_results/{subtask}.txt``, lines ``image\\tquestion\\tgold\\tanswer``."""
        lines: dict[str, list[str]] = defaultdict(list)
        for p in predictions:
            image = Path(p.meta["image"]).name
            answer = p.prediction.replace("\t", " ").replace("\n", " ")
            lines[p.meta["category"]].append(f"{image}\t{p.meta['question']}\t{p.answers[0]}\t{answer}\n")
        return {f"mme_results/{category}.txt": "".join(rows) for category, rows in lines.items()}
