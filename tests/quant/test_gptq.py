"""Tests for slimtune.quant.gptq."""

import pytest
import torch

from slimtune.quant import GPTQ, QuantSpec, dequantize, fake_quantize, gptq_quantize_linear
from slimtune.quant.grid import compute_qparams

OUT, IN, N = 32, 72, 512


@pytest.fixture(scope="module")
def layer():
    """Weight and correlated calibration inputs X = Z @ M."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, IN, generator=g)
    mixing = torch.randn(IN, IN, generator=g)
    inputs = torch.randn(N, IN, generator=g) @ mixing
    return weight, inputs


def _output_error(x, w, w_hat):
    return torch.linalg.matrix_norm(x @ w.T - x @ w_hat.T).item()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 16, 32])  # 32 is ragged on 72 columns
def test_gptq_beats_rtn_on_layer_output(layer, bits, act_order, group_size):
    weight, x = layer
    spec = QuantSpec(bits, group_size)
    result = gptq_quantize_linear(weight, x, spec, act_order=act_order, block_size=16)
    gptq_err = _output_error(x, weight, result.dequantized_weight)
    rtn_err = _output_error(x, weight, fake_quantize(weight, spec))
    assert gptq_err < 0.9 * rtn_err


@pytest.mark.parametrize("group_size", [None, 16, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_act_order_returns_consistent_params(layer, group_size, symmetric):
    weight, x = layer
    spec = QuantSpec(4, group_size, symmetric)
    result = gptq_quantize_linear(weight, x, spec, act_order=True, block_size=16)

    assert result.perm is not None
    assert sorted(result.perm.tolist()) == list(range(IN))
    assert not torch.equal(result.perm, torch.arange(IN))  # really reordered
    assert result.scale.shape == (OUT, spec.n_groups(IN))
    assert result.q_int.dtype == torch.uint8 and int(result.q_int.max()) <= 15
    # Codes and params in ORIGINAL column order reproduce the weight exactly.
    assert torch.equal(dequantize(result.q_int, result.scale, result.zero, spec), result.dequantized_weight)


def test_no_act_order_has_no_perm(layer):
    weight, x = layer
    result = gptq_quantize_linear(weight, x, QuantSpec(4, 16))
    assert result.perm is None
    assert torch.equal(dequantize(result.q_int, result.scale, result.zero, QuantSpec(4, 16)), result.dequantized_weight)
    assert result.loss > 0


def _obs_reference(weight, hessian, spec, damp):
    """Unblocked GPTQ via the explicit OBS inverse-Hessian downdate (float64)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    h_inv = torch.linalg.inv(h)
    scale, zero = compute_qparams(weight, spec)  # per channel: fixed from the original W
    scale, zero = scale[:, 0].double(), zero[:, 0].double()
    out = torch.empty_like(w)
    for i in range(w.shape[1]):
        q = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, spec.maxq)
        out[:, i] = scale * (q - zero)
        err = (w[:, i] - out[:, i]) / h_inv[0, 0]
        w[:, i:] -= err[:, None] * h_inv[0][None, :]
        h_inv = h_inv[1:, 1:] - torch.outer(h_inv[1:, 0], h_inv[0, 1:]) / h_inv[0, 0]
    return out.float()


def test_matches_unblocked_obs_reference(layer):
    weight, x = layer
    spec = QuantSpec(4, None)
    gptq = GPTQ(IN)
    gptq.add_batch(x)
    result = gptq.quantize(weight, spec, damp=0.01, block_size=16)
    reference = _obs_reference(weight, gptq.hessian, spec, damp=0.01)
    # Float32 vs float64 may flip a rare rounding tie; nearly all values agree.
    agree = torch.isclose(result.dequantized_weight, reference, atol=1e-4).float().mean().item()
    assert agree > 0.98


def test_block_size_does_not_change_result(layer):
    weight, x = layer
    spec = QuantSpec(3, 16)
    a = gptq_quantize_linear(weight, x, spec, block_size=1)
    b = gptq_quantize_linear(weight, x, spec, block_size=128)
    assert (a.q_int == b.q_int).float().mean().item() > 0.98
    assert b.loss == pytest.approx(a.loss, rel=1e-2)


def test_hessian_is_running_average_over_batches(layer):
    _, x = layer
    gptq = GPTQ(IN, hessian_dtype=torch.float64)
    gptq.add_batch(x[:100].reshape(4, 25, IN))  # [batch, seq, in] is flattened
    gptq.add_batch(x[100:])
    expected = 2.0 / N * x.double().T @ x.double()
    assert gptq.nsamples == N
    torch.testing.assert_close(gptq.hessian, expected, rtol=1e-10, atol=1e-8)


def test_dead_inputs_zero_their_columns(layer):
    weight, x = layer
    x = x.clone()
    x[:, [3, 40]] = 0.0
    result = gptq_quantize_linear(weight, x, QuantSpec(4, 16), act_order=True)
    assert bool((result.dequantized_weight[:, [3, 40]] == 0).all())
    assert bool(torch.isfinite(result.dequantized_weight).all())


def test_cholesky_retry_raises_damping_with_warning():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, generator=g)  # rank-2 Hessian: singular without damping
    gptq = GPTQ(8)
    gptq.add_batch(x)
    with pytest.warns(UserWarning, match="damp="):
        result = gptq.quantize(torch.randn(4, 8, generator=g), QuantSpec(4, None), damp=0.0)
    assert bool(torch.isfinite(result.dequantized_weight).all())


def test_cholesky_failure_raises_clear_error():
    gptq = GPTQ(4)
    gptq.add_batch(torch.ones(1, 4))
    gptq.hessian = -torch.eye(4)  # negative definite: no damping can fix it
    with pytest.raises(RuntimeError, match="Cholesky failed"):
        gptq.quantize(torch.randn(3, 4), QuantSpec(4, None))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="layer_in_features=0"):
        GPTQ(0)
    gptq = GPTQ(8)
    with pytest.raises(RuntimeError, match="add_batch"):
        gptq.quantize(torch.randn(4, 8), QuantSpec())
    with pytest.raises(ValueError, match=r"shape=\(5, 7\)"):
        gptq.add_batch(torch.randn(5, 7))
    with pytest.raises(ValueError, match="NaN"):
        gptq.add_batch(torch.full((2, 8), float("nan")))
    gptq.add_batch(torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"shape=\(4, 9\)"):
        gptq.quantize(torch.randn(4, 9), QuantSpec())
    with pytest.raises(ValueError, match="block_size=0"):
        gptq.quantize(torch.randn(4, 8), QuantSpec(), block_size=0)
    with pytest.raises(ValueError, match="damp=-1"):
        gptq.quantize(torch.randn(4, 8), QuantSpec(), damp=-1)


# --------------------------------------------------------------------------- fixed non-uniform grids (NF4 storage)

NF4_TABLE = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                          0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def _absmax_scales(weight, group_size):
    return weight.reshape(weight.shape[0], -1, group_size).abs().amax(dim=2)


def _nearest(weight, table, scale, group_size):
    normalized = weight / scale.repeat_interleave(group_size, dim=1)
    return (normalized[..., None] - table).abs().argmin(dim=-1)


def gptq_codebook(weight, x, scale, act_order):
    gptq = GPTQ(IN)
    gptq.add_batch(x)
    return gptq.quantize_codebook(weight, NF4_TABLE, scale, 24, act_order=act_order, block_size=16)


@pytest.mark.parametrize("act_order", [False, True])
def test_codebook_gptq_beats_rounding_to_the_same_grid(layer, act_order):
    weight, x = layer
    scale = _absmax_scales(weight, 24)
    result = gptq_codebook(weight, x, scale, act_order)
    rounded = NF4_TABLE[_nearest(weight, NF4_TABLE, scale, 24)] * scale.repeat_interleave(24, dim=1)
    assert _output_error(x, weight, result.dequantized_weight) < 0.8 * _output_error(x, weight, rounded)
    # every weight is a table value times its block's scale, given by the returned codes
    assert result.codes.dtype == torch.uint8 and int(result.codes.max()) < len(NF4_TABLE)
    assert torch.equal(result.dequantized_weight, NF4_TABLE[result.codes.long()] * scale.repeat_interleave(24, dim=1))
    assert (result.perm is not None) == act_order and result.loss > 0


def test_codebook_gptq_with_uncorrelated_inputs_rounds_to_nearest():
    # A diagonal Hessian has no cross terms: GPTQ has nothing to compensate and must round each weight to nearest.
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 48, generator=g)
    gptq = GPTQ(48)
    gptq.hessian, gptq.nsamples = torch.diag(torch.rand(48, generator=g) + 0.5), 1
    scale = _absmax_scales(weight, 16)
    # an unsorted table (bitsandbytes' FP4 order): codes index the table as given
    table = NF4_TABLE[torch.randperm(16, generator=g)]
    result = gptq.quantize_codebook(weight, table, scale, 16)
    assert torch.equal(result.codes.long(), _nearest(weight, table, scale, 16))


@pytest.mark.parametrize("kwargs, message", [
    ({"codebook": torch.zeros(4, 4)}, "codebook=(4, 4) is not valid; valid: a 1-D finite float tensor"),
    ({"scale": torch.ones(OUT, 2)}, f"scale shape=({OUT}, 2) is not valid; valid: positive values of shape ({OUT}, 3)"),
    ({"scale": torch.zeros(OUT, 3)}, "valid: positive values of shape"),
    ({"group_size": 0}, "group_size=0 is not valid; valid: a positive int"),
])
def test_codebook_gptq_bad_arguments_are_one_line_errors(layer, kwargs, message):
    weight, x = layer
    gptq = GPTQ(IN)
    gptq.add_batch(x)
    args = {"codebook": NF4_TABLE, "scale": torch.ones(OUT, 3), "group_size": 24, **kwargs}
    with pytest.raises(ValueError) as err:
        gptq.quantize_codebook(weight, **args)
    assert message in str(err.value) and "\n" not in str(err.value)
