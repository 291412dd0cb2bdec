"""AWQ (slimtune.quant.awq) and the scale folds it shares with SmoothQuant (slimtune.quant.folds)."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.quant import QuantSpec
from slimtune.quant.awq import awq_clip_ranges, awq_model, awq_search_scales, quantize_model_awq
from slimtune.quant.drivers import quantize_model_rtn
from slimtune.quant.folds import FOLD_TABLES, ScaleFold, apply_fold, resolve_folds
from slimtune.quant.grid import fake_quantize
from slimtune.quant.layers import QuantLinear


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(kind="llama", seed=0, outliers=True):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    if kind in ("gemma", "gemma2"):
        from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM

        config_cls, model_cls = (GemmaConfig, GemmaForCausalLM) if kind == "gemma" else (Gemma2Config, Gemma2ForCausalLM)
        model = model_cls(config_cls(**common, head_dim=16))
    else:
        model = (LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    model.eval()
    if outliers:  # a few input channels dwarf the rest, as in trained LLMs
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[[3, 17, 40]] = 25.0
                layer.post_attention_layernorm.weight[[5, 33]] = 25.0
    return model


def ids(seed, n=2, t=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, t), generator=g) for _ in range(n)]


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(b).logits for b in batches])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "gemma2"])
def test_folding_any_scales_keeps_full_precision_logits(kind):
    model = tiny(kind)
    probe = ids(1, n=1)
    before = logits(model, probe)
    g = torch.Generator().manual_seed(2)
    n_folds = 0
    mlp_norm = "pre_feedforward_layernorm" if kind == "gemma2" else "post_attention_layernorm"
    for block in model.model.layers:
        folds = resolve_folds(block, FOLD_TABLES[kind])
        assert [f.prev_name for f in folds] == ["input_layernorm", "self_attn.v_proj", mlp_norm, "mlp.up_proj"]
        assert folds[0].norm_offset == (1.0 if kind.startswith("gemma") else 0.0)
        for f in folds:
            apply_fold(f, torch.rand(f.width, generator=g) * 4 + 0.25)
            n_folds += 1
    after = logits(model, probe)
    assert n_folds == 8
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, tiny(kind).model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_grouped_query_value_scales_repeat_over_the_query_heads_sharing_them():
    block = tiny().model.layers[0]
    vo = next(f for f in resolve_folds(block, FOLD_TABLES["llama"]) if f.prev_name == "self_attn.v_proj")
    # 4 query heads of 16 channels read 2 value heads: query heads 0,1 -> value head 0; 2,3 -> value head 1
    assert vo.width == 32 and vo.in_features == 64
    assert vo.expand.tolist() == list(range(16)) * 2 + list(range(16, 32)) * 2


def test_search_beats_rtn_on_planted_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g)
    x[:, [7, 50, 90, 101]] *= 40.0
    w = torch.randn(96, 128, generator=g) * 0.05
    spec = QuantSpec(4, 64, symmetric=True)
    found = awq_search_scales(x, [w], spec)
    assert found.alpha > 0
    assert found.error < 0.5 * found.rtn_error, (found.error, found.rtn_error)
    # the reported error is the real output error of the scaled, quantized weight
    s = found.scales
    deq = fake_quantize(w * s, spec) / s
    assert ((x @ (w - deq).T).square().mean()).item() == pytest.approx(found.error, rel=1e-4)
    # RTN error matches plain fake quantization
    assert ((x @ (w - fake_quantize(w, spec)).T).square().mean()).item() == pytest.approx(found.rtn_error, rel=1e-4)


def test_search_rejects_alphas_outside_the_unit_interval():
    with pytest.raises(SlimtuneError, match=r"alphas=\[0.5, 1.5\] is not valid; valid: floats in \[0, 1\]"):
        awq_search_scales(torch.randn(8, 16), [torch.randn(4, 16)], QuantSpec(4, 8), [0.5, 1.5])


def test_clip_ranges_only_shrink_and_lower_group_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    w[0, 5] = 12.0  # one large weight stretches its group's grid
    spec = QuantSpec(3, 32, symmetric=True)
    bounds = awq_clip_ranges(x, w, spec)
    top = w.abs().reshape(32, 2, 32).amax(-1)
    assert bounds.shape == (32, 2) and (bounds <= top + 1e-6).all() and (bounds >= 0.5 * top - 1e-6).all()
    clipped = torch.maximum(torch.minimum(w, bounds.repeat_interleave(32, 1)), -bounds.repeat_interleave(32, 1))
    err = lambda m: (x @ (w - fake_quantize(m, spec)).T).square().mean()  # noqa: E731
    assert err(clipped) < err(w)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_model_output_error_below_rtn(bits):
    spec = QuantSpec(bits, 32, symmetric=True)
    fp = tiny()
    evals = ids(5)
    reference = logits(fp, evals)
    rtn = copy.deepcopy(fp)
    quantize_model_rtn(rtn, spec)
    awq = copy.deepcopy(fp)
    result = quantize_model_awq(awq, ids(4, n=4), spec)
    assert all(isinstance(m, QuantLinear) for n, m in awq.named_modules() if n.endswith("_proj"))
    rtn_err = (logits(rtn, evals) - reference).square().mean()
    awq_err = (logits(awq, evals) - reference).square().mean()
    assert awq_err < 0.85 * rtn_err, (float(awq_err), float(rtn_err))
    assert len(result.alphas) == 8 and all(a > 0 for k, a in result.alphas.items() if "layernorm" in k)
    assert all(e <= r for e, r in result.errors.values())
    # the norm gains changed, and they are listed for a quantized base to carry
    assert "model.layers.0.input_layernorm.weight" in result.changed
    assert not any("_proj" in n for n in result.changed)  # every producer linear is a target here


def test_awq_folds_keep_the_float_function_and_gptq_quantizes_the_scaled_weights():
    spec = QuantSpec(3, 32, symmetric=True)
    fp = tiny()
    evals = ids(5)
    reference = logits(fp, evals)
    scaled = copy.deepcopy(fp)
    result = awq_model(scaled, ids(4, n=4), spec, keep_original=True)
    torch.testing.assert_close(logits(scaled, evals), reference, rtol=1e-4, atol=1e-4)
    # originals are the scaled weights (what LoRC reconstructs)
    assert torch.equal(result.originals["model.layers.1.mlp.down_proj"], scaled.model.layers[1].mlp.down_proj.weight)
    both = copy.deepcopy(fp)
    quantize_model_awq(both, ids(4, n=4), spec, method="gptq")
    rtn = copy.deepcopy(fp)
    quantize_model_rtn(rtn, spec)
    assert (logits(both, evals) - reference).square().mean() < (logits(rtn, evals) - reference).square().mean()


def test_clipping_shrinks_weights_after_the_scales_and_leaves_q_k_alone():
    spec = QuantSpec(3, 32, symmetric=True)
    plain, clipped = tiny(), tiny()
    awq_model(plain, ids(4, n=2), spec)
    awq_model(clipped, ids(4, n=2), spec, clip=True)
    for name, p in plain.named_parameters():  # block 0: same inputs, so the same scales; clipping comes after them
        if not name.startswith("model.layers.0."):
            continue
        c = clipped.get_parameter(name)
        if name.endswith(("q_proj.weight", "k_proj.weight")) or "norm" in name or "embed" in name:
            assert torch.equal(p, c), name
        elif name.endswith("_proj.weight"):
            assert (c.abs() <= p.abs() + 1e-7).all() and not torch.equal(p, c), name


def test_refusals_are_one_line():
    spec = QuantSpec(4, 32)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(SlimtuneError, match=r"model_type='gpt2'.*valid: gemma, gemma2, gemma3_text, llama"):
        awq_model(gpt2, ids(4, n=1), spec)
    # a table that leaves a target without a fold position
    no_mlp = (ScaleFold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),)
    from slimtune.quant.folds import walk_fold_blocks

    with pytest.raises(SlimtuneError, match=r"no foldable scale position for layer model\.layers\.0\.self_attn\.o_proj"):
        walk_fold_blocks(tiny(), ids(4, n=1), "all-linear", ("lm_head",), "AWQ", lambda bw: None, table=no_mlp)
    # a wrong table (the MLP norm in front of attention) is caught by the function check
    wrong = (ScaleFold("post_attention_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),)

    def fold_random(bw):
        for f in bw.folds:
            apply_fold(f, torch.rand(f.width) + 0.5)
        bw.verify()

    with pytest.raises(SlimtuneError, match=r"folding scales changed block model\.layers\.0's output"):
        walk_fold_blocks(tiny(), ids(4, n=1), ["q_proj"], (), "AWQ", fold_random, table=wrong)
    with pytest.raises(SlimtuneError, match="max_search_tokens=0 is not valid"):
        awq_model(tiny(), ids(4, n=1), spec, max_search_tokens=0)
    with pytest.raises(SlimtuneError, match="method='nf4' is not valid; valid: rtn, gptq"):
        quantize_model_awq(tiny(), ids(4, n=1), spec, method="nf4")


@pytest.mark.parametrize("group_size, symmetric", [(32, True), (48, False), (None, True)])
def test_vectorised_search_quantizer_equals_the_grid_module(group_size, symmetric):
    from slimtune.quant.awq import _fake_quantize_2d

    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(7))
    spec = QuantSpec(3, group_size, symmetric)
    torch.testing.assert_close(_fake_quantize_2d(w, spec), fake_quantize(w, spec), rtol=0, atol=1e-6)
