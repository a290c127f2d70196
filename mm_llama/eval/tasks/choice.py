"""Multiple-choice benchmarks: ScienceQA-IMG and MMBench (circular).

Layouts read (lmms-lab parquet, a ``.parquet`` file or a folder of them):

- ``lmms-lab/ScienceQA`` (config ``ScienceQA-IMG``): question, choices (list), answer (index), hint,
  image (may be empty). It has no id column, so the question id is the row number.
- ``lmms-lab/MMBench`` (e.g. ``en`` dev): index, question, hint, A, B, C, D (E), answer (letter; absent
  on test), category, L2-category, image.

Prompts follow LLaVA-1.5: ``Context: {hint}`` (ScienceQA) or the hint line (MMBench), the question, one
``X. option`` line per choice, then "Answer with the option's letter from the given choices directly."
MMBench asks every question once per circular shift of its options (ids ``{index}@{shift}``); a question
counts as right only when all shifts are.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mm_llama.eval.metrics import OPTION_LETTERS, circular_accuracy, mmbench_extract, scienceqa_parse
from mm_llama.eval.readers import image_item, parquet_files, read_parquet
from mm_llama.eval.tasks.base import MULTIPLE_CHOICE_PROMPT, Prediction, Sample, Task, question_prompt


def _options_text(options: Sequence[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options))


def _is_missing(value: Any) -> bool:
    """MMBench marks absent options and hints with None, NaN or the string "nan"/"none"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none", "")


class ScienceQATask(Task):
    """ScienceQA-IMG test: accuracy with LLaVA's option-letter parsing."""

    name = "scienceqa"
    max_new_tokens = 16

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        self._parquet = read_parquet(
            parquet_files(self.data), ["question", "choices", "answer", "hint", "image"]
        )

    def __len__(self) -> int:
        return len(self._parquet)

    def load(self) -> Iterator[Sample]:
        for i, row in enumerate(self._parquet):
            choices = list(row["choices"])
            if not 0 <= row["answer"] < len(choices) <= len(OPTION_LETTERS):
                raise ValueError(
                    f"{self.data} row {i}: answer index {row['answer']} for {len(choices)} choices "
                    f"(expected 0 <= answer < choices <= {len(OPTION_LETTERS)})"
                )
            context = f"Context: {row['hint']}\n" if row["hint"] else ""
            question = f"{context}{row['question']}\n{_options_text(choices)}"
            has_image = row["image"] is not None
            yield Sample(
                question_id=i,
                prompt=question_prompt(question, ["<image>"] if has_image else [], MULTIPLE_CHOICE_PROMPT),
                answers=[OPTION_LETTERS[row["answer"]]],
                media={"image": [image_item(row["image"], f"{self.data} row {i}")]} if has_image else {},
                meta={"num_choices": len(choices)},
            )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Accuracy (%); ``unparsed`` counts answers with no recognisable option letter (scored wrong)."""
        picks = [scienceqa_parse(p.prediction, p.meta["num_choices"]) for p in predictions]
        hits = [pick >= 0 and OPTION_LETTERS[pick] == p.answers[0] for pick, p in zip(picks, predictions)]
        return {
            "accuracy": 100.0 * sum(hits) / len(hits) if hits else 0.0,
            "unparsed": sum(pick < 0 for pick in picks),
            "scored": len(hits),
        }


class MMBenchTask(Task):
    """MMBench with CircularEval and rule-based answer extraction (no LLM judge)."""

    name = "mmbench"
    max_new_tokens = 16

    def __init__(self, data: str | Path, media_root: str | Path | None = None, circular: bool = True) -> None:
        super().__init__(data, media_root)
        self.circular = circular
        self._parquet = read_parquet(
            parquet_files(self.data), ["index", "question", "hint", "A", "B", "image"]
        )
        letters = [c for c in OPTION_LETTERS if c in self._parquet.column_names]
        option_rows = zip(*(self._parquet[c] for c in letters))
        self._num_options = [sum(not _is_missing(v) for v in row) for row in option_rows]

    def __len__(self) -> int:
        return sum(self._num_options) if self.circular else len(self._num_options)

    def load(self) -> Iterator[Sample]:
        for row, num_options in zip(self._parquet, self._num_options):
            where = f"{self.data} index {row['index']}"
            options = [row[letter] for letter in OPTION_LETTERS[:num_options]]
            if any(_is_missing(o) for o in options):
                raise ValueError(f"{where}: options must be filled from A on without gaps, got {options}")
            answer = row.get("answer")
            gold = None
            if not _is_missing(answer):
                if str(answer).strip() not in OPTION_LETTERS[:num_options]:
                    raise ValueError(
                        f"{where}: answer {answer!r} is not one of the option letters "
                        f"{list(OPTION_LETTERS[:num_options])}"
                    )
                gold = OPTION_LETTERS.index(str(answer).strip())
            question = row["question"] if _is_missing(row["hint"]) else f"{row['hint']}\n{row['question']}"
            image = image_item(row["image"], where)
            for shift in range(num_options if self.circular else 1):
                shifted = options[shift:] + options[:shift]
                yield Sample(
                    question_id=f"{row['index']}@{shift}",
                    prompt=question_prompt(
                        f"{question}\n{_options_text(shifted)}", ["<image>"], MULTIPLE_CHOICE_PROMPT
                    ),
                    answers=[] if gold is None else [OPTION_LETTERS[(gold - shift) % num_options]],
                    media={"image": [image]},
                    meta={
                        "index": row["index"],
                        "shift": shift,
                        "choices": dict(zip(OPTION_LETTERS, shifted)),
                        "category": row.get("category"),
                    },
                )

    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Circular accuracy (%, all shifts right), single-pass accuracy on shift 0, per category."""
        passes: dict[str, list[bool]] = defaultdict(list)
        category_of: dict[str, str] = {}
        unparsed = 0
        for p in predictions:
            if not p.answers:
                continue
            pick = mmbench_extract(p.prediction, p.meta["choices"])
            unparsed += pick is None
            key = str(p.meta["index"])
            passes[key].append(pick == p.answers[0])
            category_of[key] = str(p.meta["category"])
        if not passes:
            return {
                "accuracy": 0.0,
                "scored": 0,
                "note": "no answer keys (test split): submit the predictions",
            }
        first = [p for p in predictions if p.answers and p.meta["shift"] == 0]
        by_category: dict[str, dict[str, list[bool]]] = defaultdict(dict)
        for key, oks in passes.items():
            by_category[category_of[key]][key] = oks
        return {
            "accuracy": 100.0 * circular_accuracy(passes),
            "single_pass_accuracy": 100.0
            * sum(mmbench_extract(p.prediction, p.meta["choices"]) == p.answers[0] for p in first)
            / max(len(first), 1),
            "per_category": {c: 100.0 * circular_accuracy(q) for c, q in sorted(by_category.items())},
            "unparsed": unparsed,
            "scored": len(passes),
        }
