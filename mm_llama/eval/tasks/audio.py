"""Clotho-AQA: audio question answering on Clotho clips.

Layout read: the official CSV (``clotho_aqa_test.csv``: file_name, QuestionText, answer, confidence; one
row per rater, three raters per question) with the WAV files under ``media_root`` (default: the
``audio_files/`` folder beside the CSV). Rows are grouped into questions by (file_name, QuestionText), in
file order; question ids are ``{file_name}/{n}``.

Scoring: the reference is the raters' majority answer (ties: the first rater's); ``accuracy`` is exact
match after lower-casing and stripping end punctuation; ``yes_no_accuracy`` covers the questions whose
reference is yes or no, reading yes/no from the first word of the answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mm_llama.eval.metrics import exact_match, majority_answer, yes_no
from mm_llama.eval.readers import media_path, read_csv
from mm_llama.eval.tasks.base import SHORT_ANSWER_PROMPT, Prediction, Sample, Task, question_prompt


class ClothoAQATask(Task):
    """Clotho-AQA from its official CSV and audio folder."""

    name = "clotho_aqa"
    max_new_tokens = 16

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        rows = read_csv(self.data, ["file_name", "QuestionText", "answer"])
        grouped: dict[tuple[str, str], list[str]] = {}
        for row in rows:
            grouped.setdefault((row["file_name"], row["QuestionText"]), []).append(row["answer"])
        self._questions = list(grouped.items())
        self._audio_dir = self.media_root or self.data.parent / "audio_files"

    def __len__(self) -> int:
        return len(self._questions)

    def load(self) -> Iterator[Sample]:
        per_file: dict[str, int] = {}
        for (file_name, question), answers in self._questions:
            n = per_file.get(file_name, 0)
            per_file[file_name] = n + 1
            qid = f"{file_name}/{n}"
            audio = media_path(self._audio_dir, file_name, f"Clotho-AQA question {qid}", "file_name")
            yield Sample(
                question_id=qid,
                prompt=question_prompt(question, ["<audio>"], SHORT_ANSWER_PROMPT),
                answers=answers,
                media={"audio": [str(audio)]},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Exact match with the majority answer (%), and yes/no accuracy (%) on the binary questions."""
        hits = []
        binary = []
        for p in predictions:
            reference = majority_answer(p.answers)
            hits.append(exact_match(p.prediction, reference))
            if reference in ("yes", "no"):
                binary.append(yes_no(p.prediction) == reference)
        return {
            "accuracy": 100.0 * sum(hits) / len(hits) if hits else 0.0,
            "yes_no_accuracy": 100.0 * sum(binary) / len(binary) if binary else 0.0,
            "yes_no_questions": len(binary),
            "scored": len(hits),
        }
