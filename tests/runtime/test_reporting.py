"""What a run shows: plain progress lines off a terminal, TensorBoard event files, curves named by the loss unit."""
import io
import json

import pytest

from fastft.runtime import reporting
from fastft.runtime.trainer import Trainer

from helpers import tiny_config, write_uneven_data

RECORD = {"loss": 1.25, "lr": 1e-3, "seconds": 0.02}


def test_progress_off_a_terminal_prints_one_plain_line_per_logged_step():
    stream = io.StringIO()
    progress = reporting.Progress(total=4, stream=stream)
    assert not progress.interactive  # a StringIO is no TTY
    for step in range(1, 5):
        progress.update(step, RECORD, logged=step % 2 == 0)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["step 2/4  loss 1.2500  lr 1.00e-03  20 ms", "step 4/4  loss 1.2500  lr 1.00e-03  20 ms"]
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_is_a_bar():
    stream = io.StringIO()
    progress = reporting.Progress(total=3, stream=stream, interactive=True)
    progress.update(1, RECORD, logged=True)
    progress.close()
    assert "\r" in stream.getvalue() and "train" in stream.getvalue()


def test_unknown_tracker_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="run.tracker must be one of none, tensorboard"):
        reporting.make_tracker("wandb", tmp_path)


def test_tensorboard_tracker_writes_the_metrics_of_a_run(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    data = write_uneven_data(tmp_path / "train.jsonl")
    cfg = tiny_config(tmp_path / "run", data, run={"tracker": "tensorboard", "max_steps": 3},
                      data={"eval_path": str(data)}, eval={"at_end": True})
    Trainer(cfg).fit()
    logs = tmp_path / "run" / reporting.TENSORBOARD_DIR
    events = event_accumulator.EventAccumulator(str(logs))
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == train_losses
    assert [e.step for e in events.Scalars("eval/loss")] == [3]
    assert {"train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])


def test_curves_name_the_task_loss_unit(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fastft.runtime import plots

    titles = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, *a, **k: titles.append(text))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5}) + "\n")
    plots.plot_curves(metrics, tmp_path / "curves.png", loss_unit="example")
    assert "train loss (per example)" in titles
