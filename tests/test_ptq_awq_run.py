"""AWQ / AWQ+GPTQ / SmoothQuant through the Trainer: a tiny Llama, calibration, LoRC, fine-tune, export, reload, resume."""

from pathlib import Path

import pytest
import torch
from conftest import compose
from safetensors.torch import load_file
from test_ptq_run import LogitsAtTrainStart, _logits, ptq_overrides
from transformers import AutoModelForCausalLM

from slimtune.callbacks import PostTrainingQuantization
from slimtune.callbacks import ptq as ptq_module
from slimtune.errors import SlimtuneError
from slimtune.quant import QuantLinear, load_quantized
from slimtune.quant.smoothquant import W8A8Linear
from slimtune.run import finish, fit, prepare, run

SMOOTHQUANT = ["callbacks.ptq_lorc_w3.method=smoothquant", "callbacks.ptq_lorc_w3.bits=8",
               "callbacks.ptq_lorc_w3.group_size=null"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_awq_lorc_finetune_export_and_reload(tmp_path, text_file):
    cfg = compose(*ptq_overrides(tmp_path, f"data.path={text_file}", "trainer.max_steps=6", "optimizer.lr=1e-2",
                                 "callbacks.ptq_lorc_w3.method=awq", "+callbacks.ptq_lorc_w3.clip=true"))
    job = prepare(cfg)
    fp_logits = _logits(job.model)
    norm_before = job.model.base_model.model.model.layers[0].input_layernorm.weight.clone()
    probe = LogitsAtTrainStart()
    job.callbacks.append(probe)
    report = finish(fit(job))

    bases = [m.base_layer for n, m in job.model.named_modules() if n.endswith(("q_proj", "o_proj", "down_proj"))]
    assert len(bases) == 6 and all(isinstance(b, QuantLinear) and b.bits == 3 for b in bases)
    assert report["ptq_method"] == "awq" and report["ptq_layers"] == 14 and report["ptq_lorc_rank"] == 8
    assert 0 < report["ptq_awq_error_vs_rtn"] <= 1.0 and 0 <= report["ptq_awq_mean_alpha"] < 1
    # the scales are folded into the norms: the base is no longer the pretrained one, and the state carries them
    norm_after = job.model.base_model.model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm_before, norm_after)
    ptq = next(cb for cb in job.callbacks if isinstance(cb, PostTrainingQuantization))
    assert torch.equal(ptq.state_dict()["float_params"]["model.layers.0.input_layernorm.weight"], norm_after)
    # quantized + LoRC starts close to the float model
    assert (probe.logits - fp_logits).pow(2).mean() < 0.5 * fp_logits.var()

    trained = _logits(job.model)
    assert torch.equal(_logits(load_quantized(report["quantized_dir"])), trained)
    merged = AutoModelForCausalLM.from_pretrained(report["merged_dir"])
    assert (_logits(merged) - trained).abs().max() <= 1e-4 * trained.abs().max()


@pytest.mark.parametrize("method", ["awq_gptq", "smoothquant"])
def test_resume_restores_the_quantized_base_and_folded_scales_without_calibrating(tmp_path, text_file, monkeypatch,
                                                                                 method):
    method_args = SMOOTHQUANT if method == "smoothquant" else [f"callbacks.ptq_lorc_w3.method={method}"]
    common = [f"data.path={text_file}", "model.lora.dropout=0.1", "checkpoint.every_n_train_steps=3",
              "export.merged=false", "export.quantized=false", *method_args]
    straight_report = run(compose(*ptq_overrides(tmp_path / "a", *common, "trainer.max_steps=6")))
    first = compose(*ptq_overrides(tmp_path / "b", *common, "trainer.max_steps=3"))
    run(first)
    state = torch.load(Path(first.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"][
        "PostTrainingQuantization"]
    assert len(state["layers"]) == 14 and "model.layers.1.post_attention_layernorm.weight" in state["float_params"]

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run must not calibrate or quantize again")

    monkeypatch.setattr(ptq_module, "calibration_batches", no_calibration)
    monkeypatch.setattr("slimtune.quant.quantize_model_awq", no_calibration)
    monkeypatch.setattr("slimtune.quant.smoothquant.smooth_model", no_calibration)
    resumed = compose(*ptq_overrides(tmp_path / "b", *common, "trainer.max_steps=6", "ckpt_path=last"))
    report = run(resumed)
    assert report["steps"] == 6
    a = load_file(Path(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(Path(resumed.output_dir) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert report["eval_ppl_after"] == pytest.approx(straight_report["eval_ppl_after"], rel=1e-4)
    if method == "smoothquant":  # the outlier monitor's figures, before and after smoothing, also after a resume
        assert straight_report["ptq_outlier_ratio_after"] < straight_report["ptq_outlier_ratio_before"]
        assert report["ptq_outlier_ratio_after"] == straight_report["ptq_outlier_ratio_after"]


def test_smoothquant_run_quantizes_weights_and_activations_and_exports(tmp_path, text_file):
    cfg = compose(*ptq_overrides(tmp_path, f"data.path={text_file}", "trainer.max_steps=4", *SMOOTHQUANT,
                                 "+callbacks.ptq_lorc_w3.int8_matmul=true", "export.merged=false"))
    job = prepare(cfg)
    report = finish(fit(job))
    bases = [m.base_layer for n, m in job.model.named_modules() if n.endswith(("k_proj", "up_proj"))]
    assert len(bases) == 4 and all(isinstance(b, W8A8Linear) and b.int8_matmul for b in bases)
    assert report["ptq_method"] == "smoothquant"
    assert report["ptq_outlier_ratio_after"] < report["ptq_outlier_ratio_before"]
    # 8-bit weights and activations barely move the perplexity of the float model
    assert report["eval_ppl_after_quant"] == pytest.approx(report["eval_ppl_before_quant"], rel=0.02)
    reloaded = load_quantized(report["quantized_dir"])
    layer = reloaded.base_model.model.model.layers[0].mlp.up_proj.base_layer
    assert isinstance(layer, W8A8Linear) and layer.int8_matmul
    assert torch.equal(_logits(reloaded), _logits(job.model))


def test_awq_refuses_a_block_layout_it_cannot_fold_into(tiny_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=2048, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))
    for p in opt.parameters():
        p.requires_grad_(False)
    with pytest.raises(SlimtuneError, match=r"AWQ cannot fold scales into model_type='opt'.*valid: gemma"):
        PostTrainingQuantization(method="awq", bits=4, group_size=32, calibration="corpus", n_samples=2, seq_len=16,
                                 tokenizer=tiny_tokenizer, verbose=False, progress=False).quantize(opt)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "awq", "alpha": 1.5}, "alpha=1.5 is not valid; valid: floats in [0, 1]"),
    ({"method": "awq", "alpha": [0.2, -0.1]}, "alpha=[0.2, -0.1] is not valid; valid: floats in [0, 1]"),
    ({"method": "smoothquant", "bits": 8, "group_size": None, "alpha": 2}, "alpha=2 is not valid; valid: a float in [0, 1]"),
    ({"method": "smoothquant", "bits": 4, "group_size": None}, "bits=4 is not valid with method=smoothquant (W8A8); valid: 8"),
    ({"method": "smoothquant", "bits": 8, "group_size": 64}, "group_size=64 is not valid with method=smoothquant"),
    ({"method": "gptq", "alpha": 0.5}, "alpha=0.5 is not valid with method=gptq; valid: null"),
    ({"method": "awq", "n_grid": 0}, "n_grid=0 is not valid; valid: an int >= 1"),
    ({"method": "awq", "max_search_tokens": 0}, "max_search_tokens=0 is not valid"),
    ({"method": "awq", "clip": "yes"}, "clip='yes' is not valid; valid: true, false"),
    ({"method": "gptq", "clip": True}, "clip=True is not valid with method=gptq; valid: its default"),
    ({"method": "smoothquant", "bits": 8, "group_size": None, "n_grid": 10}, "n_grid=10 is not valid with method=smoothquant"),
    ({"method": "awq", "int8_matmul": True}, "int8_matmul=True is not valid with method=awq"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError) as err:
        PostTrainingQuantization(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_compressed_tensors_export_refuses_smoothquant_before_training(tmp_path):
    cfg = compose(*ptq_overrides(tmp_path, "export.compressed_tensors=true", *SMOOTHQUANT))
    with pytest.raises(SlimtuneError, match="not valid with PostTrainingQuantization method=smoothquant"):
        prepare(cfg)
    assert not Path(cfg.output_dir).exists()
