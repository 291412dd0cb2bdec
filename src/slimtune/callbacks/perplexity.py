"""Perplexity before and after fine-tuning, as a callback any Lightning Trainer can take."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch

from slimtune.callbacks._base import (
    SlimtuneCallback,
    check_bool,
    check_int,
    check_model_arg,
    check_name,
    check_path,
    check_tokenizer_arg,
    is_sequence,
    log_to_loggers,
    resolve_tokenizer,
    show,
)
from slimtune.errors import SlimtuneError
from slimtune.eval.perplexity import perplexity, read_eval_text, tokenize_eval_text
from slimtune.quant.bnb4bit import fast_4bit_eval

_MOMENTS = ("fit_start", "fit_end")


def _check_causal_lm(model) -> None:
    """Perplexity calls `model(input_ids=...).logits` (a transformers causal LM does); say so before a deep TypeError."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature: let the call decide
        return
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "input_ids" not in parameters and not takes_kwargs:
        raise SlimtuneError(
            f"PerplexityEvaluation needs a causal LM called as model(input_ids=...) returning .logits; "
            f"{type(model).__name__}.forward takes ({', '.join(parameters)}); valid: a transformers / PEFT model "
            "(pass model='<attribute>' to choose it)"
        )


class PerplexityEvaluation(SlimtuneCallback):
    """Measures perplexity (GPTQ protocol: one stream, non-overlapping windows) at fit start and fit end.

    Text comes from `path` (a text file, or `wikitext2` for WikiText-2's test split / `wikitext2:valid`, found from any
    directory: $SLIMTUNE_DATA, ../shared/data beside the project, or the hub; see `slimtune.data.sources`), from
    `text`, or, when neither is given, from the datamodule's held-out split (`trainer.datamodule.heldout_token_ids()`).
    The tokenizer is `tokenizer` (an object or a
    path) or `pl_module.tokenizer`. Results land in `self.results` ({"before": {...}, "after": {...}}), in every
    logger as `<name>/ppl_before` and `<name>/ppl_after`, and in checkpoints, so a resumed run keeps its "before".

    Args:
        path: a text file to measure (its lines joined as the GPTQ papers do); not with `text`.
        text: the text itself; not with `path`. Neither: the datamodule's held-out split.
        tokenizer: a tokenizer or a path / hub name (default `pl_module.tokenizer`); only for `path` / `text`.
        seq_len: tokens per window (an int > 1); default the model's context, at most 2048 (and at most the
            datamodule's `block_size` for the held-out split).
        max_windows: measure at most this many windows (None: all).
        batch_size: windows per forward pass.
        at: when to measure: `fit_start`, `fit_end`, or both (a list).
        name: prefix of the logged metrics (`<name>/ppl_before`) and of this callback's checkpoint state.
        progress: show a progress bar.
        model: the model to measure: an `nn.Module`, or the name / dotted path of the LightningModule's attribute
            holding it (`"lm"`). Default: `pl_module.model`, else the only transformers / PEFT model it holds.
        fast_4bit: measure bitsandbytes 4-bit layers with bitsandbytes' fused bf16 CPU kernel (CPUs with
            avx512_bf16: about 2.7x faster; outputs differ by bf16 rounding, so perplexity moves in the 3rd-4th
            digit). The exact weights are restored before training continues. Default False: measure exactly what
            trains (`slimtune.quant.bnb4bit.fast_4bit_eval`).
    """

    def __init__(
        self,
        path: str | None = None,
        text: str | None = None,
        tokenizer: Any = None,
        seq_len: int | None = None,
        max_windows: int | None = None,
        batch_size: int = 1,
        at: str | tuple[str, ...] | list[str] = _MOMENTS,
        name: str = "eval",
        progress: bool = True,
        model: Any = None,
        fast_4bit: bool = False,
    ):
        owner = "PerplexityEvaluation"
        if path is not None and text is not None:
            raise SlimtuneError("PerplexityEvaluation takes path or text, not both")
        check_path(path, "path", owner)
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise SlimtuneError(f"PerplexityEvaluation text={show(text)} is not valid; valid: a non-empty string, or null")
        moments = [at] if isinstance(at, str) else list(at) if is_sequence(at) else None
        if not moments or not all(isinstance(m, str) for m in moments) or any(m not in _MOMENTS for m in moments):
            bad = [m for m in moments if m not in _MOMENTS] if moments else at
            raise SlimtuneError(f"PerplexityEvaluation at={show(bad)} is not valid; valid: {', '.join(_MOMENTS)} "
                                "(one, or a list of them)")
        self.text = read_eval_text(path) if path is not None else text
        self.path = path
        self.tokenizer = check_tokenizer_arg(tokenizer, owner)
        self.seq_len = check_int(seq_len, "seq_len", owner, 2, none_ok=True)
        self.max_windows = check_int(max_windows, "max_windows", owner, 1, none_ok=True)
        self.batch_size = check_int(batch_size, "batch_size", owner, 1)
        self.at = tuple(moments)
        self.name = check_name(name, "name", owner)
        self.progress = check_bool(progress, "progress", owner)
        self.model = check_model_arg(model, owner)
        self.fast_4bit = check_bool(fast_4bit, "fast_4bit", owner)
        self.results: dict[str, dict[str, float]] = {}
        self._token_ids: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def _tokenizer(self, pl_module):
        tokenizer = resolve_tokenizer(pl_module, self.tokenizer, "PerplexityEvaluation", "to tokenize its text")
        if isinstance(self.tokenizer, str):
            self.tokenizer = tokenizer  # a path is loaded once
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
        model = self.model_for(pl_module)
        _check_causal_lm(model)
        seq_len = self._seq_len(model)
        ids = self.token_ids(trainer, pl_module)
        if self.text is None:  # held-out blocks: windows no longer than one block
            block = getattr(getattr(trainer, "datamodule", None), "block_size", None)
            seq_len = min(seq_len, block) if block else seq_len
        with fast_4bit_eval(model) if self.fast_4bit else nullcontext():
            result = perplexity(model, ids, seq_len, self.max_windows, self.batch_size,
                                self.progress and trainer.is_global_zero, desc=f"Perplexity ({moment})")
        log_to_loggers(trainer, {f"{self.name}/ppl_{moment}": result["ppl"]})
        return result

    def on_fit_start(self, trainer, pl_module) -> None:
        model = self.model_for(pl_module)  # a model that cannot be found fails here, before any work
        _check_causal_lm(model)
        # A resumed run keeps its first measurement: it comes back with the checkpoint (before or after this hook).
        resuming = getattr(trainer, "ckpt_path", None) is not None
        if "fit_start" in self.at and "before" not in self.results and not resuming:
            self.results["before"] = self.evaluate(trainer, pl_module, "before")

    def on_fit_end(self, trainer, pl_module) -> None:
        if "fit_end" in self.at:
            self.results["after"] = self.evaluate(trainer, pl_module, "after")

    def report(self) -> dict[str, Any]:
        """`<name>_ppl_<moment>` for each measurement (before, after; with PostTrainingQuantization also
        before_quant, after_quant, after_lorc)."""
        return {f"{self.name}_ppl_{moment}": result["ppl"] for moment, result in self.results.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"results": {k: dict(v) for k, v in self.results.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = {k: dict(v) for k, v in state_dict.get("results", {}).items()}
