"""Pruning with recovery: `GradualPruning` (masks grow along Zhu & Gupta's cubic schedule while the model trains, then
stay fixed for recovery) and `OneShotPruning` (magnitude, Wanda or SparseGPT at fit start, then recovery).

The math is `slimtune.prune` (pure torch); this module is the lifecycle:

* **Masks are enforced.** After every training batch (so after every optimizer step) the pruned weights are set to
  zero again, and before every optimizer step their gradients are zeroed, so neither the gradient nor the optimizer's
  moments (Adam keeps moving a weight whose gradient turned zero) nor weight decay bring them back.
* **LoRA.** With a frozen base and LoRA adapters, the base is pruned while the adapters train. Each pruned base layer
  carries its mask (`slimtune_prune_mask`), which `slimtune.models.merge` applies to the merged weight: the adapter's
  delta is masked, not added to pruned positions, so the merged model keeps the zeros. With `mask_adapter=true` the
  forward masks the delta too, so the trained model and the merged model compute the same thing.
* **Resume.** Masks, accumulated scores (movement, Taylor, Wanda's input norms) and the schedule's position are the
  callback's `state_dict`; a resumed fit re-applies the masks to the rebuilt base, so `ckpt_path=last` ends where the
  uninterrupted run ends. OneShotPruning also keeps SparseGPT's updated weights (the base is not in slimtune's
  checkpoints of a LoRA run).
* **Several processes (DDP).** Masks are computed on every rank and then broadcast from rank 0, so they are identical
  even for scores from each rank's own activations (Wanda). DeepSpeed is refused when pruned weights are trainable:
  its fp32 master copy would restore them.

Report: `prune_sparsity` (zeros over all targets), `prune_sparsity_<layer type>` (`q_proj`, ...), `prune_layers`,
`prune_target` (the schedule's last target); unless `export.pruning=false` (and in `export_dir`) a per-layer table
`sparsity.csv` and plot `sparsity.png` (with matplotlib installed), and `masks.safetensors`, which `load_masks` reads
to continue training; with `export.shrunk=true` the merged model with the pruned heads/channels removed from its
shapes and config (`shrunk/`, for granularity heads/channels).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.callbacks._base import (
    SlimtuneCallback,
    check_bool,
    check_int,
    check_model_arg,
    check_number,
    check_path,
    check_tokenizer_arg,
    export_switch,
    is_sequence,
    log_to_loggers,
    resolve_tokenizer,
    show,
)
from slimtune.errors import SlimtuneError, choices
from slimtune.prune.masks import (
    GRANULARITIES,
    STRUCTURED,
    find_structured_groups,
    global_masks,
    layer_mask,
    nm_mask,
    outlier_ratio,
    owl_sparsities,
    parse_nm,
    row_mask,
    structured_masks,
)
from slimtune.prune.schedule import CubicSchedule, check_sparsity
from slimtune.prune.scores import (
    NEEDS_ACTIVATIONS,
    NEEDS_GRADIENTS,
    SCORES,
    InputNormAccumulator,
    MovementScore,
    TaylorScore,
    magnitude_score,
    wanda_score,
)
from slimtune.select import LayerRef, base_model, name_matches, select_layers

MASK_ATTR = "slimtune_prune_mask"  # the keep-mask a pruned layer carries, read by the merge
STATE_VERSION = 1

__all__ = ["GradualPruning", "MASK_ATTR", "OneShotPruning", "load_masks", "save_masks"]


def _patterns(value: Any, key: str, owner: str) -> str | list[str]:
    if isinstance(value, str) and value:
        return value
    if is_sequence(value) and value and all(isinstance(t, str) and t for t in value):
        return list(value)
    raise SlimtuneError(f"{owner} {key}={show(value)} is not valid; valid: all-linear or a non-empty list of name patterns")


def _exclude(value: Any, owner: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not is_sequence(value) or not all(isinstance(p, str) and p for p in value):
        raise SlimtuneError(f"{owner} exclude={show(value)} is not valid; valid: a list of name patterns")
    return list(value)


def _layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_of(name: str) -> str:
    match = re.search(r"^(.*?\.\d+)\.", name)
    return match.group(1) if match else name


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write keep-masks (layer name -> bool tensor) as safetensors (uint8), for `load_masks`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: mask.to("cpu", torch.uint8).contiguous() for name, mask in masks.items()}, str(path))
    return path


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Keep-masks written by `save_masks` (e.g. `<output_dir>/pruning/masks.safetensors`), as bool tensors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"masks file {str(path)!r} does not exist; valid: a masks.safetensors a pruning run wrote")
    return {name: t.bool() for name, t in load_file(str(path)).items()}


class _MaskedTraining(SlimtuneCallback):
    """What both pruning callbacks do with masks: hold them, keep them enforced, share them across processes, report,
    export, and carry them through checkpoints."""

    exports = ("pruning", "shrunk")
    owner = "pruning"

    def _init_common(self, targets, exclude, export_dir, model, masks_path=None, mask_adapter=False) -> None:
        owner = type(self).__name__
        self.mask_adapter = check_bool(mask_adapter, "mask_adapter", owner)
        self._adapter_hooks: dict[str, Any] = {}
        self.targets = _patterns(targets, "targets", owner)
        self.exclude = _exclude(exclude, owner)
        self.export_dir = check_path(export_dir, "export_dir", owner)
        self.masks_path = check_path(masks_path, "masks", owner)
        self.model = check_model_arg(model, owner)
        self.masks: dict[str, torch.Tensor] = {}  # layer name -> keep-mask (bool, on the layer's device)
        self._refs: dict[str, LayerRef] = {}
        self._grad_handles: list = []
        self._pending_state: dict[str, Any] | None = None
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ layers and masks

    def _targets(self, model: nn.Module) -> dict[str, LayerRef]:
        owner = type(self).__name__
        refs = select_layers(model, self.targets, self.exclude, what=f"{owner} targets pattern",
                             setting=f"{owner} targets")
        for name, ref in refs.items():
            weight = getattr(ref.layer, "weight", None)
            if not isinstance(ref.layer, nn.Linear) or not isinstance(weight, torch.Tensor) \
                    or not weight.is_floating_point() or type(ref.layer).__module__.startswith("bitsandbytes"):
                raise SlimtuneError(f"{owner} needs float nn.Linear layers; layer {name} is {type(ref.layer).__name__}; "
                                    "valid: a float base (model.quantization=none), or exclude the layer")
        return refs

    def _check_trainable_under_deepspeed(self, trainer) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy) and any(r.layer.weight.requires_grad for r in self._refs.values()):
            raise SlimtuneError(f"{type(self).__name__} cannot keep trainable pruned weights at zero under DeepSpeed "
                                "(its fp32 master copy restores them); valid: strategy=ddp, or a LoRA run "
                                "(model.finetune=lora) whose frozen base is pruned")

    @torch.no_grad()
    def _set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Adopt `masks`, zero the pruned weights and let each layer carry its mask (for the merge)."""
        for name, mask in masks.items():
            layer = self._refs[name].layer
            mask = mask.to(device=layer.weight.device, dtype=torch.bool)
            self.masks[name] = mask
            layer.weight.data.mul_(mask)
            setattr(layer, MASK_ATTR, mask)
            wrapper = self._refs[name].wrapper
            if self.mask_adapter and wrapper is not None and hasattr(wrapper, "get_delta_weight") \
                    and name not in self._adapter_hooks:
                self._adapter_hooks[name] = wrapper.register_forward_hook(self._masked_delta_hook(name))

    def _masked_delta_hook(self, name: str):
        """The LoRA layer computes `base(x) + delta x`; take back the delta's pruned positions, so the layer computes
        with `mask * (W + delta)`, what the merged model holds."""
        import torch.nn.functional as F

        def hook(module, inputs, output):
            if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
                return output
            adapters = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
            if not adapters:
                return output
            delta = sum(module.get_delta_weight(a) for a in adapters)
            pruned = delta * ~self.masks[name].to(delta.device)
            return output - F.linear(inputs[0].to(pruned.dtype), pruned).to(output.dtype)
        return hook

    @torch.no_grad()
    def enforce(self) -> None:
        """Zero the pruned weights again (after an optimizer step)."""
        for name, mask in self.masks.items():
            self._refs[name].layer.weight.data.mul_(mask)

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        for name, mask in self.masks.items():
            grad = self._refs[name].layer.weight.grad
            if grad is not None:
                grad.mul_(mask)

    def _broadcast(self, masks: dict[str, torch.Tensor], trainer) -> dict[str, torch.Tensor]:
        """Rank 0's masks on every rank (one collective per layer)."""
        if trainer is None or trainer.world_size == 1:
            return masks
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return masks
        device = trainer.strategy.root_device
        out = {}
        for name, mask in masks.items():
            buffer = mask.to(device=device, dtype=torch.uint8).contiguous()
            dist.broadcast(buffer, src=0)
            out[name] = buffer.bool().to(mask.device)
        return out

    @torch.no_grad()
    def _broadcast_weights(self, trainer) -> None:
        """Rank 0's target weights on every rank."""
        if trainer is None or trainer.world_size == 1:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = trainer.strategy.root_device
        for ref in self._refs.values():
            buffer = ref.layer.weight.data.to(device).contiguous()
            dist.broadcast(buffer, src=0)
            ref.layer.weight.data.copy_(buffer)

    # ------------------------------------------------------------------ numbers

    def sparsity(self) -> dict[str, Any]:
        """Zeros over all targets, per layer type and per layer (of the weights themselves, not the masks)."""
        per_layer, per_type, zeros, total = {}, {}, 0, 0
        for name, ref in self._refs.items():
            w = ref.layer.weight
            z, n = int((w == 0).sum()), w.numel()
            per_layer[name] = z / n
            t = per_type.setdefault(_layer_type(name), [0, 0])
            t[0] += z
            t[1] += n
            zeros += z
            total += n
        return {"overall": zeros / max(total, 1), "by_type": {k: z / n for k, (z, n) in per_type.items()},
                "by_layer": per_layer}

    def report(self) -> dict[str, Any]:
        if not self._refs:
            return {}
        s = self.sparsity()
        out: dict[str, Any] = {"prune_method": self.method_name(), "prune_layers": len(self._refs),
                               "prune_sparsity": s["overall"]}
        out.update({f"prune_sparsity_{k}": v for k, v in s["by_type"].items()})
        out.update({f"prune_{k}": v for k, v in self.stats.items()})
        return out

    def method_name(self) -> str:
        return type(self).__name__

    def export(self, model: nn.Module, out_dir: Path, tokenizer, cfg) -> dict[str, str]:
        if not self._refs:
            return {}
        written = {}
        if export_switch(cfg, "pruning", default=True):
            written["pruning_dir"] = str(self.write_tables(Path(out_dir) / "pruning"))
        if export_switch(cfg, "shrunk"):
            written["shrunk_dir"] = str(self.write_shrunk(model, Path(out_dir) / "shrunk", tokenizer))
            written.update({f"prune_{k}": v for k, v in self.stats.items() if k.startswith("shrunk_")})
        return written

    def write_shrunk(self, model: nn.Module, directory: Path, tokenizer=None) -> Path:
        """The merged model (adapters folded in, zeros kept) with the fully pruned MLP channels and attention heads
        removed from its shapes and config (`slimtune.prune.shrink_model`): smaller, and stock transformers loads it."""
        from slimtune.models.merge import atomic_directory, merge_to_dense
        from slimtune.prune.shrink import shrink_model

        dense = merge_to_dense(model, next(iter(self._refs.values())).layer.weight.dtype)
        removed = shrink_model(dense, {n: m.cpu() for n, m in self.masks.items()})
        self.stats.update({f"shrunk_{k}": v for k, v in removed.items()})
        self.stats["shrunk_params"] = sum(p.numel() for p in dense.parameters())
        with atomic_directory(directory) as tmp:
            dense.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return Path(directory)

    def write_tables(self, folder: Path) -> Path:
        """`sparsity.csv` (layer, type, shape, sparsity), `sparsity.png` (if matplotlib is installed) and
        `masks.safetensors` in `folder`."""
        import csv

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        s = self.sparsity()
        with open(folder / "sparsity.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "type", "out_features", "in_features", "sparsity"])
            for name, value in s["by_layer"].items():
                layer = self._refs[name].layer
                writer.writerow([name, _layer_type(name), layer.out_features, layer.in_features, f"{value:.6f}"])
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the plot is optional; the table is the record
            pass
        else:
            names = list(s["by_layer"])
            fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.25), 4))
            types = sorted({_layer_type(n) for n in names})
            colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(types)}
            ax.bar(range(len(names)), [s["by_layer"][n] for n in names], color=[colors[_layer_type(n)] for n in names])
            ax.set_xlabel("layer (module order)")
            ax.set_ylabel("sparsity")
            ax.set_ylim(0, 1)
            ax.set_title(f"{self.method_name()}: {s['overall']:.1%} zeros over {len(names)} layers")
            ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in types], labels=types, fontsize=7)
            fig.tight_layout()
            fig.savefig(folder / "sparsity.png", dpi=100)
            plt.close(fig)
        save_masks(self.masks, folder / "masks.safetensors")
        return folder

    # ------------------------------------------------------------------ Lightning hooks

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._mask_gradients()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.enforce()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.export_dir and trainer.is_global_zero:
            self.write_tables(Path(self.export_dir))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles = []  # the adapter hooks stay: after the fit the model still computes as it trained

    def _common_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "masks": {n: m.to("cpu") for n, m in self.masks.items()},
                "stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("version") != STATE_VERSION:
            raise SlimtuneError(f"{type(self).__name__} state version={state_dict.get('version')!r} is not valid; "
                                f"valid: {STATE_VERSION}")
        self._pending_state = dict(state_dict)

    def _masks_from_file(self) -> dict[str, torch.Tensor]:
        masks = load_masks(self.masks_path)
        unknown = [n for n in masks if n not in self._refs]
        if unknown:
            raise SlimtuneError(f"masks file {self.masks_path!r} names layer {unknown[0]} that is not a target of "
                                f"{type(self).__name__}; valid: the targets the masks were made for")
        for name, mask in masks.items():
            shape = tuple(self._refs[name].layer.weight.shape)
            if tuple(mask.shape) != shape:
                raise SlimtuneError(f"mask of layer {name} has shape {tuple(mask.shape)}, the layer {shape}; valid: "
                                    "masks of the same model")
        return masks


# --------------------------------------------------------------------------- gradual


class GradualPruning(_MaskedTraining):
    """Prune while fine-tuning, along Zhu & Gupta's cubic schedule counted in optimizer steps; see module docstring.

    Args:
        final_sparsity: fraction of each target's weights zeroed from `end_step` on (ignored with `nm`, where it is
            1 - N/M). initial_sparsity: the target at `start_step`.
        start_step, end_step: the schedule's first and last update (optimizer steps; `end_step` <= trainer.max_steps).
            After `end_step` the masks stay fixed: the recovery phase.
        update_every: steps between mask updates.
        score: `magnitude`, `wanda` (|W| x input-channel norm over the training tokens seen so far), `movement`
            (accumulated -W x grad) or `taylor` (|W x grad|); the last two need trainable targets (full fine-tuning).
        granularity: `layer`, `row` (per output row), `global` (one threshold over all targets), `nm` (with `nm`),
            `heads` (whole attention heads: q_proj rows and o_proj columns) or `channels` (whole MLP intermediate
            channels: gate/up rows and down columns).
        nm: `"2:4"`, `"4:8"`, ...: N of every M kept; the schedule raises the zeros per group of M from 0 to M - N.
        layer_sparsity: `{pattern: final sparsity}` for the targets a pattern matches (first match wins), e.g.
            `{'.*self_attn.*': 0.3}` keeps attention denser (patterns follow `slimtune.select`: a plain name matches a
            layer name's end, anything else is a regex over the full name); the others use `final_sparsity`. Scaled
            along the schedule.
        owl: `{lambda: 0.08, threshold: 5}`: OWL's per-block sparsities (averaging `final_sparsity`, lower for blocks
            with more outlier scores), fixed at the first update.
        targets, exclude: layers (slimtune.select's rule); default every linear layer but `lm_head`.
        masks: a `masks.safetensors` (from an earlier run's export) to start from: those weights are zeroed at fit
            start and stay pruned until the schedule's masks replace them.
        mask_adapter: with LoRA, mask the adapter's delta in the forward too, so the model trains as the merged model
            computes (`mask * (W + delta)`); costs one more dense matmul per pruned layer. Off: the adapters train
            dense and only the merge masks their delta.
        export_dir: also write the sparsity table, plot and masks there at fit end.
        model: the model (see `slimtune.callbacks._base.resolve_model`).
    """

    def __init__(
        self,
        final_sparsity: float | None = 0.5,
        end_step: int | None = None,
        start_step: int = 0,
        initial_sparsity: float = 0.0,
        update_every: int = 1,
        score: str = "magnitude",
        granularity: str = "layer",
        nm: str | None = None,
        layer_sparsity: Mapping[str, float] | None = None,
        owl: Mapping[str, float] | None = None,
        targets: str | Sequence[str] = "all-linear",
        exclude: Sequence[str] = ("lm_head",),
        masks: str | None = None,
        mask_adapter: bool = False,
        export_dir: str | None = None,
        model: Any = None,
    ):
        owner = "GradualPruning"
        if not isinstance(score, str) or score not in SCORES:
            raise SlimtuneError(f"{owner} score={show(score)} is not valid; valid: {choices(SCORES)}")
        if not isinstance(granularity, str) or granularity not in GRANULARITIES:
            raise SlimtuneError(f"{owner} granularity={show(granularity)} is not valid; valid: {choices(GRANULARITIES)}")
        self.nm = None
        if granularity == "nm" or nm is not None:
            if granularity != "nm":
                raise SlimtuneError(f"{owner} nm={show(nm)} needs granularity=nm; got granularity={granularity!r}")
            if nm is None:
                raise SlimtuneError(f"{owner} granularity=nm needs nm; valid: nm='2:4' or '4:8'")
            self.nm = parse_nm(nm)
            implied = 1 - self.nm[0] / self.nm[1]
            if final_sparsity is not None and not math.isclose(final_sparsity, implied):
                raise SlimtuneError(f"{owner} final_sparsity={show(final_sparsity)} contradicts nm={nm!r} (which is "
                                    f"{implied:g}); valid: final_sparsity=null or {implied:g}")
            final_sparsity = implied
        if final_sparsity is None:
            raise SlimtuneError(f"{owner} final_sparsity=None is not valid; valid: a number in [0, 1)")
        check_sparsity(final_sparsity, "final_sparsity", owner)
        if end_step is None:
            raise SlimtuneError(f"{owner} end_step=None is not valid; valid: an int >= start_step and <= "
                                "trainer.max_steps")
        self.schedule = CubicSchedule(final=float(final_sparsity), start_step=start_step, end_step=end_step,
                                      initial=float(initial_sparsity), update_every=update_every)
        if score in NEEDS_ACTIVATIONS + NEEDS_GRADIENTS and start_step < 1:
            raise SlimtuneError(f"{owner} score={score} needs start_step >= 1 (the scores come from training steps); "
                                f"got start_step={start_step}")
        self.score = score
        self.granularity = granularity
        self.layer_sparsity: dict[str, float] = {}
        if layer_sparsity is not None:
            if not isinstance(layer_sparsity, Mapping) or not layer_sparsity:
                raise SlimtuneError(f"{owner} layer_sparsity={show(layer_sparsity)} is not valid; valid: a mapping "
                                    "{pattern: sparsity}, e.g. {'.*self_attn.*': 0.3}")
            for pattern, value in layer_sparsity.items():
                self.layer_sparsity[str(pattern)] = check_sparsity(value, f"layer_sparsity[{pattern!r}]", owner)
        self.owl: dict[str, float] | None = None
        if owl is not None:
            if not isinstance(owl, Mapping) or set(owl) - {"lambda", "threshold"}:
                raise SlimtuneError(f"{owner} owl={show(owl)} is not valid; valid: null or {{lambda: 0.08, "
                                    "threshold: 5}")
            lam = check_number(owl.get("lambda", 0.08), "owl.lambda", owner, 0.0, low_open=False)
            threshold = check_number(owl.get("threshold", 5.0), "owl.threshold", owner, 0.0)
            self.owl = {"lambda": lam, "threshold": threshold}
        if granularity in ("global", "nm", *STRUCTURED) and (self.layer_sparsity or self.owl):
            raise SlimtuneError(f"{owner} layer_sparsity/owl are not valid with granularity={granularity}; valid: "
                                "granularity=layer or row")
        self._init_common(targets, exclude, export_dir, model, masks, mask_adapter)
        self.last_update: int = -1  # the step of the last mask update
        self.current_target: float = 0.0
        self.layer_final: dict[str, float] = {}
        self._accumulators: dict[str, Any] = {}
        self._hooks: list = []

    def method_name(self) -> str:
        return f"gradual_{self.score}_{self.granularity}"

    # ------------------------------------------------------------------ the run's seam

    def check_run(self, cfg) -> None:
        if export_switch(cfg, "shrunk") and self.granularity not in STRUCTURED:
            raise SlimtuneError(f"export.shrunk=true needs structured pruning and GradualPruning has granularity="
                                f"{self.granularity}; valid: granularity=heads or channels, or export.shrunk=false")
        max_steps = (cfg.get("trainer") or {}).get("max_steps")
        if isinstance(max_steps, int) and max_steps > 0 and self.schedule.end_step > max_steps:
            raise SlimtuneError(f"GradualPruning end_step={self.schedule.end_step} is beyond trainer.max_steps="
                                f"{max_steps}; valid: end_step <= {max_steps}")
        finetune = str((cfg.get("model") or {}).get("finetune", "lora"))
        if self.score in NEEDS_GRADIENTS and finetune != "full":
            raise SlimtuneError(f"GradualPruning score={self.score} needs gradients of the pruned weights and "
                                f"model.finetune={finetune} freezes them; valid: model.finetune=full, or "
                                "score=magnitude or wanda")

    def check_model(self, model: nn.Module, cfg) -> None:
        self._check_layers(base_model(model), self._targets(model))

    def _check_layers(self, base: nn.Module, refs: dict[str, LayerRef]) -> None:
        if self.nm:
            from slimtune.prune.masks import check_nm

            for name, ref in refs.items():
                check_nm(*self.nm, ref.layer.in_features, name)
        if self.granularity in STRUCTURED:
            self._structured_groups(base, refs)
        for pattern in self.layer_sparsity:
            if not any(name_matches(pattern, n) for n in refs):
                raise SlimtuneError(f"GradualPruning layer_sparsity pattern {pattern!r} matches no target; valid: a "
                                    f"pattern matching one of {', '.join(sorted({_layer_type(n) for n in refs}))}")

    def _structured_groups(self, base: nn.Module, refs: dict[str, LayerRef]):
        config = getattr(base, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        widths = {n: (r.layer.out_features, r.layer.in_features) for n, r in refs.items()}
        return find_structured_groups(list(refs), self.granularity, num_heads=heads, widths=widths)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        max_steps = getattr(trainer, "max_steps", -1)
        if stage == "fit" and max_steps is not None and max_steps > 0 and self.schedule.end_step > max_steps:
            raise SlimtuneError(f"GradualPruning end_step={self.schedule.end_step} is beyond trainer.max_steps="
                                f"{max_steps}; valid: end_step <= {max_steps}")

    def on_fit_start(self, trainer, pl_module) -> None:
        model = self.model_for(pl_module)
        self._refs = self._targets(model)
        self._check_layers(base_model(model), self._refs)
        self._check_trainable_under_deepspeed(trainer)
        if self.score in NEEDS_GRADIENTS:
            frozen = next((n for n, r in self._refs.items() if not r.layer.weight.requires_grad), None)
            if frozen is not None:
                raise SlimtuneError(f"GradualPruning score={self.score} needs gradients and layer {frozen} is frozen; "
                                    "valid: trainable targets (model.finetune=full), or score=magnitude or wanda")
        self.masks = {}
        self._accumulators = {}
        if self.score == "wanda":
            self._accumulators = {n: InputNormAccumulator(r.layer.in_features) for n, r in self._refs.items()}
        elif self.score in NEEDS_GRADIENTS:
            kind = MovementScore if self.score == "movement" else TaylorScore
            self._accumulators = {n: kind() for n in self._refs}
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        elif self.masks_path:
            self._set_masks(self._masks_from_file())
        if self.score == "wanda" and self.last_update < self.schedule.end_step:
            for name, ref in self._refs.items():
                self._hooks.append(ref.layer.register_forward_hook(self._input_hook(name, pl_module)))

    def _input_hook(self, name: str, pl_module):
        accumulator = self._accumulators[name]

        def hook(module, inputs, output):
            if pl_module.training and torch.is_grad_enabled():  # training steps only, not evaluations
                accumulator.add_batch(inputs[0])
        return hook

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending_state is not None:  # DeepSpeed restores callbacks after on_fit_start
            self._restore(self._pending_state)
            self._pending_state = None
        step = trainer.global_step
        if self.schedule.is_update_step(step) and self.last_update < step:
            self.update(step, trainer)  # start_step=0: magnitude only (checked in __init__)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._mask_gradients()
        if self.score in NEEDS_GRADIENTS and trainer.global_step < self.schedule.end_step:
            for name, ref in self._refs.items():
                grad = ref.layer.weight.grad
                if grad is not None:
                    self._accumulators[name].add(ref.layer.weight, grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.enforce()
        step = trainer.global_step  # optimizer steps done, this batch's included
        if self.schedule.is_update_step(step) and self.last_update < step:
            self.update(step, trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the target the masks hold while this step trains (logged at this step's row)
        pl_module.log("prune/target_sparsity", self.schedule.target(trainer.global_step), on_step=True,
                      on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def teardown(self, trainer, pl_module, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ the update

    def _scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for name, ref in self._refs.items():
            w = ref.layer.weight
            if self.score == "magnitude":
                s = magnitude_score(w)
            elif self.score == "wanda":
                s = wanda_score(w, self._accumulators[name].norm())
            else:
                s = self._accumulators[name].value().clone()
                if name in self.masks:  # a pruned weight does not come back on a stale score
                    s = torch.where(self.masks[name], s, torch.full_like(s, -torch.inf))
            scores[name] = s
        return scores

    def _layer_finals(self, scores: dict[str, torch.Tensor]) -> dict[str, float]:
        final = self.schedule.final
        finals = {}
        for name in self._refs:
            match = next((v for p, v in self.layer_sparsity.items() if name_matches(p, name)), None)
            finals[name] = final if match is None else match
        if self.owl is not None:
            blocks: dict[str, list[str]] = {}
            for name in self._refs:
                blocks.setdefault(_block_of(name), []).append(name)
            ratios = {b: outlier_ratio([scores[n] for n in names], self.owl["threshold"]) for b, names in blocks.items()}
            per_block = owl_sparsities(ratios, final, self.owl["lambda"])
            for b, names in blocks.items():
                for n in names:
                    finals[n] = per_block[b]
        return finals

    @torch.no_grad()
    def update(self, step: int, trainer=None) -> None:
        """Recompute the masks for the schedule's target at `step` and apply them."""
        target = self.schedule.target(step)
        scores = self._scores()
        if not self.layer_final:
            self.layer_final = self._layer_finals(scores)
        fraction = target / self.schedule.final if self.schedule.final > 0 else 0.0
        if self.granularity == "global":
            masks = global_masks(scores, target)
        elif self.granularity == "nm":
            n, m = self.nm
            per_group = min(m - n, int(math.floor(target * m + 1e-9)))
            masks = {name: nm_mask(s, n, m, per_group) for name, s in scores.items()}
        elif self.granularity in STRUCTURED:
            groups = self._structured_groups(base_model(self._model_root()), self._refs)
            masks = structured_masks(scores, groups, target)
        else:
            select = layer_mask if self.granularity == "layer" else row_mask
            masks = {name: select(s, min(self.layer_final[name] * fraction, math.nextafter(1.0, 0.0)))
                     for name, s in scores.items()}
        self._set_masks(self._broadcast(masks, trainer))
        self.last_update = step
        self.current_target = target
        self.stats = {"target": target, "last_update_step": step}
        if trainer is not None and trainer.loggers:
            log_to_loggers(trainer, {"prune/sparsity": self.sparsity()["overall"]})
        if step >= self.schedule.end_step and self._hooks:
            for handle in self._hooks:  # the masks are final: no more input statistics
                handle.remove()
            self._hooks = []

    def _model_root(self) -> nn.Module:
        found = getattr(self, "_found", None)
        if found is None or found[1]() is None:
            raise SlimtuneError("GradualPruning has no model yet; valid: call it inside a fit")
        return found[1]()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        if not self.masks and self.last_update < 0 and not self._accumulators:
            return {}
        state = self._common_state()
        state.update({"last_update": self.last_update, "current_target": self.current_target,
                      "layer_final": dict(self.layer_final),
                      "accumulators": {n: a.state_dict() for n, a in self._accumulators.items()},
                      "settings": {"score": self.score, "granularity": self.granularity}})
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        unknown = [n for n in state.get("masks", {}) if n not in self._refs]
        if unknown:
            raise SlimtuneError(f"the checkpoint's GradualPruning state has a mask for {unknown[0]}, which is not a "
                                "target here; valid: the targets the checkpoint was trained with")
        self._set_masks(state.get("masks", {}))
        self.last_update = int(state.get("last_update", -1))
        self.current_target = float(state.get("current_target", 0.0))
        self.layer_final = dict(state.get("layer_final", {}))
        self.stats = dict(state.get("stats", {}))
        for name, acc_state in (state.get("accumulators") or {}).items():
            if name in self._accumulators:
                self._accumulators[name].load_state_dict(acc_state)


# --------------------------------------------------------------------------- one-shot


class OneShotPruning(_MaskedTraining):
    """Prune once at fit start (magnitude, Wanda or SparseGPT), then keep the masks through recovery fine-tuning.

    `run_order` 10, like PostTrainingQuantization: it changes the model at fit start, before the callbacks that
    measure it. With `PerplexityEvaluation` callbacks (at fit_start) in the Trainer it records perplexity before and
    after pruning (`results["before_prune"]`, `["after_prune"]`; `["before"]` is then the pruned model's).

    Args:
        method: `magnitude` (no data), `wanda` or `sparsegpt` (calibration data).
        sparsity: fraction zeroed in each target, in [0, 1) (ignored with `nm`). nm: `"2:4"`, `"4:8"`, ...
        calibration, n_samples, seq_len, seed: calibration windows, as PostTrainingQuantization reads them
            (`slimtune.data.calibration`).
        damp, block_size: SparseGPT's Hessian dampening (fraction of the mean diagonal) and columns per block.
        quant_bits, quant_group_size: SparseGPT only: also GPTQ-quantize the kept weights to that grid, jointly (the
            layers keep float weights holding the grid values and exact zeros).
        mask_adapter: as GradualPruning's.
        targets, exclude: layers (slimtune.select's rule). tokenizer: for the calibration text (default
            `pl_module.tokenizer`). export_dir: also write the sparsity table, plot and masks there at fit end.
    """

    run_order = 10

    def __init__(
        self,
        method: str = "sparsegpt",
        sparsity: float = 0.5,
        nm: str | None = None,
        targets: str | Sequence[str] = "all-linear",
        exclude: Sequence[str] = ("lm_head",),
        calibration: Any = None,
        n_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        damp: float = 0.01,
        block_size: int = 128,
        quant_bits: int | None = None,
        quant_group_size: int | None = 128,
        mask_adapter: bool = False,
        tokenizer: Any = None,
        export_dir: str | None = None,
        progress: bool = True,
        verbose: bool = True,
        model: Any = None,
    ):
        from slimtune.data.calibration import calibration_source, check_calibration
        from slimtune.prune.drivers import ONE_SHOT_METHODS

        owner = "OneShotPruning"
        if not isinstance(method, str) or method not in ONE_SHOT_METHODS:
            raise SlimtuneError(f"{owner} method={show(method)} is not valid; valid: {choices(ONE_SHOT_METHODS)}")
        self.method = method
        self.nm = parse_nm(nm) if nm is not None else None
        self.target_sparsity = (check_sparsity(sparsity, "sparsity", owner) if self.nm is None
                                else 1 - self.nm[0] / self.nm[1])
        self.n_samples = check_int(n_samples, "n_samples", owner, 1)
        self.seq_len = check_int(seq_len, "seq_len", owner, 2)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SlimtuneError(f"{owner} seed={show(seed)} is not valid; valid: an int")
        self.seed = seed
        self.damp = check_number(damp, "damp", owner, 0.0, 1.0, low_open=False)
        self.block_size = check_int(block_size, "block_size", owner, 1)
        if self.nm and self.block_size % self.nm[1]:
            raise SlimtuneError(f"{owner} block_size={block_size} is not a multiple of M={self.nm[1]}; valid: a "
                                f"multiple of {self.nm[1]}")
        if quant_bits is not None:
            from slimtune.quant.grid import SUPPORTED_BITS

            if method != "sparsegpt":
                raise SlimtuneError(f"{owner} quant_bits={show(quant_bits)} is not valid with method={method}; valid: "
                                    "null, or method=sparsegpt")
            if isinstance(quant_bits, bool) or quant_bits not in SUPPORTED_BITS:
                raise SlimtuneError(f"{owner} quant_bits={show(quant_bits)} is not valid; valid: null, "
                                    f"{choices(SUPPORTED_BITS)}")
        self.quant_bits = quant_bits
        self.quant_group_size = check_int(quant_group_size, "quant_group_size", owner, 1, none_ok=True)
        self.calibration = calibration_source(calibration)
        if method != "magnitude":
            check_calibration(self.calibration, what=f"{owner} calibration")
        self.tokenizer = check_tokenizer_arg(tokenizer, owner)
        self.progress = check_bool(progress, "progress", owner)
        self.verbose = check_bool(verbose, "verbose", owner)
        self._init_common(targets, exclude, export_dir, model, mask_adapter=mask_adapter)
        self.weights: dict[str, torch.Tensor] = {}  # SparseGPT's updated weights (CPU), for resume
        self.seconds: float | None = None
        self._applied_to: int | None = None

    def method_name(self) -> str:
        return self.method + (f"_{self.nm[0]}of{self.nm[1]}" if self.nm else "")

    def check_run(self, cfg) -> None:
        if export_switch(cfg, "shrunk"):
            raise SlimtuneError("export.shrunk=true needs structured pruning and OneShotPruning prunes single weights; "
                                "valid: GradualPruning with granularity=heads or channels, or export.shrunk=false")

    def check_model(self, model: nn.Module, cfg) -> None:
        refs = self._targets(model)
        if self.nm:
            from slimtune.prune.masks import check_nm

            for name, ref in refs.items():
                check_nm(*self.nm, ref.layer.in_features, name)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            from slimtune.callbacks.perplexity import PerplexityEvaluation

            callbacks = list(trainer.callbacks)
            mine = next((i for i, cb in enumerate(callbacks) if cb is self), len(callbacks))
            early = [cb for cb in callbacks[:mine] if isinstance(cb, PerplexityEvaluation) and "fit_start" in cb.at]
            if early:
                raise SlimtuneError(f"OneShotPruning comes after PerplexityEvaluation({early[0].name!r}) in the "
                                    "callbacks list; valid: put OneShotPruning first, so that the 'before' perplexity "
                                    "is the pruned model's")

    def on_fit_start(self, trainer, pl_module) -> None:
        model = self.model_for(pl_module)
        self._refs = self._targets(model)
        self._check_trainable_under_deepspeed(trainer)
        if self._pending_state is None and getattr(trainer, "ckpt_path", None) is not None:
            self._pending_state = self._state_from_checkpoint(trainer.ckpt_path)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
            return
        if self._applied_to == id(model):
            return
        self.prune(model, trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending_state is not None:  # DeepSpeed restores callbacks after on_fit_start
            self._restore(self._pending_state)
            self._pending_state = None

    def _state_from_checkpoint(self, ckpt_path) -> dict[str, Any] | None:
        path = Path(str(ckpt_path))
        if not path.is_file():
            return None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return (checkpoint.get("callbacks") or {}).get(self.state_key) or None

    def _measure(self, trainer, pl_module, moment: str) -> None:
        from slimtune.callbacks.perplexity import PerplexityEvaluation

        if trainer is None:
            return
        for cb in trainer.callbacks:
            if isinstance(cb, PerplexityEvaluation) and "fit_start" in cb.at:
                cb.results[moment] = cb.evaluate(trainer, pl_module, moment)

    def prune(self, model: nn.Module, trainer=None, pl_module=None) -> dict[str, torch.Tensor]:
        """Prune the targets of `model` now; return the masks."""
        from slimtune.prune.drivers import prune_model_oneshot
        from slimtune.quant.grid import QuantSpec
        from slimtune.quant.targets import adapters_disabled

        started = time.perf_counter()
        pl_module = pl_module if pl_module is not None else model
        self._refs = self._refs or self._targets(model)
        self._measure(trainer, pl_module, "before_prune")
        batches = None
        if self.method != "magnitude":
            from slimtune.data.calibration import calibration_batches

            tokenizer = resolve_tokenizer(pl_module, self.tokenizer, "OneShotPruning",
                                          f"for method={self.method}'s calibration text")
            batches = calibration_batches(self.calibration, tokenizer, self.n_samples, self.seq_len, self.seed)
        spec = QuantSpec(self.quant_bits, self.quant_group_size) if self.quant_bits else None
        names = list(self._refs)
        with adapters_disabled(model):
            masks = prune_model_oneshot(model, self.method, self.target_sparsity, self.nm, batches, names, exclude=(),
                                        damp=self.damp, block_size=self.block_size, spec=spec,
                                        progress=self.progress)
        masks = self._broadcast(masks, trainer)
        if self.method == "sparsegpt":
            self._broadcast_weights(trainer)  # floating-point order may differ between ranks' GPUs: rank 0's weights
            self.weights = {n: self._refs[n].layer.weight.detach().to("cpu", copy=True) for n in names}
        self._set_masks(masks)
        self._measure(trainer, pl_module, "after_prune")
        from slimtune.callbacks.perplexity import PerplexityEvaluation

        for cb in (trainer.callbacks if trainer is not None else []):
            if isinstance(cb, PerplexityEvaluation) and "after_prune" in cb.results and "before" not in cb.results:
                cb.results["before"] = dict(cb.results["after_prune"])
                log_to_loggers(trainer, {f"{cb.name}/ppl_before": cb.results["before"]["ppl"]})
        self._applied_to = id(model)
        self.seconds = time.perf_counter() - started
        self.stats = {"seconds": self.seconds, "target": self.target_sparsity}
        if self.verbose and (trainer is None or trainer.is_global_zero):
            print(f"[slimtune] {self.method_name()}: {len(masks)} layers pruned, "
                  f"{self.sparsity()['overall']:.1%} zeros, in {self.seconds:.1f} s")
        return masks

    def state_dict(self) -> dict[str, Any]:
        if not self.masks:
            return {}
        state = self._common_state()
        state["weights"] = dict(self.weights)
        state["settings"] = {"method": self.method, "sparsity": self.target_sparsity, "nm": self.nm}
        return state

    @torch.no_grad()
    def _restore(self, state: dict[str, Any]) -> None:
        unknown = [n for n in state.get("masks", {}) if n not in self._refs]
        if unknown:
            raise SlimtuneError(f"the checkpoint's OneShotPruning state has a mask for {unknown[0]}, which is not a "
                                "target here; valid: the targets the checkpoint was trained with")
        self.weights = dict(state.get("weights") or {})
        for name, weight in self.weights.items():
            layer = self._refs[name].layer
            if not layer.weight.requires_grad:  # a trainable weight comes from the checkpoint's state_dict
                layer.weight.data.copy_(weight.to(layer.weight.device, layer.weight.dtype))
        self._set_masks(state["masks"])
        self.stats = dict(state.get("stats", {}))
        self._applied_to = id(self._model_root())

    def _model_root(self) -> nn.Module:
        found = getattr(self, "_found", None)
        return found[1]() if found is not None else None
