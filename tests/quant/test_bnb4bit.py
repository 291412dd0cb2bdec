"""bitsandbytes 4-bit layers keep their gradients after evaluations, on every CPU (slimtune.quant.bnb4bit).

bitsandbytes repacks a Linear4bit for its fused bf16 kernel at the first eval-mode forward without grad, but only on
CPUs with avx512_bf16. The tests that must hold everywhere force that packing through the very flag bitsandbytes reads
(`support_avx512bf16_for_cpu`, plain Python), so they check the guard on CPUs without the flag too.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from slimtune.quant import bnb4bit  # noqa: E402
from slimtune.quant.bnb4bit import (  # noqa: E402
    dequantize_4bit,
    fast_4bit_eval,
    guard_4bit,
    is_packed,
    unpack_4bit,
)

VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def _layer(quant_type="nf4", double_quant=True, in_features=256, out_features=256, seed=0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              quant_type=quant_type, compress_statistics=double_quant, device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)
    return layer.to("cpu")


def _input_grad(layer, x):
    x = x.detach().clone().requires_grad_(True)
    layer.train()
    layer(x).pow(2).sum().backward()
    return x.grad


def _evaluate(layer, x):
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()


def _force_packing(layer):
    """What bitsandbytes does on an avx512_bf16 CPU: the flag its forward reads says the fused kernel is there."""
    layer.support_avx512bf16_for_cpu = True


@pytest.fixture
def x():
    return torch.randn(8, 256, generator=torch.Generator().manual_seed(1))


def test_unguarded_bitsandbytes_cuts_the_gradient_after_an_evaluation(x):
    """The trap itself (so the tests below can fail): after a packing eval pass, no gradient reaches the input."""
    layer = _layer()
    assert _input_grad(layer, x) is not None
    _force_packing(layer)
    _evaluate(layer, x)
    assert is_packed(layer)
    assert _input_grad(layer, x) is None


@pytest.mark.parametrize("quant_type,double_quant", VARIANTS)
def test_guarded_layer_gives_identical_gradients_after_any_number_of_evaluations(x, quant_type, double_quant):
    layer = _layer(quant_type, double_quant)
    guard_4bit(layer)
    before = _input_grad(layer, x)
    weight, absmax = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
    for _ in range(3):
        _evaluate(layer, x)  # packs on avx512_bf16 CPUs without the guard
        assert not is_packed(layer)
        assert torch.equal(_input_grad(layer, x), before)
    assert torch.equal(layer.weight.data, weight) and torch.equal(layer.weight.quant_state.absmax, absmax)


@pytest.mark.parametrize("quant_type,double_quant", VARIANTS)
def test_fast_eval_packs_and_restores_the_exact_weights(x, quant_type, double_quant, monkeypatch):
    monkeypatch.setattr(bnb4bit, "cpu_packs_4bit", lambda: True)  # take the packed path on any CPU
    layer = _layer(quant_type, double_quant)
    guard_4bit(layer)
    before = _input_grad(layer, x)
    weight = layer.weight.data.clone()
    state = layer.weight.quant_state.as_dict(packed=True)
    with fast_4bit_eval(layer):
        layer.eval()
        with torch.no_grad():
            layer(x)
        assert is_packed(layer)  # bitsandbytes' own conversion ran
        # A forward with grad inside the block (a training step) unpacks first and gets the exact gradient.
        assert torch.equal(_input_grad(layer, x), before)
        assert not is_packed(layer)
        _evaluate(layer, x)
        assert is_packed(layer)
        # state_dict() would run bitsandbytes' lossy inverse in place; the guard restores the exact weights first.
        saved = layer.state_dict()
        assert not is_packed(layer) and torch.equal(saved["weight"], weight)
        _evaluate(layer, x)
    assert not is_packed(layer)
    assert torch.equal(layer.weight.data, weight)
    after = layer.weight.quant_state.as_dict(packed=True)
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in state.items())
    assert torch.equal(_input_grad(layer, x), before)


def test_guard_unpacks_a_layer_packed_before_it_was_guarded(x):
    """Packed by an evaluation slimtune never saw (e.g. a user's validation before adding the callback): the guard
    undoes it with bitsandbytes' inverse, so gradients flow again (the bf16-rounded scales stay rounded)."""
    layer = _layer()
    before = _input_grad(layer, x)
    _force_packing(layer)
    _evaluate(layer, x)
    assert is_packed(layer)
    assert guard_4bit(layer) == 1
    assert not is_packed(layer)
    after = _input_grad(layer, x)
    assert after is not None
    assert (after - before).norm() / before.norm() < 1e-2  # bf16 scale rounding, not a cut gradient


@pytest.mark.parametrize("shape,blocksize", [((48, 80), 64), ((48, 96), 64), ((4, 160), 128), ((32, 128), 64)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_exact_dequantization_matches_the_quantizer_on_ragged_rows(shape, blocksize, quant_type):
    import bitsandbytes.functional as bnbf

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    data, state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    ours = dequantize_4bit(data, state)
    # Reference from first principles: nearest code of each flat block, times the block's absmax.
    code, flat = state.code.float(), weight.reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    assert torch.equal(state.absmax.view(-1, 1), absmax)
    nearest = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(-1)
    reference = (code[nearest] * absmax).reshape(-1)[: flat.numel()].view(shape)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (ours - weight).norm() / weight.norm() < {"nf4": 0.11, "fp4": 0.15}[quant_type]  # Gaussian weights
    # Double quantization: the same codes, scaled by the 8-bit-stored absmax.
    data, state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    scales = bnb4bit._absmax(state).view(-1, 1)
    torch.testing.assert_close(scales, absmax, rtol=2e-2, atol=0)
    codes_dq = (dequantize_4bit(data, state).reshape(-1).tolist())
    expected = (code[nearest] * scales).reshape(-1)[: flat.numel()].tolist()
    assert codes_dq == pytest.approx(expected, abs=1e-6)


def test_ragged_layer_computes_with_the_weights_it_stores(x):
    """A layer 80 wide with blocks of 64: its output is x @ dequant(W).T on every CPU once guarded."""
    layer = _layer(in_features=80, out_features=48)
    guard_4bit(layer)
    inputs = torch.randn(5, 80, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = layer(inputs)
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(out, inputs @ weight.T, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(inputs.grad, weight.sum(0).expand(5, -1), rtol=1e-5, atol=1e-5)


def test_unpack_of_an_unpacked_model_changes_nothing():
    layer = _layer()
    weight = layer.weight.data.clone()
    assert unpack_4bit(layer) == 0 and torch.equal(layer.weight.data, weight)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_lora_gradients_of_a_quantized_model_survive_evaluation(quant, tiny_model_cfg):
    """Through PEFT on a tiny Llama: every LoRA gradient after eval passes equals the one before them."""
    from slimtune.models import load_model

    torch.manual_seed(0)
    model = load_model({**tiny_model_cfg, "quantization": quant})
    for layer in bnb4bit.linear4bit_layers(model):
        _force_packing(layer)  # as bitsandbytes leaves a freshly built layer on an avx512_bf16 CPU
    guard_4bit(model)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(4))

    def lora_grads():
        model.train()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    assert before and all(g is not None for g in before.values())
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        after = lora_grads()
        assert after.keys() == before.keys()
        for name, grad in before.items():
            if quant == "int8":  # LLM.int8's CPU matmul is not bit-reproducible call to call
                torch.testing.assert_close(after[name], grad, rtol=1e-3, atol=1e-6)
            else:
                assert torch.equal(after[name], grad), name
