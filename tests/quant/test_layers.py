"""Tests for slimtune.quant.layers: bit packing, QuantLinear, LoRA on QuantLinear through PEFT."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.quant import GPTQ, QuantSpec, dequantize, quantize_to_grid
from slimtune.quant.layers import (
    QuantLinear,
    QuantLinearLora,
    pack_codes,
    packed_width,
    register_quant_lora,
    unpack_codes,
)
from slimtune.quant.drivers import quantize_model_rtn


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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 37, 96])
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    q = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_width(n, bits))
    # Really packed: at most one padding unit over n * bits / 8 bytes.
    unit_bytes = 3 if bits == 3 else 1
    assert packed.shape[1] * 8 < n * bits + 8 * unit_bytes
    assert torch.equal(unpack_codes(packed, bits, n), q)


def test_packing_layout_is_little_endian_bit_stream():
    # 4-bit: two codes per byte, the first in the low nibble.
    assert pack_codes(torch.tensor([[1, 2, 15]]), 4).tolist() == [[0x21, 0x0F]]
    # 2-bit: four codes per byte.
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 3]]), 2).tolist() == [[0b00111001, 0b11]]
    # 3-bit: 8 codes in 3 bytes; code j at bits [3j, 3j + 3).
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    stream = sum(c << (3 * j) for j, c in enumerate(codes[0].tolist()))
    assert pack_codes(codes, 3).tolist() == [[stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 64, 32])  # 64 is ragged on 96 columns
def test_quant_linear_values_on_grid(bits, symmetric, group_size):
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 24, bias=True)
    spec = QuantSpec(bits, group_size, symmetric)
    layer = QuantLinear.from_linear(linear, spec)

    q = layer.codes()
    assert q.dtype == torch.uint8 and q.shape == (24, 96)
    assert int(q.min()) >= 0 and int(q.max()) <= spec.maxq
    ref_q, ref_scale, ref_zero = quantize_to_grid(linear.weight.detach(), spec)
    assert torch.equal(q, ref_q)
    assert torch.equal(layer.zeros(), ref_zero)
    assert torch.equal(layer.scales, ref_scale.half())

    # Dequantized weight is exactly scale * (q - zero) per (row, group).
    cols = torch.arange(96)
    groups = torch.zeros_like(cols) if group_size is None else cols // group_size
    scale = layer.scales.float()[:, groups]
    zero = layer.zeros()[:, groups]
    assert torch.equal(layer.dequantized_weight(), scale * (q.float() - zero))
    assert torch.equal(layer.dequantized_weight(), dequantize(q, layer.scales.float(), layer.zeros(), spec))
    # ...and close to the float weight: half a grid step, plus float16 rounding of the scale.
    tol = scale * (0.5 + spec.maxq * 2.0**-11)
    assert ((layer.dequantized_weight() - linear.weight).abs() <= tol).all()

    n_groups = spec.n_groups(96)
    expected = 24 * packed_width(96, bits) * 8 + 24 * packed_width(n_groups, bits) * 8 + 24 * n_groups * 16 + 24 * 32
    assert layer.stored_bits() == expected


def test_forward_in_input_dtype_and_cast_keeps_scales():
    torch.manual_seed(2)
    linear = torch.nn.Linear(40, 16)
    layer = QuantLinear.from_linear(linear, QuantSpec(4, 16))
    x = torch.randn(3, 5, 40)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.equal(layer(x), expected)

    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.qweight.dtype == torch.uint8
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16


def test_from_result_keeps_gptq_codes():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 48, generator=g)
    gptq = GPTQ(48)
    gptq.add_batch(torch.randn(256, 48, generator=g))
    spec = QuantSpec(3, 16)
    result = gptq.quantize(weight, spec, act_order=True, block_size=16)
    layer = QuantLinear.from_result(result, spec)
    assert layer.act_order
    assert torch.equal(layer.codes(), result.q_int)
    assert torch.allclose(layer.dequantized_weight(), result.dequantized_weight, rtol=1e-3, atol=1e-4)


def test_from_linear_rejects_other_layers():
    with pytest.raises(SlimtuneError, match="Conv1d"):
        QuantLinear.from_linear(torch.nn.Conv1d(4, 4, 1), QuantSpec(4))


def test_lora_on_quant_linear_trains_and_base_stays_frozen():
    model = tiny_llama()
    quantize_model_rtn(model, QuantSpec(4, 32))
    codes_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "qzeros", "scales"))}

    config = register_quant_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model = get_peft_model(model, config)
    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantLinearLora)]
    assert len(wrapped) == 6
    assert all(isinstance(m.get_base_layer(), QuantLinear) for m in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 16))
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    lora_B = wrapped[0].lora_B["default"].weight
    assert lora_B.abs().sum() > 0  # B started at zero and was trained

    codes_after = {n.replace(".base_layer", ""): b for n, b in peft_model.get_base_model().named_buffers()
                   if n.endswith(("qweight", "qzeros", "scales"))}
    assert codes_after.keys() == codes_before.keys()
    assert all(torch.equal(codes_before[n], codes_after[n]) for n in codes_before)

    with pytest.raises(SlimtuneError, match="merging"):
        wrapped[0].merge()


def test_lora_disabled_adapter_gives_base_output():
    model = tiny_llama()
    quantize_model_rtn(model, QuantSpec(4, 32))
    base = copy.deepcopy(model)
    peft_model = get_peft_model(
        model, register_quant_lora(LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    )
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert not torch.equal(peft_model(input_ids=ids).logits, base(input_ids=ids).logits)
