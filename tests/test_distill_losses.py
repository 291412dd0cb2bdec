"""Distillation losses against formulas computed directly (probabilities, not log-space tricks), their limits, masking
as slimtune's data layer masks labels, and chunked == unchunked in value and gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from slimtune.distill import (DIVERGENCES, HeadInput, HiddenStateLoss, KDSpec, TopKLogprobs, divergence, kd_loss,
                              kd_positions, mix_with_ce, uniform_layer_map)
from slimtune.errors import SlimtuneError

V = 37


def logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def kl(p, q):
    """KL(p || q) row by row, from probabilities."""
    return (p * (p.log() - q.log())).sum(-1)


def reference(loss, p, q, beta=0.5, alpha=0.1):
    """Each divergence written from its definition, in probability space (p teacher, q student)."""
    if loss == "fkl":
        return kl(p, q)
    if loss == "rkl":
        return kl(q, p)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "skl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if loss == "srkl":
        return kl(q, (1 - alpha) * p + alpha * q)
    raise AssertionError(loss)


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_each_divergence_equals_its_definition(loss):
    s, t = logits(6, V, seed=1).double(), logits(6, V, seed=2).double()
    p, q = t.softmax(-1), s.softmax(-1)
    got = divergence(s.log_softmax(-1), t.log_softmax(-1), loss, beta=0.3, alpha=0.2)
    torch.testing.assert_close(got, reference(loss, p, q, beta=0.3, alpha=0.2))
    assert (got > 1e-3).all()  # distinct distributions: a strictly positive divergence
    # identical distributions: zero
    same = divergence(t.log_softmax(-1), t.log_softmax(-1), loss, beta=0.3, alpha=0.2)
    torch.testing.assert_close(same, torch.zeros(6, dtype=torch.float64))


def test_forward_kl_equals_torch_distributions():
    s, t = logits(5, V, seed=3), logits(5, V, seed=4)
    expected = kl_divergence(Categorical(logits=t), Categorical(logits=s))
    torch.testing.assert_close(divergence(s.log_softmax(-1), t.log_softmax(-1), "fkl"), expected)
    torch.testing.assert_close(divergence(s.log_softmax(-1), t.log_softmax(-1), "rkl"),
                               kl_divergence(Categorical(logits=s), Categorical(logits=t)))


def test_jsd_and_skew_limits():
    s, t = logits(4, V, seed=5).double(), logits(4, V, seed=6).double()
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    fkl, rkl = divergence(ls, lt, "fkl"), divergence(ls, lt, "rkl")
    # beta -> 0: JSD(beta) / beta -> KL(p||q); beta -> 1: JSD(beta) / (1 - beta) -> KL(q||p); the endpoints are those
    eps = 1e-7  # the next term of the expansion is O(beta * sum p^2 / q): small beta, double precision
    torch.testing.assert_close(divergence(ls, lt, "jsd", beta=eps) / eps, fkl, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(divergence(ls, lt, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(divergence(ls, lt, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(divergence(ls, lt, "jsd", beta=1.0), rkl)
    # symmetric JSD is bounded by log 2 and symmetric in its arguments
    jsd = divergence(ls, lt, "jsd", beta=0.5)
    assert (jsd <= math.log(2)).all()
    torch.testing.assert_close(jsd, divergence(lt, ls, "jsd", beta=0.5))
    # skew KL: alpha = 0 is plain KL, alpha = 1 compares a distribution with itself
    torch.testing.assert_close(divergence(ls, lt, "skl", alpha=0.0), fkl)
    torch.testing.assert_close(divergence(ls, lt, "srkl", alpha=0.0), rkl)
    torch.testing.assert_close(divergence(ls, lt, "skl", alpha=1.0), torch.zeros(4, dtype=torch.float64))
    assert (divergence(ls, lt, "skl", alpha=0.5) < fkl).all()


def test_temperature_scales_logits_and_multiplies_by_t_squared():
    s, t = logits(2, 5, V, seed=7), logits(2, 5, V, seed=8)
    temperature = 2.5
    got = kd_loss(s, t, loss="fkl", temperature=temperature, shift=False, chunk_size=None)
    expected = temperature ** 2 * kl((t / temperature).softmax(-1), (s / temperature).softmax(-1)).mean()
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, kd_loss(s, t, loss="fkl", shift=False, chunk_size=None))


def test_masking_follows_the_shifted_labels_of_the_data_layer():
    """Labels as slimtune's collate makes them: prompt and padding -100; the logits at t predict labels[t + 1]."""
    B, L = 2, 6
    s, t = logits(B, L, V, seed=9), logits(B, L, V, seed=10)
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100],   # prompt (2 tokens), response 3, padding 1
                           [1, 2, 3, 4, -100, -100]])
    got = kd_loss(s, t, labels, loss="rkl", chunk_size=None)
    kept = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]  # positions t whose next label is kept
    expected = torch.stack([kl(s[b, i].softmax(-1), t[b, i].softmax(-1)) for b, i in kept]).mean()
    torch.testing.assert_close(got, expected)
    assert kd_positions(labels).sum() == len(kept)
    # whatever sits at masked positions does not matter
    s2, t2 = s.clone(), t.clone()
    s2[0, 0] += 100.0
    t2[1, 3:] -= 50.0
    torch.testing.assert_close(kd_loss(s2, t2, labels, loss="rkl", chunk_size=None), expected)
    # everything masked: zero, with a graph
    s3 = s.clone().requires_grad_(True)
    zero = kd_loss(s3, t, torch.full((B, L), -100))
    zero.backward()
    assert float(zero.detach()) == 0.0 and s3.grad is not None and float(s3.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_equals_unchunked_in_value_and_gradient(loss, top_k):
    B, L = 3, 7
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(11))
    labels[0, :2] = -100
    labels[2, 5:] = -100
    t = logits(B, L, V, seed=12)
    values, grads = [], []
    for chunk_size in (None, 1, 4, 1000):
        s = logits(B, L, V, seed=13).requires_grad_(True)
        value = kd_loss(s, t, labels, loss=loss, top_k=top_k, temperature=1.5, beta=0.3, alpha=0.2,
                        chunk_size=chunk_size)
        value.backward()
        values.append(value.detach())
        grads.append(s.grad)
    assert float(grads[0].abs().sum()) > 0
    for value, grad in zip(values[1:], grads[1:]):
        torch.testing.assert_close(value, values[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-8)


def test_teacher_head_runs_one_chunk_at_a_time():
    """A teacher given as hidden states + output layer never computes more than chunk_size positions of logits."""
    B, L, H = 2, 9, 8
    head_t = torch.nn.Linear(H, V, bias=False)
    head_s = torch.nn.Linear(H, V, bias=False)
    hidden_t, hidden_s = logits(B, L, H, seed=14), logits(B, L, H, seed=15)
    rows = []

    def counting_head(x):
        rows.append(x.shape[0])
        return head_t(x)

    with torch.no_grad():
        full_t = head_t(hidden_t)
    labels = torch.ones(B, L, dtype=torch.long)
    student = HeadInput(hidden_s, head_s)
    chunked = kd_loss(student, HeadInput(hidden_t, counting_head), labels, loss="jsd", chunk_size=4)
    assert max(rows) <= 4 and sum(rows) == B * (L - 1)
    chunked.backward()
    grad = head_s.weight.grad.clone()
    head_s.weight.grad = None
    whole = kd_loss(head_s(hidden_s), full_t, labels, loss="jsd", chunk_size=None)
    whole.backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad, head_s.weight.grad)


def test_top_k_renormalizes_both_over_the_teachers_top_tokens_and_a_cache_gives_the_same():
    s, t = logits(1, 4, V, seed=16), logits(1, 4, V, seed=17)
    k, temperature = 6, 2.0
    got = kd_loss(s, t, loss="fkl", top_k=k, temperature=temperature, shift=False, chunk_size=None)
    ids = t.topk(k, -1).indices
    p = (t.gather(-1, ids) / temperature).softmax(-1)
    q = (s.gather(-1, ids) / temperature).softmax(-1)
    torch.testing.assert_close(got, temperature ** 2 * kl(p, q).mean())
    # what a cache stores: the teacher's full-vocabulary log-probabilities of its top k (at temperature 1), k >= top_k
    top = t.log_softmax(-1).topk(k + 3, -1)
    cached = kd_loss(s, TopKLogprobs(top.values, top.indices), loss="fkl", top_k=k, temperature=temperature,
                     shift=False, chunk_size=2)
    torch.testing.assert_close(cached, got)


def test_padded_vocabularies_are_compared_on_the_shared_tokens():
    s, t = logits(2, 5, V, seed=18), logits(2, 5, V + 11, seed=19)  # teacher embeddings padded to a larger size
    labels = torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(kd_loss(s, t, labels), kd_loss(s, t[..., :V], labels))
    torch.testing.assert_close(kd_loss(s, t, labels, vocab_size=30), kd_loss(s[..., :30], t[..., :30], labels))


def test_mix_with_ce():
    ce, kd = torch.tensor(2.0), torch.tensor(0.5)
    assert float(mix_with_ce(ce, kd, 0.25)) == pytest.approx(0.75 * 2.0 + 0.25 * 0.5)
    with pytest.raises(SlimtuneError, match=r"kd_weight=1.5 is not valid; valid: a number in \[0, 1\]"):
        mix_with_ce(ce, kd, 1.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 1.5}, r"beta=1.5 is not valid; valid: a number in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha=-0.1 is not valid; valid: a number in \[0, 1\]"),
    ({"temperature": 0}, "temperature=0 is not valid; valid: a number > 0"),
    ({"temperature": -1.0}, "temperature=-1.0 is not valid"),
    ({"loss": "kl"}, "loss='kl' is not supported; valid: fkl, rkl, jsd, tvd, skl, srkl"),
    ({"top_k": 0}, "top_k=0 is not valid; valid: a positive int"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError, match=message) as err:
        KDSpec(**kwargs)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- hidden states


def test_hidden_state_mse_and_cosine_with_a_projection():
    B, L, ds, dt = 2, 5, 6, 10
    student = [logits(B, L, ds, seed=20 + i).requires_grad_(True) for i in range(3)]  # embeddings + 2 layers
    teacher = [logits(B, L, dt, seed=30 + i) for i in range(5)]  # embeddings + 4 layers
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pairs = uniform_layer_map(2, 4)
    assert pairs == [(1, 2), (2, 4)]
    mse = HiddenStateLoss(pairs, ds, dt, 3, 5, loss="mse")
    got = mse(student, teacher, mask)
    keep = mask.bool()
    expected = torch.stack([((mse.projections[k](student[s][keep]) - teacher[t][keep]) ** 2).mean()
                            for k, (s, t) in enumerate(pairs)]).mean()
    torch.testing.assert_close(got, expected)
    got.backward()
    assert mse.projections[0].weight.grad is not None and student[1].grad is not None
    assert float(student[1].grad[1, 3:].abs().sum()) == 0.0  # padding is masked
    cosine = HiddenStateLoss([(-1, -1)], ds, dt, 3, 5, loss="cosine")
    projected = cosine.projections[0](student[2][keep])
    expected = (1 - F.cosine_similarity(projected, teacher[4][keep], dim=-1)).mean()
    torch.testing.assert_close(cosine(student, teacher, mask), expected)
    # equal widths: no projection, and identical states give zero
    same = HiddenStateLoss([(1, 1)], dt, dt, 5, 5)
    assert same.projections is None and float(same(teacher, teacher)) == 0.0


def test_hidden_state_pairs_naming_missing_layers_are_refused():
    with pytest.raises(SlimtuneError, match=r"the teacher has no layer 7; valid: 0 \(embeddings\) to 4"):
        HiddenStateLoss([(1, 7)], 4, 4, 3, 5)
    with pytest.raises(SlimtuneError, match="the student has no layer -4"):
        HiddenStateLoss([(-4, 1)], 4, 4, 3, 5)
    with pytest.raises(SlimtuneError, match="hidden-state loss='l1' is not supported; valid: mse, cosine"):
        HiddenStateLoss([(1, 1)], 4, 4, 3, 5, loss="l1")
    with pytest.raises(SlimtuneError, match="layer pair 'ab' is not valid"):
        HiddenStateLoss(["ab"], 4, 4, 3, 5)
