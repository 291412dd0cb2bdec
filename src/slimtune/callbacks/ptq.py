"""Post-training quantization (RTN, GPTQ, NF4, GPTQ-NF4, AWQ, AWQ+GPTQ, SmoothQuant W8A8) of the frozen base, with
LoRC-initialised LoRA, before fine-tuning.

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
   AWQ (`awq`, `awq_gptq`; `slimtune.quant.awq`): per-input-channel scales searched on the calibration activations
   and folded into the norm or linear before each group of layers (`slimtune.quant.folds`), then RTN or GPTQ of the
   scaled weights. SmoothQuant (`smoothquant`; `slimtune.quant.smoothquant`): outliers migrated into the weights with
   strength `alpha` (folded the same way), then `W8A8Linear` layers (8-bit per-channel weights, 8-bit per-token
   activations); the report carries the outlier monitor's largest max/median |x| ratio at the targets' inputs over the
   calibration set before and after smoothing (`ptq_outlier_ratio_before` / `_after`). Folding changes float tensors
   (norm gains, producer linears that are not targets): the state carries them too (`float_params`), and with LoRA the
   adapters read the scaled inputs (LoRC reconstructs the scaled weights), which is the same function.
3. LoRC (`lorc_rank` > 0): the LoRA factors of every wrapped layer are set to the rank-`lorc_rank` truncated SVD of
   `E = W - dequant(Q(W))`, with B divided by PEFT's scaling (alpha / r) so that `scaling * B @ A ~= E` and the layer
   computes `(Q + B A) x ~= W x` at step 0. `lorc_iters` > 1 alternates LoftQ-style (re-quantize `W - B A` with RTN /
   NF4, refit), keeping the iterate with the smallest residual. A rank below the LoRA r fills the first `lorc_rank`
   components; the rest keep PEFT's init (B columns zero, A rows random), so they train as usual.

With `PerplexityEvaluation` callbacks in the Trainer it records perplexity before quantization, after quantization and
after LoRC (`results["before_quant"]`, `["after_quant"]`, `["after_lorc"]`; `["before"]` is then the last of these and
`["after"]` comes at fit end), so a run's report shows all four. The callback must come BEFORE PerplexityEvaluation in
the callbacks list (slimtune's run sorts callbacks by `run_order`, 10 here; in your own Trainer list it first, or it
refuses to run).

Resume: `state_dict()` holds the quantized base (every quantized layer's buffers and its grid), so Lightning checkpoints
carry it even though slimtune's `CausalLMModule` keeps only trainable tensors. A resumed fit (`ckpt_path` given, or
state loaded with `load_state_dict`) rebuilds the quantized layers from that state without calibrating; the LoRA
weights come from the checkpoint as usual. Checkpoints grow by the quantized base (about bits/16 of the fp16 model).

In slimtune's run (the seam of `SlimtuneCallback`): `check_run` refuses a bitsandbytes base, a full fine-tune and an
`export.compressed_tensors` it cannot write, before anything is loaded; `check_model` refuses targets that match no
layer and group sizes compressed-tensors cannot store, before training; `report` adds `ptq_*` fields; `export` writes
`quantized/` (`slimtune.quant.save_quantized`, adapter included; `load_quantized(directory)` reloads it; on unless
`export.quantized=false`) and `compressed_tensors/` (`export.compressed_tensors=true`; the same base for vLLM).
`slimtune.models.save_merged` dequantizes `QuantLinear` layers for the dense merged model.

The torch/PEFT work lives in `slimtune.quant` (drivers, LoRC, layer state) and `slimtune.select` (which layers); this
module is the lifecycle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
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
    export_switch,
    is_sequence,
    log_to_loggers,
    resolve_tokenizer,
    show,
)
from slimtune.data.calibration import calibration_batches, calibration_source, check_calibration
from slimtune.errors import SlimtuneError, choices
from slimtune.quant.lorc import init_lora_from_factors, lorc_factors_for_layer
from slimtune.quant.nf4 import NF4_BLOCKSIZES
from slimtune.quant.state import is_quantized_layer, layer_state, rebuild_layer
from slimtune.quant.targets import adapters_disabled, layer_device, set_module
from slimtune.select import LayerRef, base_model, select_layers

METHODS = ("rtn", "gptq", "nf4", "gptq_nf4", "awq", "awq_gptq", "smoothquant")
NF4_METHODS = ("nf4", "gptq_nf4")  # bitsandbytes Linear4bit layers
AWQ_METHODS = ("awq", "awq_gptq")
FOLDING = ("awq", "awq_gptq", "smoothquant")  # scales folded into norms / linears: float tensors change too
CALIBRATED = ("gptq", "gptq_nf4", *FOLDING)
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


# --------------------------------------------------------------------------- the callback


class PostTrainingQuantization(SlimtuneCallback):
    """Quantizes the frozen base (RTN, GPTQ or NF4) at fit start and initialises LoRA from LoRC; see module docstring.

    `run_order` 10: it changes the model at fit start, so it runs before the callbacks that measure it.

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
        alpha: AWQ: null (the grid 0, 1/n_grid, ..., (n_grid-1)/n_grid) or floats in [0, 1] to search; SmoothQuant:
            the migration strength in [0, 1] (null: 0.5). Not used by the other methods (refused).
        n_grid: AWQ grid size. duo_scaling: AWQ scales mean|x|^a / mean|w|^(1-a). clip: AWQ weight clipping search
            (not q/k). max_search_tokens: AWQ scores each alpha on at most this many calibration tokens.
        int8_matmul: SmoothQuant layers compute inference forwards with `torch._int_mm` (int8 x int8 -> int32).
        SmoothQuant takes bits=8 and group_size=null (per output channel); its grids are symmetric.
    """

    run_order = 10
    exports = ("quantized", "compressed_tensors")

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
        alpha: Any = None,
        n_grid: int = 20,
        duo_scaling: bool = False,
        clip: bool = False,
        max_search_tokens: int | None = None,
        int8_matmul: bool = False,
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
        if method == "smoothquant":
            if bits != 8:
                raise SlimtuneError(f"PostTrainingQuantization bits={show(bits)} is not valid with method=smoothquant "
                                    "(W8A8); valid: 8")
            if group_size is not None:
                raise SlimtuneError(f"PostTrainingQuantization group_size={show(group_size)} is not valid with "
                                    "method=smoothquant (one weight scale per output channel); valid: null")
        for flag, value in (("symmetric", symmetric), ("act_order", act_order), ("double_quant", double_quant),
                            ("true_sequential", true_sequential), ("duo_scaling", duo_scaling), ("clip", clip),
                            ("int8_matmul", int8_matmul)):
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
        if not _is_int(n_grid) or n_grid < 1:
            raise SlimtuneError(f"PostTrainingQuantization n_grid={show(n_grid)} is not valid; valid: an int >= 1")
        if max_search_tokens is not None and (not _is_int(max_search_tokens) or max_search_tokens < 1):
            raise SlimtuneError(f"PostTrainingQuantization max_search_tokens={show(max_search_tokens)} is not valid; "
                                "valid: null or a positive int")
        self.alpha = self._check_alpha(method, alpha)
        unused = [f"{k}={show(v)}" for k, v, default, used in (
            ("n_grid", n_grid, 20, AWQ_METHODS), ("duo_scaling", duo_scaling, False, AWQ_METHODS),
            ("clip", clip, False, AWQ_METHODS), ("max_search_tokens", max_search_tokens, None, AWQ_METHODS),
            ("int8_matmul", int8_matmul, False, ("smoothquant",))) if v != default and method not in used]
        if unused:
            raise SlimtuneError(f"PostTrainingQuantization {unused[0]} is not valid with method={method}; valid: its "
                                "default (it is an AWQ setting, int8_matmul a SmoothQuant one)")
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
        self.n_grid = n_grid
        self.duo_scaling = duo_scaling
        self.clip = clip
        self.max_search_tokens = max_search_tokens
        self.int8_matmul = int8_matmul
        self.fold_summary: dict[str, Any] = {}  # AWQ / SmoothQuant figures for the report
        self.seconds: float | None = None
        self.n_layers = 0
        self.n_lorc = 0
        self._state: dict[str, Any] | None = None  # the quantized base: set after quantizing or by load_state_dict
        self._applied_to: int | None = None  # id() of the model the state has been applied to

    # ------------------------------------------------------------------ settings

    @staticmethod
    def _check_alpha(method: str, alpha: Any) -> Any:
        """AWQ: null (a grid of n_grid values) or floats in [0, 1]; SmoothQuant: one float in [0, 1] (default 0.5)."""
        from slimtune.quant.awq import check_alphas
        from slimtune.quant.smoothquant import check_alpha

        if alpha is None:
            return 0.5 if method == "smoothquant" else None
        if method == "smoothquant":
            return check_alpha(alpha, "PostTrainingQuantization alpha")
        if method in AWQ_METHODS:
            return list(check_alphas(list(alpha) if is_sequence(alpha) else alpha, "PostTrainingQuantization alpha"))
        raise SlimtuneError(f"PostTrainingQuantization alpha={show(alpha)} is not valid with method={method}; valid: "
                            f"null (alpha is for method={', '.join(FOLDING)})")

    def settings(self) -> dict[str, Any]:
        out = {"method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
               "act_order": self.act_order, "true_sequential": self.true_sequential, "damp": self.damp, "targets": self.targets, "exclude": self.exclude,
               "n_samples": self.n_samples, "seq_len": self.seq_len, "seed": self.seed,
               "lorc_rank": self.lorc_rank, "lorc_iters": self.lorc_iters, "double_quant": self.double_quant}
        if self.method in FOLDING:
            out.update(alpha=self.alpha, n_grid=self.n_grid, duo_scaling=self.duo_scaling, clip=self.clip,
                       max_search_tokens=self.max_search_tokens)
        return out

    def spec(self):
        from slimtune.quant import QuantSpec
        from slimtune.quant.nf4 import NF4Spec

        if self.method in NF4_METHODS:
            return NF4Spec(self.group_size or 64, self.double_quant)
        if self.method == "smoothquant":
            from slimtune.quant.smoothquant import W8A8_SPEC

            return W8A8_SPEC
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    # ------------------------------------------------------------------ the run's seam

    def check_run(self, cfg) -> None:
        """A float, frozen base (model.quantization=none, model.finetune=lora), and an export.compressed_tensors this
        method can write."""
        from slimtune.models.loading import finetune_of, quantization_of

        quant = quantization_of(cfg.model)
        if quant != "none":
            raise SlimtuneError(f"PostTrainingQuantization quantizes the base itself and cannot run on "
                                f"model.quantization={quant}; valid: model.quantization=none")
        if finetune_of(cfg.model) != "lora":
            raise SlimtuneError(f"PostTrainingQuantization needs a frozen base; model.finetune="
                                f"{cfg.model.get('finetune')} is not valid with it; valid: model.finetune=lora")
        if export_switch(cfg, "compressed_tensors"):
            if self.method in NF4_METHODS or self.method == "smoothquant":
                what = "bitsandbytes layers" if self.method in NF4_METHODS else "8-bit activations are not written"
                raise SlimtuneError(f"export.compressed_tensors=true is not valid with PostTrainingQuantization "
                                    f"method={self.method} ({what}); valid: method=gptq, rtn, awq or awq_gptq, or "
                                    "export.compressed_tensors=false")
            from slimtune.quant.compressed_tensors import require_library

            require_library()

    def check_strategy(self, strategy) -> None:
        """Not under DeepSpeed: ZeRO-3 partitions the weights this callback reads, and under ZeRO-2 the LoRC factors
        written at fit start would be replaced by DeepSpeed's fp32 master copy at the first step."""
        super().check_strategy(strategy)
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(strategy, DeepSpeedStrategy):
            raise SlimtuneError("PostTrainingQuantization cannot run under DeepSpeed (ZeRO partitions the weights it "
                                "quantizes and keeps its own copy of the LoRA it initialises); valid: strategy=ddp or "
                                "a single process for the PTQ run, then resume or fine-tune its export under DeepSpeed")

    def check_model(self, model: nn.Module, cfg) -> None:
        """The targets exist; with export.compressed_tensors, the group size divides every target's width."""
        targets = self._targets(model)
        if export_switch(cfg, "compressed_tensors"):
            from slimtune.quant.compressed_tensors import check_group_widths

            check_group_widths({ref.name: ref.layer.in_features for ref in targets}, self.group_size)

    def report(self) -> dict[str, Any]:
        """Items for the run's report."""
        out = {"ptq_method": self.method, "ptq_bits": self.bits, "ptq_group_size": self.group_size,
               "ptq_lorc_rank": self.lorc_rank or None, "ptq_layers": self.n_layers or None,
               "ptq_seconds": self.seconds, **self.fold_summary}
        return {k: v for k, v in out.items() if v is not None}

    def export(self, model: nn.Module, out_dir: Path, tokenizer, cfg) -> dict[str, str]:
        """`quantized/` (unless export.quantized=false) and `compressed_tensors/` (export.compressed_tensors=true);
        nothing for bitsandbytes NF4 bases (their adapter and merged model hold them)."""
        from slimtune.quant.compressed_tensors import export_compressed_tensors
        from slimtune.quant.export import export_quantized

        written = {}
        if export_switch(cfg, "quantized", default=True):
            folder = export_quantized(model, Path(out_dir) / "quantized", tokenizer)
            if folder is not None:
                written["quantized_dir"] = str(folder)
        if export_switch(cfg, "compressed_tensors"):
            folder = export_compressed_tensors(model, Path(out_dir) / "compressed_tensors", tokenizer)
            if folder is not None:
                written["compressed_tensors_dir"] = str(folder)
        return written

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
            from slimtune.quant.export import export_quantized

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

    def _targets(self, model: nn.Module) -> list[LayerRef]:
        """The layers to quantize: float, frozen nn.Linear layers (a one-line SlimtuneError for any other)."""
        targets = list(select_layers(model, self.targets, self.exclude, what="PostTrainingQuantization targets pattern",
                                     setting="PostTrainingQuantization targets").values())
        for t in targets:
            layer = t.layer
            if is_quantized_layer(layer) or not isinstance(layer, nn.Linear):
                already = is_quantized_layer(layer)
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
        return targets

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
        from slimtune.quant import (  # looked up here: tests replace them to prove a resumed run does not call them
            quantize_model_gptq,
            quantize_model_nf4,
            quantize_model_rtn,
        )

        started = time.perf_counter()
        pl_module = pl_module if pl_module is not None else model
        base = base_model(model)
        targets = self._targets(base)
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
        names = [t.name for t in targets]  # full plain names: each matches exactly its own layer
        keep = bool(lorc)
        # the quantizers mark the model for PEFT's 4-bit dispatch; the base of an existing PEFT model stays as it was
        had_flag = "is_loaded_in_4bit" in vars(base)
        if self.method in FOLDING:  # a layout without fold positions is refused before calibrating
            from slimtune.quant.folds import fold_table_for

            fold_table_for(base, "SmoothQuant" if self.method == "smoothquant" else "AWQ")
        changed: list[str] = []
        with adapters_disabled(base):
            if self.method in FOLDING:
                tokenizer = self._get_tokenizer(pl_module)
                batches = calibration_batches(self.calibration, tokenizer, self.n_samples, self.seq_len, self.seed)
                originals, changed = self._quantize_folding(base, batches, names, keep, show)
            elif self.method in CALIBRATED:
                tokenizer = self._get_tokenizer(pl_module)
                batches = calibration_batches(self.calibration, tokenizer, self.n_samples, self.seq_len, self.seed)
                originals = quantize_model_gptq(
                    base, batches, self.spec(), names, exclude=(), damp=self.damp, act_order=self.act_order,
                    true_sequential=self.true_sequential,
                    keep_original=keep, scale_dtype=SCALE_DTYPES[self.scale_dtype], progress=show)
            elif self.method == "rtn":
                originals = quantize_model_rtn(base, self.spec(), names, exclude=(), keep_original=keep,
                                               scale_dtype=SCALE_DTYPES[self.scale_dtype])
            else:
                spec = self.spec()
                compute = next(base.get_submodule(t.path).weight.dtype for t in targets)
                originals = quantize_model_nf4(base, names, exclude=(), blocksize=spec.blocksize,
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
                lora_a, lora_b, new = lorc_factors_for_layer(layer, originals.pop(t.path), self.lorc_rank,
                                                             self.lorc_iters, nf4)
                if new is not layer:
                    set_module(base, t.path, new)
                init_lora_from_factors(t.wrapper, adapters[t.name], lora_a, lora_b)
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
            "layers": {t.path: layer_state(base.get_submodule(t.path)) for t in targets},
        }
        if self.fold_summary:
            self._state["summary"] = dict(self.fold_summary)
        if changed:  # norm gains / producer linears the scales were folded into: the base is not the pretrained one
            self._state["float_params"] = {n: base.get_parameter(n).detach().to("cpu", copy=True) for n in changed}
        self._applied_to = id(model)
        self.seconds = time.perf_counter() - started
        if self.verbose and (trainer is None or trainer.is_global_zero):
            grid = f"{self.bits}-bit" + (f" g{self.group_size}" if self.group_size else "")
            lorc_note = f", LoRC rank {self.lorc_rank} on {len(lorc)}" if lorc else ""
            print(f"[slimtune] {self.method.upper()} {grid}: {len(targets)} layers quantized{lorc_note} "
                  f"in {self.seconds:.1f} s")
        return self._state

    def _quantize_folding(self, base: nn.Module, batches, names: list[str], keep: bool, show: bool):
        """AWQ (then RTN or GPTQ) or SmoothQuant (then W8A8) of `names`; returns (originals, changed float params)."""
        from slimtune.quant import quantize_model_awq  # looked up here: tests replace it to prove a resume skips it
        from slimtune.quant.awq import default_alphas
        from slimtune.quant.smoothquant import quantize_model_w8a8, smooth_model

        scale_dtype = SCALE_DTYPES[self.scale_dtype]
        if self.method in AWQ_METHODS:
            gptq = {"damp": self.damp, "act_order": self.act_order, "true_sequential": self.true_sequential} \
                if self.method == "awq_gptq" else {}
            result = quantize_model_awq(
                base, batches, self.spec(), names, exclude=(), method="gptq" if gptq else "rtn",
                alphas=self.alpha or default_alphas(self.n_grid), duo_scaling=self.duo_scaling, clip=self.clip,
                max_search_tokens=self.max_search_tokens, keep_original=keep, scale_dtype=scale_dtype, progress=show,
                **gptq)
            alphas = list(result.alphas.values())
            ratios = [a / r for a, r in result.errors.values() if r > 0]
            self.fold_summary = {"ptq_awq_mean_alpha": sum(alphas) / len(alphas) if alphas else None,
                                 "ptq_awq_error_vs_rtn": sum(ratios) / len(ratios) if ratios else None}
            return result.originals, result.changed
        before = self._outliers(base, batches, names)
        result = smooth_model(base, batches, names, exclude=(), alpha=self.alpha, progress=show)
        after = self._outliers(base, batches, names)
        originals = quantize_model_w8a8(base, names, exclude=(), int8_matmul=self.int8_matmul, keep_original=keep,
                                        scale_dtype=scale_dtype)
        self.fold_summary = {"ptq_outlier_ratio_before": before[0], "ptq_outlier_ratio_after": after[0],
                             "ptq_layers_at_risk_before": before[1], "ptq_layers_at_risk_after": after[1]}
        return originals, result.changed

    @staticmethod
    @torch.no_grad()
    def _outliers(base: nn.Module, batches, names: list[str]) -> tuple[float, int]:
        """The outlier monitor over the calibration batches: the largest max/median |x| ratio at the targets' inputs,
        and how many targets it finds at risk."""
        from slimtune.callbacks.outliers import ActivationOutlierMonitor

        monitor = ActivationOutlierMonitor(patterns=names, plot=False, verbose=False).attach(base)
        was_training = base.training
        base.eval()
        try:
            device = layer_device(base)
            for ids in batches:
                ids = ids["input_ids"] if isinstance(ids, dict) else ids
                base(input_ids=ids.to(device), use_cache=False)
            rows = monitor.summary()
        finally:
            monitor.detach()
            base.train(was_training)
        ratios = [r["max_median_ratio"] for r in rows if r["max_median_ratio"] == r["max_median_ratio"]]
        return (max(ratios) if ratios else float("nan")), sum(bool(r["at_risk"]) for r in rows)

    def _adapter_of(self, target: LayerRef) -> str:
        active = list(getattr(target.wrapper, "active_adapters", []) or [])
        adapter = next((a for a in active if a in target.wrapper.lora_A), None)
        if adapter is None:
            raise SlimtuneError(f"layer {target.name} has no active LoRA adapter; valid: a model with one active adapter")
        return adapter

    @torch.no_grad()
    def restore(self, model: nn.Module, verbose: bool | None = None) -> None:
        """Swap the quantized layers recorded in the state into `model` (no calibration)."""
        state = self._state or {}
        if state.get("version") != STATE_VERSION:
            raise SlimtuneError(f"PostTrainingQuantization state version={state.get('version')!r} is not valid; valid: {STATE_VERSION}")
        saved = state.get("settings", {})
        differ = {k: (saved[k], v) for k, v in self.settings().items() if k in saved and saved[k] != v}
        if differ:
            _warn(f"PostTrainingQuantization resumes with the checkpoint's quantized base; settings differing from "
                  f"this callback's are ignored: {', '.join(f'{k}={a!r} (not {b!r})' for k, (a, b) in differ.items())}")
        base = base_model(model)
        for path, entry in state["layers"].items():
            try:
                current = base.get_submodule(path)
            except AttributeError:
                raise SlimtuneError(f"quantized layer {path} of the checkpoint is not in the model; valid: the model "
                                    "the checkpoint was trained with (same LoRA targets)") from None
            if is_quantized_layer(current):
                continue  # already quantized (a second fit in the same process)
            shape = (getattr(current, "out_features", None), getattr(current, "in_features", None))
            if shape != (entry["out_features"], entry["in_features"]):
                raise SlimtuneError(f"quantized layer {path} of the checkpoint has shape {entry['out_features']}x"
                                    f"{entry['in_features']}, the model's is {shape[0]}x{shape[1]}; valid: the same model")
            set_module(base, path, rebuild_layer(entry, layer_device(current)))
        for name, tensor in (state.get("float_params") or {}).items():  # folded AWQ / SmoothQuant scales
            try:
                param = base.get_parameter(name)
            except AttributeError:
                raise SlimtuneError(f"parameter {name} of the checkpoint is not in the model; valid: the model the "
                                    "checkpoint was trained with") from None
            if tuple(param.shape) != tuple(tensor.shape):
                raise SlimtuneError(f"parameter {name} of the checkpoint has shape {tuple(tensor.shape)}, the model's "
                                    f"is {tuple(param.shape)}; valid: the same model")
            param.data.copy_(tensor.to(device=param.device, dtype=param.dtype))
        self.n_layers = len(state["layers"])
        self.fold_summary = dict(state.get("summary") or {})
        self._applied_to = id(model)
        if self.verbose if verbose is None else verbose:
            print(f"[slimtune] restored {self.n_layers} quantized layers from the checkpoint (no calibration)")

