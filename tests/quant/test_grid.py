"""Tests for slimtune.quant.grid: QuantSpec validation and RTN grids."""

import pytest
import torch

from slimtune.quant import QuantSpec, compute_qparams, dequantize, fake_quantize, group_index, quantize_to_grid


def _weight(out=24, inp=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 32, 40])
def test_codes_lie_on_grid_and_dequantize_formula(bits, symmetric, group_size):
    spec = QuantSpec(bits, group_size, symmetric)
    w = _weight()
    q, scale, zero = quantize_to_grid(w, spec)

    assert q.dtype == torch.uint8 and q.shape == w.shape
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    assert torch.equal(zero, zero.round())
    assert bool((zero >= 0).all()) and bool((zero <= 2**bits - 1).all())
    assert bool((scale > 0).all())

    # Expand per-group params by hand: column c belongs to group c // group_size.
    cols = torch.arange(w.shape[1])
    g_idx = torch.zeros_like(cols) if group_size is None else cols // group_size
    expected = scale[:, g_idx] * (q.float() - zero[:, g_idx])
    torch.testing.assert_close(dequantize(q, scale, zero, spec), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_half_step(bits, symmetric):
    spec = QuantSpec(bits, 32, symmetric)
    w = _weight()
    q, scale, zero = quantize_to_grid(w, spec)
    err = (dequantize(q, scale, zero, spec) - w).abs()
    half_step = scale[:, group_index(w.shape[1], spec)] / 2
    assert bool((err <= half_step * (1 + 1e-5) + 1e-7).all())


def test_eight_bit_round_trip_is_tight():
    spec = QuantSpec(8, 64)
    w = _weight()
    w_hat = fake_quantize(w, spec)
    assert (w_hat - w).abs().max() < 0.02
    assert not torch.equal(w_hat, w)  # really quantized


def test_error_shrinks_with_more_bits():
    w = _weight()
    errors = [(fake_quantize(w, QuantSpec(b, 32)) - w).norm().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert len(set(errors)) == 4


def test_ragged_last_group():
    spec = QuantSpec(4, 128)
    w = _weight(out=8, inp=576)
    q, scale, zero = quantize_to_grid(w, spec)
    assert scale.shape == (8, 5) and zero.shape == (8, 5)
    assert spec.n_groups(576) == 5
    assert torch.bincount(group_index(576, spec)).tolist() == [128, 128, 128, 128, 64]
    # The ragged group's params come from its 64 columns only.
    tail_scale, tail_zero = compute_qparams(w[:, 512:], QuantSpec(4, None))
    torch.testing.assert_close(scale[:, 4:], tail_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero[:, 4:], tail_zero, rtol=0, atol=0)
    assert fake_quantize(w, spec).shape == w.shape


def test_per_channel_has_one_group():
    q, scale, zero = quantize_to_grid(_weight(), QuantSpec(4, None))
    assert scale.shape == (24, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_point_is_grid_centre(bits):
    _, _, zero = quantize_to_grid(_weight(), QuantSpec(bits, 32, symmetric=True))
    assert bool((zero == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_rows_and_groups(symmetric):
    spec = QuantSpec(4, 16, symmetric)
    w = _weight(out=4, inp=48)
    w[1] = 0.0
    w[2, 16:32] = 0.0
    q, scale, zero = quantize_to_grid(w, spec)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    w_hat = dequantize(q, scale, zero, spec)
    assert bool(torch.isfinite(w_hat).all())
    assert bool((w_hat[1] == 0).all())
    assert bool((w_hat[2, 16:32] == 0).all())


def test_fake_quantize_keeps_dtype():
    w = _weight().to(torch.bfloat16)
    out = fake_quantize(w, QuantSpec(4, 32))
    assert out.dtype == torch.bfloat16 and out.shape == w.shape


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"bits": 5}, "bits=5"),
        ({"bits": 16}, "bits=16"),
        ({"bits": True}, "bits=True"),
        ({"group_size": 0}, "group_size=0"),
        ({"group_size": -3}, "group_size=-3"),
        ({"group_size": 1.5}, "group_size=1.5"),
        ({"symmetric": "yes"}, "symmetric='yes'"),
    ],
)
def test_bad_spec_raises_one_line_value_error(kwargs, bad):
    with pytest.raises(ValueError) as info:
        QuantSpec(**kwargs)
    message = str(info.value)
    assert bad in message and "valid" in message and "\n" not in message


def test_bad_weight_shape_raises():
    with pytest.raises(ValueError, match=r"shape=\(10,\)"):
        fake_quantize(torch.randn(10), QuantSpec(4, None))


def test_any_positive_group_size_is_accepted():
    w = _weight(out=3, inp=10)
    q, scale, _ = quantize_to_grid(w, QuantSpec(3, 7))
    assert scale.shape == (3, 2)
