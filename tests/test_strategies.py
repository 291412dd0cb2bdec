"""Strategies with 2 CPU processes, as users run them: `python train.py strategy=S trainer.devices=2` (Lightning
starts the second process itself), on a tiny Llama with LoRA.

Under ddp, deepspeed_zero2, deepspeed_zero3 and fsdp: the loss falls; 2 processes with data.batch_size=4 end with the
adapter and merged model of 1 process with data.batch_size=8 (the same global batches, see GlobalBatchSampler), within
ATOL; only rank 0 writes; a run resumed with ckpt_path=last from its mid-run checkpoint ends where the uninterrupted run
ends. Why not bit-equal: each process averages the loss over its own 4 sequences and the gradients are then averaged
over processes (an all-reduce), where one process averages over 8 at once, so float32 sums run in another order; ZeRO
also steps AdamW on flattened partitions, FSDP on flat shards. After 6 steps the weights differ by about 1e-7 (values
about 0.1), against changes of about 1e-2 made by training.

The ddp case runs by default; the others (about half a minute each on 2 cores) run with the slow tests.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

STEPS, EVERY, BATCH, DEVICES = 6, 3, 4, 2
ATOL = 1e-5  # adapter and merged weights, 2 processes vs 1 (see the module docstring)
STRATEGIES = [
    "ddp",
    pytest.param("deepspeed_zero2", marks=pytest.mark.slow),
    pytest.param("deepspeed_zero3", marks=pytest.mark.slow),
    pytest.param("fsdp", marks=pytest.mark.slow),
]


def train(out: Path, *overrides: str, devices: int = DEVICES, batch: int = BATCH) -> subprocess.CompletedProcess:
    """`python train.py` on the tiny Llama with LoRA (fp32 base unless overridden), no callbacks, no validation."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    args = ["recipe=qlora_tiny", "model.quantization=none", "callbacks=[]", f"output_dir={out}",
            f"trainer.devices={devices}", f"data.batch_size={batch}", f"trainer.max_steps={STEPS}",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            f"checkpoint.every_n_train_steps={EVERY}", "checkpoint.save_top_k=-1", "seed=11", *overrides]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=out.parent, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"train.py {' '.join(args)}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def weights(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(out / "adapter" / "adapter_model.safetensors"), load_file(out / "merged" / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def losses(out: Path) -> list[float]:
    rows = csv.DictReader(open(out / "logs" / "metrics.csv"))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process with the global batch (2 x 4): the run every strategy must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(out, devices=1, batch=BATCH * DEVICES)
    return out


def check_like_single(out: Path, single: Path, result: subprocess.CompletedProcess) -> None:
    adapter, merged = weights(out)
    ref_adapter, ref_merged = weights(single)
    untrained = {k: v for k, v in ref_adapter.items() if "lora_B" in k}  # LoRA's B starts at zero
    assert min(v.abs().max().item() for v in untrained.values()) > 100 * ATOL, "training must move every adapter"
    assert max_difference(adapter, ref_adapter) <= ATOL
    assert max_difference(merged, ref_merged) <= ATOL
    logged = losses(out)
    assert len(logged) == STEPS and logged[-1] < logged[0], logged
    assert result.stdout.count("slimtune report") == 1, "rank 0 alone reports and exports"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "logs", "merged", "report.json"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_train_as_one_process_with_the_global_batch_and_resume(strategy, single, tmp_path):
    straight = tmp_path / "straight"
    result = train(straight, f"strategy={strategy}")
    check_like_single(straight, single, result)
    checkpoint = straight / "checkpoints" / f"step{EVERY}.ckpt"
    assert checkpoint.is_dir() == strategy.startswith("deepspeed")  # DeepSpeed writes folders (one shard per rank)

    # An interrupted run: its output folder holds the mid-run checkpoint as last.ckpt.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    copy = shutil.copytree if checkpoint.is_dir() else shutil.copy
    copy(checkpoint, resumed / "checkpoints" / "last.ckpt")
    train(resumed, f"strategy={strategy}", "ckpt_path=last")
    assert max_difference(weights(resumed)[0], weights(straight)[0]) <= 1e-7
    assert max_difference(weights(resumed)[1], weights(straight)[1]) <= 1e-7
