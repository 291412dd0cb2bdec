"""A teacher-logit cache: one teacher pass over the training sequences writes, for every position, the teacher's k
largest log-probabilities and their token ids to safetensors shards; a student then distils from it with no teacher
in memory. Pure torch + safetensors.

Layout of a cache folder: `shard-00000.safetensors`, ... each holding `logprobs` (positions, k) float32, `ids`
(positions, k) int32 and `offsets` (sequences + 1) int64 (sequence i's rows are offsets[i]:offsets[i + 1]), and
`cache.json`: the fingerprint, and per shard its file and the hashes of its sequences, in order. A sequence is found by
the hash of its token ids, so the cache serves any batch order, any padding and any LightningModule.

The fingerprint names what the cached numbers depend on: the tokenizer (`tokenizer_fingerprint`), the data (a hash of
every sequence's hash, in order), the teacher (its description, or a checksum of its weights when given as a module),
k and the compared vocabulary; a cache is reused only when every part matches, otherwise `check` names the part that
differs. Writing is resumable: `cache.json` is rewritten after each shard, so an interrupted pass continues at the
first shard not written.

The cached log-probabilities are of the whole vocabulary at temperature 1; `slimtune.distill.losses` renormalizes them
over the k tokens at any temperature, which is exactly the online top-k loss.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.distill.losses import HeadInput, TopKLogprobs
from slimtune.errors import SlimtuneError

__all__ = ["CACHE_FILE", "LogitCache", "data_fingerprint", "read_cache_meta", "sequence_key", "teacher_topk", "weights_fingerprint",
           "write_logit_cache"]

CACHE_FILE = "cache.json"
FORMAT_VERSION = 1


def sequence_key(ids: Sequence[int] | Tensor) -> str:
    """The hash a sequence of token ids is found by."""
    data = torch.as_tensor(ids, dtype=torch.int64).cpu().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()


def data_fingerprint(sequences: Iterable[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    count = 0
    for ids in sequences:
        digest.update(sequence_key(ids).encode())
        count += 1
    return f"{count}:{digest.hexdigest()[:16]}"


def weights_fingerprint(model: nn.Module) -> str:
    """A checksum of a module's weights (shapes, sums and absolute sums): two different teachers differ."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not torch.is_tensor(tensor):
                continue
            values = tensor.detach().float() if tensor.is_floating_point() else tensor.detach().double()
            digest.update(f"{name}:{tuple(tensor.shape)}:{float(values.sum()):.6e}:{float(values.abs().sum()):.6e}"
                          .encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def teacher_topk(source: Tensor | HeadInput, k: int, vocab_size: int | None = None,
                 chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The k largest full-vocabulary log-probabilities (B, L, k) and their ids of a teacher's logits (B, L, V) or
    `HeadInput`, computed `chunk_size` positions at a time."""
    hidden = source.hidden if isinstance(source, HeadInput) else source
    batch, length = hidden.shape[:2]
    flat = hidden.reshape(batch * length, hidden.shape[-1])
    values, indices = [], []
    for rows in flat.split(chunk_size):
        logits = (source.head(rows) if isinstance(source, HeadInput) else rows).float()
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        top = logits.log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    width = values[0].shape[-1]
    return (torch.cat(values).reshape(batch, length, width).cpu(),
            torch.cat(indices).to(torch.int32).reshape(batch, length, width).cpu())


def read_cache_meta(folder: Path) -> dict | None:
    path = folder / CACHE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SlimtuneError(f"teacher-logit cache {str(folder)!r} has a {CACHE_FILE} that is not valid JSON "
                            f"({err}); valid: a folder write_logit_cache wrote, or an empty one") from err


def _check_fingerprint(folder: Path, stored: dict, expected: dict) -> None:
    for part, value in expected.items():
        if stored.get(part) != value:
            raise SlimtuneError(
                f"teacher-logit cache {str(folder)!r} was written for another {part} ({stored.get(part)!r}, this "
                f"run: {value!r}); valid: the data, tokenizer and teacher it was written for, or a new cache folder")


def write_logit_cache(run_teacher, sequences: Sequence[Sequence[int]], folder, fingerprint: dict, top_k: int,
                      vocab_size: int | None = None, batch_size: int = 8, shard_sequences: int = 256,
                      chunk_size: int = 1024, pad_id: int = 0, progress: bool = False) -> Path:
    """Run the teacher over `sequences` (lists of token ids) and write the cache to `folder`; resumes a cache the
    same fingerprint left unfinished, refuses one another fingerprint wrote.

    `run_teacher(input_ids, attention_mask)` returns the teacher's logits or a `HeadInput` (`TeacherRunner.run`
    without its hidden states). `fingerprint`: the parts the cache is valid for (`data` is computed here and added).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sequences = [list(map(int, s)) for s in sequences]
    fingerprint = {**fingerprint, "data": data_fingerprint(sequences), "top_k": int(top_k), "vocab_size": vocab_size,
                   "format": FORMAT_VERSION}
    meta = read_cache_meta(folder)
    if meta is not None:
        _check_fingerprint(folder, meta["fingerprint"], fingerprint)
    else:
        meta = {"fingerprint": fingerprint, "shards": [], "complete": False}
    done = sum(len(shard["keys"]) for shard in meta["shards"])
    starts = range(done, len(sequences), shard_sequences)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sequences), initial=done, desc="Teacher logits", leave=False)
    for start in starts:
        shard = sequences[start:start + shard_sequences]
        logprobs, ids, offsets = [], [], [0]
        for first in range(0, len(shard), batch_size):
            batch = shard[first:first + batch_size]
            length = max(len(s) for s in batch)
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, s in enumerate(batch):
                input_ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[row, :len(s)] = 1
            values, indices = teacher_topk(run_teacher(input_ids, mask), top_k, vocab_size, chunk_size)
            for row, s in enumerate(batch):
                logprobs.append(values[row, :len(s)])
                ids.append(indices[row, :len(s)])
                offsets.append(offsets[-1] + len(s))
            if bar is not None:
                bar.update(len(batch))
        name = f"shard-{len(meta['shards']):05d}.safetensors"
        save_file({"logprobs": torch.cat(logprobs).contiguous(), "ids": torch.cat(ids).contiguous(),
                   "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(folder / name))
        meta["shards"].append({"file": name, "keys": [sequence_key(s) for s in shard]})
        (folder / CACHE_FILE).write_text(json.dumps(meta), encoding="utf-8")
    if bar is not None:
        bar.close()
    meta["complete"] = True
    (folder / CACHE_FILE).write_text(json.dumps(meta), encoding="utf-8")
    return folder


class LogitCache:
    """A complete cache folder, checked against the fingerprint of this run; `lookup` builds a batch's teacher."""

    def __init__(self, folder, expected: dict | None = None):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        meta = read_cache_meta(self.folder)
        if meta is None or not meta.get("complete"):
            what = "holds no cache" if meta is None else "holds an unfinished cache"
            raise SlimtuneError(f"teacher-logit cache {str(self.folder)!r} {what}; valid: a folder write_logit_cache "
                                "finished (a Distillation callback with a teacher writes it at fit start)")
        if expected is not None:
            _check_fingerprint(self.folder, meta["fingerprint"], expected)
        self.fingerprint = meta["fingerprint"]
        self.top_k = int(self.fingerprint["top_k"])
        self._rows: dict[str, tuple[int, int, int]] = {}
        self._shards: list[dict[str, Tensor]] = []
        for index, shard in enumerate(meta["shards"]):
            tensors = load_file(str(self.folder / shard["file"]))
            self._shards.append(tensors)
            offsets = tensors["offsets"].tolist()
            for position, key in enumerate(shard["keys"]):
                self._rows[key] = (index, offsets[position], offsets[position + 1])

    def __len__(self) -> int:
        return len(self._rows)

    def sequence(self, ids: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """The cached (length, k) log-probabilities and ids of one sequence; a one-line SlimtuneError if absent."""
        key = sequence_key(ids)
        found = self._rows.get(key)
        if found is None:
            raise SlimtuneError(f"teacher-logit cache {str(self.folder)!r} has no entry for a training sequence of "
                                f"{len(ids)} tokens: the data changed since it was written; valid: the data it was "
                                "written for, or a new cache folder")
        shard, start, end = found
        tensors = self._shards[shard]
        return tensors["logprobs"][start:end], tensors["ids"][start:end]

    def lookup(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TopKLogprobs:
        """The teacher of a right-padded batch (B, L) as `TopKLogprobs` (B, L, k); padding rows are zeros."""
        batch, length = input_ids.shape
        logprobs = torch.zeros((batch, length, self.top_k), dtype=torch.float32)
        ids = torch.zeros((batch, length, self.top_k), dtype=torch.int32)
        lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [length] * batch
        for row in range(batch):
            n = int(lengths[row])
            values, indices = self.sequence(input_ids[row, :n])
            logprobs[row, :n], ids[row, :n] = values, indices
        return TopKLogprobs(logprobs.to(input_ids.device), ids.to(input_ids.device))
