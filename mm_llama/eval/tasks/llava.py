"""``llava_qa``: short-answer questions from any LLaVA-format file, of any modality (plugins' too).

``data`` is a JSON list (or JSON lines) of LLaVA records: ``id``, the media under a key named after each
registered modality (``"image": "a.png"``, a plugin's ``"depth": "maps/x.npy"``; a path or a list of
paths, relative to the file's folder or to ``media_root``) and ``conversations``. The first human turn is
the prompt, used as written (its markers included, no answer-format line added: put any instruction in the
question); the first gpt turn after it is the reference. Later turns are not asked.

Scoring: exact match after the official VQA answer normalisation on both sides (:func:`evalai_normalize`,
the EvalAI processor: lower-case, punctuation, number words to digits, articles dropped; so "Near." matches
"near" and "two boxes" matches "2 boxes"), overall and per modality (``text`` for records without media).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from mm_llama.eval.metrics import evalai_normalize
from mm_llama.eval.tasks.base import LlavaRecordsTask, Prediction, Sample, percent, record_media


def normalized_match(prediction: str, reference: str) -> bool:
    """Equality after the EvalAI answer normalisation of both sides."""
    return evalai_normalize(prediction) == evalai_normalize(reference)


class LlavaQATask(LlavaRecordsTask):
    """The first question of each record of a LLaVA-format file, scored by normalised exact match."""

    name = "llava_qa"
    max_new_tokens = 32

    def load(self) -> Iterator[Sample]:
        for record in self._records:
            where = f"{self.data} record {record['id']!r}"
            turns = record["conversations"]
            first = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
            if first is None:
                raise ValueError(f"{where}: no human turn in 'conversations'")
            reference = next((t["value"] for t in turns[first + 1 :] if t.get("from") == "gpt"), None)
            if reference is None:
                raise ValueError(
                    f"{where}: no gpt turn after the first human turn to take the reference from"
                )
            prompt = turns[first]["value"]
            media = record_media(record, prompt, self._root, where)
            yield Sample(
                question_id=record["id"],
                prompt=prompt,
                answers=[str(reference)],
                media=media,
                meta={"modalities": sorted(media)},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Accuracy (%) overall and per modality, and how many answers were scored."""
        hits = [normalized_match(p.prediction, p.answers[0]) for p in predictions]
        by_modality: dict[str, list[bool]] = defaultdict(list)
        for p, hit in zip(predictions, hits):
            for modality in p.meta.get("modalities") or ["text"]:
                by_modality[modality].append(hit)
        return {
            "accuracy": percent(hits),
            "per_modality": {m: percent(v) for m, v in sorted(by_modality.items())},
            "scored": len(hits),
        }
