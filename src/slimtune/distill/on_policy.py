"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples completions of the batch's prompts, and the
divergence is taken on the student's own tokens. Pure torch + transformers' `generate`.

A row's prompt is what the data layer masks: the tokens before its first kept label (chat and instruction data mask
the prompt with -100). A row with no masked prefix (packed plain text) is prompted with the first half of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.distill.losses import IGNORE_INDEX

__all__ = ["Generated", "prompts_of", "sample_completions"]


@dataclass
class Generated:
    """Prompt + sampled completion per row, left-padded: ids, attention mask, position ids, and labels that keep only
    the completion (up to and including its first end-of-sequence token)."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor


def prompts_of(input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
               ignore_index: int = IGNORE_INDEX) -> list[Tensor]:
    """Each row's prompt (see the module docstring); at least one token."""
    prompts = []
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum()) if attention_mask is not None else input_ids.shape[1]
        ids = input_ids[row, :length]
        kept = (labels[row, :length] != ignore_index).nonzero() if labels is not None else None
        first = int(kept[0]) if kept is not None and len(kept) else 0
        cut = first if first > 0 else max(1, length // 2)
        prompts.append(ids[:cut])
    return prompts


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: list[Tensor], max_new_tokens: int, temperature: float = 1.0,
                       pad_token_id: int = 0, eos_token_id: int | None = None) -> Generated:
    """Sample a completion of each prompt from `model` (in eval mode for the sampling, its mode restored after)."""
    device = prompts[0].device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id, use_cache=True)
    finally:
        model.train(was_training)
    sequences = out if isinstance(out, Tensor) else out.sequences
    completion = sequences[:, width:]
    keep = torch.ones_like(completion, dtype=torch.bool)
    if eos_token_id is not None:  # after a row's first end-of-sequence token, generate only pads
        ended = (completion == eos_token_id).long().cumsum(-1)
        keep = (ended == 0) | ((ended == 1) & (completion == eos_token_id))
    attention = torch.cat([mask, keep.long()], dim=1)
    labels = torch.full_like(sequences, IGNORE_INDEX)
    labels[:, width:] = torch.where(keep, completion, torch.full_like(completion, IGNORE_INDEX))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return Generated(sequences, attention, positions, labels)
