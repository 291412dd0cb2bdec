"""W&B sweeps of distillation recipes (sweeps/*.yaml): every parameter combination expands, as `wandb agent` expands
it, into a `train.py` call that composes and builds its callbacks; one runs end to end offline with the sweep's
metric in the W&B summary. (The sweep controller itself needs a W&B server, which tests cannot reach.)"""

import glob
import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, compose

from slimtune.run import build_callbacks, run

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def agent_calls(sweep: dict) -> list[list[str]]:
    """The train.py arguments of every grid point: the command's fixed arguments, then ${args_no_hyphens}
    (key=value per parameter, values as str() renders them, as the agent does)."""
    names = list(sweep["parameters"])
    fixed = [a for a in sweep["command"] if not a.startswith("${") and a not in ("python",)]
    calls = []
    for values in itertools.product(*(sweep["parameters"][n]["values"] for n in names)):
        calls.append([*fixed, *(f"{n}={v}" for n, v in zip(names, values))])
    return calls


def covering(calls: list[list[str]]) -> list[list[str]]:
    """A few grid points that between them use every value of every parameter (each key composes on its own)."""
    chosen, seen = [], set()
    for args in calls:
        if not set(args) <= seen:
            chosen.append(args)
            seen |= set(args)
    return chosen


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["each_value", "full_grid"])
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_grid_point_composes_into_a_train_call(path, full, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    assert path.read_text().startswith(f"# wandb sweep sweeps/{path.name} && wandb agent")
    assert sweep["program"] == "train.py" and "${args_no_hyphens}" in sweep["command"]
    assert sweep["metric"]["goal"] in ("minimize", "maximize")
    calls = agent_calls(sweep)
    assert len(calls) == len(set(map(tuple, calls))) > 1
    for args in calls if full else covering(calls):
        cfg = compose(*args, f"output_dir={tmp_path}", "logger=none", "trainer.enable_checkpointing=false")
        (distill,) = [cb for cb in build_callbacks(cfg) if type(cb).__name__ == "Distillation"]
        for arg in args:
            key, _, value = arg.partition("=")
            if key.startswith("callbacks.distill."):
                field = key.rsplit(".", 1)[1]
                got = getattr(distill.spec, field, getattr(distill, field, None))
                assert str(got) in (value, str(float(value)) if value.replace(".", "").isdigit() else value, "None")


@pytest.mark.slow  # ~10 s: W&B's offline service starts and stops
def test_one_sweep_run_end_to_end_offline_reports_the_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = yaml.safe_load((ROOT / "sweeps" / "distill_tiny.yaml").read_text())
    args = agent_calls(sweep)[-1]
    cfg = compose(*args, f"output_dir={tmp_path / 'run'}", "trainer.max_steps=3", "trainer.val_check_interval=3",
                  "export.merged=false", "trainer.enable_progress_bar=false")
    torch.set_num_threads(1)
    report = run(cfg)
    import wandb

    metric = sweep["metric"]["name"]
    try:
        summary = dict(wandb.run.summary)  # what the agent reads back as the run's result
    finally:
        wandb.finish()
    assert glob.glob(str(Path(cfg.output_dir) / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert summary[metric] == pytest.approx(report[metric]) and report["distill_loss"] == "jsd"
