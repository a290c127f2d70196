"""Evaluation on VQA-style benchmarks with the official metrics: tasks, metrics and the runner.

``evaluate(model, "vqav2", "path/to/v2_OpenEnded_mscoco_val2014_questions.json", output_dir="out")``

The names below are imported from their modules on first use (PEP 562): ``mm_llama.eval.tasks`` (the task
names, for ``mm-llama eval --help``) loads no dataset or model library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mm_llama.eval.runner import evaluate, metrics_table
    from mm_llama.eval.tasks import TASKS, Prediction, Sample, Task, get_task

_LAZY: dict[str, str] = {
    "evaluate": "mm_llama.eval.runner",
    "metrics_table": "mm_llama.eval.runner",
    "TASKS": "mm_llama.eval.tasks",
    "Prediction": "mm_llama.eval.tasks",
    "Sample": "mm_llama.eval.tasks",
    "Task": "mm_llama.eval.tasks",
    "get_task": "mm_llama.eval.tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mm_llama.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["TASKS", "Prediction", "Sample", "Task", "evaluate", "get_task", "metrics_table"]
