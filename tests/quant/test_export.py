"""Tests for slimtune.quant.export: save/load of quantized models (with LoRC adapters), bits per parameter."""

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.quant import QuantSpec
from slimtune.quant.export import load_quantized, save_quantized, stored_bits_per_parameter
from slimtune.quant.layers import QuantLinear, QuantLinearLora
from slimtune.quant import add_lorc_adapters, quantize_model_gptq, quantize_model_nf4, quantize_model_rtn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine's few cores are shared: tiny ops are far faster on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(hidden=96, seed=0, tie=False):
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(10)
    return [torch.randint(0, 256, (4, 24), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def eval_ids():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (3, 24), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "bits,group_size,symmetric,act_order",
    [
        (4, 64, False, False),  # 96 columns in groups of 64: ragged last group
        (3, 64, True, True),
        (2, 32, False, True),
        (8, None, False, False),
    ],
)
def test_round_trip_gives_identical_logits(tmp_path, calib, eval_ids, bits, group_size, symmetric, act_order):
    model = tiny_llama()
    spec = QuantSpec(bits, group_size, symmetric)
    quantize_model_gptq(model, calib, spec, act_order=act_order, block_size=32, progress=False)
    save_quantized(model, tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == ["q"]  # no temporary directory left behind
    assert sorted(os.listdir(tmp_path / "q")) == ["config.json", "model.safetensors", "slimtune_quant.json"]

    loaded = load_quantized(tmp_path / "q")
    assert type(loaded) is LlamaForCausalLM and not loaded.training
    assert torch.equal(logits(loaded, eval_ids), logits(model, eval_ids))
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            other = loaded.get_submodule(name)
            assert isinstance(other, QuantLinear) and other.spec == spec and other.act_order == act_order
            assert torch.equal(other.qweight, layer.qweight) and torch.equal(other.scales, layer.scales)
    assert not any(p.device.type == "meta" for p in loaded.parameters())


def test_round_trip_bfloat16_576_wide_ragged_groups(tmp_path, eval_ids):
    model = tiny_llama(hidden=576).to(torch.bfloat16)  # 576 = 4 x 128 + 64: ragged last group
    quantize_model_rtn(model, QuantSpec(4, 128))
    assert model.model.layers[0].self_attn.q_proj.scales.shape == (576, 5)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    # Rebuilt (non-persistent) rotary buffers get the saved model's dtype back.
    assert loaded.model.rotary_emb.inv_freq.dtype == model.model.rotary_emb.inv_freq.dtype
    out = logits(loaded, eval_ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, logits(model, eval_ids))


def test_manifest_documents_layers(tmp_path):
    model = tiny_llama()
    quantize_model_rtn(model, QuantSpec(4, 64), targets=["q_proj", "down_proj"])
    save_quantized(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "slimtune_quant.json").read_text())
    assert manifest["format"] == "slimtune-quant" and manifest["version"] == 1
    assert "little-endian" in manifest["packing"]["order"]
    assert sorted(manifest["layers"]) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
    ]
    assert manifest["layers"]["model.layers.0.self_attn.q_proj"] == {
        "in_features": 96, "out_features": 96, "bits": 4, "group_size": 64, "symmetric": False,
        "act_order": False, "bias": False, "g_idx": False, "scale_dtype": "float16", "dtype": "float32",
    }
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_round_trip_tied_embeddings(tmp_path, eval_ids):
    model = tiny_llama(hidden=64, tie=True)
    quantize_model_rtn(model, QuantSpec(3, 32))
    save_quantized(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "slimtune_quant.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, eval_ids), logits(model, eval_ids))


def test_round_trip_lorc_peft_model(tmp_path, calib, eval_ids):
    model = tiny_llama()
    originals = quantize_model_gptq(model, calib, QuantSpec(3, 64), block_size=32, keep_original=True,
                                    progress=False)
    peft_model = add_lorc_adapters(model, originals, rank=4, alpha=8)
    save_quantized(peft_model, tmp_path / "q")
    assert (tmp_path / "q" / "adapter" / "adapter_config.json").is_file()

    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.get_base_model().model.layers[0].self_attn.q_proj, QuantLinearLora)
    assert torch.equal(logits(loaded, eval_ids), logits(peft_model, eval_ids))
    assert not any(p.requires_grad for p in loaded.parameters())

    base_only = load_quantized(tmp_path / "q", load_adapter=False)
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(logits(base_only, eval_ids), logits(peft_model, eval_ids))

    trainable = load_quantized(tmp_path / "q", is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)

    # An adapter directory elsewhere can be given explicitly.
    peft_model.save_pretrained(tmp_path / "adapter_copy")
    explicit = load_quantized(tmp_path / "q", adapter_dir=tmp_path / "adapter_copy")
    assert torch.equal(logits(explicit, eval_ids), logits(peft_model, eval_ids))


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, eval_ids):
    model = tiny_llama(hidden=64)
    quantize_model_rtn(model, QuantSpec(4, 32))
    target = tmp_path / "q"
    save_quantized(model, target)
    with pytest.raises(SlimtuneError, match="already exists"):
        save_quantized(model, target)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            open(os.path.join(path, "tokenizer.json"), "w").close()  # partly written
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "other", tokenizer=BrokenTokenizer())
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, target, tokenizer=BrokenTokenizer(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["q"]  # nothing half-written, old copy intact
    assert torch.equal(logits(load_quantized(target), eval_ids), logits(model, eval_ids))

    other = tiny_llama(hidden=64, seed=1)
    quantize_model_rtn(other, QuantSpec(2, 32))
    save_quantized(other, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert torch.equal(logits(load_quantized(target), eval_ids), logits(other, eval_ids))


def test_load_and_save_bad_inputs(tmp_path):
    with pytest.raises(SlimtuneError, match="slimtune_quant.json' does not exist"):
        load_quantized(tmp_path / "missing")
    model = tiny_llama(hidden=64)
    quantize_model_nf4(model, ["o_proj"])
    with pytest.raises(SlimtuneError, match="layer model.layers.0.self_attn.o_proj is Linear4bit"):
        save_quantized(model, tmp_path / "nf4")
    assert not (tmp_path / "nf4").exists()


def test_stored_bits_per_parameter():
    model = tiny_llama()
    fp_bits = stored_bits_per_parameter(model)
    assert fp_bits[1] == 32.0 and fp_bits[0] != fp_bits[0]  # nan: nothing quantized

    quantize_model_rtn(model, QuantSpec(4, 64))
    quant, whole = stored_bits_per_parameter(model)
    # Per row of a 96-wide layer: 48 code bytes + 2 groups x (16-bit scale + packed 4-bit zeros: 1 byte).
    per_row_96 = 48 * 8 + 2 * 16 + 8
    # 128-wide (down_proj): 64 code bytes + 2 groups.
    per_row_128 = 64 * 8 + 2 * 16 + 8
    rows_96 = 96 + 48 + 48 + 96 + 128 + 128  # q, k, v (2 kv heads of 24), o, gate, up
    bits = 2 * (rows_96 * per_row_96 + 96 * per_row_128)
    params = 2 * (rows_96 * 96 + 96 * 128)
    assert quant == pytest.approx(bits / params)
    assert 4.0 < quant < 4.6
    other_params = 256 * 96 * 2 + 96 * 5  # embeddings, lm_head, norms
    assert whole == pytest.approx((bits + 32 * other_params) / (params + other_params))
