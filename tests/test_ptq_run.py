"""Post-training quantization through the Trainer: a tiny Llama, GPTQ 3-bit, LoRC, fine-tune, export, reload, resume."""

import csv
import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import TINY_LLAMA, compose
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.callbacks import PerplexityEvaluation, PostTrainingQuantization
from slimtune.callbacks import ptq as ptq_module
from slimtune.data import default_corpus_path
from slimtune.errors import SlimtuneError
from slimtune.quant import QuantLinear, load_quantized
from slimtune.run import finish, fit, prepare, run

IDS = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: on a busy shared CPU, OpenMP's threads make each op far slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ptq_overrides(tmp_path, *extra):
    return ["recipe=lorc_w3_tiny", f"output_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "callbacks.perplexity.max_windows=2", *extra]


def _losses(out: Path) -> list[float]:
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").read_text().splitlines()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=IDS).logits.float()
    model.train(was)
    return out


class LogitsAtTrainStart(L.Callback):
    """Records the model's logits after every fit-start hook (quantization, LoRC), before the first step."""

    logits = None

    def on_train_start(self, trainer, pl_module):
        self.logits = _logits(pl_module.model)


def test_gptq_lorc_finetune_export_and_reload(tmp_path, text_file):
    cfg = compose(*ptq_overrides(tmp_path / "lorc", f"data.path={text_file}", "trainer.max_steps=30",
                                 "optimizer.lr=1e-2"))
    job = prepare(cfg)
    fp_logits = _logits(job.model)
    probe = LogitsAtTrainStart()
    job.callbacks.append(probe)
    report = finish(fit(job))

    # Quantized: every LoRA layer now wraps a 3-bit QuantLinear; LoRA is trainable, the base holds no parameter.
    lora_layers = [m for n, m in job.model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert lora_layers and all(isinstance(m.base_layer, QuantLinear) and m.base_layer.bits == 3 for m in lora_layers)
    assert report["ptq_method"] == "gptq" and report["ptq_layers"] == 14 and report["ptq_lorc_rank"] == 8

    # The four perplexities: fp, quantized, quantized + LoRC (= the fine-tune's "before"), fine-tuned.
    for key in ("before_quant", "after_quant", "after_lorc", "before", "after"):
        assert report[f"eval_ppl_{key}"] > 0, key
    assert report["eval_ppl_before"] == report["eval_ppl_after_lorc"]
    assert report["eval_ppl_after"] < report["eval_ppl_before"]

    losses = _losses(Path(cfg.output_dir))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    # Without LoRC (same GPTQ codes), step-0 logits are further from the full-precision model's.
    plain = compose(*ptq_overrides(tmp_path / "plain", f"data.path={text_file}", "trainer.max_steps=1",
                                   "callbacks.ptq_lorc_w3.lorc_rank=0", "export.merged=false", "export.adapter=false",
                                   "export.quantized=false", "trainer.enable_checkpointing=false"))
    plain_job = prepare(plain)
    plain_probe = LogitsAtTrainStart()
    plain_job.callbacks.append(plain_probe)
    fit(plain_job)
    lorc_err = (probe.logits - fp_logits).pow(2).mean()
    plain_err = (plain_probe.logits - fp_logits).pow(2).mean()
    assert lorc_err < 0.8 * plain_err, (float(lorc_err), float(plain_err))

    # Export: the quantized folder (adapter inside) reloads to the very logits of the trained model.
    trained = _logits(job.model)
    reloaded = load_quantized(report["quantized_dir"])
    assert torch.equal(_logits(reloaded), trained)
    with_run_adapter = load_quantized(report["quantized_dir"], adapter_dir=report["adapter_dir"])
    assert torch.equal(_logits(with_run_adapter), trained)
    # The dense merged export computes the same (up to float rounding).
    merged = AutoModelForCausalLM.from_pretrained(report["merged_dir"])
    assert (_logits(merged) - trained).abs().max() <= 1e-4 * trained.abs().max()
    assert json.loads((Path(cfg.output_dir) / "report.json").read_text())["quantized_dir"] == report["quantized_dir"]


def test_resume_rebuilds_the_quantized_base_without_calibrating(tmp_path, text_file, monkeypatch):
    common = [f"data.path={text_file}", "model.lora.dropout=0.1", "checkpoint.every_n_train_steps=4",
              "export.merged=false", "export.quantized=false"]
    straight = compose(*ptq_overrides(tmp_path / "a", *common, "trainer.max_steps=8"))
    straight_report = run(straight)
    first = compose(*ptq_overrides(tmp_path / "b", *common, "trainer.max_steps=4"))
    run(first)
    ckpt = torch.load(Path(first.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # the base is not in the weights...
    state = ckpt["callbacks"]["PostTrainingQuantization"]
    assert len(state["layers"]) == 14  # ...but in the callback state

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run must not calibrate or quantize again")

    monkeypatch.setattr(ptq_module, "calibration_batches", no_calibration)
    monkeypatch.setattr("slimtune.quant.quantize_model_gptq", no_calibration)
    resumed = compose(*ptq_overrides(tmp_path / "b", *common, "trainer.max_steps=8", "ckpt_path=last"))
    report = run(resumed)
    assert report["steps"] == 8
    a = load_file(Path(straight.output_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(resumed.output_dir) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # The measurements at the true start come back with the checkpoint.
    for key in ("before_quant", "after_quant", "after_lorc", "before"):
        assert report[f"eval_ppl_{key}"] == pytest.approx(straight_report[f"eval_ppl_{key}"])
    assert report["eval_ppl_after"] == pytest.approx(straight_report["eval_ppl_after"], rel=1e-4)


def _tiny_lora_model(r=8, alpha=16, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0))


@pytest.mark.parametrize("method", ["nf4", "gptq_nf4"])
def test_nf4_lorc_state_restores_without_quantizing_again(method, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    model = _tiny_lora_model()
    fp = _logits(model)
    plain = _tiny_lora_model()
    calib = {"tokenizer": tiny_tokenizer, "calibration": "corpus", "n_samples": 4, "seq_len": 32, "progress": False}
    PostTrainingQuantization(method=method, bits=4, group_size=64, verbose=False, **calib).quantize(plain)
    cb = PostTrainingQuantization(method=method, bits=4, group_size=64, lorc_rank=8, lorc_iters=2, verbose=False,
                                  **calib)
    cb.quantize(model)
    assert type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    quantized = _logits(model)
    assert (quantized - fp).pow(2).mean() < (_logits(plain) - fp).pow(2).mean()

    # A fresh model with the same LoRA weights and the saved state computes the same; its float base weights are
    # zeroed first, so the quantized layers can only come from the state.
    fresh = _tiny_lora_model()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    for name, module in fresh.named_modules():
        if name.endswith("base_layer"):
            module.weight.data.zero_()
    restored = PostTrainingQuantization(method=method, bits=4, group_size=64, lorc_rank=8, lorc_iters=2, verbose=False,
                                        calibration="corpus")
    restored.load_state_dict(cb.state_dict())
    restored.restore(fresh)
    assert torch.equal(_logits(fresh), quantized)


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_rtn_in_your_own_trainer_measures_each_moment_and_exports(package, tiny_tokenizer, tmp_path):
    import importlib

    L = importlib.import_module(package)

    class MyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _tiny_lora_model(r=4, alpha=8)
            self.tokenizer = tiny_tokenizer

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (8, 16))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    text = Path(default_corpus_path()).read_text()[:4000]
    ptq = PostTrainingQuantization(method="rtn", bits=4, group_size=32, lorc_rank=4, progress=False, verbose=False,
                                   export_dir=str(tmp_path / "quantized"))
    ppl = PerplexityEvaluation(text=text, seq_len=32, max_windows=2, progress=False)
    trainer = L.Trainer(max_steps=2, callbacks=[ptq, ppl], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module = MyLM()
    trainer.fit(module, loader)
    assert set(ppl.results) == {"before_quant", "after_quant", "after_lorc", "before", "after"}
    assert ppl.results["before"] == ppl.results["after_lorc"] != ppl.results["after_quant"]
    assert torch.equal(_logits(load_quantized(tmp_path / "quantized")), _logits(module.model))  # export_dir at fit end

    late = PostTrainingQuantization(method="rtn", bits=4, group_size=32, progress=False, verbose=False)
    wrong = L.Trainer(max_steps=1, callbacks=[PerplexityEvaluation(text=text, seq_len=32, max_windows=1), late],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(SlimtuneError, match="put PostTrainingQuantization first"):
        wrong.fit(MyLM(), loader)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 5}, "bits=5 is not valid; valid: 2, 3, 4, 8"),
    ({"group_size": 0}, "group_size=0 is not valid; valid: a positive int or null"),
    ({"method": "hqq"}, "method='hqq' is not valid; valid: rtn, gptq, nf4, gptq_nf4, awq, awq_gptq, smoothquant"),
    ({"method": "nf4", "bits": 3}, "bits=3 is not valid with method=nf4; valid: 4"),
    ({"method": "gptq_nf4", "bits": 8}, "bits=8 is not valid with method=gptq_nf4; valid: 4"),
    ({"method": "gptq_nf4", "group_size": 48}, "group_size=48 is not an NF4 block size; valid: 32, 64, 128"),
    ({"lorc_rank": -1}, "lorc_rank=-1 is not valid"),
    ({"n_samples": 0}, "n_samples=0 is not valid; valid: an int >= 1"),
    ({"damp": 2.0}, "damp=2.0 is not valid"),
    ({"targets": []}, "targets=[] is not valid"),
    ({"calibration": "/no/such/calib.jsonl"}, "'/no/such/calib.jsonl' does not exist"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError) as err:
        PostTrainingQuantization(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lorc_rank_above_the_lora_rank_and_unknown_targets_fail_before_any_work():
    with pytest.raises(SlimtuneError, match=r"lorc_rank=16 is not valid for layer model.layers.0.self_attn.q_proj "
                                            r"\(LoRA r=8, shape 64x64\); valid: 1 to 8"):
        PostTrainingQuantization(method="rtn", lorc_rank=16, verbose=False).quantize(_tiny_lora_model())
    with pytest.raises(SlimtuneError, match="targets pattern 'qkv_proj' matches no layer; valid: names ending in"):
        PostTrainingQuantization(method="rtn", targets=["qkv_proj"], verbose=False).quantize(_tiny_lora_model())


def test_calibration_set_smaller_than_asked_fails_in_one_line(tmp_path, text_file):
    small = tmp_path / "calib.jsonl"
    small.write_text("\n".join(json.dumps({"text": f"Document {i}."}) for i in range(5)))
    cfg = compose(*ptq_overrides(tmp_path, f"data.path={text_file}", f"callbacks.ptq_lorc_w3.calibration={small}",
                                 "callbacks.ptq_lorc_w3.n_samples=8"))
    with pytest.raises(SlimtuneError) as err:
        run(cfg)
    assert f"calibration set '{small}' has 0 samples of 64 tokens, fewer than the n_samples=8 asked" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("model.quantization=nf4", "cannot run on model.quantization=nf4; valid: model.quantization=none"),
    ("model.finetune=full", "model.finetune=full is not valid with it; valid: model.finetune=lora"),
])
def test_run_refuses_ptq_on_a_quantized_or_trainable_base(tmp_path, override, message):
    cfg = compose(*ptq_overrides(tmp_path, override))
    with pytest.raises(SlimtuneError, match=message):
        prepare(cfg)
    assert not Path(cfg.output_dir).exists()


def test_callbacks_are_ordered_ptq_first(tmp_path):
    from slimtune.run import build_callbacks

    cfg = compose(*ptq_overrides(tmp_path, "callbacks=[perplexity,ptq_lorc_w3]"))
    callbacks = build_callbacks(cfg)
    assert isinstance(callbacks[0], PostTrainingQuantization)
    assert isinstance(callbacks[1], PerplexityEvaluation)


def test_lorc_rank_below_the_lora_rank_fills_the_first_components():
    fp_model = _tiny_lora_model()
    fp = _logits(fp_model)
    plain = _tiny_lora_model()
    PostTrainingQuantization(method="rtn", bits=3, group_size=32, verbose=False).quantize(plain)
    model = _tiny_lora_model()
    PostTrainingQuantization(method="rtn", bits=3, group_size=32, lorc_rank=4, verbose=False).quantize(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape[0] == 8 and torch.count_nonzero(b[:, 4:]) == 0 and torch.count_nonzero(a[4:]) > 0
    assert torch.linalg.matrix_rank(layer.get_delta_weight("default")) == 4
    assert (_logits(model) - fp).pow(2).mean() < (_logits(plain) - fp).pow(2).mean()
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_run_exports_compressed_tensors_that_transformers_and_peft_load(tmp_path, text_file):
    from peft import PeftModel

    cfg = compose(*ptq_overrides(tmp_path, f"data.path={text_file}", "trainer.max_steps=2", "export.merged=false",
                                 "callbacks.ptq_lorc_w3.method=rtn", "callbacks.ptq_lorc_w3.symmetric=true",
                                 "export.compressed_tensors=true"))
    job = prepare(cfg)
    report = finish(fit(job))
    folder = Path(report["compressed_tensors_dir"])
    assert folder == Path(cfg.output_dir) / "compressed_tensors"
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    assert qconfig["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _logits(base)  # compressed-tensors decompresses on the first forward
    served = PeftModel.from_pretrained(base, folder / "adapter")
    torch.testing.assert_close(_logits(served), _logits(job.model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("callbacks.ptq_lorc_w3.group_size=48", "64 wide, not a multiple of group_size=48"),
    ("callbacks.ptq_lorc_w3.method=nf4", "not valid with PostTrainingQuantization method=nf4"),
    ("callbacks.ptq_lorc_w3.method=gptq_nf4", "not valid with PostTrainingQuantization method=gptq_nf4"),
    ("recipe=qlora_tiny", "needs a PostTrainingQuantization callback"),
])
def test_compressed_tensors_export_refuses_what_it_cannot_store_before_training(tmp_path, override, message):
    extra = ["callbacks.ptq_lorc_w3.bits=4", "callbacks.ptq_lorc_w3.group_size=64"] if "nf4" in override else []
    if override.startswith("recipe="):  # a run without post-training quantization
        cfg = compose(override, f"output_dir={tmp_path / 'run'}", "export.compressed_tensors=true")
    else:
        cfg = compose(*ptq_overrides(tmp_path, "export.compressed_tensors=true", *extra, override))
    with pytest.raises(SlimtuneError, match=message) as err:
        prepare(cfg)
    assert "\n" not in str(err.value)
    assert not Path(cfg.output_dir).exists()


def test_gptq_nf4_preset_finetunes_a_qlora_base_and_merges(tmp_path, text_file):
    import bitsandbytes as bnb

    cfg = compose("model=tiny_llama", "model.quantization=none", "callbacks=[ptq_gptq_nf4,perplexity]",
                  f"data.path={text_file}", "data.block_size=64", "data.batch_size=4", "trainer.max_steps=12",
                  "optimizer.lr=1e-2", f"output_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false",
                  "trainer.log_every_n_steps=1", "callbacks.perplexity.max_windows=2",
                  "callbacks.ptq_gptq_nf4.calibration=corpus", "callbacks.ptq_gptq_nf4.n_samples=8",
                  "callbacks.ptq_gptq_nf4.seq_len=64",
                  "callbacks.ptq_gptq_nf4.lorc_rank=4", "callbacks.ptq_gptq_nf4.progress=false")
    job = prepare(cfg)
    report = finish(fit(job))
    assert report["ptq_method"] == "gptq_nf4" and report["ptq_layers"] == 14 and report["ptq_lorc_rank"] == 4
    bases = [m.base_layer for n, m in job.model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert len(bases) == 4 and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)
    assert report["eval_ppl_after"] < report["eval_ppl_before"]
    losses = _losses(Path(cfg.output_dir))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    # the dense merged model (NF4 dequantized, adapter merged in fp32) computes what the trained model does
    trained = _logits(job.model)
    merged = AutoModelForCausalLM.from_pretrained(report["merged_dir"])
    assert (_logits(merged) - trained).abs().max() <= 1e-4 * trained.abs().max()


def test_replacing_a_recipes_callbacks_names_the_orphaned_settings(tmp_path, data_dir):
    # lorc_w3_tiny sets callbacks.ptq_lorc_w3.*; a callbacks list without that preset leaves settings with no class
    cfg = compose(*ptq_overrides(tmp_path, "callbacks=[ptq_gptq_nf4,perplexity]"))
    with pytest.raises(SlimtuneError) as err:
        prepare(cfg)
    assert "callbacks.ptq_lorc_w3 has settings but no _target_" in str(err.value)
    assert "~callbacks.ptq_lorc_w3" in str(err.value) and "\n" not in str(err.value)
    assert not Path(cfg.output_dir).exists()
    dropped = compose(*ptq_overrides(tmp_path, "callbacks=[ptq_gptq_nf4,perplexity]", "~callbacks.ptq_lorc_w3"))
    assert "ptq_lorc_w3" not in dropped.callbacks
