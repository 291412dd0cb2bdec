"""Calibration windows for post-training quantization, from any text source the data layer reads.

No Lightning here: `PostTrainingQuantization` and `ActivationOutlierMonitor` use it, and so can a script that calls
`slimtune.quant.quantize_model_gptq` directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import SlimtuneError

__all__ = ["calibration_batches", "calibration_source", "default_calibration_path"]


def default_calibration_path() -> str:
    """The C4 validation sample in the shared data folder ($SLIMTUNE_DATA, else ../shared/data)."""
    return str(Path(os.environ.get("SLIMTUNE_DATA", "../shared/data")) / "c4" / "c4-validation-sample.jsonl")


def calibration_source(source: Any) -> dict[str, Any]:
    """The data config of a calibration source: None (the C4 sample), a path, or a mapping with 'path' or 'dataset'."""
    if source is None:
        return {"path": default_calibration_path()}
    if isinstance(source, (str, Path)):
        return {"path": str(source)}
    if isinstance(source, Mapping):
        cfg = dict(source)
        if not cfg.get("path") and not cfg.get("dataset"):
            raise SlimtuneError(f"calibration={cfg!r} names no data; valid: a path, or a mapping with 'path' or 'dataset'")
        return cfg
    raise SlimtuneError(f"calibration={source!r} is not valid; valid: null (C4 sample), a path, or a mapping with 'path' or 'dataset'")


def _describe_source(cfg: Mapping[str, Any]) -> str:
    return repr(str(cfg.get("dataset") or cfg.get("path")))


def _texts(raw, cfg: Mapping[str, Any]) -> list[str]:
    columns = set(raw.column_names)
    field = str(cfg.get("text_field", "text"))
    if field in columns:
        return [str(t) for t in raw[field] if t]
    if "messages" in columns:
        return ["\n".join(str(m.get("content", "")) for m in msgs or []) for msgs in raw["messages"]]
    if {"prompt", "response"} <= columns:
        return [f"{p}\n{r}" for p, r in zip(raw["prompt"], raw["response"])]
    raise SlimtuneError(
        f"calibration set {_describe_source(cfg)} has columns {sorted(columns)}; valid: a {field!r} column "
        "(set text_field), 'messages', or 'prompt'+'response'"
    )


def calibration_batches(source: Any, tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """`n_samples` windows of `seq_len` tokens (each a LongTensor [1, seq_len]), drawn at random (seeded) from `source`.

    Documents are read with `slimtune.data.datasets.load_raw`, shuffled (seeded), tokenized and joined with EOS into
    one stream until it holds twice the tokens asked (or the set ends); the windows are `n_samples` distinct
    non-overlapping slots of that stream, chosen at random, after a random shift.

    Raises:
        SlimtuneError: the source holds fewer than `n_samples` windows of `seq_len` tokens (or cannot be read).
    """
    from slimtune.data.datasets import load_raw

    cfg = calibration_source(source)
    try:
        raw = load_raw(cfg)
    except SlimtuneError as err:
        raise SlimtuneError(f"calibration set {_describe_source(cfg)} could not be read: {err}") from err
    texts = _texts(raw, cfg)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(texts), generator=generator).tolist()
    wanted = 2 * n_samples * seq_len
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
        if len(stream) >= wanted:
            break
    slots = len(stream) // seq_len
    if slots < n_samples:
        raise SlimtuneError(
            f"calibration set {_describe_source(cfg)} has {slots} samples of {seq_len} tokens, fewer than the "
            f"n_samples={n_samples} asked; valid: n_samples <= {slots}, a smaller seq_len, or more text"
        )
    shift = int(torch.randint(0, len(stream) - slots * seq_len + 1, (1,), generator=generator))
    picks = sorted(torch.randperm(slots, generator=generator)[:n_samples].tolist())
    ids = torch.tensor(stream, dtype=torch.long)
    return [ids[shift + s * seq_len: shift + (s + 1) * seq_len].unsqueeze(0).clone() for s in picks]
