"""Benchmark tasks by name: one small class per benchmark, one visible registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm_llama.eval.tasks.audio import ClothoAQATask
from mm_llama.eval.tasks.base import (
    MULTIPLE_CHOICE_PROMPT,
    SHORT_ANSWER_PROMPT,
    Prediction,
    Sample,
    Task,
    question_prompt,
)
from mm_llama.eval.tasks.choice import MMBenchTask, ScienceQATask
from mm_llama.eval.tasks.llava import LlavaQATask
from mm_llama.eval.tasks.toy import ToyWorldTask
from mm_llama.eval.tasks.vqa import GQATask, TextVQATask, VizWizTask, VQAv2Task
from mm_llama.eval.tasks.yesno import MMETask, POPETask

TASKS: dict[str, type[Task]] = {
    "vqav2": VQAv2Task,
    "gqa": GQATask,
    "textvqa": TextVQATask,
    "vizwiz": VizWizTask,
    "scienceqa": ScienceQATask,
    "pope": POPETask,
    "mme": MMETask,
    "mmbench": MMBenchTask,
    "clotho_aqa": ClothoAQATask,
    "toy": ToyWorldTask,
    "llava_qa": LlavaQATask,
}


def get_task(name: str, data: str | Path, **options: Any) -> Task:
    """Build the task registered as ``name`` on ``data``; ``options`` go to its constructor."""
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name](data, **options)


__all__ = [
    "MULTIPLE_CHOICE_PROMPT",
    "SHORT_ANSWER_PROMPT",
    "TASKS",
    "ClothoAQATask",
    "GQATask",
    "LlavaQATask",
    "MMBenchTask",
    "MMETask",
    "POPETask",
    "Prediction",
    "Sample",
    "ScienceQATask",
    "Task",
    "TextVQATask",
    "ToyWorldTask",
    "VQAv2Task",
    "VizWizTask",
    "get_task",
    "question_prompt",
]
