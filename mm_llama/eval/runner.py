"""The evaluation loop: batched greedy generation over a task, resumable, with the files a paper needs.

``evaluate(model, task, data, output_dir=...)`` writes into ``output_dir``:

- ``predictions.jsonl``: one line per answered question (id, prompt, model output, references, metadata),
  appended and flushed after every batch. A rerun reads it back and only asks the questions not in it, so
  a crash or Ctrl-C loses at most the batch in flight; a line cut short by a crash is dropped.
- the task's official results file(s) (e.g. ``vqav2_results.json`` for the EvalAI server);
- ``metrics.json`` and ``summary.md`` (a Markdown table of every number in the metrics);
- ``run.json``: what the answers came from (task, data, a sha256 of the content of every data file the
  task reads (``Task.data_files()``), answer length, the model's fingerprint when it has one:
  ``MultimodalLM.fingerprint()``). A rerun into a folder of another run (a retrained model, other data, the
  same data file edited in place) raises instead of mixing in stale answers.

The model is anything with ``generate(prompts, media=, max_new_tokens=, do_sample=) -> list[str]``, where
``media`` maps each modality in the batch (by its registered name: ``image``, a plugin's ``depth``) to one
list of items per prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from mm_llama.errors import MMInputError
from mm_llama.eval.tasks import Prediction, Sample, Task, get_task
from mm_llama.modality import marker, modalities

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
RUN_FILE = "run.json"
HASH_BLOCK = 1 << 20
"""Bytes read at a time when hashing the data files."""


class Generator(Protocol):
    """What the runner needs from a model (``mm_llama.MultimodalLM`` is one)."""

    def generate(
        self,
        prompts: list[str],
        *,
        media: dict[str, list[list[Any]]] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
    ) -> list[str]: ...


def data_hash(files: Sequence[Path]) -> str:
    """sha256 over the bytes of ``files`` in the given order (each prefixed by its length, so moving bytes
    from one file to the next changes the hash)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as fh:
            while block := fh.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def _run_info(model: Generator, task: Task, data: str | Path | None, max_new_tokens: int) -> dict[str, Any]:
    fingerprint = getattr(model, "fingerprint", None)
    return {
        "task": task.name,
        "data": str(Path(data).resolve()) if data is not None else None,
        "data_sha256": data_hash(task.data_files()),
        "max_new_tokens": max_new_tokens,
        "model": fingerprint() if callable(fingerprint) else None,
    }


def _check_same_run(out: Path, info: dict[str, Any]) -> None:
    """Write ``run.json``, or check that the answers already in ``out`` come from the same run."""
    path = out / RUN_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in info if before.get(k) != info[k]]
        if changed and (out / PREDICTIONS_FILE).is_file():
            raise MMInputError(
                f"{out} holds the answers of another run ({', '.join(changed)} changed, see {path}"
                f"{'; the data files were edited since' if 'data_sha256' in changed else ''}); "
                "evaluate into another output folder (--output), or delete this one to start over"
            )
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_predictions(path: Path) -> dict[str, Prediction]:
    """Answered questions by ``str(question_id)``; a truncated last line is cut off the file and dropped."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done: dict[str, Prediction] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s:%d: dropping a line cut short by an interrupted run", path, number)
                path.write_text("".join(lines[:-1]), encoding="utf-8")
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({err}); fix or delete this line") from err
        prediction = Prediction.from_json(record, f"{path}:{number}")
        done[str(prediction.question_id)] = prediction
    return done


def _batch_media(batch: Sequence[Sample]) -> dict[str, list[list[Any]]]:
    """For each modality present in the batch, one list of items per prompt (empty for prompts without)."""
    names = [m for m in modalities() if any(s.media.get(m) for s in batch)]
    return {m: [list(s.media.get(m, [])) for s in batch] for m in names}


def _check_sample(sample: Sample, task: Task) -> None:
    """Each ``<m>`` marker needs exactly one item; say which question is off."""
    known = modalities()
    unknown = set(sample.media) - set(known)
    if unknown:
        raise ValueError(
            f"{task.name} question {sample.question_id}: unsupported media {sorted(unknown)} "
            f"(registered modalities: {', '.join(known)}; a plugin's need --plugin FILE)"
        )
    for modality in known:
        markers = sample.prompt.count(marker(modality))
        items = len(sample.media.get(modality, []))
        if markers != items:
            raise ValueError(
                f"{task.name} question {sample.question_id}: prompt has {markers} {marker(modality)} "
                f"marker(s) but {items} {modality} item(s)"
            )


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while batch := list(islice(samples, size)):
        yield batch


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as ``{"per_category.random.f1": 87.1, ...}``."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = value
    return flat


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """A Markdown table of every number in ``metrics`` (floats with 2 decimals)."""
    rows = ["| metric | value |", "| --- | ---: |"]
    for name, value in flatten_metrics(metrics).items():
        rows.append(f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |")
    return "\n".join(rows)


def _write_outputs(out: Path, task: Task, predictions: Sequence[Prediction], metrics: dict[str, Any]) -> None:
    for name, content in task.results_files(predictions).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content)
        path.write_text(text, encoding="utf-8")
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    summary = [
        f"# {task.name} evaluation",
        "",
        f"- data: `{task.data}`",
        f"- questions: {metrics['num_questions']}",
        f"- generated max_new_tokens: {metrics['max_new_tokens']}, greedy",
        "",
        metrics_table({k: v for k, v in metrics.items() if k not in ("num_questions", "max_new_tokens")}),
        "",
    ]
    (out / SUMMARY_FILE).write_text("\n".join(summary), encoding="utf-8")


def evaluate(
    model: Generator,
    task: str | Task,
    data: str | Path | None = None,
    output_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
    **task_options: Any,
) -> dict[str, Any]:
    """Run ``model`` greedily over ``task`` (a name from ``TASKS`` with ``data``, or a built Task).

    ``limit`` keeps the first N questions; ``max_new_tokens`` overrides the task's default; other
    keywords (e.g. ``media_root``) go to the task. With ``output_dir``, answers are saved as they come
    and a rerun resumes. Returns the task's metrics plus ``task``, ``num_questions``, ``max_new_tokens``.
    """
    if isinstance(task, Task):
        if data is not None or task_options:
            raise ValueError("pass either a built Task, or a task name with data and options, not both")
        task_obj = task
    else:
        if data is None:
            raise ValueError(f"task {task!r} needs a data path (a file or folder on disk)")
        task_obj = get_task(task, data, **task_options)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = max_new_tokens or task_obj.max_new_tokens
    total = len(task_obj) if limit is None else min(limit, len(task_obj))

    out = Path(output_dir) if output_dir is not None else None
    done: dict[str, Prediction] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_same_run(out, _run_info(model, task_obj, data, tokens))
        done = read_predictions(out / PREDICTIONS_FILE)
    order: list[str] = []
    seen: set[str] = set()
    new = 0

    def pending() -> Iterator[Sample]:
        for sample in islice(task_obj.load(), total):
            key = str(sample.question_id)
            if key in seen:
                raise ValueError(f"{task_obj.name}: question id {sample.question_id!r} occurs twice")
            seen.add(key)
            order.append(key)
            if key not in done:
                _check_sample(sample, task_obj)
                yield sample

    bar = tqdm(total=total, initial=min(len(done), total), desc=task_obj.name, unit="q", disable=not progress)
    sink = (out / PREDICTIONS_FILE).open("a", encoding="utf-8") if out is not None else None
    try:
        for batch in _batches(pending(), batch_size):
            answers = model.generate(
                [s.prompt for s in batch], media=_batch_media(batch), max_new_tokens=tokens, do_sample=False
            )
            if len(answers) != len(batch):
                raise ValueError(f"model.generate returned {len(answers)} answers for {len(batch)} prompts")
            for sample, answer in zip(batch, answers):
                record = Prediction(
                    sample.question_id, sample.prompt, answer.strip(), sample.answers, sample.meta
                )
                done[str(sample.question_id)] = record
                if sink is not None:
                    sink.write(json.dumps(record.to_json()) + "\n")
            if sink is not None:
                sink.flush()
                os.fsync(sink.fileno())
            new += len(batch)
            bar.update(len(batch))
    except KeyboardInterrupt:
        where = f"; rerun to resume from {out / PREDICTIONS_FILE}" if out is not None else ""
        logger.warning("interrupted after %d new answers%s", new, where)
        raise
    finally:
        bar.close()
        if sink is not None:
            sink.close()

    predictions = [done[key] for key in order]
    metrics: dict[str, Any] = {
        "task": task_obj.name,
        "num_questions": len(predictions),
        "max_new_tokens": tokens,
        **task_obj.score(predictions),
    }
    if out is not None:
        _write_outputs(out, task_obj, predictions, metrics)
    return metrics
