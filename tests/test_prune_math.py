"""Pure-torch pruning (slimtune.prune) on tensors: exact sparsity and N:M patterns, structured groups, the cubic
schedule, SparseGPT's layer-output error against magnitude and Wanda, joint SparseGPT + GPTQ, one-shot model pruning."""

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.prune import (
    CubicSchedule,
    InputNormAccumulator,
    MovementScore,
    SparseGPT,
    TaylorScore,
    find_structured_groups,
    global_masks,
    layer_mask,
    magnitude_score,
    nm_mask,
    owl_sparsities,
    parse_nm,
    prune_model_oneshot,
    row_mask,
    sparsity_of,
    structured_masks,
    wanda_score,
)
from slimtune.quant import QuantSpec


def _score(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layer_row_and_global_masks_have_exactly_the_asked_sparsity(sparsity):
    score = _score((48, 64))
    mask = layer_mask(score, sparsity)
    assert int((~mask).sum()) == round(sparsity * score.numel())
    assert score[~mask].max() <= score[mask].min() if 0 < sparsity else mask.all()  # the lowest scores go
    rows = row_mask(score, sparsity)
    assert ((~rows).sum(dim=1) == round(sparsity * 64)).all()
    scores = {"a": _score((16, 32), 1), "b": _score((8, 64), 2) * 3}
    masks = global_masks(scores, sparsity)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * (16 * 32 + 8 * 64))
    if sparsity:  # global: layer b's scores are higher, so it keeps more
        assert sparsity_of(masks["b"].float()) < sparsity_of(masks["a"].float())


def test_ties_still_give_the_exact_count():
    mask = layer_mask(torch.zeros(10, 10), 0.37)
    assert int((~mask).sum()) == 37


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_masks_keep_n_of_every_m(pattern):
    n, m = parse_nm(pattern)
    score = _score((32, 64))
    mask = nm_mask(score, n, m)
    groups = mask.reshape(32, -1, m)
    assert (groups.sum(dim=2) == n).all()
    # the kept ones are each group's largest
    g = score.reshape(32, -1, m)
    assert (torch.where(groups, g, torch.inf).amin(dim=2) >= torch.where(groups, -torch.inf, g).amax(dim=2)).all()
    half = nm_mask(score, n, m, prune_per_group=(m - n) // 2)  # a gradual step on the way
    assert (half.reshape(32, -1, m).sum(dim=2) == m - (m - n) // 2).all()


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", 24])
def test_bad_nm_patterns_are_one_line_errors(bad):
    with pytest.raises(SlimtuneError, match="valid: "):
        parse_nm(bad)


def test_nm_needs_m_dividing_the_width():
    with pytest.raises(SlimtuneError, match="M=8 does not divide the input width 60"):
        nm_mask(torch.rand(4, 60), 2, 8)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_sparsity_outside_zero_one_is_refused(bad):
    with pytest.raises(SlimtuneError, match=r"valid: a number in \[0, 1\)"):
        layer_mask(torch.rand(4, 4), bad)


def test_structured_masks_drop_whole_heads_and_channels_with_the_matching_next_layer_slices():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
             "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    widths = {names[0]: (64, 64), names[1]: (64, 64), names[2]: (128, 64), names[3]: (128, 64), names[4]: (64, 128)}
    scores = {n: _score(widths[n], i) for i, n in enumerate(names)}
    heads = find_structured_groups(names, "heads", num_heads=4)
    masks = structured_masks(scores, heads, 0.5)
    q, o = masks[names[0]], masks[names[1]]
    dropped_rows = (~q.any(dim=1)).nonzero().flatten()
    assert len(dropped_rows) == 32 and torch.equal(dropped_rows, (~o.any(dim=0)).nonzero().flatten())
    assert q[dropped_rows].sum() == 0 and q.sum() == 32 * 64  # whole rows of 2 whole heads of 16 dims
    assert set((dropped_rows // 16).tolist()).__len__() == 2
    channels = find_structured_groups(names, "channels", widths=widths)
    masks = structured_masks(scores, channels, 0.25)
    gone = (~masks[names[3]].any(dim=1)).nonzero().flatten()
    assert len(gone) == 32
    assert torch.equal(gone, (~masks[names[2]].any(dim=1)).nonzero().flatten())
    assert torch.equal(gone, (~masks[names[4]].any(dim=0)).nonzero().flatten())
    with pytest.raises(SlimtuneError, match="valid: fewer than 4"):
        structured_masks(scores, heads, 0.99)


def test_cubic_schedule_hits_its_targets_at_the_asked_steps():
    s = CubicSchedule(final=0.8, start_step=10, end_step=50, initial=0.2, update_every=10)
    assert s.update_steps() == [10, 20, 30, 40, 50]
    assert s.target(0) == 0.0 and s.target(9) == 0.0
    assert s.target(10) == pytest.approx(0.2)
    assert s.target(50) == pytest.approx(0.8) and s.target(1000) == pytest.approx(0.8)
    for t in (20, 30, 40):
        expected = 0.8 + (0.2 - 0.8) * (1 - (t - 10) / 40) ** 3
        assert s.target(t) == pytest.approx(expected)
        assert s.target(t + 9) == s.target(t)  # held between updates
    targets = [s.target(t) for t in range(60)]
    assert targets == sorted(targets)
    assert [t for t in range(60) if s.is_update_step(t)] == s.update_steps()
    odd = CubicSchedule(final=0.5, start_step=0, end_step=7, update_every=3)
    assert odd.update_steps() == [0, 3, 6, 7]


@pytest.mark.parametrize("kwargs, message", [
    ({"final": 0.5, "start_step": 10, "end_step": 5}, "end_step=5 is before start_step=10"),
    ({"final": 1.0, "start_step": 0, "end_step": 5}, "final_sparsity=1.0"),
    ({"final": 0.5, "start_step": 0, "end_step": 5, "update_every": 0}, "update_every=0"),
    ({"final": 0.3, "start_step": 0, "end_step": 5, "initial": 0.5}, "initial_sparsity=0.5 is above"),
])
def test_bad_schedules_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError, match=message):
        CubicSchedule(**kwargs)


def test_scores():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    acc = InputNormAccumulator(2)
    acc.add_batch(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    assert torch.allclose(acc.norm(), torch.tensor([5.0, 1.0]))
    assert torch.allclose(wanda_score(w, acc.norm()), torch.tensor([[5.0, 2.0], [2.5, 4.0]]))
    assert torch.equal(magnitude_score(w), w.abs())
    movement, taylor = MovementScore(), TaylorScore()
    for g in (torch.ones(2, 2), -torch.ones(2, 2)):
        movement.add(w, 2 * g)
        taylor.add(w, g)
    assert torch.equal(movement.value(), torch.zeros(2, 2))  # moved back and forth
    assert torch.equal(taylor.value(), w.abs())


def _correlated_inputs(n_tokens=2048, width=64, seed=0):
    """Inputs whose channels share 8 common factors (correlated, as LLM activations are) and differ 100x in size,
    the large channels scattered over the width as outlier features are."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n_tokens, 8, generator=g) @ torch.randn(8, width, generator=g)
    scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=g)]
    return (torch.randn(n_tokens, width, generator=g) + shared) * scales


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_output_error_is_below_magnitude_and_wanda_on_correlated_inputs(nm):
    x = _correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    solver = SparseGPT(64)
    solver.add_batch(x)
    n, m = nm or (0, 0)
    result = solver.prune(w, 0.5, n=n, m=m, block_size=32)
    mask = result.mask
    if nm:
        assert (mask.reshape(48, -1, 4).sum(dim=2) == 2).all()
    else:
        assert int((~mask).sum()) == w.numel() // 2
    assert torch.equal(result.weight == 0, ~mask) or ((result.weight == 0) >= ~mask).all()
    norm = x.square().sum(0).sqrt()
    mag = nm_mask(magnitude_score(w), *nm) if nm else layer_mask(magnitude_score(w), 0.5)
    wan = nm_mask(wanda_score(w, norm), *nm) if nm else row_mask(wanda_score(w, norm), 0.5)

    def error(weight):
        return float((x @ (w - weight).T).square().mean())

    e_sparsegpt, e_magnitude, e_wanda = error(result.weight), error(w * mag), error(w * wan)
    assert e_sparsegpt < e_wanda < e_magnitude, (e_sparsegpt, e_wanda, e_magnitude)
    assert e_sparsegpt < 0.7 * e_wanda  # the OBS updates, not just a better mask


def test_sparsegpt_jointly_quantized_keeps_zeros_and_lands_on_a_4bit_grid():
    x = _correlated_inputs()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    solver = SparseGPT(64)
    solver.add_batch(x)
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    joint = solver.prune(w, n=2, m=4, block_size=32, spec=spec)
    assert ((joint.weight == 0) >= ~joint.mask).all()
    assert (joint.weight.reshape(16, -1, 4) != 0).sum(dim=2).max() <= 2
    for row in range(16):
        for g in range(2):
            values = joint.weight[row, g * 32:(g + 1) * 32]
            assert values.unique().numel() <= 16  # at most 2**4 levels per row and group
    sparse_only = solver.prune(w, n=2, m=4, block_size=32)
    error = lambda weight: float((x @ (w - weight).T).square().mean())  # noqa: E731
    assert error(sparse_only.weight) <= error(joint.weight) < 3 * error(sparse_only.weight)


def test_owl_sparsities_average_the_target_and_spare_outlier_rich_blocks():
    s = owl_sparsities({"a": 0.01, "b": 0.05, "c": 0.03}, 0.6, 0.1)
    assert sum(s.values()) / 3 == pytest.approx(0.6)
    assert s["b"] < s["c"] < s["a"] and max(s.values()) - min(s.values()) == pytest.approx(0.2)
    with pytest.raises(SlimtuneError, match="OWL lambda"):
        owl_sparsities({"a": 0.1, "b": 0.2}, 0.05, 0.1)


def _tiny_llama(seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY_LLAMA

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).eval()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_model_pruning_prunes_every_target_to_the_pattern(method):
    model = _tiny_llama()
    batches = [torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    masks = prune_model_oneshot(model, method, 0.5, calib_batches=batches)
    assert len(masks) == 14  # 7 linear layers in each of 2 blocks, lm_head excluded
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert int((~mask).sum()) == mask.numel() // 2
        assert ((weight == 0) >= ~mask).all()
    assert sparsity_of(model.lm_head.weight) == 0.0
    model = _tiny_llama()
    masks = prune_model_oneshot(model, method, nm=(2, 4), calib_batches=batches, targets=["mlp.down_proj"])
    assert list(masks) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all() for m in masks.values())


def test_one_shot_sparsegpt_gives_the_lowest_loss_of_the_three():
    batches = [torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    losses = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _tiny_llama().requires_grad_(False)
        dense = model(input_ids=batches[0]).logits
        prune_model_oneshot(model, method, 0.5, calib_batches=batches)
        losses[method] = float((model(input_ids=batches[0]).logits - dense).square().mean())
    assert losses["sparsegpt"] < losses["magnitude"], losses
    assert losses["sparsegpt"] < losses["wanda"], losses


def test_one_shot_calibrated_methods_need_data():
    with pytest.raises(SlimtuneError, match="needs calibration data and got none"):
        prune_model_oneshot(_tiny_llama(), "wanda", 0.5)
    with pytest.raises(SlimtuneError, match="pruning method='obs' is not valid"):
        prune_model_oneshot(_tiny_llama(), "obs", 0.5)
    with pytest.raises(SlimtuneError, match="matches no layer"):
        prune_model_oneshot(_tiny_llama(), "magnitude", 0.5, targets=["nothing_here"])


def test_shrinking_removes_pruned_channels_and_heads_exactly_and_stock_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY_LLAMA
    from slimtune.prune import shrink_model
    from slimtune.select import linear_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LLAMA, "num_key_value_heads": 4})).eval()
    names = [n for n in linear_layers(model) if n != "lm_head"]
    widths = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    scores = {n: magnitude_score(model.get_submodule(n).weight) for n in names}
    masks = {**structured_masks(scores, find_structured_groups(names, "channels", widths=widths), 0.25),
             **structured_masks(scores, find_structured_groups(names, "heads", num_heads=4), 0.5)}
    with torch.no_grad():
        for n, m in masks.items():
            model.get_submodule(n).weight.mul_(m)
    ids = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pruned_logits = model(input_ids=ids).logits
    size = sum(p.numel() for p in model.parameters())
    removed = shrink_model(model, masks)
    assert removed == {"channels_removed": 32, "heads_removed": 2}
    assert model.model.layers[0].mlp.up_proj.weight.shape == (96, 64)
    assert model.model.layers[1].self_attn.k_proj.weight.shape == (32, 64)
    model.save_pretrained(tmp_path / "small")
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert (small.config.intermediate_size, small.config.num_attention_heads, small.config.head_dim) == (96, 2, 16)
    assert sum(p.numel() for p in small.parameters()) == size - 2 * (3 * 32 * 64 + 4 * 32 * 64)  # per block
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, pruned_logits, rtol=1e-4, atol=1e-4)
    gqa = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA))
    with pytest.raises(SlimtuneError, match="removing attention heads needs plain multi-head attention"):
        shrink_model(gqa, structured_masks({n: magnitude_score(gqa.get_submodule(n).weight) for n in names},
                                           find_structured_groups(names, "heads", num_heads=4), 0.5))


def test_one_shot_sparsegpt_with_a_4bit_grid_gives_2of4_weights_on_the_grid():
    model = _tiny_llama().requires_grad_(False)
    batches = [torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    masks = prune_model_oneshot(model, "sparsegpt", nm=(2, 4), calib_batches=batches, spec=QuantSpec(4, 32),
                                targets=["up_proj", "o_proj"])
    assert len(masks) == 4
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all()
        groups = weight.reshape(weight.shape[0], -1, 32)
        assert max(groups[r, g].unique().numel() for r in range(weight.shape[0]) for g in range(groups.shape[1])) <= 16
    with pytest.raises(SlimtuneError, match="joint quantization is not valid with method=wanda"):
        prune_model_oneshot(_tiny_llama(), "wanda", 0.5, calib_batches=batches, spec=QuantSpec(4, 32))
