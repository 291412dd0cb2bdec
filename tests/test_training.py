"""Through the real Trainer: a tiny Llama (built from a config) on a bitsandbytes NF4 base with PEFT LoRA."""

import csv
import glob
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TINY_LLAMA, compose, tiny_run_overrides
from slimtune.errors import SlimtuneError
from slimtune.run import finish, fit, prepare, run


def _losses(out: Path) -> list[float]:
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_qlora_loss_falls_base_frozen_adapters_change(tmp_path, text_file):
    cfg = compose(*tiny_run_overrides(tmp_path, f"data.path={text_file}", "trainer.max_steps=30", "optimizer.lr=1e-2"))
    job = prepare(cfg)
    named = dict(job.model.named_parameters())
    frozen_before = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in named.items() if "lora_B" in n}
    assert frozen_before and lora_before
    report = finish(fit(job))

    losses = _losses(Path(cfg.output_dir))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert report["eval_ppl_after"] < report["eval_ppl_before"]
    named = dict(job.model.named_parameters())
    assert all(torch.equal(named[n], before) for n, before in frozen_before.items())
    assert all(not torch.equal(named[n], before) for n, before in lora_before.items())


def test_merged_model_matches_trained_adapter_model(tmp_path, text_file):
    cfg = compose(*tiny_run_overrides(tmp_path, f"data.path={text_file}", "trainer.max_steps=8", "optimizer.lr=5e-3"))
    job = fit(prepare(cfg))
    report = finish(job)
    merged = AutoModelForCausalLM.from_pretrained(report["merged_dir"])
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 32))
    with torch.no_grad():
        job.model.eval()
        adapter_logits = job.model(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    assert not any(hasattr(m.weight, "quant_state") for m in merged.modules() if isinstance(m, torch.nn.Linear))
    scale = adapter_logits.abs().max()
    assert (adapter_logits - merged_logits).abs().max() <= 1e-4 * scale
    # The LoRA delta matters: the merged model is not just the dequantized base.
    job.model.disable_adapter_layers()
    with torch.no_grad():
        base_logits = job.model(input_ids=ids).logits
    assert (base_logits - merged_logits).abs().max() > 100 * (adapter_logits - merged_logits).abs().max()
    assert (Path(report["adapter_dir"]) / "adapter_model.safetensors").is_file()


def test_resume_equals_uninterrupted_and_checkpoint_holds_only_trainable_state(tmp_path, text_file):
    common = [f"data.path={text_file}", "model.lora.dropout=0.1", "checkpoint.every_n_train_steps=4",
              "export.merged=false", "callbacks.perplexity.max_windows=2"]
    straight = compose(*tiny_run_overrides(tmp_path / "a", *common, "trainer.max_steps=8"))
    run(straight)
    first = compose(*tiny_run_overrides(tmp_path / "b", *common, "trainer.max_steps=4"))
    run(first)
    ckpt = torch.load(Path(first.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"]
    resumed = compose(*tiny_run_overrides(tmp_path / "b", *common, "trainer.max_steps=8", "ckpt_path=last"))
    report = run(resumed)
    assert report["steps"] == 8
    a = load_file(Path(straight.output_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(resumed.output_dir) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # The "before" perplexity of the resumed run is the one measured at the true start.
    assert report["eval_ppl_before"] == pytest.approx(run.__globals__["json"].load(
        open(Path(straight.output_dir) / "report.json"))["eval_ppl_before"])


def test_resume_from_missing_checkpoint_is_one_line_error(tmp_path):
    cfg = compose(*tiny_run_overrides(tmp_path, "ckpt_path=last"))
    with pytest.raises(SlimtuneError, match="ckpt_path=last but .* does not exist"):
        prepare(cfg)
    assert not Path(cfg.output_dir).exists()


def test_wandb_offline_writes_a_run_directory(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(*tiny_run_overrides(tmp_path, f"data.path={text_file}", "logger=wandb", "trainer.max_steps=4",
                                      "export.merged=false"))
    report = run(cfg)
    import wandb

    wandb.finish()
    runs = glob.glob(str(Path(cfg.output_dir) / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    run_dir = Path(runs[0])
    assert list(run_dir.glob("run-*.wandb")), sorted(p.name for p in run_dir.iterdir())
    assert (run_dir / "files" / "report.json").is_file()
    assert report["steps"] == 4


def test_full_finetune_of_a_small_model(tmp_path, text_file):
    cfg = compose("recipe=full_tiny", f"output_dir={tmp_path / 'run'}", f"data.path={text_file}",
                  "trainer.max_steps=20", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1")
    report = run(cfg)
    assert report["compression_trainable_params"] == report["compression_total_params"]
    losses = _losses(Path(cfg.output_dir))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert "adapter_dir" not in report and Path(report["merged_dir"], "config.json").is_file()


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("just a few words", "shorter than one block"),
])
def test_bad_data_is_one_line_error_and_writes_nothing(tmp_path, content, message):
    path = tmp_path / "tiny.txt"
    path.write_text(content)
    cfg = compose(*tiny_run_overrides(tmp_path, f"data.path={path}"))
    with pytest.raises(SlimtuneError, match=message) as err:
        prepare(cfg)
    assert "\n" not in str(err.value)
    assert not Path(cfg.output_dir).exists()


def test_missing_model_path_writes_nothing(tmp_path):
    cfg = compose(*tiny_run_overrides(tmp_path, "model.config=null", "model.name_or_path=./no/such/model"))
    with pytest.raises(SlimtuneError, match=r"model path './no/such/model' does not exist"):
        prepare(cfg)
    assert not Path(cfg.output_dir).exists()


def test_checkpoint_of_another_model_is_one_line_error(tmp_path, text_file):
    first = compose(*tiny_run_overrides(tmp_path / "r8", f"data.path={text_file}", "trainer.max_steps=2",
                                        "export.merged=false", "export.adapter=false", "callbacks=[]"))
    run(first)
    ckpt = Path(first.output_dir) / "checkpoints" / "last.ckpt"
    cfg = compose(*tiny_run_overrides(tmp_path / "r4", f"data.path={text_file}", "model.lora.r=4", f"ckpt_path={ckpt}"))
    with pytest.raises(SlimtuneError, match=r"does not fit this model: .* is \[8, 64\] in the checkpoint and \[4, 64\]") as err:
        prepare(cfg)
    assert "\n" not in str(err.value)
    assert not Path(cfg.output_dir).exists()
    prepare(compose(*tiny_run_overrides(tmp_path / "r8b", f"data.path={text_file}", f"ckpt_path={ckpt}")))  # same model: fits


def test_failure_during_fit_removes_the_folder_it_created(tmp_path, text_file):
    # A real misconfiguration only fit can find: early stopping on a metric no step logs (raises at the first validation,
    # step 5, before any checkpoint is saved).
    overrides = [f"data.path={text_file}", "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
                 "+callbacks.stop.monitor=no/such/metric"]
    cfg = compose(*tiny_run_overrides(tmp_path / "new" / "parents", *overrides))
    with pytest.raises(RuntimeError, match="no/such/metric"):
        run(cfg)
    assert not (tmp_path / "new").exists()  # the output folder and the parents the run created
    # A folder that existed before is the user's: left as it is, with what the failed run logged.
    Path(cfg.output_dir).mkdir(parents=True)
    (Path(cfg.output_dir) / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="no/such/metric"):
        run(cfg)
    assert (Path(cfg.output_dir) / "notes.txt").read_text() == "mine"
