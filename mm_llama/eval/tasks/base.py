"""The benchmark contract: a task turns local files into prompts and scores the model's answers.

A :class:`Task` is built from a data path (a file or folder on disk) and an optional media root. Its
``load()`` yields :class:`Sample` s: a unique question id, the user prompt with media markers
(``<image>``, ``<audio>``, ...) and the standard answer-format suffix, the media items for those markers
in order, and the reference answers. ``score()`` gets back :class:`Prediction` s (the lines of
``predictions.jsonl``: prompt, model output, references, metadata), so scoring never re-reads the data
and a resumed run scores exactly like an uninterrupted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mm_llama.errors import MissingInputError
from mm_llama.eval.readers import media_path, read_json_records, require_fields
from mm_llama.modality import modalities

QuestionId = int | str
# A path, encoded bytes, a PIL image, a numpy array or a tensor: whatever model.generate accepts.
MediaItem = Any

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class Sample:
    """One question to ask: ``media[m]`` holds the items for the ``<m>`` markers of ``prompt``, in order."""

    question_id: QuestionId
    prompt: str
    answers: list[str]
    media: dict[str, list[MediaItem]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """One answered question, as stored in ``predictions.jsonl``; ``meta`` must be JSON-serialisable."""

    question_id: QuestionId
    prompt: str
    prediction: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str) -> Prediction:
        fields = ("question_id", "prompt", "prediction", "answers", "meta")
        missing = [name for name in fields if name not in record]
        if missing:
            raise ValueError(f"{where}: prediction record lacks {missing}; expected fields {list(fields)}")
        return cls(**{name: record[name] for name in fields})


def question_prompt(question: str, markers: Sequence[str], suffix: str | None) -> str:
    """LLaVA's layout: one marker line per media item, the question, then the answer-format line."""
    head = "".join(f"{m}\n" for m in markers)
    return f"{head}{question}\n{suffix}" if suffix else f"{head}{question}"


def record_media(record: Mapping[str, Any], prompt: str, root: Path, where: str) -> dict[str, list[str]]:
    """The media of a LLaVA-format record: for every registered modality with a key in it (``"image"``, or
    a plugin's ``"depth"``), its path or list of paths, resolved against ``root``, checked to stay inside it (no ``../``, absolute
    paths or symlinks out) and to exist.

    A key whose marker the prompt holds but that no registered modality has (a plugin not imported) raises,
    rather than leaving the marker as plain text.
    """
    known = modalities()
    for key in record:
        if key not in known and f"<{key}>" in prompt:
            raise ValueError(
                f"{where}: the prompt has <{key}> and the record a {key!r} key, but no modality {key!r} is "
                f"registered (known: {', '.join(known)}); import its plugin first (--plugin FILE)"
            )
    media: dict[str, list[str]] = {}
    for modality in known:
        if modality in record:
            value = record[modality]
            paths = value if isinstance(value, list) else [value]
            media[modality] = [str(media_path(root, p, where, modality)) for p in paths]
    return media


class Task(ABC):
    """A benchmark on local files. Subclasses set ``name`` and ``max_new_tokens`` and implement the rest."""

    name: ClassVar[str]
    max_new_tokens: ClassVar[int]

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        self.data = Path(data)
        if not self.data.exists():
            raise MissingInputError(f"{self.name}: data path does not exist: {self.data}")
        self.media_root = Path(media_root) if media_root is not None else None

    @abstractmethod
    def __len__(self) -> int:
        """How many samples ``load()`` yields (cheap: no media is read)."""

    @abstractmethod
    def load(self) -> Iterator[Sample]:
        """Yield the samples in a fixed order, media read lazily one sample at a time."""

    @abstractmethod
    def score(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Metrics over the given predictions (percentages in [0, 100] unless the key says otherwise)."""

    def data_files(self) -> list[Path]:
        """Every file the task reads its questions and answers from (not the media), for the run's content
        hash: ``data`` itself, or for a folder every file under it in sorted order. A task that reads files
        beside ``data`` (VQAv2's annotations) or only some of a folder's (POPE's JSON) says so here."""
        if self.data.is_file():
            return [self.data]
        return sorted(p for p in self.data.rglob("*") if p.is_file())

    def results_files(self, predictions: Sequence[Prediction]) -> dict[str, Any]:
        """Files for an official evaluation server or script: relative name -> JSON object or text."""
        return {}


def percent(hits: Sequence[bool]) -> float:
    """The share of true values, in percent (0 for none)."""
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


class LlavaRecordsTask(Task):
    """A task over a file of LLaVA-format records (``id``, ``conversations``, media keys); subclasses
    may read the file their own way (:meth:`read_records`)."""

    def __init__(self, data: str | Path, media_root: str | Path | None = None) -> None:
        super().__init__(data, media_root)
        records = self.read_records()
        for i, record in enumerate(records):
            require_fields(record, ["id", "conversations"], f"{self.data} record {i}")
        self._records = records
        self._root = self.media_root or self.data.parent

    def read_records(self) -> list[dict[str, Any]]:
        """The records: a JSON list or JSON lines."""
        return read_json_records(self.data)

    def __len__(self) -> int:
        return len(self._records)
