"""What slimtune's callbacks share: a base class both Lightning packages accept, finding the model and tokenizer in a
user's LightningModule, and one-line checks of callback arguments.

Lightning ships twice: `lightning.pytorch` (the unified package) and `pytorch_lightning`, and each Trainer refuses
callbacks derived from the other's `Callback`. The two classes are the same code, so slimtune's callbacks derive from
every one that is installed and work in either Trainer.

The model a callback works on is found by `resolve_model`: the callback's `model=` argument (an `nn.Module`, or the
name / dotted path of an attribute of the LightningModule), else `pl_module.model`, else the only transformers
`PreTrainedModel` or PEFT `PeftModel` the LightningModule holds directly; anything else is a one-line SlimtuneError
saying where to put the model. Callbacks call it once per fit, through `SlimtuneCallback.model_for`.

`SlimtuneCallback` is also the seam between a compression method and slimtune's run (`slimtune.run`), which knows no
method by name: it sorts callbacks by `run_order`, calls `check_run(cfg)` before anything is loaded or written,
`check_model(model, cfg)` once the model is built, and `report()` and `export(...)` at the end. Each has a harmless
default, so a callback implements only what it needs; state for resume is Lightning's own `state_dict()` /
`load_state_dict()`.
"""

from __future__ import annotations

import math
import numbers
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from slimtune.errors import SlimtuneError


def _callback_bases() -> tuple[type, ...]:
    bases = []
    try:
        from lightning.pytorch import Callback as UnifiedCallback

        bases.append(UnifiedCallback)
    except ImportError:  # pragma: no cover - only pytorch_lightning installed
        pass
    try:
        from pytorch_lightning import Callback as ClassicCallback

        bases.append(ClassicCallback)
    except ImportError:
        pass
    if not bases:  # pragma: no cover
        raise ImportError("slimtune's callbacks need lightning (pip install lightning) or pytorch_lightning")
    return tuple(bases)


# --------------------------------------------------------------------------- showing values in messages


def show(value: Any) -> str:
    """A value as an error message names it: literals as repr, anything else (a module, a tensor) by its type, so
    the message stays one short line."""
    if value is None or isinstance(value, (str, bool, numbers.Number, os.PathLike)):
        text = repr(os.fspath(value) if isinstance(value, os.PathLike) else value)
    elif isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (str, bool, numbers.Number)) for v in value):
        text = repr(list(value))
    else:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- finding the model


def _hf_model_types() -> tuple[type, ...]:
    """transformers' PreTrainedModel and PEFT's PeftModel: the models a LightningModule may hold under any name."""
    types: list[type] = []
    try:
        from transformers import PreTrainedModel

        types.append(PreTrainedModel)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from peft import PeftModel

        types.append(PeftModel)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _held_modules(pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a LightningModule holds directly: its registered children, then modules kept as plain attributes
    (e.g. a frozen teacher stored with `self.__dict__[...]` so it stays out of `parameters()`); each module once."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    attributes = [(n, v) for n, v in vars(pl_module).items() if isinstance(v, nn.Module)]
    for name, module in [*pl_module.named_children(), *attributes]:
        if id(module) not in seen:
            seen.add(id(module))
            found.append((name, module))
    return found


def _where_to_put_it(owner: str) -> str:
    return (f"store it as self.model, pass model='<attribute>' (or model=<the nn.Module>) to {owner}, or hold exactly "
            "one transformers PreTrainedModel / PEFT PeftModel as an attribute")


def _model_at(pl_module: nn.Module, path: str, owner: str) -> nn.Module:
    owner_type = type(pl_module).__name__
    target: Any = pl_module
    for depth, part in enumerate(path.split(".")):
        if not hasattr(target, part):
            where = owner_type if depth == 0 else f"{owner_type}.{'.'.join(path.split('.')[:depth])}"
            held = ", ".join(repr(n) for n, _ in _held_modules(pl_module)) or "none"
            raise SlimtuneError(f"{owner} model={path!r}: {where} has no attribute {part!r}; valid: an attribute of "
                                f"{owner_type} holding the model (modules it holds: {held})")
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        raise SlimtuneError(f"{owner} model={path!r}: {owner_type}.{path} is a {type(target).__name__}, not an "
                            "nn.Module; valid: the attribute that holds the model")
    return target


def resolve_model(pl_module: Any, model: Any = None, owner: str = "slimtune callback") -> nn.Module:
    """The model a callback works on inside `pl_module` (see the module docstring); a one-line SlimtuneError else.

    `model` is the callback's `model=` argument: None (look it up), an attribute name or dotted path of `pl_module`
    (`"lm"`, `"wrapper.lm"`), or the `nn.Module` itself, which must be `pl_module` or held by it (a model from another
    LightningModule instance would be measured or quantized instead of the one being trained).
    """
    owner_type = type(pl_module).__name__
    if isinstance(model, str):
        return _model_at(pl_module, model, owner)
    if isinstance(model, nn.Module):
        held = (model is pl_module or any(m is model for m in pl_module.modules())
                or any(v is model for v in vars(pl_module).values()))
        if not held:
            raise SlimtuneError(f"{owner} model=<{type(model).__name__}> is not held by the {owner_type} being fit; "
                                f"valid: the model that {owner_type} instance holds, or model='<its attribute name>'")
        return model
    hf_types = _hf_model_types()
    if hf_types and isinstance(pl_module, hf_types):  # called with the model itself, outside a LightningModule
        return pl_module
    direct = getattr(pl_module, "model", None)
    if isinstance(direct, nn.Module):
        return direct
    candidates = [(n, m) for n, m in _held_modules(pl_module) if hf_types and isinstance(m, hf_types)]
    # a base model also held inside a PEFT model held beside it (`self.base`, `self.lm = get_peft_model(self.base)`)
    # is the same model: the outermost one stands for it
    candidates = [(n, m) for n, m in candidates
                  if not any(other is not m and any(x is m for x in other.modules()) for _, other in candidates)]
    if len(candidates) == 1:
        return candidates[0][1]
    if not candidates:
        raise SlimtuneError(f"{owner} found no model in {owner_type}: {_where_to_put_it(owner)}")
    named = ", ".join(f"{n} ({type(m).__name__})" for n, m in candidates)
    options = " or ".join(f"model={n!r}" for n, _ in candidates)
    raise SlimtuneError(f"{owner} found {len(candidates)} models in {owner_type}: {named}; valid: pass {options} to "
                        f"{owner}, or store the one it should use as self.model")


def check_model_arg(model: Any, owner: str) -> Any:
    """`model=` of a callback: None, an attribute name / dotted path, or an nn.Module."""
    if model is None or isinstance(model, nn.Module):
        return model
    if isinstance(model, str) and model and all(part.isidentifier() for part in model.split(".")):
        return model
    raise SlimtuneError(f"{owner} model={show(model)} is not valid; valid: null (find self.model or the only "
                        "transformers/PEFT model), an attribute name or dotted path such as 'lm', or an nn.Module")


# --------------------------------------------------------------------------- finding the tokenizer


def check_tokenizer_arg(tokenizer: Any, owner: str) -> Any:
    """`tokenizer=` of a callback: None, a path or hub name, or a tokenizer object (callable on text)."""
    if tokenizer is None or callable(tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)) and os.fspath(tokenizer):
        return os.fspath(tokenizer)
    raise SlimtuneError(f"{owner} tokenizer={show(tokenizer)} is not valid; valid: null (use the LightningModule's "
                        "self.tokenizer), a tokenizer, or a path / hub name AutoTokenizer.from_pretrained loads")


def load_tokenizer(source: str, owner: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SlimtuneError(f"{owner} tokenizer={source!r} could not be loaded ({first}); valid: a folder with a "
                            "tokenizer, or a hub name that is cached (no network here)") from None


def resolve_tokenizer(pl_module: Any, tokenizer: Any = None, owner: str = "slimtune callback",
                      purpose: str = "", required: bool = True):
    """The callback's `tokenizer=` (an object, or a path loaded with AutoTokenizer), else `pl_module.tokenizer`;
    None when `required` is false and there is none, else a one-line SlimtuneError saying where to put it."""
    found = tokenizer if tokenizer is not None else getattr(pl_module, "tokenizer", None)
    if isinstance(found, (str, os.PathLike)):
        found = load_tokenizer(os.fspath(found), owner)
    if found is None and required:
        why = f" {purpose}" if purpose else ""
        raise SlimtuneError(f"{owner} needs a tokenizer{why} and found none: pass tokenizer=<a tokenizer or its path> "
                            f"to {owner}, or store it as self.tokenizer in {type(pl_module).__name__}")
    return found


# --------------------------------------------------------------------------- argument checks


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(value: Any, key: str, owner: str) -> bool:
    if not isinstance(value, bool):
        raise SlimtuneError(f"{owner} {key}={show(value)} is not valid; valid: true, false")
    return value


def check_int(value: Any, key: str, owner: str, low: int, none_ok: bool = False) -> int | None:
    """An int >= `low` (bools, floats and strings refused), or None when `none_ok`."""
    if value is None and none_ok:
        return None
    if not _is_int(value) or value < low:
        valid = ("a positive int" if low == 1 else f"an int >= {low}") + (", or null" if none_ok else "")
        raise SlimtuneError(f"{owner} {key}={show(value)} is not valid; valid: {valid}")
    return int(value)


def check_number(value: Any, key: str, owner: str, low: float, high: float | None = None,
                 low_open: bool = True, high_open: bool = True) -> float:
    """A finite number in the given interval (bools and strings refused)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        if high is None:
            valid = ("a positive number" if low == 0 else f"a number > {low:g}") if low_open else f"a number >= {low:g}"
        else:
            valid = f"a number in {left}{low:g}, {high:g}{right}"
        raise SlimtuneError(f"{owner} {key}={show(value)} is not valid; valid: {valid}")
    return float(value)


def check_name(value: Any, key: str, owner: str) -> str:
    """A metric prefix: a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise SlimtuneError(f"{owner} {key}={show(value)} is not valid; valid: a non-empty string (a metric prefix)")
    return value


def check_path(value: Any, key: str, owner: str) -> str | None:
    """None or a non-empty path string."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return os.fspath(value)
    raise SlimtuneError(f"{owner} {key}={show(value)} is not valid; valid: a path, or null")


def is_sequence(value: Any) -> bool:
    """A list-like value (list, tuple, Hydra ListConfig), not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


# --------------------------------------------------------------------------- the base class


def export_switch(cfg, key: str, default: bool = False) -> bool:
    """Whether the run config asks for the export `export.<key>`: its value when true or false; `default` when it is
    null or absent (a callback's own default, e.g. PostTrainingQuantization writes `quantized/` unless told not to)."""
    value = (cfg.get("export") or {}).get(key)
    return default if value is None else bool(value)


class SlimtuneCallback(*_callback_bases()):
    """Base of slimtune's callbacks: a Callback of every installed Lightning package, with one way to find the model,
    and the seam through which slimtune's run drives a compression method (see the module docstring).

    A subclass stores its `model=` argument as `self.model` (checked with `check_model_arg`) and asks for the model
    with `model_for(pl_module)`, first in its `on_fit_start`.
    """

    model: Any = None

    run_order: ClassVar[int] = 100
    """Place in a run's callback list, lower first (the run sorts stably by it). Methods that change the model at fit
    start (quantization, one-shot pruning) use 10; callbacks that measure or watch the model keep 100."""

    exports: ClassVar[tuple[str, ...]] = ()
    """The `export.<key>` switches this callback writes (e.g. `quantized`); the run refuses `export.<key>=true` that
    no callback in it (and no built-in: adapter, merged) claims."""

    def check_run(self, cfg) -> None:
        """Check the composed run config before anything is loaded or written; raise a one-line SlimtuneError naming
        the setting this callback cannot work with and what is valid."""

    def check_model(self, model: nn.Module, cfg) -> None:
        """Check the built model before training (e.g. a format limit the export would otherwise hit at the end)."""

    def check_strategy(self, strategy) -> None:
        """Refuse, in one line, a Lightning strategy this callback cannot work under. The run calls it with the
        strategy its config builds, before anything is written; `setup` calls it in any Trainer.

        The default refuses FSDP: slimtune's callbacks read and run the model outside FSDP's root forward (perplexity
        would fail at fit start, statistics would count shards); DeepSpeed ZeRO-3 gathers on demand, so they run there.
        """
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(strategy, FSDPStrategy):
            raise SlimtuneError(f"{type(self).__name__} cannot run under FSDP yet; valid: strategy=deepspeed_zero3 or "
                                "ddp with slimtune's callbacks, or FSDP without them")

    def report(self) -> dict[str, Any]:
        """Fields merged into the run's report (prefix keys with this callback's own `name` where several instances
        may be in one run)."""
        return {}

    def export(self, model: nn.Module, out_dir: Path, tokenizer, cfg) -> dict[str, str]:
        """At fit end, on the main process: write this callback's artefacts under `out_dir`, into `out_dir/<key>` for
        each `export.<key>` of `exports` that is on (`export_switch`); return report keys -> paths
        (`{"quantized_dir": ".../quantized"}`)."""
        return {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._found = None  # each fit looks again: the LightningModule may be another one, or hold another model
        self.check_strategy(trainer.strategy)

    def model_for(self, pl_module) -> nn.Module:
        """The model this callback works on in `pl_module`, found once per fit (by whichever hook asks first)."""
        found = getattr(self, "_found", None)
        if found is not None and found[0]() is pl_module and found[1]() is not None:
            return found[1]()
        model = self.find_model(pl_module)
        self._found = (weakref.ref(pl_module), weakref.ref(model))  # weak: a kept callback does not keep the model
        return model

    def find_model(self, pl_module) -> nn.Module:
        """The single place a callback resolves its model (`resolve_model`); anything every callback must do to the
        model it works on belongs here."""
        from slimtune.quant.bnb4bit import guard_4bit

        model = resolve_model(pl_module, self.model, owner=type(self).__name__)
        guard_4bit(model)  # evaluations inside the fit must not cut gradients through bitsandbytes 4-bit layers
        return model


def log_to_loggers(trainer, metrics: dict[str, float]) -> None:
    """Log outside a training step (fit start/end), where `LightningModule.log` is not allowed."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
