"""PNG curves of a run's metrics.jsonl: loss, learning rate, gradient norm and the eval metric."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl; a resumed run's repeated steps keep the last."""
    train, evals = {}, {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        target = evals if any(k.startswith("eval_") for k in record) else train
        target[record["step"]] = {**target.get(record["step"], {}), **record}
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def plot_curves(metrics_path: str | Path, out_path: str | Path, eval_metric: str = "loss",
                loss_unit: str = "loss unit") -> None:
    """Four panels; the loss panel names the task's loss unit (a classification loss is per example)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("loss", f"train loss (per {loss_unit})"), ("lr", "learning rate"), ("grad_norm", "gradient norm")]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r])
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes.flat[3]
    key = f"eval_{eval_metric}"
    ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], marker="o")
    ax.set_title(f"eval {eval_metric}")
    ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
