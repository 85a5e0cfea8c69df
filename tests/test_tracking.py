"""training.report_to: records reach real trackers (TensorBoard event files, an offline MLflow store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrenar_cli.pipeline.common import RunOptions
from tests.test_distill import distill_config, read_metrics


def test_tensorboard_and_mlflow_receive_every_record(tiny_llama: Path, stdlib_text: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from entrenar_cli.pipeline.distill import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    cfg = distill_config(tiny_llama, stdlib_text, out, max_steps=6, eval_steps=3, logging_steps=2,
                         report_to='["tensorboard", "mlflow"]', mixed_precision="fp32")
    run(cfg, RunOptions(progress=False))
    metrics = read_metrics(out)
    train = [r for r in metrics if r.get("event") == "train"]
    evals = [r for r in metrics if r.get("event") == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [p for p in (out / "trackers").iterdir() if p.name.endswith("-distill")]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    ppl = acc.Scalars("eval/perplexity")
    assert [e.value for e in ppl] == pytest.approx([r["perplexity"] for r in evals], rel=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "trackers" / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "entrenar"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert mlrun.data.params["training.learning_rate"] == str(cfg.training.learning_rate)
    assert mlrun.info.status == "FINISHED"


def test_missing_tracker_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from entrenar_cli.errors import UsageError
    from entrenar_cli.tracking import check_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match="'wandb'.*not installed") as err:
        check_available(["tensorboard", "wandb"])
    assert "pip install wandb" in (err.value.hint or "")
