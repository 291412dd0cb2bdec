"""MoEBalance under DDP and ZeRO-2 on 2 CPU processes (`python train.py strategy=S trainer.devices=2`, an upcycled
tiny MoE): the expert loads are all-reduced before the Switch loss and the aux-loss-free bias update, so 2 processes with
batch 2 end where 1 process with the global batch 4 ends: the same bias (from the same global loads) and LoRA weights
within float rounding. Without the all-reduce each rank would balance on its own half of the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

ATOL = 2e-4  # as tests/test_strategies.py: per-process means then averaged gradients, vs one mean over the batch


def train(out: Path, devices: int, batch: int, strategy: str = "ddp") -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    args = ["recipe=moe_upcycle_smollm2", "model=tiny_llama_moe", f"output_dir={out}", f"trainer.devices={devices}",
            f"data.batch_size={batch}", "data.block_size=32", "trainer.max_steps=5", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "optimizer.lr=5e-3", "seed=3",
            "callbacks.moe_balance.bias_rate=0.01", "callbacks.moe_balance.heatmap=false", "export.merged=false",
            *([f"strategy={strategy}"] if devices > 1 else [])]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=out.parent, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_two_processes_balance_on_the_global_batch(strategy, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(single, devices=1, batch=4)
    train(ddp, devices=2, batch=2, strategy=strategy)
    bias_single = torch.load(single / "moe" / "expert_bias.pt")
    bias_ddp = torch.load(ddp / "moe" / "expert_bias.pt")
    assert bias_single.keys() == bias_ddp.keys()
    assert all(torch.equal(bias_single[k], bias_ddp[k]) for k in bias_single)
    assert any(b.abs().max() > 0 for b in bias_single.values()), bias_single
    report_single = json.loads((single / "report.json").read_text())
    report_ddp = json.loads((ddp / "report.json").read_text())
    assert report_ddp["moe_cv_per_layer"] == report_single["moe_cv_per_layer"]
    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= ATOL
