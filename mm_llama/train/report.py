"""What a run reports: a progress bar (loss, learning rate, tokens/s), TensorBoard scalars and, at the
end, a loss-curve PNG. Only the main process reports."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: write files, never open windows

import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT_FILE = "loss.png"
HISTORY_FILE = "train_log.json"
SMOOTHING_WINDOW = 20
"""Steps in the moving average drawn over the raw loss curve."""
SMOOTHING_MIN_POINTS = 4
"""Short runs average over a quarter of their steps, so the smoothed curve keeps a shape."""
PLOT_SIZE_IN = (7.0, 4.0)
PLOT_DPI = 120


class Reporter:
    """Progress bar + TensorBoard for one stage; a no-op on non-main processes."""

    def __init__(
        self, stage_dir: Path, stage: str, total_steps: int, start_step: int, log_every: int, enabled: bool
    ):
        self.enabled = enabled
        self.log_every = log_every
        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", disable=not enabled)
        self.writer = SummaryWriter(str(stage_dir / TENSORBOARD_DIR)) if enabled else None
        self._losses: list[float] = []
        self._tokens = 0
        self._start = time.perf_counter()

    def step(
        self, step: int, loss: float, lrs: dict[str, float], grad_norm: float | None, tokens: int
    ) -> float:
        """Record one optimizer step; every ``log_every`` steps write averages. Returns tokens/s."""
        self._losses.append(loss)
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        if not self.enabled:
            return tokens_per_s
        main_lr = next(iter(lrs.values()))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{main_lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if step % self.log_every == 0:
            self.writer.add_scalar("train/loss", sum(self._losses) / len(self._losses), step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
            for group, lr in lrs.items():
                self.writer.add_scalar(f"train/lr/{group}", lr, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self._losses, self._tokens, self._start = [], 0, time.perf_counter()
        return tokens_per_s

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def plot_loss(losses: list[float], path: Path, title: str) -> Path:
    """Write the per-step training loss and its moving average as a PNG."""
    steps = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=PLOT_SIZE_IN)
    ax.plot(steps, losses, alpha=0.35, linewidth=1, label="loss")
    window = min(SMOOTHING_WINDOW, len(losses) // SMOOTHING_MIN_POINTS)
    if window > 1:
        smooth = [sum(losses[i - window + 1 : i + 1]) / window for i in range(window - 1, len(losses))]
        ax.plot(steps[window - 1 :], smooth, linewidth=2, label=f"mean of {window} steps")
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def write_history(
    losses: list[float],
    lrs: list[float],
    seconds: float,
    path: Path,
    skipped: dict[str, int] | None = None,
) -> None:
    """The per-step loss and learning rate as JSON (the data behind the plot), and the training records
    skipped (``on_error: skip``), counted by reason."""
    path.write_text(json.dumps({"loss": losses, "lr": lrs, "seconds": seconds, "skipped": skipped or {}}))
