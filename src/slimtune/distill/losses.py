"""Logit distillation losses between a teacher and a student causal LM, pure torch.

**Divergences** (per position, over the vocabulary; p the teacher's distribution, q the student's):

* ``fkl``  forward KL, KL(p || q) (Hinton et al.; mode-covering);
* ``rkl``  reverse KL, KL(q || p) (MiniLLM; mode-seeking);
* ``jsd``  generalized Jensen-Shannon of GKD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q.
  At beta = 0 and 1 that sum is 0 for any pair, so, as GKD and TRL do, beta = 0 is forward KL and beta = 1 reverse
  KL: the limits of JSD(beta) / beta and JSD(beta) / (1 - beta);
* ``tvd``  total variation, 1/2 sum |p - q|;
* ``skl``  skew forward KL of DistiLLM, KL(p || alpha p + (1 - alpha) q);
* ``srkl`` skew reverse KL of DistiLLM, KL(q || (1 - alpha) p + alpha q).
  alpha = 0 is plain forward / reverse KL, alpha = 1 gives 0.

**Temperature** T divides both models' logits, and the divergence is multiplied by T^2 (Hinton et al.: the gradient's
size then stays comparable across temperatures).

**Top-k** restricts both distributions to the teacher's k most likely tokens at each position, each renormalized over
those k tokens. The top-k set and the renormalized teacher distribution depend only on the teacher's k largest
log-probabilities (at any temperature: log_softmax is shift-invariant), so a cache of them (`slimtune.distill.cache`)
gives exactly the loss the online teacher gives.

**Positions** are the ones the next-token loss trains on, as slimtune's data layer marks them: labels of -100
(padding, prompt tokens) are left out, and, as transformers shifts labels inside the model, the logits at position t are
compared where labels[t + 1] is kept. The loss is the mean over those positions.

**Chunks.** The vocabulary-sized work (the teacher's output layer, both log-softmaxes, the mixture) runs on
`chunk_size` positions at a time, and each chunk is checkpointed: its intermediates are recomputed in backward instead
of kept, so no vocabulary-sized float32 tensor of the whole batch exists at once, in forward or backward. A teacher
given as hidden states plus its output layer (`HeadInput`) has its logits computed chunk by chunk too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from slimtune.errors import SlimtuneError, choices

__all__ = ["DIVERGENCES", "IGNORE_INDEX", "HeadInput", "TopKLogprobs", "KDSpec", "divergence", "kd_loss",
           "kd_positions", "mix_with_ce"]

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
IGNORE_INDEX = -100


@dataclass
class HeadInput:
    """A model's last hidden states (B, L, H) and the output layer mapping them to logits: logits are then computed
    only for the positions of one chunk at a time."""

    hidden: Tensor
    head: Callable[[Tensor], Tensor]


@dataclass
class TopKLogprobs:
    """A teacher's k largest log-probabilities (B, L, k) per position and their token ids (B, L, k), e.g. from a cache."""

    logprobs: Tensor
    ids: Tensor


Source = Union[Tensor, HeadInput, TopKLogprobs]


@dataclass(frozen=True)
class KDSpec:
    """What to compute: the divergence, its parameters, temperature and top-k; checked on construction."""

    loss: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    top_k: int | None = None

    def __post_init__(self):
        check_spec(self.loss, self.temperature, self.beta, self.alpha, self.top_k)


def check_spec(loss, temperature, beta, alpha, top_k, owner: str = "distillation") -> None:
    """One-line SlimtuneError for a divergence name, temperature, beta, alpha or top_k that is not valid."""
    if loss not in DIVERGENCES:
        raise SlimtuneError(f"{owner} loss={loss!r} is not supported; valid: {choices(DIVERGENCES)}")
    for key, value, low, high, low_open in (("temperature", temperature, 0.0, None, True),
                                            ("beta", beta, 0.0, 1.0, False), ("alpha", alpha, 0.0, 1.0, False)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
        if not ok:
            valid = "a number > 0" if high is None else f"a number in [{low:g}, {high:g}]"
            raise SlimtuneError(f"{owner} {key}={value!r} is not valid; valid: {valid}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise SlimtuneError(f"{owner} top_k={top_k!r} is not valid; valid: a positive int, or null (whole vocabulary)")


# --------------------------------------------------------------------------- the divergences


def _weighted_log_ratio(weight_logp: Tensor, other_logp: Tensor) -> Tensor:
    """sum_v w_v (log w_v - log o_v) with w = exp(weight_logp): KL(w || o) per row."""
    return (weight_logp.exp() * (weight_logp - other_logp)).sum(-1)


def _log_mixture(logp: Tensor, logq: Tensor, weight_p: float) -> Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed in log space."""
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


def divergence(student_logprobs: Tensor, teacher_logprobs: Tensor, loss: str = "fkl", beta: float = 0.5,
               alpha: float = 0.1) -> Tensor:
    """The divergence of each row (one position) between two log-distributions over the last dimension."""
    logq, logp = student_logprobs, teacher_logprobs
    if loss == "fkl" or (loss == "jsd" and beta == 0.0) or (loss == "skl" and alpha == 0.0):
        return _weighted_log_ratio(logp, logq)
    if loss == "rkl" or (loss == "jsd" and beta == 1.0) or (loss == "srkl" and alpha == 0.0):
        return _weighted_log_ratio(logq, logp)
    if loss == "jsd":
        logm = _log_mixture(logp, logq, beta)
        return beta * _weighted_log_ratio(logp, logm) + (1.0 - beta) * _weighted_log_ratio(logq, logm)
    if loss == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    if loss == "skl":
        return _weighted_log_ratio(logp, _log_mixture(logp, logq, alpha)) if alpha < 1.0 else logp.new_zeros(logp.shape[:-1])
    if loss == "srkl":
        return _weighted_log_ratio(logq, _log_mixture(logq, logp, alpha)) if alpha < 1.0 else logq.new_zeros(logq.shape[:-1])
    raise SlimtuneError(f"distillation loss={loss!r} is not supported; valid: {choices(DIVERGENCES)}")


# --------------------------------------------------------------------------- positions


def kd_positions(labels: Tensor | None = None, attention_mask: Tensor | None = None, shape: tuple[int, int] | None = None,
                 shift: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Boolean (B, L) mask of the logit positions the loss compares: where the next label is kept (labels given),
    else where the next token is a real one (attention mask), else every position but the last. `shift=False`
    compares every position whose own label (or attention) is kept, for logits already aligned with their labels."""
    if labels is not None:
        keep = labels != ignore_index
    elif attention_mask is not None:
        keep = attention_mask.bool()
    elif shape is not None:
        keep = torch.ones(shape, dtype=torch.bool)
    else:
        raise SlimtuneError("kd_positions needs labels, an attention mask or a shape")
    if not shift:
        return keep
    positions = torch.zeros_like(keep)
    positions[:, :-1] = keep[:, 1:]
    if labels is None and attention_mask is not None:
        positions[:, :-1] &= attention_mask[:, :-1].bool()
    return positions


# --------------------------------------------------------------------------- the loss


def _rows(source: Tensor, flat_index: Tensor) -> Tensor:
    """The rows of the flattened positions `flat_index`, on the device of `source` (a teacher may sit on another)."""
    return source.reshape(-1, source.shape[-1])[flat_index.to(source.device)]


def _student_logits(student: Source, flat_index: Tensor) -> Tensor:
    if isinstance(student, HeadInput):
        return student.head(_rows(student.hidden, flat_index))
    if isinstance(student, Tensor):
        return _rows(student, flat_index)
    raise SlimtuneError(f"the student is a {type(student).__name__}; valid: logits (B, L, V) or HeadInput")


def _chunk_loss(student: Source, teacher: Source, flat_index: Tensor, spec: KDSpec, vocab_size: int | None) -> Tensor:
    s_logits = _student_logits(student, flat_index).float()
    temperature = spec.temperature
    if isinstance(teacher, TopKLogprobs):
        ids = _rows(teacher.ids, flat_index).long().to(s_logits.device)
        cached = _rows(teacher.logprobs, flat_index).float().to(s_logits.device)
        if spec.top_k is not None:  # stored in descending order: the first top_k are the top_k
            ids, cached = ids[:, :spec.top_k], cached[:, :spec.top_k]
        t_lp = F.log_softmax(cached / temperature, dim=-1)
        s_lp = F.log_softmax(s_logits.gather(-1, ids) / temperature, dim=-1)
    else:
        with torch.no_grad():
            t_logits = (teacher.head(_rows(teacher.hidden, flat_index)) if isinstance(teacher, HeadInput)
                        else _rows(teacher, flat_index)).float().to(s_logits.device)
        if vocab_size is not None:
            s_logits, t_logits = s_logits[:, :vocab_size], t_logits[:, :vocab_size]
        if spec.top_k is not None:
            values, ids = t_logits.topk(min(spec.top_k, t_logits.shape[-1]), dim=-1)
            t_lp = F.log_softmax(values / temperature, dim=-1)
            s_lp = F.log_softmax(s_logits.gather(-1, ids) / temperature, dim=-1)
        else:
            t_lp = F.log_softmax(t_logits / temperature, dim=-1)
            s_lp = F.log_softmax(s_logits / temperature, dim=-1)
    per_position = divergence(s_lp, t_lp.detach(), spec.loss, spec.beta, spec.alpha)
    return per_position.sum() * temperature ** 2


def _vocab(source: Source) -> int | None:
    if isinstance(source, Tensor):
        return source.shape[-1]
    return None  # HeadInput: known once a chunk is computed; TopKLogprobs: ids index the student's vocabulary


def kd_loss(student: Source, teacher: Source, labels: Tensor | None = None, attention_mask: Tensor | None = None,
            spec: KDSpec | None = None, chunk_size: int | None = 1024, vocab_size: int | None = None,
            shift: bool = True, ignore_index: int = IGNORE_INDEX, positions: Tensor | None = None, **spec_kwargs) -> Tensor:
    """Mean divergence between teacher and student over the positions the next-token loss trains on.

    `student`: logits (B, L, V) or `HeadInput`; gradients flow into it. `teacher`: logits (B, L, V), `HeadInput` or
    `TopKLogprobs`; never differentiated. `spec` (or its fields as keywords: loss, temperature, beta, alpha, top_k)
    says what to compute. `vocab_size`: compare only the first `vocab_size` logits (same-family models whose
    embeddings are padded to different sizes); by default the smaller of the two vocabularies. `chunk_size`: positions
    per chunk (None: all at once, without checkpointing). `positions`: a (B, L) mask overriding labels/attention.
    """
    if spec is not None and spec_kwargs:
        raise SlimtuneError(f"kd_loss takes spec= or its fields ({', '.join(spec_kwargs)}), not both")
    spec = spec if spec is not None else KDSpec(**spec_kwargs)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise SlimtuneError(f"kd_loss chunk_size={chunk_size!r} is not valid; valid: a positive int, or null")
    batch_shape = (student.hidden if isinstance(student, HeadInput) else student).shape[:2]
    if positions is None:
        positions = kd_positions(labels, attention_mask, tuple(batch_shape), shift, ignore_index)
    if tuple(positions.shape) != tuple(batch_shape):
        raise SlimtuneError(f"kd_loss: labels/mask of shape {tuple(positions.shape)} do not match the student's "
                            f"{tuple(batch_shape)}")
    if vocab_size is None and not isinstance(teacher, TopKLogprobs):
        sizes = [v for v in (_vocab(student), _vocab(teacher)) if v is not None]
        vocab_size = min(sizes) if len(set(sizes)) > 1 else None
    device = student.hidden.device if isinstance(student, HeadInput) else student.device
    flat = positions.to(device).reshape(-1).nonzero().squeeze(1)
    anchor = student.hidden if isinstance(student, HeadInput) else student
    if flat.numel() == 0:
        return anchor.sum() * 0.0  # no position to distil (all masked): a zero that still has a graph
    chunks = [flat] if chunk_size is None else list(flat.split(chunk_size))
    needs_grad = torch.is_grad_enabled() and anchor.requires_grad
    total = anchor.new_zeros((), dtype=torch.float32)
    for index in chunks:
        if needs_grad and chunk_size is not None:
            piece = checkpoint(_chunk_loss, student, teacher, index, spec, vocab_size, use_reentrant=False)
        else:
            piece = _chunk_loss(student, teacher, index, spec, vocab_size)
        total = total + piece
    return total / flat.numel()


def mix_with_ce(ce: Tensor, kd: Tensor, kd_weight: float) -> Tensor:
    """(1 - kd_weight) * CE + kd_weight * KD: the usual interpolation of the hard-label and distillation losses."""
    if not 0.0 <= kd_weight <= 1.0:
        raise SlimtuneError(f"kd_weight={kd_weight!r} is not valid; valid: a number in [0, 1]")
    return (1.0 - kd_weight) * ce + kd_weight * kd
