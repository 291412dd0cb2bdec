"""Extra loss terms (distillation, MoE load balance, ...) from callbacks or any object, added to the training loss of
slimtune's `CausalLMModule` and of a user's own LightningModule, with no change to the user's code.

A Lightning callback cannot add to the loss: Lightning calls `training_step`, takes the loss it returns, divides it for
gradient accumulation, hands it to the precision plugin (loss scaling) and calls backward. So `attach_loss_terms`
wraps the LightningModule's `training_step` once, as an instance attribute (the class is untouched, and
`detach_loss_terms` of the last provider puts the original back): the wrapper returns the step's own loss plus every
attached provider's terms, and Lightning applies accumulation, precision and backward to that sum. Gradients are then
those of the summed loss by construction, under any accumulation, precision plugin or gradient checkpointing.

A provider (`LossTermProvider`) has a `name` and `loss_terms(pl_module, batch, batch_idx)`, returning named scalar
tensors already multiplied by their coefficients; it is attached in a callback's `setup` / `on_fit_start` and
detached in `teardown`. The wrapper logs each term as `train/loss_<key>` and the total as `train/loss_total` (or
under the LightningModule's `loss_total_key`: `CausalLMModule` logs its cross-entropy as `train/loss_ce` and the
total as `train/loss`).

`capture_outputs(module)` lets a provider read what a model or a submodule (an MoE router, a decoder layer) returned in
the current step: forward hooks that record only while a wrapped `training_step` runs, so the forwards that gradient
checkpointing recomputes inside backward (a router inside a checkpointed decoder layer runs again there) are not
recorded twice, and forwards outside training (validation, a teacher run inside `loss_terms`) not at all; the records
are dropped when the step ends.

This is Lightning wiring only; what a term computes belongs to its method (`slimtune.distill`, `slimtune.moe`, ...).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from slimtune.errors import SlimtuneError

__all__ = ["CapturedOutputs", "LossTermProvider", "TOTAL_KEY", "attach_loss_terms", "capture_outputs",
           "detach_loss_terms", "loss_providers"]

TOTAL_KEY = "train/loss_total"
RESERVED_KEYS = ("ce", "total")  # logged by the module / the wrapper themselves
_WIRING = "_slimtune_loss_terms"  # where a LightningModule keeps its providers (its __dict__, not a submodule)


@runtime_checkable
class LossTermProvider(Protocol):
    """Anything that adds named terms to the training loss."""

    name: str

    def loss_terms(self, pl_module: Any, batch: Any, batch_idx: int | None) -> Mapping[str, Tensor]:
        """Named scalar terms for this training step, already weighted; each is logged as `train/loss_<key>`."""
        ...


class _Wiring:
    """The providers attached to one LightningModule, and how to undo the wrapping."""

    def __init__(self, had_attribute: bool, original: Any):
        self.had_attribute = had_attribute  # training_step was an instance attribute before (put it back as it was)
        self.original = original
        self.providers: list[Any] = []
        self.wrapper: Any = None


def loss_providers(pl_module: nn.Module) -> list:
    """The providers attached to `pl_module`, in attachment order."""
    wiring = pl_module.__dict__.get(_WIRING)
    return list(wiring.providers) if wiring is not None else []


def attach_loss_terms(pl_module: nn.Module, provider: LossTermProvider) -> None:
    """Add `provider`'s terms to `pl_module`'s training loss from the next training step on (idempotent)."""
    name = getattr(provider, "name", None)
    if not isinstance(name, str) or not name or not callable(getattr(provider, "loss_terms", None)):
        raise SlimtuneError(f"{type(provider).__name__} is not a loss-term provider; valid: an object with a "
                            "non-empty `name` and a `loss_terms(pl_module, batch, batch_idx)` method")
    if not callable(getattr(pl_module, "training_step", None)):
        raise SlimtuneError(f"{type(pl_module).__name__} has no training_step; valid: a LightningModule")
    wiring = pl_module.__dict__.get(_WIRING)
    if wiring is None:
        wiring = _wrap(pl_module)
    if not any(p is provider for p in wiring.providers):
        wiring.providers.append(provider)


def detach_loss_terms(pl_module: nn.Module, provider: LossTermProvider) -> None:
    """Stop adding `provider`'s terms; with no provider left, `pl_module.training_step` is the original again."""
    wiring = pl_module.__dict__.get(_WIRING)
    if wiring is None:
        return
    wiring.providers = [p for p in wiring.providers if p is not provider]
    if wiring.providers:
        return
    del pl_module.__dict__[_WIRING]
    if pl_module.__dict__.get("training_step") is wiring.wrapper:  # else someone wrapped it again: ours passes through
        if wiring.had_attribute:
            pl_module.__dict__["training_step"] = wiring.original
        else:
            del pl_module.__dict__["training_step"]


def _wrap(pl_module: nn.Module) -> _Wiring:
    wiring = _Wiring("training_step" in pl_module.__dict__, pl_module.__dict__.get("training_step"))
    step = pl_module.training_step  # the bound method (or the instance attribute)
    module_ref = weakref.ref(pl_module)

    @functools.wraps(step)  # Lightning reads the signature through __wrapped__ (batch_idx, dataloader_iter)
    def training_step(*args, **kwargs):
        return _step_with_terms(module_ref(), wiring, step, args, kwargs)

    wiring.wrapper = training_step
    pl_module.__dict__["training_step"] = training_step
    pl_module.__dict__[_WIRING] = wiring
    return wiring


def _step_with_terms(pl_module, wiring: _Wiring, step, args: tuple, kwargs: dict):
    batch = args[0] if args else kwargs.get("batch")
    batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx")
    _RECORDING.begin_step()
    try:
        output = step(*args, **kwargs)
    finally:
        _RECORDING.stop()
    try:
        providers = list(wiring.providers)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not providers or not isinstance(loss, Tensor):
            return output  # a skipped step (None) or a malformed output: Lightning's own handling and messages
        terms: dict[str, Tensor] = {}
        for provider in providers:
            for key, term in dict(provider.loss_terms(pl_module, batch, batch_idx) or {}).items():
                terms[_checked_key(key, provider, terms)] = _checked_term(term, key, provider)
        total = loss + sum(terms.values()) if terms else loss
        for key, term in terms.items():
            pl_module.log(f"train/loss_{key}", term.detach().float(), on_step=True, on_epoch=False)
        pl_module.log(getattr(pl_module, "loss_total_key", TOTAL_KEY), total.detach().float(), prog_bar=True,
                      on_step=True, on_epoch=False)
    finally:
        _RECORDING.clear()
    return {**output, "loss": total} if isinstance(output, Mapping) else total


def _checked_key(key: Any, provider, terms: dict) -> str:
    owner = f"{type(provider).__name__}({provider.name!r}).loss_terms"
    if not isinstance(key, str) or not key.isidentifier():
        raise SlimtuneError(f"{owner} returned the key {key!r}; valid: a name such as 'kd' (logged as train/loss_kd)")
    if key in RESERVED_KEYS or key in terms:
        taken = "reserved" if key in RESERVED_KEYS else "already returned by another provider"
        raise SlimtuneError(f"{owner} returned the key {key!r}, which is {taken}; valid: a key not in "
                            f"{', '.join([*RESERVED_KEYS, *terms])}")
    return key


def _checked_term(term: Any, key: str, provider) -> Tensor:
    if not isinstance(term, Tensor) or term.numel() != 1 or not term.is_floating_point():
        shown = f"a {tuple(term.shape)} {term.dtype} tensor" if isinstance(term, Tensor) else type(term).__name__
        raise SlimtuneError(f"{type(provider).__name__}({provider.name!r}).loss_terms returned {shown} for {key!r}; "
                            "valid: a floating scalar tensor (already weighted)")
    return term.reshape(())


# --------------------------------------------------------------------------- what the model returned this step


class _Recording:
    """Whether a wrapped training_step's own forward is running, and the live captures to clear after each step."""

    def __init__(self):
        self.depth = 0
        self.captures: weakref.WeakSet[CapturedOutputs] = weakref.WeakSet()

    @property
    def active(self) -> bool:
        return self.depth > 0

    def begin_step(self) -> None:
        self.clear()
        self.depth += 1

    def stop(self) -> None:
        self.depth = max(0, self.depth - 1)

    def clear(self) -> None:
        for capture in list(self.captures):
            capture.clear()


_RECORDING = _Recording()


class CapturedOutputs:
    """The outputs a module returned during the current training step (see `capture_outputs`)."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise SlimtuneError(f"capture_outputs({type(module).__name__}) is not valid; valid: an nn.Module")
        self.module_name = type(module).__name__
        self._outputs: list[Any] = []
        self._handle = module.register_forward_hook(self._record)
        _RECORDING.captures.add(self)

    def _record(self, module, args, output) -> None:
        if _RECORDING.active:
            self._outputs.append(output)

    @property
    def outputs(self) -> list:
        """Every output of this step's forward calls, in call order (one per call; recomputations not counted)."""
        return list(self._outputs)

    @property
    def last(self) -> Any:
        """The last output of this step; a one-line SlimtuneError when the module was not called in it."""
        if not self._outputs:
            raise SlimtuneError(f"capture_outputs({self.module_name}) holds nothing in this training step; valid: "
                                "read it in loss_terms of an attached provider, after the module ran in training_step")
        return self._outputs[-1]

    def clear(self) -> None:
        self._outputs.clear()

    def remove(self) -> None:
        """Remove the hook (e.g. in the callback's teardown)."""
        self._handle.remove()
        self.clear()
        _RECORDING.captures.discard(self)

    def __enter__(self) -> CapturedOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def capture_outputs(module: nn.Module) -> CapturedOutputs:
    """Record what `module` returns in each training step's own forward (`outputs`, `last`); `remove()` when done."""
    return CapturedOutputs(module)
