"""Calibration windows for post-training quantization, from any text source the data layer reads.

No Lightning here: `PostTrainingQuantization` and `ActivationOutlierMonitor` use it, and so can a script that calls
`slimtune.quant.quantize_model_gptq` directly.

A calibration source is one of:

- `c4` (also None, the default): the C4 en validation sample, as the GPTQ paper calibrates (`slimtune.data.sources`:
  `$SLIMTUNE_DATA`, else `../shared/data` beside the project, else the hub);
- `wikitext2` (test split: do not evaluate on the text you calibrate on) or `wikitext2:valid`: WikiText-2 raw;
- `corpus`: the embedded CC0 corpus (`slimtune/corpus/default_corpus.txt`; needs nothing outside the package);
- a path: a file, folder or glob of text/JSONL/parquet that `slimtune.data.datasets.load_raw` reads;
- a mapping: a data config with `path` or `dataset` (`dataset_config`, `data_files`, `split`, `text_field`,
  `max_examples`).

`default` is refused: in `data.path` it names the embedded corpus, while the calibration default is C4.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slimtune.data.sources import SOURCES, check_available, is_named_source
from slimtune.errors import SlimtuneError, choices

__all__ = ["CALIBRATION_NAMES", "DEFAULT_CALIBRATION", "calibration_batches", "calibration_source", "check_calibration"]

DEFAULT_CALIBRATION = "c4"
# Names that are not files: the named sets, and the embedded corpus (by its data-layer name).
CALIBRATION_NAMES = (*SOURCES, "corpus")
_VALID = f"{choices(CALIBRATION_NAMES)}, a path, or a mapping with 'path' or 'dataset'"


def _named(name: str) -> dict[str, Any]:
    if name == "default":
        raise SlimtuneError(f"calibration='default' is ambiguous (data.path's 'default' is the embedded corpus, the "
                            f"calibration default is c4); valid: {_VALID}")
    return {"path": "default_corpus" if name == "corpus" else name}


def calibration_source(source: Any) -> dict[str, Any]:
    """The data config of a calibration source: None (c4), a name, a path, or a mapping with 'path' or 'dataset'."""
    if source is None:
        return {"path": DEFAULT_CALIBRATION}
    if isinstance(source, (str, Path)):
        return _named(str(source))
    if isinstance(source, Mapping):
        cfg = dict(source)
        if not cfg.get("path") and not cfg.get("dataset"):
            raise SlimtuneError(f"calibration={cfg!r} names no data; valid: {_VALID}")
        if cfg.get("path") and not cfg.get("dataset") and isinstance(cfg["path"], str):
            cfg.update(_named(cfg["path"]))
        return cfg
    raise SlimtuneError(f"calibration={source!r} is not valid; valid: null (c4), {_VALID}")


def check_calibration(cfg: Mapping[str, Any], what: str = "calibration") -> None:
    """Fail in one line, before any work, when a calibration config's data cannot be found (see `calibration_source`).

    A named set is checked as `slimtune.data.sources.check_available` does (offline with no copy fails); a path must
    name existing files. A `dataset` is left to `datasets` when it is used.
    """
    from slimtune.data.datasets import resolve_files

    path = cfg.get("path")
    if cfg.get("dataset") or not path:
        return
    if is_named_source(path):
        try:
            check_available(path)
        except SlimtuneError as err:
            raise SlimtuneError(f"{what} {err}") from None
        return
    try:
        resolve_files(path)
    except SlimtuneError as err:
        if "does not exist" in str(err):
            raise SlimtuneError(f"{what} {str(path)!r} does not exist; valid: {_VALID}") from None
        raise SlimtuneError(f"{what} {str(path)!r}: {err}") from None


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
