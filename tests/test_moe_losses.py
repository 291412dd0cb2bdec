"""slimtune.moe on plain tensors: each loss against transformers' own function or a direct reference formula, padding
excluded everywhere, statistics summed over micro-batches and over 2 gloo ranks, the aux-loss-free bias driving a
skewed synthetic router to uniform load, dead experts and collapse reports."""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from slimtune.errors import SlimtuneError
from slimtune.moe import (DeadExperts, ExpertBias, StepLoad, biased_top_k, coefficient_of_variation, collapse_report,
                          expert_load, load_shares, mean_probability, routing_entropy, routing_probabilities,
                          sequence_balance_loss, switch_loss, z_loss)

E, K, B, S = 6, 2, 3, 5


def router_output(seed=0, tokens=B * S, experts=E, top_k=K, skew=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g) * 2
    if skew is not None:
        logits = logits + skew
    indices = torch.topk(torch.softmax(logits, -1), top_k, dim=-1).indices
    return logits, indices


def padding_mask():
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, 3:] = 0  # right padding
    return mask


def our_switch(layers, mask=None, normalize_top_k=True):
    """Pooled over layers the way transformers pools: loads and probabilities summed, then one loss."""
    load = sum(expert_load(i, E, mask) for _, i in layers)
    sums = [mean_probability(routing_probabilities(lg), mask) for lg, _ in layers]
    prob_sum, tokens = sum(s for s, _ in sums), sum(t for _, t in sums)
    return switch_loss(load, tokens, prob_sum, tokens, K, normalize_top_k=normalize_top_k)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_switch_loss_equals_transformers_load_balancing_loss_func(masked, num_layers):
    layers = [router_output(seed) for seed in range(num_layers)]
    mask = padding_mask() if masked else None
    expected = load_balancing_loss_func(tuple(lg for lg, _ in layers), E, K, mask)
    ours = our_switch(layers, mask, normalize_top_k=False)
    assert float(ours) == pytest.approx(float(expected), rel=1e-6)
    # top-k aware normalisation: divided by k, so uniform routing scores 1 whatever k
    assert float(our_switch(layers, mask)) == pytest.approx(float(expected) / K, rel=1e-6)
    # the mask matters (the test can fail): padding rows are routed differently from the rest
    if masked:
        assert abs(float(our_switch(layers, None)) - float(ours) * 1 / K) > 1e-4


def test_switch_loss_is_one_when_uniform_and_e_when_collapsed():
    tokens = 12
    uniform_probs = torch.full((tokens, 4), 0.25)
    round_robin = torch.stack([torch.arange(tokens) % 4, (torch.arange(tokens) + 1) % 4], dim=1)
    s, n = mean_probability(uniform_probs)
    assert float(switch_loss(expert_load(round_robin, 4), n, s, n, top_k=2)) == pytest.approx(1.0)
    collapsed = torch.zeros(tokens, 4)
    collapsed[:, 0] = 1.0
    s, n = mean_probability(collapsed)
    load = expert_load(torch.zeros(tokens, 1, dtype=torch.long), 4)
    assert float(switch_loss(load, n, s, n, top_k=1)) == pytest.approx(4.0)


def test_switch_gradient_flows_through_probabilities_only():
    logits, indices = router_output()
    logits.requires_grad_(True)
    s, n = mean_probability(routing_probabilities(logits))
    load = expert_load(indices, E)
    assert not load.requires_grad
    switch_loss(load, n, s, n, K).backward()
    # d/dlogits of E * sum_i f_i * mean_t p_ti, by hand: p_ti (f_i - sum_j f_j p_tj) * E / N
    p = torch.softmax(logits.detach(), -1)
    f = load / (n * K)
    expected = E / n * p * (f - (p * f).sum(-1, keepdim=True))
    assert torch.allclose(logits.grad, expected, atol=1e-7)


def test_z_loss_hand_computed_and_padding_excluded():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0], [50.0, -50.0]])
    mask = torch.tensor([1, 1, 0])
    total, tokens = z_loss(logits, mask)
    expected = (math.log(4.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2  # lse([0, ln3]) = ln 4; lse([1, 1]) = 1 + ln 2
    assert float(total / tokens) == pytest.approx(expected, rel=1e-6)
    assert float(tokens) == 2
    total_all, tokens_all = z_loss(logits)
    assert float(total_all / tokens_all) > 800  # the padded row's lse of 50 would dominate


def test_sequence_balance_loss_equals_the_direct_formula():
    for score in ("softmax", "sigmoid"):
        logits, indices = router_output(seed=3)
        mask = padding_mask()
        probs = routing_probabilities(logits, score)
        total, sequences = sequence_balance_loss(probs, indices, B, mask)
        # reference: DeepSeek-V3 eq. 17-20 per sequence over its real tokens, averaged over sequences, loops only
        reference = 0.0
        for b in range(B):
            rows = [b * S + t for t in range(S) if mask[b, t]]
            T = len(rows)
            for i in range(E):
                f = E / (K * T) * sum(int(i in indices[r].tolist()) for r in rows)
                p = sum(float(probs[r, i]) for r in rows) / T
                reference += f * p
        assert float(sequences) == B
        assert float(total / sequences) == pytest.approx(reference / B, rel=1e-6)
    if score == "sigmoid":  # normalised sigmoid scores sum to one per token
        assert torch.allclose(probs.sum(-1), torch.ones(B * S))


def test_padding_never_counts():
    """Changing what padded tokens route to changes no statistic."""
    mask = padding_mask()
    logits, indices = router_output(seed=5)
    other_logits, other_indices = logits.clone(), indices.clone()
    pad = mask.reshape(-1) == 0
    other_logits[pad] = torch.randn(int(pad.sum()), E) * 10
    other_indices[pad] = 0
    for lg, ix in ((logits, indices), (other_logits, other_indices)):
        probs = routing_probabilities(lg)
        stats = (expert_load(ix, E, mask), *mean_probability(probs, mask), *z_loss(lg, mask),
                 *sequence_balance_loss(probs, ix, B, mask), torch.tensor(routing_entropy(probs, mask)))
        if lg is logits:
            first = stats
    assert all(torch.allclose(a, b) for a, b in zip(first, stats))
    assert float(expert_load(indices, E, mask).sum()) == K * int(mask.sum())


def test_step_load_sums_micro_batches_and_metrics():
    acc = StepLoad([E, E])
    loads = []
    for seed in range(3):
        _, indices = router_output(seed)
        load = expert_load(indices, E)
        loads.append(load)
        acc.add(0, load, B * S)
    reduced, tokens = acc.reduced()
    assert torch.equal(reduced[0].float(), sum(loads)) and float(tokens[0]) == 3 * B * S
    assert float(reduced[1].sum()) == 0
    assert coefficient_of_variation(torch.ones(4)) == 0
    assert coefficient_of_variation(torch.tensor([8.0, 0, 0, 0])) == pytest.approx(math.sqrt(3))
    assert torch.allclose(load_shares(torch.tensor([1.0, 3.0])), torch.tensor([0.25, 0.75]))
    ent, n = routing_entropy(torch.full((4, 8), 1 / 8))
    assert ent / n / math.log(8) == pytest.approx(1.0)
    acc.reset()
    assert float(acc.reduced()[1].sum()) == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes each import torch: 10-25 s on 2 busy cores
def test_step_load_all_reduces_over_two_gloo_ranks(tmp_path):
    from moe_rank_worker import E as WORKER_E
    from moe_rank_worker import TOKENS, indices_of_rank, rank_main

    path = tmp_path / "reduced.pt"
    mp.start_processes(rank_main, args=(_free_port(), str(path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(path)
    expected = sum(expert_load(indices_of_rank(r), WORKER_E) for r in range(2))
    assert torch.equal(got["load"].float(), expected) and float(got["tokens"][0]) == 2 * TOKENS


def test_aux_free_bias_moves_a_skewed_router_to_uniform_load():
    skew = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])  # a router that prefers the first experts
    logits, _ = router_output(seed=1, tokens=512, skew=skew)
    scores = torch.softmax(logits, -1)
    bias = ExpertBias([E], rate=0.003)
    cvs = []
    for _ in range(600):
        load = expert_load(biased_top_k(scores, bias.bias[0], K), E)
        cvs.append(coefficient_of_variation(load))
        bias.update([load])
    # a sign update with a fixed rate ends oscillating around balance, so the last 50 steps are averaged
    settled = sum(cvs[-50:]) / 50
    assert cvs[0] > 0.75 and settled < 0.15, (cvs[0], settled)
    assert bias.bias[0][0] < 0 < bias.bias[0][-1]  # favoured experts pushed down, neglected ones up
    # the bias only chooses: the unbiased top-k of the same scores is unchanged
    assert torch.equal(biased_top_k(scores, torch.zeros(E), K), torch.topk(scores, K).indices)
    restored = ExpertBias([E], rate=0.01)
    restored.load_state_dict(bias.state_dict())
    assert torch.equal(restored.bias[0], bias.bias[0])
    with pytest.raises(SlimtuneError, match="does not fit"):
        ExpertBias([E, E], rate=0.01).load_state_dict(bias.state_dict())
    for rate in (0, -1e-3, True):
        with pytest.raises(SlimtuneError, match="valid: a positive number"):
            ExpertBias([E], rate=rate)


def test_dead_experts_and_collapse_report():
    dead = DeadExperts([4], threshold=0.1, patience=3)
    starving = torch.tensor([50.0, 50.0, 0.5, 0.0])  # shares x E: 1.99, 1.99, 0.02, 0
    assert dead.observe(0, starving) == [] and dead.observe(0, starving) == []
    assert dead.observe(0, starving) == [2, 3]
    assert dead.observe(0, torch.zeros(4)) == [2, 3]  # an empty step changes nothing
    assert dead.observe(0, torch.tensor([25.0, 25.0, 25.0, 0.0])) == [3]  # expert 2 revived, expert 3 still starved
    assert dead.observe(0, torch.full((4,), 25.0)) == []
    report = collapse_report("model.layers.1.mlp.gate", starving, [2, 3], max_cv=0.5, overload=1.5)
    assert report.overloaded == [0, 1] and report.dead == [2, 3]
    assert "model.layers.1.mlp.gate" in report.message() and "[2, 3]" in report.message()
    assert collapse_report("x", torch.ones(4), [], max_cv=0.5) is None
    with pytest.raises(SlimtuneError, match="threshold"):
        DeadExperts([4], threshold=1.5, patience=3)
