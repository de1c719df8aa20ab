"""The curves of a run, drawn from its ``metrics.jsonl``: ``loss.png`` and ``accuracy.png``."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write
from ..errors import MobilenetsError
from .rundir import METRICS, read_metrics


def plot(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/loss.png (train and val loss) and RUN_DIR/accuracy.png (val top-1/top-5) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise MobilenetsError(f"{Path(run_dir) / METRICS} has no finished epochs yet")
    epochs = [r["epoch"] for r in rows]
    run_dir = Path(run_dir)
    charts = (  # file, y label, y limits, (label, metrics key, marker); EMA lines only when the run kept an EMA
        ("loss", "cross-entropy loss", None,
         (("train", "train_loss", "o"), ("val", "val_loss", "o"), ("val (EMA)", "ema_val_loss", "."))),
        ("accuracy", "accuracy (%)", (0, 100),
         (("train top-1", "train_top1", "o"), ("val top-1", "val_top1", "o"), ("val top-5", "val_top5", "o"),
          ("val top-1 (EMA)", "ema_val_top1", "."))),
    )
    written = []
    for name, ylabel, ylim, series in charts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, key, marker in series:
            if key in rows[-1]:
                ax.plot(epochs, [r.get(key) for r in rows], marker=marker, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{name}: {run_dir.name}")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(run_dir / f"{name}.png")
        try:
            atomic_write(written[-1], lambda f: fig.savefig(f, format="png", dpi=100))
        finally:
            plt.close(fig)
    return written
