"""Evaluation on VQA-style benchmarks with the official metrics: tasks, metrics and the runner.

``evaluate(model, "vqav2", "path/to/v2_OpenEnded_mscoco_val2014_questions.json", output_dir="out")``
"""

from mm_llama.eval.runner import evaluate, metrics_table
from mm_llama.eval.tasks import TASKS, Prediction, Sample, Task, get_task

__all__ = ["TASKS", "Prediction", "Sample", "Task", "evaluate", "get_task", "metrics_table"]
