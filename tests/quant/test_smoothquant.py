"""SmoothQuant (slimtune.quant.smoothquant): smoothing keeps the float function and flattens activations; W8A8 layers."""

import copy

import pytest
import torch
from torch import nn

from slimtune.callbacks import ActivationOutlierMonitor
from slimtune.errors import SlimtuneError
from slimtune.quant.smoothquant import (
    W8A8Linear,
    quantize_activations_per_token,
    quantize_model_w8a8,
    smooth_model,
    smooth_scales,
)

from test_awq import ids, logits, tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def worst_ratio(model, batches):
    monitor = ActivationOutlierMonitor(patterns=["q_proj", "gate_proj", "o_proj", "down_proj"]).attach(model)
    with torch.no_grad():
        for b in batches:
            model(b)
    rows = monitor.summary()
    monitor.detach()
    return {r["layer"].rsplit(".", 1)[-1]: r["max_median_ratio"] for r in rows if ".0." in r["layer"]}


def test_smoothing_keeps_logits_and_lowers_the_monitors_outlier_ratio():
    model = tiny()
    calib, evals = ids(4, n=2), ids(5)
    reference = logits(model, evals)
    before = worst_ratio(model, calib)
    result = smooth_model(model, calib, alpha=0.5)
    torch.testing.assert_close(logits(model, evals), reference, rtol=1e-4, atol=1e-4)
    after = worst_ratio(model, calib)
    assert before["q_proj"] > 20 and after["q_proj"] < before["q_proj"] / 3, (before, after)
    assert after["gate_proj"] < before["gate_proj"] / 3, (before, after)
    assert len(result.scales) == 8 and "model.layers.0.post_attention_layernorm.weight" in result.changed


def test_alpha_zero_leaves_the_model_as_it_is_and_bad_alpha_is_refused():
    model = tiny()
    snapshot = copy.deepcopy(model.state_dict())
    smooth_model(model, ids(4, n=1), alpha=0.0)
    # alpha 0 gives s = 1 / max|w|: weights rescaled; alpha 1 gives s = max|x| (activations flat)
    assert not torch.equal(snapshot["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight)
    s = smooth_scales(torch.tensor([4.0, 0.0, 9.0]), torch.tensor([2.0, 1.0, 0.0]), 0.5)
    assert s.tolist() == pytest.approx([2 / 2 ** 0.5, 1.0, 1.0])
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(SlimtuneError, match=r"alpha=.* is not valid; valid: a float in \[0, 1\]"):
            smooth_model(tiny(), ids(4, n=1), alpha=bad)


def test_int8_matmul_equals_the_fake_quantized_reference():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    fake = W8A8Linear.from_linear(linear)
    real = W8A8Linear.from_linear(linear, int8_matmul=True)
    x = torch.randn(3, 7, 96) * torch.linspace(0.1, 30, 96)
    with torch.no_grad():
        y_fake, y_real = fake(x), real(x)
    # reference: per-token 8-bit activations times the dequantized 8-bit weight
    codes, scale = quantize_activations_per_token(x.reshape(-1, 96))
    expected = (codes * scale) @ fake.dequantized_weight().T + linear.bias
    torch.testing.assert_close(y_fake.reshape(-1, 40), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y_real, y_fake, rtol=1e-5, atol=1e-4)
    # and close to the float layer (8-bit both sides)
    assert (y_real - linear(x)).abs().max() < 0.02 * linear(x).abs().max()


def test_w8a8_passes_gradients_to_its_input():
    layer = W8A8Linear.from_linear(nn.Linear(32, 8), int8_matmul=True)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(4, 32))


def test_smoothing_before_w8a8_lowers_the_error_on_outlier_activations():
    fp = tiny()
    calib, evals = ids(4, n=2), ids(5)
    reference = logits(fp, evals)
    plain = copy.deepcopy(fp)
    quantize_model_w8a8(plain)
    smoothed = copy.deepcopy(fp)
    smooth_model(smoothed, calib, alpha=0.5)
    quantize_model_w8a8(smoothed, int8_matmul=True)
    assert isinstance(smoothed.model.layers[1].mlp.down_proj, W8A8Linear)
    plain_err = (logits(plain, evals) - reference).square().mean()
    smooth_err = (logits(smoothed, evals) - reference).square().mean()
    assert smooth_err < 0.5 * plain_err, (float(smooth_err), float(plain_err))


def test_w8a8_layers_survive_save_and_load_and_compressed_tensors_refuses_them(tmp_path):
    from slimtune.quant import load_quantized, save_quantized
    from slimtune.quant.compressed_tensors import save_compressed_tensors

    model = tiny()
    smooth_model(model, ids(4, n=1))
    quantize_model_w8a8(model, int8_matmul=True)
    folder = save_quantized(model, tmp_path / "q")
    back = load_quantized(folder)
    layer = back.model.layers[0].self_attn.v_proj
    assert isinstance(layer, W8A8Linear) and layer.int8_matmul
    evals = ids(5)
    assert torch.equal(logits(back, evals), logits(model, evals))
    with pytest.raises(SlimtuneError, match="quantizes its activations too"):
        save_compressed_tensors(model, tmp_path / "ct")
