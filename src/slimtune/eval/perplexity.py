"""Perplexity as the GPTQ/SparseGPT papers measure it: one token stream, non-overlapping windows, mean NLL per token."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slimtune.errors import SlimtuneError


def read_eval_text(path: str | Path) -> str:
    """The papers' evaluation string: a text file's lines joined with "\\n\\n" (WikiText rows keep their newline;
    blank rows are empty strings, as the `wikitext-2-raw-v1` dataset yields them).

    `path` may also name a set (a str): `wikitext2` (WikiText-2 raw test split) or `wikitext2:valid`, found from any
    directory through `slimtune.data.sources` ($SLIMTUNE_DATA, ../shared/data beside the project, or the hub).
    """
    from slimtune.data.sources import EVAL_NAMES, eval_text, is_named_source

    if isinstance(path, str) and is_named_source(path):
        return eval_text(path)
    path = Path(path).expanduser()
    if not path.is_file():
        raise SlimtuneError(f"evaluation text {str(path)!r} does not exist; valid: a path to a text file, or {', '.join(EVAL_NAMES)}")
    with path.open(encoding="utf-8") as handle:
        rows = [row if row.strip() else "" for row in handle]
    return "\n\n".join(rows)


def tokenize_eval_text(text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "Perplexity",
) -> dict[str, float]:
    """exp(mean NLL) over `token_ids` cut into windows of `seq_len` (the tail shorter than a window is dropped)."""
    if seq_len <= 1:
        raise SlimtuneError(f"perplexity seq_len={seq_len} is not valid; valid: an integer > 1")
    n_windows = token_ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, int(max_windows))
    if n_windows == 0:
        raise SlimtuneError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    was_training = model.training
    model.eval()
    windows = token_ids[: n_windows * seq_len].view(n_windows, seq_len)
    nll_sum = 0.0
    try:
        for start in tqdm(range(0, n_windows, batch_size), desc=desc, disable=not progress, leave=False):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.size(0), -1)
            nll_sum += loss.mean(dim=1).sum().item()
    finally:
        model.train(was_training)
    mean_nll = nll_sum / n_windows
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": n_windows, "tokens": n_windows * seq_len}
