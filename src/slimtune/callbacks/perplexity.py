"""Perplexity before and after fine-tuning, as a callback any Lightning Trainer can take."""

from __future__ import annotations

from typing import Any

import torch

from slimtune.callbacks._base import SlimtuneCallback, log_to_loggers, unwrap_model
from slimtune.errors import SlimtuneError
from slimtune.eval.perplexity import perplexity, read_eval_text, tokenize_eval_text

_MOMENTS = ("fit_start", "fit_end")


class PerplexityEvaluation(SlimtuneCallback):
    """Measures perplexity (GPTQ protocol: one stream, non-overlapping windows) at fit start and fit end.

    Text comes from `path` (a text file, or `wikitext2` for WikiText-2's test split / `wikitext2:valid`, found from any
    directory: $SLIMTUNE_DATA, ../shared/data beside the project, or the hub; see `slimtune.data.sources`), from
    `text`, or, when neither is given, from the datamodule's held-out split (`trainer.datamodule.heldout_token_ids()`).
    The tokenizer is `tokenizer` (an object or a
    path) or `pl_module.tokenizer`. Results land in `self.results` ({"before": {...}, "after": {...}}), in every
    logger as `<name>/ppl_before` and `<name>/ppl_after`, and in checkpoints, so a resumed run keeps its "before".
    """

    def __init__(
        self,
        path: str | None = None,
        text: str | None = None,
        tokenizer: Any = None,
        seq_len: int | None = None,
        max_windows: int | None = None,
        batch_size: int = 1,
        at: tuple[str, ...] | list[str] = _MOMENTS,
        name: str = "eval",
        progress: bool = True,
    ):
        if path is not None and text is not None:
            raise SlimtuneError("PerplexityEvaluation takes path or text, not both")
        if seq_len is not None and int(seq_len) <= 1:
            raise SlimtuneError(f"PerplexityEvaluation seq_len={seq_len} is not valid; valid: an integer > 1 or None")
        if max_windows is not None and int(max_windows) <= 0:
            raise SlimtuneError(f"PerplexityEvaluation max_windows={max_windows} is not valid; valid: a positive integer or None")
        if int(batch_size) <= 0:
            raise SlimtuneError(f"PerplexityEvaluation batch_size={batch_size} is not valid; valid: a positive integer")
        bad = [m for m in at if m not in _MOMENTS]
        if bad:
            raise SlimtuneError(f"PerplexityEvaluation at={bad} is not valid; valid: {', '.join(_MOMENTS)}")
        self.text = read_eval_text(path) if path is not None else text
        self.path = path
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len) if seq_len is not None else None
        self.max_windows = int(max_windows) if max_windows is not None else None
        self.batch_size = int(batch_size)
        self.at = tuple(at)
        self.name = name
        self.progress = progress
        self.results: dict[str, dict[str, float]] = {}
        self._token_ids: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def _tokenizer(self, pl_module):
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer is None:
            raise SlimtuneError("PerplexityEvaluation needs a tokenizer: pass tokenizer=... or set pl_module.tokenizer")
        return tokenizer

    def token_ids(self, trainer, pl_module) -> torch.Tensor:
        if self._token_ids is None:
            if self.text is not None:
                self._token_ids = tokenize_eval_text(self.text, self._tokenizer(pl_module))
            else:
                datamodule = getattr(trainer, "datamodule", None)
                heldout = getattr(datamodule, "heldout_token_ids", None)
                ids = heldout() if callable(heldout) else None
                if ids is None or ids.numel() == 0:
                    raise SlimtuneError("PerplexityEvaluation has no text: give path= or text=, or a datamodule with a held-out split")
                self._token_ids = ids
        return self._token_ids

    def _seq_len(self, model) -> int:
        if self.seq_len is not None:
            return self.seq_len
        config = getattr(model, "config", None)
        return int(min(getattr(config, "max_position_embeddings", 2048) or 2048, 2048))

    def evaluate(self, trainer, pl_module, moment: str) -> dict[str, float]:
        model = unwrap_model(pl_module)
        seq_len = self._seq_len(model)
        ids = self.token_ids(trainer, pl_module)
        if self.text is None:  # held-out blocks: windows no longer than one block
            block = getattr(getattr(trainer, "datamodule", None), "block_size", None)
            seq_len = min(seq_len, block) if block else seq_len
        result = perplexity(model, ids, seq_len, self.max_windows, self.batch_size, self.progress and trainer.is_global_zero,
                            desc=f"Perplexity ({moment})")
        log_to_loggers(trainer, {f"{self.name}/ppl_{moment}": result["ppl"]})
        return result

    def on_fit_start(self, trainer, pl_module) -> None:
        # A resumed run keeps its first measurement: it comes back with the checkpoint (before or after this hook).
        resuming = getattr(trainer, "ckpt_path", None) is not None
        if "fit_start" in self.at and "before" not in self.results and not resuming:
            self.results["before"] = self.evaluate(trainer, pl_module, "before")

    def on_fit_end(self, trainer, pl_module) -> None:
        if "fit_end" in self.at:
            self.results["after"] = self.evaluate(trainer, pl_module, "after")

    def state_dict(self) -> dict[str, Any]:
        return {"results": {k: dict(v) for k, v in self.results.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = {k: dict(v) for k, v in state_dict.get("results", {}).items()}
