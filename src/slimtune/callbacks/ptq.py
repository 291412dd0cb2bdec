"""Post-training quantization (RTN, GPTQ, NF4, GPTQ-NF4) of the frozen base, with LoRC-initialised LoRA, before fine-tuning.

`PostTrainingQuantization` runs at fit start, on the model the LightningModule holds (`model=`, else `pl_module.model`,
else its only transformers / PEFT model; see `slimtune.callbacks._base.resolve_model`): a PEFT LoRA model (LoRA layers
wrapping `nn.Linear` base layers) or a plain transformers model with frozen linear layers.

1. Calibration (GPTQ and GPTQ-NF4; `slimtune.data.calibration`): `n_samples` random windows of `seq_len` tokens, seeded, from
   a named set or any text source the data layer reads: `c4` (the default: the C4 en validation sample, as the GPTQ
   paper calibrates; from $SLIMTUNE_DATA, ../shared/data beside the project, or the hub), `wikitext2` /
   `wikitext2:valid`, `corpus` (the embedded CC0 corpus), a JSONL/text/parquet file, folder or glob, or a data
   mapping (`path` or `dataset`); `default` is refused (see `slimtune.data.calibration`).
2. Quantization with `slimtune.quant`: each target's base layer is swapped in place for a `QuantLinear` (RTN, GPTQ) or
   a bitsandbytes `Linear4bit` (NF4: bitsandbytes rounds to nearest; GPTQ-NF4: the same storage and block scales,
   each 4-bit code chosen by GPTQ's error feedback, so the base is a QLoRA base that starts closer to the float model).
   In a PEFT model the LoRA layer stays and only its `base_layer` changes, so the
   adapters (and the optimizer that holds them) are untouched.
3. LoRC (`lorc_rank` > 0): the LoRA factors of every wrapped layer are set to the rank-`lorc_rank` truncated SVD of
   `E = W - dequant(Q(W))`, with B divided by PEFT's scaling (alpha / r) so that `scaling * B @ A ~= E` and the layer
   computes `(Q + B A) x ~= W x` at step 0. `lorc_iters` > 1 alternates LoftQ-style (re-quantize `W - B A` with RTN /
   NF4, refit), keeping the iterate with the smallest residual. A rank below the LoRA r fills the first `lorc_rank`
   components; the rest keep PEFT's init (B columns zero, A rows random), so they train as usual.

With `PerplexityEvaluation` callbacks in the Trainer it records perplexity before quantization, after quantization and
after LoRC (`results["before_quant"]`, `["after_quant"]`, `["after_lorc"]`; `["before"]` is then the last of these and
`["after"]` comes at fit end), so a run's report shows all four. The callback must come BEFORE PerplexityEvaluation in
the callbacks list (slimtune's run puts it first; in your own Trainer list it first, or it refuses to run).

Resume: `state_dict()` holds the quantized base (every quantized layer's buffers and its grid), so Lightning checkpoints
carry it even though slimtune's `CausalLMModule` keeps only trainable tensors. A resumed fit (`ckpt_path` given, or
state loaded with `load_state_dict`) rebuilds the quantized layers from that state without calibrating; the LoRA
weights come from the checkpoint as usual. Checkpoints grow by the quantized base (about bits/16 of the fp16 model).

Export: `export_quantized(model, directory)` writes the model with `slimtune.quant.save_quantized` (adapter included;
`load_quantized(directory)` reloads it); `slimtune.models.save_merged` dequantizes `QuantLinear` layers for the dense
merged model.
`export_compressed_tensors(model, directory)` writes the same base in compressed-tensors format for vLLM
(`slimtune.quant.save_compressed_tensors`); `check_compressed_tensors_export` refuses, before training, what that
format cannot hold.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.callbacks._base import (
    SlimtuneCallback,
    check_bool,
    check_model_arg,
    check_path,
    check_tokenizer_arg,
    is_sequence,
    log_to_loggers,
    resolve_tokenizer,
    show,
)
from slimtune.data.calibration import calibration_batches, calibration_source, check_calibration
from slimtune.errors import SlimtuneError, choices
from slimtune.quant.model import is_linear_like, select_names
from slimtune.quant.nf4 import NF4_BLOCKSIZES

METHODS = ("rtn", "gptq", "nf4", "gptq_nf4")
NF4_METHODS = ("nf4", "gptq_nf4")  # bitsandbytes Linear4bit layers
CALIBRATED = ("gptq", "gptq_nf4")
BITS = (2, 3, 4, 8)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STATE_VERSION = 1
MOMENTS = ("before_quant", "after_quant", "after_lorc")


def _warn(message: str) -> None:
    try:
        from lightning.pytorch.utilities import rank_zero_warn
    except ImportError:  # pragma: no cover
        import warnings

        warnings.warn(message, stacklevel=2)
    else:
        rank_zero_warn(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _progress_bar(iterable, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False)


# --------------------------------------------------------------------------- targets inside PEFT models


def _tuner_types() -> tuple[type, ...]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return ()
    return (BaseTunerLayer,)


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (LoRA layers still in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _Target:
    """A layer to quantize: its name without PEFT's `.base_layer`, the path of the layer that gets swapped, and the
    LoRA layer wrapping it (None for a plain linear layer)."""

    __slots__ = ("name", "path", "wrapper")

    def __init__(self, name: str, path: str, wrapper: nn.Module | None):
        self.name, self.path, self.wrapper = name, path, wrapper


def linear_targets(base: nn.Module, targets: str | Sequence[str] = "all-linear",
                   exclude: Sequence[str] = ("lm_head",)) -> list[_Target]:
    """The linear layers of `base` that `targets` names, seen through PEFT wrappers, in module order.

    Names are the plain model's (`model.layers.0.self_attn.q_proj`); a pattern matches a name that equals it, ends with
    `"." + pattern`, or matches it as a full regex. A pattern matching no layer raises SlimtuneError.
    """
    tuners = _tuner_types()
    tuner_names = [n for n, m in base.named_modules() if n and tuners and isinstance(m, tuners)]
    candidates: dict[str, _Target] = {}
    for name, module in base.named_modules():
        if not name or any(name.startswith(t + ".") for t in tuner_names):
            continue  # inside a LoRA layer: its base_layer is reached through the wrapper, lora_A/B are adapters
        if name in tuner_names:
            path, inner = name, module
            while hasattr(inner, "base_layer") and isinstance(inner.base_layer, nn.Module):
                path, inner = path + ".base_layer", inner.base_layer
            if is_linear_like(inner):
                candidates[name] = _Target(name, path, module)
        elif is_linear_like(module):
            candidates[name] = _Target(name, name, None)
    if not candidates:
        raise SlimtuneError(f"model {type(base).__name__} has no linear layers to quantize")
    found = set(select_names(candidates, targets, exclude, "targets pattern", "targets"))
    return [t for n, t in candidates.items() if n in found]


# --------------------------------------------------------------------------- the quantized state


def _layer_state(layer: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild a quantized layer without calibration (CPU tensors)."""
    from slimtune.quant import QuantLinear

    if isinstance(layer, QuantLinear):
        return {
            "kind": "quant_linear",
            "in_features": layer.in_features, "out_features": layer.out_features,
            "bits": layer.spec.bits, "group_size": layer.spec.group_size, "symmetric": layer.spec.symmetric,
            "act_order": layer.act_order,
            "dtype": str(layer.bias.dtype if layer.bias is not None else torch.float32).removeprefix("torch."),
            "tensors": {k: v.detach().cpu() for k, v in layer.state_dict().items()},
        }
    from slimtune.quant.bnb4bit import unpack_4bit

    unpack_4bit(layer)  # the stored layout, never bitsandbytes' CPU-packed one
    weight = layer.weight
    return {
        "kind": "nf4",
        "in_features": layer.in_features, "out_features": layer.out_features,
        "compute_dtype": str(layer.compute_dtype or torch.float32).removeprefix("torch."),
        "data": weight.data.detach().cpu(),
        "quant_state": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                        for k, v in weight.quant_state.as_dict(packed=True).items()},
        "bias": None if layer.bias is None else layer.bias.detach().cpu(),
    }


def _rebuild_layer(entry: Mapping[str, Any], device: torch.device) -> nn.Module:
    from slimtune.quant import QuantLinear, QuantSpec

    if entry["kind"] == "quant_linear":
        tensors = entry["tensors"]
        layer = QuantLinear(
            entry["in_features"], entry["out_features"],
            QuantSpec(entry["bits"], entry["group_size"], entry["symmetric"]),
            bias=tensors.get("bias") is not None, has_g_idx=tensors.get("g_idx") is not None,
            act_order=entry["act_order"], dtype=getattr(torch, entry["dtype"]),
            scale_dtype=tensors["scales"].dtype, device="cpu",
        )
        layer.load_state_dict({k: v for k, v in tensors.items() if v is not None})
        return layer.to(device)
    if entry["kind"] == "nf4":
        import bitsandbytes as bnb

        stats = dict(entry["quant_state"])
        layer = bnb.nn.Linear4bit(entry["in_features"], entry["out_features"], bias=entry["bias"] is not None,
                                  compute_dtype=getattr(torch, entry["compute_dtype"]), device="meta")
        layer.weight = bnb.nn.Params4bit.from_prequantized(entry["data"].to(device), stats, requires_grad=False,
                                                           device=device)
        if entry["bias"] is not None:
            layer.bias = nn.Parameter(entry["bias"].to(device), requires_grad=False)
        from slimtune.quant.bnb4bit import guard_4bit

        guard_4bit(layer)
        return layer
    raise SlimtuneError(f"quantized layer kind {entry['kind']!r} is not valid; valid: quant_linear, nf4")


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- LoRC


@torch.no_grad()
def _lorc_factors_for(layer: nn.Module, weight: torch.Tensor, rank: int, iters: int, nf4):
    """(A [rank, in], B [out, rank], layer) with B @ A ~= W - dequant(Q); LoftQ iterations may replace the codes."""
    from slimtune.quant import QuantLinear, apply_lorc, lorc_factors
    from slimtune.quant.nf4 import nf4_dequantize, nf4_linear

    if isinstance(layer, QuantLinear):
        holder = nn.Module()
        holder.add_module("layer", layer)
        (lora_a, lora_b), = apply_lorc(holder, rank, iters, {"layer": weight}).values()
        return lora_a, lora_b, layer
    # bitsandbytes NF4: same alternation, re-quantizing W - B A with NF4 (round to nearest; the first iterate keeps
    # GPTQ-NF4's codes, and the smallest residual wins).
    w = weight.to(device=layer.weight.device, dtype=torch.float32)
    best, current = None, layer
    for it in range(iters):
        if it > 0:
            current = nf4_linear((w - lora_b @ lora_a).to(weight.dtype), layer.bias, nf4,
                                 layer.compute_dtype or weight.dtype)
        error = w - nf4_dequantize(current)
        lora_a, lora_b = (f.float() for f in lorc_factors(error, rank))
        residual = torch.linalg.matrix_norm(error - lora_b @ lora_a).item()
        if best is None or residual < best[0]:
            best = (residual, lora_a, lora_b, current)
    return best[1], best[2], best[3]


@torch.no_grad()
def _init_lora(wrapper: nn.Module, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Set the first `k` LoRA components so that `scaling * B @ A` equals `lora_b @ lora_a` (rank k)."""
    k = lora_a.shape[0]
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    scaling = wrapper.scaling[adapter]
    a[:k].copy_(lora_a.to(device=a.device, dtype=a.dtype))
    b.zero_()
    b[:, :k].copy_((lora_b / scaling).to(device=b.device, dtype=b.dtype))


# --------------------------------------------------------------------------- the callback


class PostTrainingQuantization(SlimtuneCallback):
    """Quantizes the frozen base (RTN, GPTQ or NF4) at fit start and initialises LoRA from LoRC; see module docstring.

    Args:
        method: `rtn`, `gptq` (needs calibration data), `nf4` (bitsandbytes; bits=4, group_size = NF4 block size) or
            `gptq_nf4` (bitsandbytes NF4 storage and block scales, codes chosen by GPTQ from calibration data).
        bits: 2, 3, 4 or 8. group_size: input columns per scale (None: one per output row). symmetric: signed grid.
        act_order, damp: GPTQ's column order by Hessian diagonal and dampening (fraction of the mean diagonal).
        true_sequential: GPTQ calibrates a block's sublayer groups one after another (q/k/v -> o -> gate/up -> down),
            each on inputs computed with the groups before it already quantized (the reference's --true-sequential);
            false calibrates all of a block's layers in one pass (faster: 2 passes per block instead of 5).
        targets: `all-linear` or name patterns of the layers to quantize; exclude: patterns left out (`lm_head`).
        calibration: `c4` (or null: the C4 en validation sample), `wikitext2` (test split) / `wikitext2:valid`,
            `corpus` (the embedded corpus), a path/folder/glob, or a data mapping (`path` or `dataset`,
            `dataset_config`, `data_files`, `split`, `text_field`, `max_examples`) as `load_raw` reads it.
        n_samples, seq_len, seed: calibration windows (GPTQ: 128 x 2048 from C4, seed 0).
        lorc_rank: LoRC rank (None or 0: no LoRC); at most the LoRA r of the model. lorc_iters: LoftQ alternations.
        double_quant: NF4 double quantization of the block scales. scale_dtype: dtype of QuantLinear scales.
        tokenizer: a tokenizer or a path (default `pl_module.tokenizer`); needed by the calibrated methods.
        export_dir: also write the quantized model (`save_quantized`, adapter included) there at fit end.
        progress: progress bars over blocks / layers. verbose: print one line when the base is quantized or restored.
        model: the model to quantize: an `nn.Module`, or the name / dotted path of the LightningModule's attribute
            holding it (`"lm"`). Default: `pl_module.model`, else the only transformers / PEFT model it holds.
    """

    def __init__(
        self,
        method: str = "gptq",
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = False,
        act_order: bool = False,
        damp: float = 0.01,
        true_sequential: bool = False,
        targets: str | Sequence[str] = "all-linear",
        exclude: Sequence[str] = ("lm_head",),
        calibration: Any = None,
        n_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        lorc_rank: int | None = None,
        lorc_iters: int = 1,
        double_quant: bool = True,
        scale_dtype: str = "float16",
        tokenizer: Any = None,
        export_dir: str | None = None,
        progress: bool = True,
        verbose: bool = True,
        model: Any = None,
    ):
        owner = "PostTrainingQuantization"
        if not isinstance(method, str) or method not in METHODS:
            raise SlimtuneError(f"PostTrainingQuantization method={show(method)} is not valid; valid: {choices(METHODS)}")
        if not _is_int(bits) or bits not in BITS:
            raise SlimtuneError(f"PostTrainingQuantization bits={show(bits)} is not valid; valid: {choices(BITS)}")
        if group_size is not None and (not _is_int(group_size) or group_size <= 0):
            raise SlimtuneError(f"PostTrainingQuantization group_size={show(group_size)} is not valid; valid: a positive int or null")
        if method in NF4_METHODS:
            if bits != 4:
                raise SlimtuneError(f"PostTrainingQuantization bits={show(bits)} is not valid with method={method}; valid: 4")
            if group_size is not None and group_size not in NF4_BLOCKSIZES:
                raise SlimtuneError(
                    f"PostTrainingQuantization group_size={show(group_size)} is not an NF4 block size; valid: {choices(NF4_BLOCKSIZES)} or null (64)"
                )
        for flag, value in (("symmetric", symmetric), ("act_order", act_order), ("double_quant", double_quant),
                            ("true_sequential", true_sequential)):
            if not isinstance(value, bool):
                raise SlimtuneError(f"PostTrainingQuantization {flag}={show(value)} is not valid; valid: true, false")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or not 0 <= damp < 1:
            raise SlimtuneError(f"PostTrainingQuantization damp={show(damp)} is not valid; valid: a float in [0, 1)")
        if isinstance(targets, str):
            if targets != "all-linear" and not targets:
                raise SlimtuneError("PostTrainingQuantization targets='' is not valid; valid: all-linear or name patterns")
        elif not is_sequence(targets) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise SlimtuneError(f"PostTrainingQuantization targets={show(targets)} is not valid; valid: all-linear or a non-empty list of name patterns")
        if exclude is not None and not isinstance(exclude, str) and not is_sequence(exclude):
            raise SlimtuneError(f"PostTrainingQuantization exclude={show(exclude)} is not valid; valid: a list of name patterns")
        exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
        if not all(isinstance(p, str) and p for p in exclude):
            raise SlimtuneError(f"PostTrainingQuantization exclude={show(exclude)} is not valid; valid: a list of name patterns")
        for key, value, low in (("n_samples", n_samples, 1), ("seq_len", seq_len, 2), ("lorc_iters", lorc_iters, 1)):
            if not _is_int(value) or value < low:
                raise SlimtuneError(f"PostTrainingQuantization {key}={show(value)} is not valid; valid: an int >= {low}")
        if not _is_int(seed):
            raise SlimtuneError(f"PostTrainingQuantization seed={show(seed)} is not valid; valid: an int")
        if lorc_rank is not None and (not _is_int(lorc_rank) or lorc_rank < 0):
            raise SlimtuneError(f"PostTrainingQuantization lorc_rank={show(lorc_rank)} is not valid; valid: null or 0 (no LoRC), or a positive int")
        if not isinstance(scale_dtype, str) or scale_dtype not in SCALE_DTYPES:
            raise SlimtuneError(f"PostTrainingQuantization scale_dtype={show(scale_dtype)} is not valid; valid: {choices(SCALE_DTYPES)}")
        calibration_cfg = calibration_source(calibration)
        if method in CALIBRATED:
            check_calibration(calibration_cfg, what="PostTrainingQuantization calibration")
        self.method = method
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.act_order = act_order
        self.true_sequential = true_sequential
        self.damp = float(damp)
        self.targets = targets if isinstance(targets, str) else list(targets)
        self.exclude = exclude
        self.calibration = calibration_cfg
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.seed = seed
        self.lorc_rank = lorc_rank or 0
        self.lorc_iters = lorc_iters
        self.double_quant = double_quant
        self.scale_dtype = scale_dtype
        self.tokenizer = check_tokenizer_arg(tokenizer, owner)
        self.export_dir = check_path(export_dir, "export_dir", owner)
        self.progress = check_bool(progress, "progress", owner)
        self.verbose = check_bool(verbose, "verbose", owner)
        self.model = check_model_arg(model, owner)
        self.seconds: float | None = None
        self.n_layers = 0
        self.n_lorc = 0
        self._state: dict[str, Any] | None = None  # the quantized base: set after quantizing or by load_state_dict
        self._applied_to: int | None = None  # id() of the model the state has been applied to

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "act_order": self.act_order, "true_sequential": self.true_sequential, "damp": self.damp, "targets": self.targets, "exclude": self.exclude,
                "n_samples": self.n_samples, "seq_len": self.seq_len, "seed": self.seed,
                "lorc_rank": self.lorc_rank, "lorc_iters": self.lorc_iters, "double_quant": self.double_quant}

    def spec(self):
        from slimtune.quant import QuantSpec
        from slimtune.quant.nf4 import NF4Spec

        if self.method in NF4_METHODS:
            return NF4Spec(self.group_size or 64, self.double_quant)
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    def report(self) -> dict[str, Any]:
        """Items for the run's report."""
        out = {"ptq_method": self.method, "ptq_bits": self.bits, "ptq_group_size": self.group_size,
               "ptq_lorc_rank": self.lorc_rank or None, "ptq_layers": self.n_layers or None,
               "ptq_seconds": self.seconds}
        return {k: v for k, v in out.items() if v is not None}

    # ------------------------------------------------------------------ Lightning hooks

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("layers"):
            self._state = dict(state_dict)
            self._applied_to = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._check_order(trainer)

    def on_fit_start(self, trainer, pl_module) -> None:
        model = self.model_for(pl_module)
        resuming = getattr(trainer, "ckpt_path", None) is not None
        if self._state is None and resuming:
            self._state = self._state_from_checkpoint(trainer.ckpt_path)
        if self._state is not None:
            if self._applied_to != id(model):
                self.restore(model, verbose=self.verbose and trainer.is_global_zero)
            return
        self.quantize(model, trainer=trainer, pl_module=pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.export_dir and trainer.is_global_zero:
            export_quantized(self.model_for(pl_module), self.export_dir, self._get_tokenizer(pl_module, required=False))

    # ------------------------------------------------------------------ work

    def _check_order(self, trainer) -> None:
        from slimtune.callbacks.perplexity import PerplexityEvaluation

        callbacks = list(getattr(trainer, "callbacks", []))
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), None)
        early = [cb for cb in callbacks[:mine or 0] if isinstance(cb, PerplexityEvaluation) and "fit_start" in cb.at]
        if mine is not None and early:
            raise SlimtuneError(
                f"PostTrainingQuantization comes after PerplexityEvaluation({early[0].name!r}) in the callbacks list; "
                "valid: put PostTrainingQuantization first, so that the 'before' perplexity is the quantized model's"
            )

    def _get_tokenizer(self, pl_module, required: bool = True):
        tokenizer = resolve_tokenizer(pl_module, self.tokenizer, "PostTrainingQuantization",
                                      f"for method={self.method}'s calibration text", required)
        if isinstance(self.tokenizer, str):
            self.tokenizer = tokenizer  # a path is loaded once
        return tokenizer

    def _state_from_checkpoint(self, ckpt_path) -> dict[str, Any]:
        path = Path(str(ckpt_path))
        if not path.is_file():
            raise SlimtuneError(f"resuming from {str(path)!r}: the file does not exist; valid: a checkpoint of a PTQ run")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        if not state.get("layers"):
            raise SlimtuneError(
                f"checkpoint {str(path)!r} holds no PostTrainingQuantization state, so its adapters were not trained "
                "on a quantized base; valid: resume a run that had this callback, or start without ckpt_path"
            )
        return state

    def _ppl_callbacks(self, trainer) -> list:
        from slimtune.callbacks.perplexity import PerplexityEvaluation

        if trainer is None:
            return []
        return [cb for cb in trainer.callbacks if isinstance(cb, PerplexityEvaluation) and "fit_start" in cb.at]

    def _measure(self, trainer, pl_module, moment: str) -> None:
        for cb in self._ppl_callbacks(trainer):
            cb.results[moment] = cb.evaluate(trainer, pl_module, moment)

    def quantize(self, model: nn.Module, trainer=None, pl_module=None) -> dict[str, Any]:
        """Calibrate (GPTQ), quantize the targets of `model`, LoRC-initialise its LoRA layers; returns the state."""
        from slimtune.quant import (
            quantize_model_gptq,
            quantize_model_nf4,
            quantize_model_rtn,
        )

        started = time.perf_counter()
        pl_module = pl_module if pl_module is not None else model
        base = base_model_of(model)
        targets = linear_targets(base, self.targets, self.exclude)
        for t in targets:
            layer = base.get_submodule(t.path)
            if _is_bnb(layer) or not isinstance(layer, nn.Linear):
                already = _is_bnb(layer) or type(layer).__name__ == "QuantLinear"
                raise SlimtuneError(
                    f"layer {t.name} is {'already quantized ' if already else ''}({type(layer).__name__}); valid: "
                    + ("a float base (model.quantization=none) under PostTrainingQuantization" if already
                       else "nn.Linear layers (leave it out with exclude)")
                )
            if layer.weight.requires_grad:
                raise SlimtuneError(
                    f"layer {t.name} is trainable; valid: PostTrainingQuantization quantizes a frozen base "
                    "(model.finetune=lora, or freeze the layers)"
                )
        lorc = [t for t in targets if t.wrapper is not None and hasattr(t.wrapper, "lora_A")] if self.lorc_rank else []
        if self.lorc_rank and not lorc:
            raise SlimtuneError(
                f"PostTrainingQuantization lorc_rank={self.lorc_rank} needs LoRA layers on the quantized layers and the "
                "model has none; valid: lorc_rank=null, or a LoRA model (model.finetune=lora)"
            )
        adapters = {t.name: self._adapter_of(t) for t in lorc}
        for t in lorc:  # before any work: a rank LoRA cannot hold is a config error
            layer, r = base.get_submodule(t.path), t.wrapper.r[adapters[t.name]]
            limit = min(layer.in_features, layer.out_features, r)
            if self.lorc_rank > limit:
                raise SlimtuneError(
                    f"PostTrainingQuantization lorc_rank={self.lorc_rank} is not valid for layer {t.name} "
                    f"(LoRA r={r}, shape {layer.out_features}x{layer.in_features}); valid: 1 to {limit}"
                )
        show = self.progress and (trainer is None or trainer.is_global_zero)

        self._measure(trainer, pl_module, "before_quant")
        paths = [re.escape(t.path) for t in targets]
        keep = bool(lorc)
        # the quantizers mark the model for PEFT's 4-bit dispatch; the base of an existing PEFT model stays as it was
        had_flag = "is_loaded_in_4bit" in vars(base)
        with _adapters_disabled(base):
            if self.method in CALIBRATED:
                tokenizer = self._get_tokenizer(pl_module)
                batches = calibration_batches(self.calibration, tokenizer, self.n_samples, self.seq_len, self.seed)
                originals = quantize_model_gptq(
                    base, batches, self.spec(), paths, exclude=(), damp=self.damp, act_order=self.act_order,
                    true_sequential=self.true_sequential,
                    keep_original=keep, scale_dtype=SCALE_DTYPES[self.scale_dtype], progress=show)
            elif self.method == "rtn":
                originals = quantize_model_rtn(base, self.spec(), paths, exclude=(), keep_original=keep,
                                               scale_dtype=SCALE_DTYPES[self.scale_dtype])
            else:
                spec = self.spec()
                compute = next(base.get_submodule(t.path).weight.dtype for t in targets)
                originals = quantize_model_nf4(base, paths, exclude=(), blocksize=spec.blocksize,
                                               compress_statistics=spec.double_quant, compute_dtype=compute,
                                               keep_original=keep)
        if not had_flag:
            vars(base).pop("is_loaded_in_4bit", None)
        self.n_layers = len(targets)
        self._measure(trainer, pl_module, "after_quant")

        if lorc:
            nf4 = self.spec() if self.method in NF4_METHODS else None
            for t in _progress_bar(lorc, "LoRC layers", show):
                layer = base.get_submodule(t.path)
                lora_a, lora_b, new = _lorc_factors_for(layer, originals.pop(t.path), self.lorc_rank,
                                                        self.lorc_iters, nf4)
                if new is not layer:
                    _set_module(base, t.path, new)
                _init_lora(t.wrapper, adapters[t.name], lora_a, lora_b)
            self.n_lorc = len(lorc)
            self._measure(trainer, pl_module, "after_lorc")
        del originals

        for cb in self._ppl_callbacks(trainer):  # the fine-tune starts from here: that is its "before"
            last = next((cb.results[m] for m in reversed(MOMENTS) if m in cb.results), None)
            if last is not None and "before" not in cb.results:
                cb.results["before"] = dict(last)
                log_to_loggers(trainer, {f"{cb.name}/ppl_before": last["ppl"]})

        self._state = {
            "version": STATE_VERSION,
            "settings": self.settings(),
            "layers": {t.path: _layer_state(base.get_submodule(t.path)) for t in targets},
        }
        self._applied_to = id(model)
        self.seconds = time.perf_counter() - started
        if self.verbose and (trainer is None or trainer.is_global_zero):
            grid = f"{self.bits}-bit" + (f" g{self.group_size}" if self.group_size else "")
            lorc_note = f", LoRC rank {self.lorc_rank} on {len(lorc)}" if lorc else ""
            print(f"[slimtune] {self.method.upper()} {grid}: {len(targets)} layers quantized{lorc_note} "
                  f"in {self.seconds:.1f} s")
        return self._state

    def _adapter_of(self, target: _Target) -> str:
        active = list(getattr(target.wrapper, "active_adapters", []) or [])
        adapter = next((a for a in active if a in target.wrapper.lora_A), None)
        if adapter is None:
            raise SlimtuneError(f"layer {target.name} has no active LoRA adapter; valid: a model with one active adapter")
        return adapter

    @torch.no_grad()
    def restore(self, model: nn.Module, verbose: bool | None = None) -> None:
        """Swap the quantized layers recorded in the state into `model` (no calibration)."""
        from slimtune.quant import QuantLinear

        state = self._state or {}
        if state.get("version") != STATE_VERSION:
            raise SlimtuneError(f"PostTrainingQuantization state version={state.get('version')!r} is not valid; valid: {STATE_VERSION}")
        saved = state.get("settings", {})
        differ = {k: (saved[k], v) for k, v in self.settings().items() if k in saved and saved[k] != v}
        if differ:
            _warn(f"PostTrainingQuantization resumes with the checkpoint's quantized base; settings differing from "
                  f"this callback's are ignored: {', '.join(f'{k}={a!r} (not {b!r})' for k, (a, b) in differ.items())}")
        base = base_model_of(model)
        for path, entry in state["layers"].items():
            try:
                current = base.get_submodule(path)
            except AttributeError:
                raise SlimtuneError(f"quantized layer {path} of the checkpoint is not in the model; valid: the model "
                                    "the checkpoint was trained with (same LoRA targets)") from None
            if isinstance(current, QuantLinear) or _is_bnb(current):
                continue  # already quantized (a second fit in the same process)
            shape = (getattr(current, "out_features", None), getattr(current, "in_features", None))
            if shape != (entry["out_features"], entry["in_features"]):
                raise SlimtuneError(f"quantized layer {path} of the checkpoint has shape {entry['out_features']}x"
                                    f"{entry['in_features']}, the model's is {shape[0]}x{shape[1]}; valid: the same model")
            _set_module(base, path, _rebuild_layer(entry, _device_of(current)))
        self.n_layers = len(state["layers"])
        self._applied_to = id(model)
        if self.verbose if verbose is None else verbose:
            print(f"[slimtune] restored {self.n_layers} quantized layers from the checkpoint (no calibration)")


@contextmanager
def _adapters_disabled(base: nn.Module):
    """Calibrate the base alone: LoRA layers skip their adapters (flag only, no requires_grad change)."""
    tuners = _tuner_types()
    layers = [m for m in base.modules() if tuners and isinstance(m, tuners) and hasattr(m, "_disable_adapters")]
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, previous):
            m._disable_adapters = flag


# --------------------------------------------------------------------------- export and the run


def has_quant_layers(model: nn.Module) -> bool:
    from slimtune.quant import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def export_quantized(model: nn.Module, directory: str | Path, tokenizer=None) -> Path | None:
    """Write a model with QuantLinear layers with `save_quantized` (adapter included); None when it has none."""
    from slimtune.quant import save_quantized

    if not has_quant_layers(model):
        return None
    return save_quantized(model, directory, tokenizer, overwrite=True)


def check_run_config(cfg) -> None:
    """A run refuses PostTrainingQuantization on a bitsandbytes-quantized base or with a full fine-tune."""
    from slimtune.models.loading import quantization_of

    nodes = [(name, node) for name, node in (cfg.get("callbacks") or {}).items()
             if node is not None and str(node.get("_target_", "")).endswith("PostTrainingQuantization")]
    if not nodes:
        return
    quant = quantization_of(cfg.model)
    if quant != "none":
        raise SlimtuneError(
            f"callbacks.{nodes[0][0]} (PostTrainingQuantization) quantizes the base itself and cannot run on "
            f"model.quantization={quant}; valid: model.quantization=none"
        )
    if str(cfg.model.get("finetune", "lora")) != "lora":
        raise SlimtuneError(
            f"callbacks.{nodes[0][0]} (PostTrainingQuantization) needs a frozen base; model.finetune="
            f"{cfg.model.get('finetune')} is not valid with it; valid: model.finetune=lora"
        )


def check_compressed_tensors_export(callbacks: list, model: nn.Module) -> None:
    """Before training: export.compressed_tensors needs a GPTQ/RTN PostTrainingQuantization whose group size divides
    every target layer's width (compressed-tensors has no ragged groups), and the compressed-tensors package."""
    from slimtune.quant.compressed_tensors import _require_library

    ptq = [cb for cb in callbacks if isinstance(cb, PostTrainingQuantization)]
    if not ptq:
        raise SlimtuneError("export.compressed_tensors=true needs a PostTrainingQuantization callback (e.g. "
                            "callbacks=[ptq_gptq_w4]); valid: export.compressed_tensors=false without one")
    _require_library()
    base = base_model_of(model)
    for cb in ptq:
        if cb.method in NF4_METHODS:
            raise SlimtuneError(f"export.compressed_tensors=true is not valid with PostTrainingQuantization method={cb.method} "
                                "(bitsandbytes layers); valid: method=gptq or rtn, or export.compressed_tensors=false")
        if cb.group_size is None:
            continue
        for t in linear_targets(base, cb.targets, cb.exclude):
            width = base.get_submodule(t.path).in_features
            if width % cb.group_size:
                raise SlimtuneError(
                    f"export.compressed_tensors=true: layer {t.name} is {width} wide, not a multiple of "
                    f"group_size={cb.group_size} (compressed-tensors has no ragged groups); valid: a group size "
                    "dividing every target width, or export.compressed_tensors=false"
                )


def export_compressed_tensors(model: nn.Module, directory: str | Path, tokenizer=None) -> Path | None:
    """Write a model with QuantLinear layers in compressed-tensors format (vLLM); None when it has none."""
    from slimtune.quant.compressed_tensors import save_compressed_tensors

    if not has_quant_layers(model):
        return None
    return save_compressed_tensors(model, directory, tokenizer, overwrite=True)


def ptq_first(callbacks: list) -> list:
    """The callbacks with PostTrainingQuantization first (it must quantize before anything measures the model)."""
    return sorted(callbacks, key=lambda cb: not isinstance(cb, PostTrainingQuantization))
