import importlib.util

import bitsandbytes as bnb
import pytest
import torch

from conftest import compose
from slimtune.errors import SlimtuneError
from slimtune.models import build_skeleton, count_parameters, load_model, resolve_source
from slimtune.models.stats import compression_stats


def test_sources_are_told_apart(tmp_path, tiny_model_cfg):
    assert resolve_source(tiny_model_cfg).kind == "config"
    assert resolve_source({"name_or_path": "meta-llama/Llama-2-13b-hf"}).kind == "hub"
    assert resolve_source({"name_or_path": "Qwen/Qwen2.5-0.5B"}).kind == "hub"
    assert resolve_source({"name_or_path": str(tmp_path)}).kind == "local"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_source({"name_or_path": str(gguf)})
    assert (source.kind, source.path, source.gguf_file) == ("gguf", str(tmp_path), "m.gguf")


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/folder", "missing.gguf", "~/nope/model.safetensors"])
def test_missing_model_path_is_one_line_error(path):
    with pytest.raises(SlimtuneError, match=r"does not exist") as err:
        resolve_source({"name_or_path": path})
    assert path in str(err.value) and "\n" not in str(err.value)


def test_gguf_without_gguf_package(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(SlimtuneError, match=r"'gguf' package is not installed"):
        resolve_source({"name_or_path": str(gguf)})


def test_4bit_without_bitsandbytes(monkeypatch, tiny_model_cfg):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(SlimtuneError, match=r"model.quantization='nf4' needs bitsandbytes"):
        load_model(tiny_model_cfg)


def test_bad_quantization_name(tiny_model_cfg):
    with pytest.raises(SlimtuneError, match=r"model.quantization='nf3' is not supported; valid: none, nf4, fp4, int8"):
        load_model({**tiny_model_cfg, "quantization": "nf3"})


def test_lora_targets_matching_nothing(tiny_model_cfg):
    cfg = {**tiny_model_cfg, "lora": {**tiny_model_cfg["lora"], "target_modules": ["query_key_value"]}}
    with pytest.raises(SlimtuneError) as err:
        load_model(cfg)
    assert "query_key_value" in str(err.value) and "q_proj" in str(err.value)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_base_is_bitsandbytes_and_frozen(tiny_model_cfg, quant):
    model = load_model({**tiny_model_cfg, "quantization": quant})
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    expected = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert isinstance(layer, expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    out = model(input_ids=torch.randint(0, 1000, (2, 16)), labels=torch.randint(0, 1000, (2, 16)))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_nf4_double_quant_stores_about_4_13_bits(tiny_model_cfg):
    cfg = {**tiny_model_cfg, "config": {**tiny_model_cfg["config"], "hidden_size": 512, "intermediate_size": 1024,
                                        "num_attention_heads": 8, "num_key_value_heads": 8}}
    stats = compression_stats(load_model(cfg))
    # 4 bits + 8-bit absmax per 64 weights + fp32 second-level absmax per 256 blocks = 4.127, plus code tables.
    assert 4.12 < stats["quantized_bits_per_param"] < 4.2
    single = compression_stats(load_model({**cfg, "double_quant": False}))
    assert 4.49 < single["quantized_bits_per_param"] < 4.6


def test_full_finetune_unfreezes_everything(tiny_model_cfg):
    model = load_model({**tiny_model_cfg, "quantization": "none", "finetune": "full"})
    trainable, total = count_parameters(model)
    assert trainable == total
    with pytest.raises(SlimtuneError, match="finetune=full cannot train a nf4 base"):
        load_model({**tiny_model_cfg, "finetune": "full"})


def test_qlora_13b_skeleton_without_download():
    cfg = compose("recipe=qlora_13b")
    model = build_skeleton(cfg.model)
    base = model.get_base_model()
    assert base.config.hidden_size == 5120 and base.config.num_hidden_layers == 40
    assert next(base.parameters()).device.type == "meta"
    assert set(model.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lora_layers = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    assert len(lora_layers) == 40 * 7
    r, h, i = 64, 5120, 13824
    per_layer = 4 * r * (h + h) + 2 * r * (h + i) + r * (i + h)
    trainable, total = count_parameters(model)
    assert trainable == 40 * per_layer == 250_347_520
    assert 13.0e9 < total - trainable < 13.1e9


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_local_folder_source_through_transformers_quantization(tmp_path, tiny_model_cfg, quant):
    """A local folder loads through transformers' BitsAndBytesConfig; it quantizes exactly as slimtune's in-place
    swap (used for GGUF files and configs, which transformers cannot quantize at load) does."""
    from transformers import AutoModelForCausalLM

    from slimtune.models import load_config
    from slimtune.models.loading import _swap_linear_for_bnb

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_config(tiny_model_cfg)).save_pretrained(tmp_path / "tiny")
    cfg = {**tiny_model_cfg, "config": None, "name_or_path": str(tmp_path / "tiny"), "quantization": quant}
    model = load_model(cfg)
    layer = model.base_model.model.model.layers[1].mlp.down_proj.base_layer
    expected = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt, "none": torch.nn.Linear}[quant]
    assert type(layer) is expected
    swapped = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    if quant != "none":
        _swap_linear_for_bnb(swapped, quant, True, torch.float32)
    if quant == "int8":  # LLM.int8's CPU matmul is not bit-reproducible call to call: compare what is stored
        theirs = swapped.model.layers[1].mlp.down_proj.weight
        assert torch.equal(layer.weight.data, theirs.data) and torch.equal(layer.weight.SCB, theirs.SCB)
        return
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, swapped(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
