"""Strategies with 2 CPU processes, as users run them: `python train.py strategy=S trainer.devices=2` (Lightning
starts the second process itself), on a tiny Llama with LoRA (and QLoRA under ZeRO).

Under ddp, deepspeed_zero2, deepspeed_zero3 and fsdp: the loss falls; 2 processes with data.batch_size=4 end with the
adapter and merged model of 1 process with data.batch_size=8 (the same global batches, see GlobalBatchSampler) within
ATOL; only rank 0 writes; a run resumed with ckpt_path=last from its mid-run checkpoint ends exactly where the
uninterrupted run ends.

Why not bit-equal to 1 process with batch 8: each process averages the loss over its own 4 sequences and the gradients
are then averaged over the processes, where one process averages over 8 at once: the same sums in another order. Adam
turns these float32 rounding differences into weight differences up to about 5e-5 (LoRA) and 7e-5 (QLoRA) after 6
steps at lr 5e-3. One process accumulating 2 batches of 4 (trainer.accumulate_grad_batches=2) sums in the order 2
processes do and differs from batch 8 just as much; against it, ddp is bit-equal and fsdp within 2e-7. DeepSpeed
computes the clipping norm over its partitions and applies the coefficient in its own arithmetic (dividing by
(norm + 1e-6) / max_norm where torch multiplies by max_norm / (norm + 1e-6)): last-bit differences that Adam amplifies
to about 6e-5; without clipping, ZeRO-2 is bit-equal to 1 process accumulating (tested below). For scale: 1 process
training on other batches (batch 4) ends 4e-2 away from the batch-8 run, 200 x ATOL.

The ddp case runs by default; the others (about a minute each on 2 busy cores) run with the slow tests.
"""

from __future__ import annotations

import json
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
LR = 5e-3
ATOL = 2e-4  # adapter and merged weights, 2 processes vs 1 process with batch 8 (see the module docstring)
TIGHT = {"ddp": 0.0, "fsdp": 2e-6}  # 2 processes vs 1 process accumulating 2 batches of 4 (DeepSpeed: see above)
STRATEGIES = [
    "ddp",
    pytest.param("deepspeed_zero2", marks=pytest.mark.slow),
    pytest.param("deepspeed_zero3", marks=pytest.mark.slow),
    pytest.param("fsdp", marks=pytest.mark.slow),
]


def overrides(out: Path, *extra: str, devices: int = DEVICES, batch: int = BATCH) -> list[str]:
    """The tiny Llama with LoRA (fp32 base unless overridden), no callbacks, no validation."""
    return ["recipe=qlora_tiny", "model.quantization=none", "callbacks=[]", f"output_dir={out}",
            f"trainer.devices={devices}", f"data.batch_size={batch}", f"trainer.max_steps={STEPS}", f"optimizer.lr={LR}",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            f"checkpoint.every_n_train_steps={EVERY}", "checkpoint.save_top_k=-1", "seed=11", *extra]


def train(out: Path, *extra: str, devices: int = DEVICES, batch: int = BATCH) -> subprocess.CompletedProcess:
    """`python train.py` as users run it (Lightning starts the other processes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    args = overrides(out, *extra, devices=devices, batch=batch)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=out.parent, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"train.py {' '.join(args)}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def weights(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(out / "adapter" / "adapter_model.safetensors"), load_file(out / "merged" / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@torch.no_grad()
def loss_on(model, blocks: torch.Tensor) -> float:
    model.eval()
    return float(model(input_ids=blocks, labels=blocks).loss)


class Reference:
    """One process with the global batch (2 x 4): the run every strategy must reproduce; and the untrained model's
    loss on the first 16 training blocks, against which each run's merged model must have learned."""

    def __init__(self, root: Path, *extra: str):
        from conftest import compose
        from slimtune.run import prepare

        self.out = root / "run"
        train(self.out, *extra, devices=1, batch=BATCH * DEVICES)
        self.accumulated = root / "accumulated"
        train(self.accumulated, *extra, "trainer.accumulate_grad_batches=2", devices=1, batch=BATCH)
        assert max_difference(weights(self.accumulated)[0], weights(self.out)[0]) <= ATOL
        job = prepare(compose(*overrides(root / "unused", *extra, devices=1)))  # the same seed: the same initial model
        self.blocks = torch.tensor(job.datamodule.prepare().train["input_ids"][:16])
        self.initial_loss = loss_on(job.model, self.blocks)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("single"))


def check_like_single(out: Path, single: Reference, result: subprocess.CompletedProcess, tight: float | None) -> None:
    from transformers import AutoModelForCausalLM

    adapter, merged = weights(out)
    ref_adapter, ref_merged = weights(single.out)
    untrained = {k: v for k, v in ref_adapter.items() if "lora_B" in k}  # LoRA's B starts at zero
    assert min(v.abs().max().item() for v in untrained.values()) > 100 * ATOL, "training must move every adapter"
    assert max_difference(adapter, ref_adapter) <= ATOL
    assert max_difference(merged, ref_merged) <= ATOL
    if tight is not None:
        accumulated_adapter, accumulated_merged = weights(single.accumulated)
        assert max_difference(adapter, accumulated_adapter) <= tight
        assert max_difference(merged, accumulated_merged) <= tight
    final_loss = loss_on(AutoModelForCausalLM.from_pretrained(out / "merged"), single.blocks)
    assert final_loss < single.initial_loss - 0.05, (single.initial_loss, final_loss)  # the loss falls
    assert result.stdout.count("slimtune report") == 1, "rank 0 alone reports and exports"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "logs", "merged", "report.json"]
    tokens = json.loads((out / "report.json").read_text())["train_tokens"]
    assert tokens == json.loads((single.out / "report.json").read_text())["train_tokens"]  # both processes' tokens


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_train_as_one_process_with_the_global_batch(strategy, single, tmp_path):
    out = tmp_path / "run"
    check_like_single(out, single, train(out, f"strategy={strategy}"), TIGHT.get(strategy))
    checkpoint = out / "checkpoints" / f"step{EVERY}.ckpt"
    assert checkpoint.is_dir() == strategy.startswith("deepspeed")  # DeepSpeed writes folders (one shard per rank)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [getattr(s, "values", [s])[0] for s in STRATEGIES])
def test_resume_from_a_mid_run_checkpoint_ends_where_the_uninterrupted_run_ends(strategy, tmp_path):
    straight = tmp_path / "straight"
    train(straight, f"strategy={strategy}")
    checkpoint = straight / "checkpoints" / f"step{EVERY}.ckpt"
    # An interrupted run: its output folder holds the mid-run checkpoint as last.ckpt.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    copy = shutil.copytree if checkpoint.is_dir() else shutil.copy
    copy(checkpoint, resumed / "checkpoints" / "last.ckpt")
    train(resumed, f"strategy={strategy}", "ckpt_path=last")
    for resumed_weights, straight_weights in zip(weights(resumed), weights(straight)):
        assert max_difference(resumed_weights, straight_weights) == 0.0


@pytest.fixture(scope="module")
def single_qlora(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("single_qlora"), "model.quantization=nf4")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_qlora_under_zero_trains_as_one_process(strategy, single_qlora, tmp_path):
    """An NF4 base (double quantization) with LoRA: ZeRO-2 replicates the 4-bit codes, ZeRO-3 partitions them (uint8,
    beside the float adapters) and gathers each layer's for its forward and backward, with bitsandbytes' quant state
    kept on the parameter."""
    out = tmp_path / "run"
    result = train(out, f"strategy={strategy}", "model.quantization=nf4")
    check_like_single(out, single_qlora, result, None)
    report = (out / "report.json").read_text()
    assert '"quantization": "nf4"' in report


@pytest.mark.slow
def test_zero3_offload_steps_with_cpu_adam_like_one_process(single, tmp_path):
    """Parameters and optimizer states in CPU memory, AdamW stepped by DeepSpeed's CPU Adam (the C++ op; slimtune
    hands it the AdamW of optimizer.*): the same weights as torch's AdamW in one process, within ATOL."""
    out = tmp_path / "run"
    result = train(out, "strategy=deepspeed_zero3_offload")
    check_like_single(out, single, result, None)


@pytest.mark.slow
def test_zero2_without_clipping_is_bit_equal_to_one_process_accumulating(tmp_path):
    """What separates DeepSpeed from 1 process is its clipping arithmetic: without clipping, nothing."""
    train(tmp_path / "accumulated", "trainer.gradient_clip_val=0", "trainer.accumulate_grad_batches=2", devices=1)
    train(tmp_path / "zero2", "trainer.gradient_clip_val=0", "strategy=deepspeed_zero2")
    for zero2, accumulated in zip(weights(tmp_path / "zero2"), weights(tmp_path / "accumulated")):
        assert max_difference(zero2, accumulated) == 0.0


# ----------------------------------------------------------------------------------------------- in one process


def test_presets_pick_lightning_classes_on_gpus_and_cpu_subclasses_on_cpus(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from conftest import compose
    from slimtune.lightning import strategies

    expected = {
        "ddp": (DDPStrategy, DDPStrategy),
        "deepspeed_zero2": (DeepSpeedStrategy, strategies.CPUDeepSpeedStrategy),
        "deepspeed_zero3": (DeepSpeedStrategy, strategies.CPUDeepSpeedStrategy),
        "deepspeed_zero3_offload": (strategies.OffloadDeepSpeedStrategy, strategies.CPUDeepSpeedStrategy),
        "fsdp": (strategies.ClippingFSDPStrategy, strategies.CPUFSDPStrategy),
    }
    stages = {"deepspeed_zero2": 2, "deepspeed_zero3": 3, "deepspeed_zero3_offload": 3}
    for preset, (on_gpu, on_cpu) in expected.items():
        for accelerator, cls in (("gpu", on_gpu), ("cpu", on_cpu)):
            cfg = compose("recipe=qlora_tiny", f"strategy={preset}", f"trainer.accelerator={accelerator}",
                          "data.batch_size=3")
            strategy = instantiate(cfg.trainer.strategy, _convert_="all")
            assert type(strategy) is cls, (preset, accelerator)
            if preset in stages:
                assert strategy.config["zero_optimization"]["stage"] == stages[preset]
                assert strategy.config["train_micro_batch_size_per_gpu"] == 3  # = data.batch_size
                assert strategies.offloads_optimizer(strategy.config) == preset.endswith("offload")


def test_own_deepspeed_json_replaces_the_preset_settings(tmp_path):
    import json

    from hydra.utils import instantiate

    from conftest import compose

    own = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 12345}, "zero_allow_untested_optimizer": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(own))
    cfg = compose("recipe=qlora_tiny", "strategy=deepspeed_zero2", f"trainer.strategy.config={path}")
    strategy = instantiate(cfg.trainer.strategy, _convert_="all")
    assert strategy.config == own and strategy.zero_stage_3


@pytest.mark.parametrize("preset", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_lightning_keeps_the_global_batch_sampler(preset, tiny_tokenizer):
    """Lightning swaps a loader's sampler for its DistributedSampler under distributed strategies unless the sampler
    is one already: GlobalBatchSampler derives from it, so each rank keeps its slice of the global batch."""
    import lightning.pytorch as L
    from hydra.utils import instantiate
    from lightning.pytorch.trainer.states import RunningStage

    from conftest import compose
    from slimtune.data.sampling import GlobalBatchSampler
    from slimtune.lightning import CausalLMDataModule

    cfg = compose("recipe=qlora_tiny", f"strategy={preset}", "trainer.devices=2", "model.quantization=none")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=instantiate(cfg.trainer.strategy, _convert_="all"),
                        logger=False, enable_checkpointing=False)
    assert trainer._accelerator_connector.is_distributed and trainer._accelerator_connector.use_distributed_sampler
    datamodule = CausalLMDataModule(tiny_tokenizer, cfg.data)
    datamodule.trainer = trainer
    loader = datamodule.train_dataloader()
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared is loader and isinstance(prepared.sampler, GlobalBatchSampler)
    # Each rank's slice of global batch g is the g-th batch of 8 one process draws, in two halves.
    one = GlobalBatchSampler(100, 8, seed=3).order(0)
    halves = [GlobalBatchSampler(100, 4, seed=3, rank=r, world_size=2).order(0) for r in (0, 1)]
    for g in range(len(one) // 8):
        assert halves[0][4 * g:4 * g + 4] + halves[1][4 * g:4 * g + 4] == one[8 * g:8 * g + 8]
