"""The toy world: a LLaVA-format JSON list over all modalities (see ``mm_llama.data.toyworld``).

Each record has ``id``, optional ``image`` / ``audio`` / ``video`` / ``imu`` keys (any registered
modality's, a plugin's ``depth`` too) holding a path (or a list of paths) relative to the JSON's folder,
``conversations`` whose first human turn is the prompt (``"<image>\\nWhat colour is the circle?"``), and
``question_type`` / ``answer`` (plus ``choices``). The reference is ``answer``, else the first gpt turn.
The prompt is used as written: the toy world's answer style is learned in training, so no suffix is added.

Scoring: exact match after lower-casing and stripping end punctuation, overall, per question type (with
the chance level ``1 / len(choices)`` where choices are given) and per modality.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from mm_llama.eval.metrics import exact_match
from mm_llama.eval.readers import read_json
from mm_llama.eval.tasks.base import LlavaRecordsTask, Prediction, Sample, percent, record_media


class ToyWorldTask(LlavaRecordsTask):
    """Questions from a toy-world ``instruct_{split}.json`` (or any LLaVA-format list with answers)."""

    name = "toy"
    max_new_tokens = 32

    def read_records(self) -> list[dict[str, Any]]:
        """The records: a JSON list only."""
        records = read_json(self.data)
        if not isinstance(records, list):
            raise ValueError(f"{self.data}: expected a JSON list of LLaVA-format records")
        return records

    def load(self) -> Iterator[Sample]:
        for record in self._records:
            where = f"{self.data} record {record['id']!r}"
            turns = record["conversations"]
            human = next((t["value"] for t in turns if t.get("from") == "human"), None)
            gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
            if human is None:
                raise ValueError(f"{where}: no human turn in 'conversations'")
            answer = record.get("answer", gpt)
            if answer is None:
                raise ValueError(f"{where}: no 'answer' field and no gpt turn to take the reference from")
            media = record_media(record, human, self._root, where)
            yield Sample(
                question_id=record["id"],
                prompt=human,
                answers=[str(answer)],
                media=media,
                meta={
                    "question_type": record.get("question_type"),
                    "modalities": sorted(media),
                    "choices": record.get("choices"),
                },
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Accuracy (%) overall, per question type (with chance %) and per modality."""
        hits = [exact_match(p.prediction, p.answers[0]) for p in predictions]
        by_type: dict[str, list[bool]] = defaultdict(list)
        by_modality: dict[str, list[bool]] = defaultdict(list)
        chance: dict[str, float] = {}
        for p, hit in zip(predictions, hits):
            qtype = str(p.meta.get("question_type"))
            by_type[qtype].append(hit)
            for modality in p.meta.get("modalities") or ["text"]:
                by_modality[modality].append(hit)
            if p.meta.get("choices"):
                chance[qtype] = 100.0 / len(p.meta["choices"])
        per_type: dict[str, dict[str, float]] = {}
        for qtype, type_hits in sorted(by_type.items()):
            per_type[qtype] = {"accuracy": percent(type_hits)}
            if qtype in chance:
                per_type[qtype]["chance"] = chance[qtype]
        return {
            "accuracy": percent(hits),
            "per_question_type": per_type,
            "per_modality": {m: percent(v) for m, v in sorted(by_modality.items())},
            "scored": len(hits),
        }
