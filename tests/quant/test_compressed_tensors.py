"""compressed-tensors (vLLM) export: the folder loads in transformers to the same logits; codes decompress exactly."""

import json

import pytest
import torch
from conftest import TINY_LLAMA
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.quant import (
    QuantLinear,
    QuantSpec,
    add_lorc_adapters,
    quantize_model_gptq,
    quantize_model_rtn,
    save_compressed_tensors,
)

pytest.importorskip("compressed_tensors")  # a core dependency; the skip only guards a broken install
from compressed_tensors.compressors import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

IDS = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def tiny(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


@torch.no_grad()
def logits(model):
    return model(IDS).logits


def reload_transformers(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16), (3, None)])
def test_symmetric_export_loads_in_transformers_to_the_same_logits(tmp_path, bits, group):
    model = tiny()
    quantize_model_rtn(model, QuantSpec(bits=bits, group_size=group, symmetric=True))
    out = save_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == bits and weights["symmetric"] is True
    assert weights["strategy"] == ("group" if group else "channel") and weights.get("group_size") == group
    assert config["ignore"] == ["lm_head"]

    loaded = reload_transformers(out)
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())  # transformers' own loader, not slimtune's
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


def test_gptq_act_order_export_matches(tmp_path):
    model = tiny(2)
    calib = [torch.randint(0, TINY_LLAMA["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    quantize_model_gptq(model, calib, QuantSpec(bits=4, group_size=32, symmetric=True), act_order=True, progress=False)
    out = save_compressed_tensors(model, tmp_path / "ct")
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] == "weight"  # act-order calibration, groups kept in column order: no g_idx needed
    assert not any(k.endswith("weight_g_idx") for k in load_file(out / "model.safetensors"))
    torch.testing.assert_close(logits(reload_transformers(out)), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, None), (2, 16)])
def test_asymmetric_codes_decompress_exactly_with_the_library(tmp_path, bits, group):
    # transformers 5.24 + compressed-tensors 0.20 cannot load asymmetric pack-quantized folders (it expects the
    # zero points unpacked: llm-compressor issue #1618); the library's own decompressor reads them.
    model = tiny(3)
    quantize_model_rtn(model, QuantSpec(bits=bits, group_size=group, symmetric=False))
    out = save_compressed_tensors(model, tmp_path / "ct")
    qconfig = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qconfig.config_groups["group_0"]
    tensors = load_file(out / "model.safetensors")
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert set(local) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        # The library dequantizes in the scale dtype (float16); slimtune in float32 from the same float16 scales.
        assert torch.equal(weight, layer.dequantized_weight().to(weight.dtype)), name


def test_lorc_adapter_is_saved_next_to_the_base(tmp_path):
    model = tiny(4)
    originals = quantize_model_rtn(model, QuantSpec(bits=4, group_size=32, symmetric=True), keep_original=True)
    peft_model = add_lorc_adapters(model, originals, rank=4)
    out = save_compressed_tensors(peft_model, tmp_path / "ct")
    keys = load_file(out / "model.safetensors")
    assert not any("base_layer" in k or "lora_" in k for k in keys)
    assert (out / "adapter" / "adapter_config.json").is_file()
    from peft import PeftModel

    base = reload_transformers(out)
    logits(base)  # compressed-tensors decompresses on the first forward; PEFT then finds float weights to wrap
    served = PeftModel.from_pretrained(base, out / "adapter").eval()
    torch.testing.assert_close(logits(served), logits(peft_model), rtol=0, atol=1e-4)


def test_bad_input_is_refused_and_nothing_is_written(tmp_path):
    model = tiny()
    quantize_model_rtn(model, QuantSpec(bits=4, group_size=48))  # 64-wide layers: a ragged last group
    with pytest.raises(SlimtuneError, match=r"not a multiple of group_size=48.*valid:"):
        save_compressed_tensors(model, tmp_path / "ragged")
    assert list(tmp_path.iterdir()) == []
    permuted = tiny()
    quantize_model_rtn(permuted, QuantSpec(bits=4, group_size=32, symmetric=True))
    layer = permuted.model.layers[0].mlp.down_proj
    g_idx = torch.randperm(layer.in_features, generator=torch.Generator().manual_seed(0)) % layer.n_groups
    layer.set_codes(layer.codes(), layer.scales.float(), layer.zeros(), g_idx=g_idx)
    with pytest.raises(SlimtuneError, match=r"g_idx.*valid:"):
        save_compressed_tensors(permuted, tmp_path / "permuted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SlimtuneError, match="no QuantLinear layers"):
        save_compressed_tensors(tiny(), tmp_path / "float")
    good = tiny()
    quantize_model_rtn(good, QuantSpec(bits=4, group_size=32))
    save_compressed_tensors(good, tmp_path / "ct")
    with pytest.raises(SlimtuneError, match="already exists"):
        save_compressed_tensors(good, tmp_path / "ct")
    save_compressed_tensors(good, tmp_path / "ct", overwrite=True)
