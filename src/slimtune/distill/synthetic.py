"""Synthetic data for sequence-level distillation: the teacher answers a set of prompts (optionally reasoning step by
step), written as chat JSONL (`{"messages": [...]}` per line) that slimtune's data layer reads. No Lightning.

Prompts come from the embedded instruction set (`default_instruct`), a JSONL file (`prompt` or `messages` rows; the
conversation up to its last user turn is the prompt) or any data config the data layer loads (`{"dataset": ...}`).
Writing is resumable: each batch is appended and flushed, and a second call with the same output file (and batch size)
continues after the last complete batch (lines of a batch cut by an interruption are generated again). Each batch
samples from its own seed (`seed` + its first prompt's index), so an interrupted and resumed generation writes what an
uninterrupted one writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import SlimtuneError

__all__ = ["REASONING_INSTRUCTION", "generate_synthetic", "load_prompts"]

REASONING_INSTRUCTION = "Think step by step, then give the final answer."


def _conversation_prefix(row: Mapping[str, Any]) -> list[dict[str, str]] | None:
    if isinstance(row.get("messages"), Sequence):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        return messages[:last_user + 1] if last_user is not None else None
    if isinstance(row.get("prompt"), str):
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": row["prompt"]}]
    return None


def load_prompts(source: Any = "default_instruct", limit: int | None = None) -> list[list[dict[str, str]]]:
    """Conversations ending in a user turn: `default_instruct`, a JSONL path, or a data config (mapping)."""
    if isinstance(source, Mapping):
        from slimtune.data.datasets import load_raw

        rows = list(load_raw(source))
    else:
        from slimtune.data.datasets import default_instruct_path

        path = default_instruct_path() if source == "default_instruct" else os.fspath(source)
        if not Path(path).is_file():
            raise SlimtuneError(f"synthetic prompts {source!r} do not exist; valid: default_instruct, a JSONL file "
                                "with prompt or messages rows, or a data config")
        rows = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise SlimtuneError(f"synthetic prompts {path!r} line {number} is not JSON; valid: one JSON "
                                            "object per line") from None
    prompts = [p for p in (_conversation_prefix(row) for row in rows if isinstance(row, Mapping)) if p]
    if not prompts:
        raise SlimtuneError(f"synthetic prompts {source!r} hold no prompt; valid: rows with a 'prompt' string or "
                            "'messages' with a user turn")
    return prompts[:limit] if limit else prompts


def _complete_batches(path: Path, batch_size: int) -> int:
    """Keep the lines of `path` that complete batches (an interrupted write may leave half a line or half a batch,
    which is then generated again, with its own seed); their count."""
    if not path.is_file():
        return 0
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            kept.append(line)
    kept = kept[:len(kept) - len(kept) % batch_size]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
    return len(kept)


@torch.no_grad()
def generate_synthetic(model, tokenizer, out_path, prompts: Any = "default_instruct", max_new_tokens: int = 256,
                       temperature: float = 0.7, batch_size: int = 4, reasoning: bool = False, seed: int = 0,
                       limit: int | None = None, progress: bool = True) -> Path:
    """Write the teacher's answer to each prompt as a chat JSONL line; returns the file. Resumable (see the module
    docstring). `temperature` 0 decodes greedily."""
    from slimtune.data.datasets import ensure_chat_template

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SlimtuneError(f"synthetic max_new_tokens={max_new_tokens!r} is not valid; valid: a positive int")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise SlimtuneError(f"synthetic temperature={temperature!r} is not valid; valid: a number >= 0 (0: greedy)")
    conversations = prompts if isinstance(prompts, list) and prompts and isinstance(prompts[0], list) \
        else load_prompts(prompts, limit)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _complete_batches(out_path, batch_size)
    ensure_chat_template(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(conversations), initial=done, desc="Synthetic answers")
    try:
        with open(out_path, "a", encoding="utf-8") as handle:
            for start in range(done, len(conversations), batch_size):
                batch = conversations[start:start + batch_size]
                asked = [[*c[:-1], {**c[-1], "content": f"{c[-1]['content']}\n\n{REASONING_INSTRUCTION}"}]
                         if reasoning else c for c in batch]
                texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in asked]
                encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
                width = max(len(e) for e in encoded)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, e in enumerate(encoded):  # left padding
                    ids[row, width - len(e):] = torch.tensor(e)
                    mask[row, width - len(e):] = 1
                torch.manual_seed(seed + start)
                sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0} \
                    if temperature > 0 else {"do_sample": False}
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                     eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling)
                for conversation, completion in zip(asked, out[:, width:].tolist()):
                    answer = tokenizer.decode(completion, skip_special_tokens=True).strip()
                    record = {"messages": [*conversation, {"role": "assistant", "content": answer}]}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out_path
