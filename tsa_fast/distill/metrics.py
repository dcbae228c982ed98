"""Training metrics: one CSV per phase (`metrics.csv`: a row per logged step, validation columns filled at
evaluation steps), TensorBoard events when tensorboard is installed, and a PNG of the training curves."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    """Appends rows to `path` (CSV). On resume from step k, rows after step k are dropped first, so the
    resumed run continues the curve exactly where the checkpoint left it."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool):
        self.path = path
        self.rows: list[dict] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        self._rewrite()
        self.writer = _tensorboard_writer(path.parent) if tensorboard else None

    def write(self, row: dict) -> None:
        self.rows.append({key: _format(value) for key, value in row.items()})
        self._rewrite()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def _rewrite(self) -> None:
        """The whole file, atomically (a killed run never leaves a torn CSV)."""
        columns = list(dict.fromkeys(key for row in self.rows for key in row)) or ["step"]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory / "tensorboard"))


def read_metrics(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(runs: dict[str, Path], out: Path, metric: str) -> None:
    """Training loss and validation `metric` against step, one line per run (name -> metrics.csv)."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in runs.items():
        rows = read_metrics(path)
        train = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
        val = [(int(r["step"]), float(r[f"val_{metric}"])) for r in rows if r.get(f"val_{metric}")]
        if train:
            ax_loss.plot(*zip(*train), label=name)
        if val:
            ax_val.plot(*zip(*val), marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (each run's own objective)", title="training loss")
    ax_val.set(xlabel="step", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    if metric == "perplexity":
        ax_val.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
