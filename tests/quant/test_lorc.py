"""Tests for slimtune.quant.lorc and slimtune.quant.nf4."""

import functools
import sys

import pytest
import torch

from slimtune.quant import QuantSpec, fake_quantize, gptq_quantize_linear, lorc_factors, lorc_init, nf4_fake_quantize

OUT, IN = 48, 80


@pytest.fixture(scope="module")
def weight():
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))


def _rtn(bits):
    return functools.partial(fake_quantize, spec=QuantSpec(bits, 16))


def _norm(x):
    return torch.linalg.matrix_norm(x).item()


def test_residual_strictly_decreases_with_rank(weight):
    error = weight - _rtn(3)(weight)
    residuals = []
    for rank in (1, 4, 16):
        lora_A, lora_B = lorc_factors(error, rank)
        assert lora_A.shape == (rank, IN) and lora_B.shape == (OUT, rank)
        residuals.append(_norm(error - lora_B @ lora_A))
    assert residuals[0] < _norm(error)
    assert residuals[0] > residuals[1] > residuals[2]


def test_full_rank_reconstructs_and_split_is_balanced(weight):
    error = weight - _rtn(2)(weight)
    lora_A, lora_B = lorc_factors(error, min(OUT, IN))
    torch.testing.assert_close(lora_B @ lora_A, error, rtol=1e-4, atol=1e-4)
    # sqrt(S) on both sides: row k of A and column k of B have equal norms.
    torch.testing.assert_close(lora_A.norm(dim=1), lora_B.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_lowrank_svd_close_to_exact():
    g = torch.Generator().manual_seed(2)
    low_rank = torch.randn(120, 6, generator=g) @ torch.randn(6, 100, generator=g)
    error = low_rank + 0.01 * torch.randn(120, 100, generator=g)
    exact = _norm(error - torch.mm(*reversed(lorc_factors(error, 6, method="exact"))))
    approx = _norm(error - torch.mm(*reversed(lorc_factors(error, 6, method="lowrank"))))
    assert approx <= exact * 1.01


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lorc_init_refinement_not_worse(weight, bits):
    quantize_fn = _rtn(bits)
    base1, a1, b1 = lorc_init(weight, quantize_fn, rank=8, iters=1)
    base3, a3, b3 = lorc_init(weight, quantize_fn, rank=8, iters=3)
    r1 = _norm(weight - base1 - b1 @ a1)
    r3 = _norm(weight - base3 - b3 @ a3)
    assert r1 < _norm(weight - quantize_fn(weight))
    assert r3 <= r1
    torch.testing.assert_close(base1, quantize_fn(weight), rtol=0, atol=0)


def test_lorc_init_with_gptq_quantizer(weight):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, IN, generator=g) @ torch.randn(IN, IN, generator=g)

    def gptq_fn(w):
        return gptq_quantize_linear(w, x, QuantSpec(3, 16)).dequantized_weight

    base, lora_A, lora_B = lorc_init(weight, gptq_fn, rank=4, iters=2)
    assert _norm(weight - base - lora_B @ lora_A) < _norm(weight - base)


def test_lorc_keeps_dtype(weight):
    base, lora_A, lora_B = lorc_init(weight.to(torch.bfloat16), _rtn(4), rank=4)
    assert base.dtype == lora_A.dtype == lora_B.dtype == torch.bfloat16


@pytest.mark.parametrize("rank", [0, -1, 49, 2.5, True])
def test_bad_rank_raises(weight, rank):
    error = weight - _rtn(4)(weight)
    with pytest.raises(ValueError, match=f"rank={rank!r}") as info:
        lorc_factors(error, rank)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"rank={rank!r}"):
        lorc_init(weight, _rtn(4), rank)


def test_other_bad_inputs_raise(weight):
    with pytest.raises(ValueError, match="iters=0"):
        lorc_init(weight, _rtn(4), rank=2, iters=0)
    with pytest.raises(ValueError, match="method='svd'"):
        lorc_factors(weight, 2, method="svd")
    with pytest.raises(ValueError, match=r"output shape=\(2, 2\)"):
        lorc_init(weight, lambda w: torch.zeros(2, 2), rank=2)


def test_nf4_fake_quantize_close_and_lorc_reduces_error(weight):
    pytest.importorskip("bitsandbytes")
    w_nf4 = nf4_fake_quantize(weight)
    assert w_nf4.shape == weight.shape and w_nf4.dtype == weight.dtype
    assert not torch.equal(w_nf4, weight)
    assert _norm(w_nf4 - weight) / _norm(weight) < 0.15

    base, lora_A, lora_B = lorc_init(weight, nf4_fake_quantize, rank=8)
    torch.testing.assert_close(base, w_nf4, rtol=0, atol=0)
    assert _norm(weight - base - lora_B @ lora_A) < _norm(weight - base)


def test_nf4_bf16_and_fp4():
    pytest.importorskip("bitsandbytes")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    out = nf4_fake_quantize(w.to(torch.bfloat16), blocksize=32, quant_type="fp4", compress_statistics=False)
    assert out.dtype == torch.bfloat16
    assert _norm(out.float() - w) / _norm(w) < 0.25


def test_nf4_bad_arguments_raise(weight):
    with pytest.raises(ValueError, match="blocksize=100"):
        nf4_fake_quantize(weight, blocksize=100)
    with pytest.raises(ValueError, match="quant_type='int4'"):
        nf4_fake_quantize(weight, quant_type="int4")


def test_nf4_missing_bitsandbytes_says_how_to_install(weight, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        nf4_fake_quantize(weight)
