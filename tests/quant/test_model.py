"""Tests for slimtune.quant on whole models: layer selection (targets), RTN/GPTQ (drivers), LoRC adapters and NF4 LoRC
(lorc), NF4 (nf4)."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.quant import GPTQ, QuantSpec
from slimtune.quant.layers import QuantLinear, QuantLinearLora
from slimtune.quant.drivers import check_calibration, quantize_model_gptq, quantize_model_rtn
from slimtune.quant.lorc import add_lorc_adapters, apply_lorc, lorc_nf4
from slimtune.quant.nf4 import quantize_model_nf4
from slimtune.quant.targets import find_linear_layers

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Llama's true-sequential sublayer order (the GPTQ reference's).
GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine's few cores are shared: tiny ops are far faster on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(hidden=64, seed=0):
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def fp_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(10)
    return [torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def eval_ids():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (4, 32), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def mse(a, b):
    return (a - b).pow(2).mean().item()


# --------------------------------------------------------------------------- layer selection


def test_find_linear_layers_all_linear_excludes_lm_head(fp_model):
    found = find_linear_layers(fp_model)
    assert len(found) == 2 * len(LINEARS)
    assert "lm_head" not in found
    assert list(found)[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" in find_linear_layers(fp_model, exclude=())


def test_find_linear_layers_patterns(fp_model):
    assert list(find_linear_layers(fp_model, ["v_proj", "q_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert list(find_linear_layers(fp_model, [r"model\.layers\.1\.mlp\..*"])) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    ]
    assert list(find_linear_layers(fp_model, "lm_head", exclude=())) == ["lm_head"]


def test_find_linear_layers_pattern_matching_nothing(fp_model):
    with pytest.raises(SlimtuneError, match=r"'qkv_proj' matches no layer.*q_proj, k_proj"):
        find_linear_layers(fp_model, ["q_proj", "qkv_proj"])
    with pytest.raises(SlimtuneError, match="'lm_head' only matches excluded"):
        find_linear_layers(fp_model, ["lm_head"])


# --------------------------------------------------------------------------- RTN


def test_rtn_replaces_layers_and_keeps_originals(fp_model):
    model = copy.deepcopy(fp_model)
    spec = QuantSpec(4, 32)
    originals = quantize_model_rtn(model, spec, keep_original=True)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant) == set(find_linear_layers(fp_model))
    assert isinstance(model.lm_head, nn.Linear)
    for name, layer in quant.items():
        w = fp_model.get_submodule(name).weight
        assert torch.equal(originals[name], w)
        assert layer.spec == spec
        assert (layer.dequantized_weight() - w).abs().max() < 0.05


# --------------------------------------------------------------------------- GPTQ


def gptq_whole_model(model, batches, spec, true_sequential, **kw):
    """Reference: same algorithm, full-model forwards instead of cached block inputs."""
    groups = GROUPS if true_sequential else [[n for g in GROUPS for n in g]]
    for block in model.model.layers:
        for group in groups:
            gptqs = {n: GPTQ(block.get_submodule(n).in_features) for n in group}
            hooks = [
                block.get_submodule(n).register_forward_hook(
                    lambda mod, inp, out, g=gptqs[n]: g.add_batch(inp[0])
                )
                for n in group
            ]
            with torch.no_grad():
                for ids in batches:
                    model(input_ids=ids, use_cache=False)
            for h in hooks:
                h.remove()
            for n in group:
                parent_name, _, child = n.rpartition(".")
                lin = block.get_submodule(n)
                result = gptqs[n].quantize(lin.weight, spec, **kw)
                setattr(block.get_submodule(parent_name), child, QuantLinear.from_result(result, spec, lin.bias))


@pytest.mark.parametrize("act_order, true_sequential", [(False, False), (True, False), (False, True), (True, True)])
def test_sequential_gptq_equals_whole_model_calibration(fp_model, calib, act_order, true_sequential):
    spec = QuantSpec(3, 32)
    kw = dict(damp=0.01, block_size=32, act_order=act_order)
    sequential = copy.deepcopy(fp_model)
    quantize_model_gptq(sequential, calib, spec, progress=False, true_sequential=true_sequential, **kw)
    reference = copy.deepcopy(fp_model)
    gptq_whole_model(reference, calib, spec, true_sequential, **kw)

    seq_layers = {n: m for n, m in sequential.named_modules() if isinstance(m, QuantLinear)}
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantLinear)}
    assert seq_layers.keys() == ref_layers.keys() and len(seq_layers) == 14
    for name in seq_layers:
        assert torch.equal(seq_layers[name].codes(), ref_layers[name].codes()), name
        assert torch.allclose(
            seq_layers[name].dequantized_weight(), ref_layers[name].dequantized_weight(), atol=1e-5
        ), name


def test_gptq_closer_to_fp_than_rtn_at_3_bits(fp_model, calib, eval_ids):
    spec = QuantSpec(3, 32)
    ref = logits(fp_model, eval_ids)
    gptq_model = copy.deepcopy(fp_model)
    quantize_model_gptq(gptq_model, calib, spec, block_size=32, progress=False)
    rtn_model = copy.deepcopy(fp_model)
    quantize_model_rtn(rtn_model, spec)
    gptq_err = mse(logits(gptq_model, eval_ids), ref)
    rtn_err = mse(logits(rtn_model, eval_ids), ref)
    assert gptq_err < 0.9 * rtn_err


def test_gptq_one_pass_per_block_and_device_argument(fp_model, calib, eval_ids):
    spec = QuantSpec(4, 32)
    model = copy.deepcopy(fp_model)
    originals = quantize_model_gptq(
        model, calib, spec, targets=["q_proj", "down_proj"], true_sequential=False,
        device="cpu", keep_original=True, progress=False,
    )
    assert sorted(originals) == sorted(find_linear_layers(fp_model, ["q_proj", "down_proj"]))
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)
    assert model.training is False and model.config.use_cache == fp_model.config.use_cache
    assert mse(logits(model, eval_ids), logits(fp_model, eval_ids)) < 1e-3


@pytest.mark.parametrize("true_sequential, o_proj_runs", [(False, 2), (True, 4)])
def test_gptq_pass_count_and_shared_hessians(fp_model, calib, monkeypatch, true_sequential, o_proj_runs):
    """Layers reading one tensor share a Hessian (4 accumulations per block and batch, not 7); true-sequential
    passes stop once their group has read its input, so o_proj runs in 4 passes per batch (o, gate/up, down groups
    and the output pass), not 5; one-pass mode runs it twice (calibration and output)."""
    added = []
    original_add = GPTQ.add_batch
    monkeypatch.setattr(GPTQ, "add_batch", lambda self, x: (added.append(x.shape), original_add(self, x))[1])
    model = copy.deepcopy(fp_model)
    calls = []
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: calls.append(1))
    quantize_model_gptq(model, calib, QuantSpec(4, 32), true_sequential=true_sequential, progress=False)
    n_batches = len(calib)
    assert len(added) == 4 * len(model.model.layers) * n_batches
    assert len(calls) == o_proj_runs * n_batches


def test_check_calibration():
    batches = [torch.zeros(8, 128, dtype=torch.long), torch.zeros(4, 128, dtype=torch.long)]
    with pytest.raises(SlimtuneError, match="calibration set has 12 samples of 128 tokens, fewer than the 128 asked"):
        check_calibration(batches, 128)
    trimmed = check_calibration(batches, 10)
    assert [b.shape[0] for b in trimmed] == [8, 2]
    with pytest.raises(SlimtuneError, match="n_samples=0"):
        check_calibration(batches, 0)
    with pytest.raises(SlimtuneError, match="calibration batch 0"):
        check_calibration([torch.zeros(2, 4)], 1)


def test_gptq_rejects_too_small_calibration_set(fp_model, calib):
    with pytest.raises(SlimtuneError, match="calibration set has 8 samples of 32 tokens, fewer than the 16 asked"):
        quantize_model_gptq(copy.deepcopy(fp_model), calib, QuantSpec(4), n_samples=16, progress=False)


def test_gptq_rejects_conv1d_layer(fp_model, calib):
    model = copy.deepcopy(fp_model)
    model.model.layers[0].mlp.down_proj = nn.Conv1d(128, 64, 1)
    with pytest.raises(SlimtuneError, match="GPTQ needs nn.Linear weights; layer model.layers.0.mlp.down_proj is Conv1d"):
        quantize_model_gptq(model, calib, QuantSpec(4), targets=["down_proj"], progress=False)


def test_gptq_rejects_bnb_4bit_layers(fp_model, calib):
    model = copy.deepcopy(fp_model)
    quantize_model_nf4(model, ["o_proj"])
    with pytest.raises(SlimtuneError, match="GPTQ needs nn.Linear weights; layer model.layers.0.self_attn.o_proj is Linear4bit"):
        quantize_model_gptq(model, calib, QuantSpec(4), progress=False)


def test_gptq_rejects_models_without_blocks_and_layers_outside_them(fp_model, calib):
    with pytest.raises(SlimtuneError, match="cannot find the decoder blocks of Sequential"):
        quantize_model_gptq(nn.Sequential(nn.Linear(4, 4)), calib, QuantSpec(4), progress=False)
    with pytest.raises(SlimtuneError, match="layer lm_head is outside the decoder blocks"):
        quantize_model_gptq(copy.deepcopy(fp_model), calib, QuantSpec(4), targets=["lm_head"], exclude=(),
                            progress=False)


# --------------------------------------------------------------------------- LoRC


def _residual(model, originals, factors):
    total = 0.0
    for name, (a, b) in factors.items():
        layer = model.get_submodule(name)
        total += torch.linalg.matrix_norm(originals[name] - layer.dequantized_weight() - b @ a).item() ** 2
    return total**0.5


@pytest.fixture(scope="module")
def rtn3(fp_model):
    model = copy.deepcopy(fp_model)
    originals = quantize_model_rtn(model, QuantSpec(3, 32), keep_original=True)
    return model, originals


def test_lorc_residual_falls_with_rank(rtn3):
    model, originals = rtn3
    residuals = [_residual(model, originals, apply_lorc(model, r, original_weights=originals)) for r in (1, 4, 16)]
    base = sum(torch.linalg.matrix_norm(originals[n] - m.dequantized_weight()).item() ** 2
               for n, m in model.named_modules() if isinstance(m, QuantLinear)) ** 0.5
    assert base > residuals[0] > residuals[1] > residuals[2]


def test_lorc_loftq_iterations_do_not_increase_residual(rtn3):
    model, originals = rtn3
    one = _residual(model, originals, apply_lorc(model, 4, iters=1, original_weights=originals))
    refined = copy.deepcopy(model)
    codes = refined.model.layers[0].mlp.down_proj.codes().clone()
    factors = apply_lorc(refined, 4, iters=4, original_weights=originals)
    assert _residual(refined, originals, factors) <= one + 1e-6
    layer = refined.model.layers[0].mlp.down_proj
    assert int(layer.codes().max()) <= 7 and layer.codes().shape == codes.shape


@pytest.mark.parametrize("alpha", [None, 16])
def test_lorc_adapters_step0_closer_to_fp(fp_model, calib, eval_ids, alpha):
    model = copy.deepcopy(fp_model)
    originals = quantize_model_gptq(model, calib, QuantSpec(3, 32), block_size=32, keep_original=True,
                                    progress=False)
    quant_err = mse(logits(model, eval_ids), logits(fp_model, eval_ids))
    factors = apply_lorc(model, 8, original_weights=originals)
    peft_model = add_lorc_adapters(model, originals, rank=8, alpha=alpha)
    lorc_err = mse(logits(peft_model, eval_ids), logits(fp_model, eval_ids))
    assert lorc_err < 0.7 * quant_err

    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinearLora)
    scaling = layer.scaling["default"]
    assert scaling == (1.0 if alpha is None else alpha / 8)
    a, b = factors["model.layers.0.self_attn.q_proj"]
    delta = scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(delta, b @ a, atol=1e-6)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_apply_lorc_bad_inputs(rtn3):
    model, originals = rtn3
    with pytest.raises(SlimtuneError, match="original_weights is missing"):
        apply_lorc(model, 4)
    partial = dict(list(originals.items())[1:])
    with pytest.raises(SlimtuneError, match="original weight of layer model.layers.0.self_attn.q_proj is missing"):
        apply_lorc(model, 4, original_weights=partial)
    with pytest.raises(SlimtuneError, match="rank=999"):
        apply_lorc(model, 999, original_weights=originals)


def test_lorc_nf4(fp_model, eval_ids):
    model = copy.deepcopy(fp_model)
    originals = quantize_model_nf4(model, keep_original=True)
    nf4_err = mse(logits(model, eval_ids), logits(fp_model, eval_ids))
    peft_model = lorc_nf4(model, originals, rank=8, alpha=16)
    lorc_err = mse(logits(peft_model, eval_ids), logits(fp_model, eval_ids))
    assert lorc_err < 0.7 * nf4_err

    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    layer = peft_model.get_base_model().model.layers[1].mlp.down_proj
    assert isinstance(layer, LoraLinear4bit) and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    # Step 0: W4 + scaling * B A reproduces the LoRC factorisation of W - dequant(NF4(W)).
    base = layer.get_base_layer()
    deq = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    w = originals["model.layers.1.mlp.down_proj"]
    assert torch.linalg.matrix_norm(w - deq - delta) < torch.linalg.matrix_norm(w - deq)


# --------------------------------------------------------------------------- GPTQ-NF4


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_nf4_makes_bitsandbytes_layers_closer_than_rounding(fp_model, calib, eval_ids, act_order):
    import bitsandbytes as bnb

    from slimtune.quant.nf4 import NF4Spec, nf4_block_absmax, nf4_dequantize

    rounded = copy.deepcopy(fp_model)
    quantize_model_nf4(rounded)
    model = copy.deepcopy(fp_model)
    originals = quantize_model_gptq(model, calib, NF4Spec(blocksize=32), act_order=act_order, keep_original=True,
                                    progress=False)
    assert model.is_loaded_in_4bit
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * len(LINEARS) and set(layers) == set(originals)
    for name, layer in layers.items():
        state = layer.weight.quant_state
        assert state.blocksize == 32 and state.nested and state.quant_type == "nf4"
        # the stored codes are table values times the block absmax bitsandbytes computed from the float weight
        w = originals[name]
        absmax = nf4_block_absmax(layer).reshape(w.shape[0], -1).repeat_interleave(32, dim=1)
        table_values = nf4_dequantize(layer) / absmax
        assert torch.isin(table_values.round(decimals=4), state.code.round(decimals=4)).all()
        assert (absmax - w.abs().reshape(w.shape[0], -1, 32).amax(2).repeat_interleave(32, dim=1)).abs().max() < 0.02
    # GPTQ chose other codes than rounding to nearest, and the model is closer to the float one
    name = "model.layers.1.mlp.down_proj"
    assert not torch.equal(layers[name].weight.data, rounded.get_submodule(name).weight.data)
    fp = logits(fp_model, eval_ids)
    assert mse(logits(model, eval_ids), fp) < 0.8 * mse(logits(rounded, eval_ids), fp)


def test_gptq_nf4_layer_width_not_a_multiple_of_the_block_is_refused(fp_model, calib):
    from slimtune.quant.nf4 import NF4Spec

    with pytest.raises(SlimtuneError, match="layer model.layers.0.mlp.down_proj has in_features=128, not a multiple "
                                            "of the NF4 block size 256; valid: a block size that divides it"):
        quantize_model_gptq(copy.deepcopy(fp_model), calib, NF4Spec(blocksize=256), targets=["down_proj"],
                            progress=False)


def test_gptq_nf4_layer_with_an_all_zero_block_matches_what_bitsandbytes_computes():
    from slimtune.quant.nf4 import NF4Spec, gptq_nf4_linear, nf4_dequantize

    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(128, 16, bias=False)
    layer.weight.data = torch.randn(16, 128, generator=g)
    layer.weight.data[:4, 64:] = 0.0  # pruned blocks, after columns whose error GPTQ feeds forward
    x = torch.randn(256, 128, generator=g) @ torch.randn(128, 128, generator=g)
    gptq = GPTQ(128)
    gptq.add_batch(x)
    # without double quant a zero block stores absmax exactly 0 (dividing by it would make NaN codes)
    new = gptq_nf4_linear(layer, gptq, NF4Spec(blocksize=64, double_quant=False))
    weight = nf4_dequantize(new)
    assert torch.equal(weight[:4, 64:], torch.zeros(4, 64))
    assert torch.isfinite(weight).all()
    assert torch.linalg.matrix_norm(x @ (weight - layer.weight.data).T) < 0.2 * torch.linalg.matrix_norm(x @ layer.weight.data.T)
