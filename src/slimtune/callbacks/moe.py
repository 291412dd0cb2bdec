"""MoE load balancing for any Trainer: Switch, z- and sequence-level balance losses added through the loss-term seam,
aux-loss-free expert bias (DeepSeek-V3), and expert-utilisation metrics with dead-expert and collapse warnings.

`MoEBalance` finds the routers of the model (`slimtune.moe.find_routers`: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS, and routers declared with `slimtune.moe.register_router`), records what each returned in the training
step's own forward (`capture_outputs`: the forwards gradient checkpointing recomputes in backward are not counted),
and adds, each with its coefficient and logged on its own:

* `train/loss_aux`: the Switch loss, top-k aware (1 when uniform), the mean over router layers;
* `train/loss_z`: ST-MoE's router z-loss, the mean over layers;
* `train/loss_seq`: DeepSeek-V2/V3's sequence-wise balance loss, the mean over layers.

Padding (`batch[mask_key]` == 0, when the batch is a mapping holding it) is excluded from every statistic. With
`global_batch=True` the Switch loss of a micro-batch weights its router probabilities by the expert load of the
optimizer step so far (this and the earlier micro-batches of the step), summed over data-parallel ranks: the
global-batch balancing of Megatron-Core; exact for the step's last micro-batch, and for the loss the Trainer
optimises without accumulation.

**transformers' own aux loss.** Mixtral, Qwen-MoE, OLMoE and GPT-OSS add `router_aux_loss_coef x` their Switch loss
(pooled over layers, not top-k normalised) to the loss they return when `config.output_router_logits` is true.
`builtin_aux` decides: `auto` (default) turns it off for the fit when this callback adds its own Switch term (so it
is counted once, by this callback) and leaves it on otherwise; `off` turns it off always; `keep` leaves it on and
refuses a Switch coefficient > 0 here. The config is restored at teardown; `report()` names the loss used.

**Aux-loss-free bias.** With `bias_rate`, each router layer gets a per-expert bias added to its scores for choosing
the top-k only, moved after every optimizer step by `bias_rate x sign(mean load - load)` from the step's load summed
over micro-batches and ranks. It is callback state (checkpointed, resumed exactly); DeepSeek-V3 keeps it in its own
`e_score_correction_bias` buffer (so it is saved with the model), for the other families a forward hook re-chooses
from the logits, and `export` writes it to `moe/expert_bias.pt`.

**Seeing the experts.** After each optimizer step (on every rank, from the loads summed over ranks): per layer the
coefficient of variation of the load, the normalised router entropy, the number of dead experts (share below
`dead_threshold` x uniform for `dead_steps` steps) and, with `log_shares`, each expert's share, logged as
`moe/<layer>/...` plus summaries `moe/cv_max`, `moe/dead_experts`; a collapse warning names the layer and experts when
the coefficient of variation reaches `collapse_cv` or experts die. At fit end the layers x experts heatmap is written
as `moe_heatmap.csv` (every recorded step) and `moe_heatmap.png` (mean shares), and logged to W&B as a table (and an
image when Pillow is installed) with a WandbLogger. All coefficients 0 makes it a monitor only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimtune.callbacks._base import (SlimtuneCallback, check_bool, check_int, check_model_arg, check_number,
                                      check_path, show)
from slimtune.errors import SlimtuneError
from slimtune.lightning.loss_terms import attach_loss_terms, capture_outputs, detach_loss_terms
from slimtune.moe.aux_free import ExpertBias
from slimtune.moe.heatmap import mean_shares, write_heatmap_csv, write_heatmap_png
from slimtune.moe.losses import (expert_load, mean_probability, routing_probabilities, sequence_balance_loss,
                                 switch_loss, token_mask, z_loss)
from slimtune.moe.routers import FAMILIES, find_routers
from slimtune.moe.stats import (DeadExperts, StepLoad, all_reduce_sum, coefficient_of_variation, collapse_report,
                                load_shares)

__all__ = ["MoEBalance"]

BUILTIN_AUX = ("auto", "off", "keep")


class MoEBalance(SlimtuneCallback):
    name = "moe"  # the loss-term provider's name

    def __init__(self, aux_coef: float = 0.01, z_coef: float = 0.0, seq_coef: float = 0.0,
                 bias_rate: float | None = None, global_batch: bool = True, builtin_aux: str = "auto",
                 mask_key: str | None = "attention_mask", dead_threshold: float = 0.1, dead_steps: int = 20,
                 collapse_cv: float = 1.0, log_shares: bool = True, heatmap: bool = True,
                 heatmap_dir: str | None = None, heatmap_every: int = 1, model: Any = None):
        owner = "MoEBalance"
        self.aux_coef = check_number(aux_coef, "aux_coef", owner, 0, low_open=False)
        self.z_coef = check_number(z_coef, "z_coef", owner, 0, low_open=False)
        self.seq_coef = check_number(seq_coef, "seq_coef", owner, 0, low_open=False)
        self.bias_rate = None if bias_rate is None else check_number(bias_rate, "bias_rate", owner, 0)
        self.global_batch = check_bool(global_batch, "global_batch", owner)
        if builtin_aux not in BUILTIN_AUX:
            hint = " (YAML reads a bare off as false: write \"off\")" if builtin_aux is False else ""
            raise SlimtuneError(f"MoEBalance builtin_aux={show(builtin_aux)} is not valid; valid: "
                                f"{', '.join(BUILTIN_AUX)}{hint}")
        if builtin_aux == "keep" and self.aux_coef > 0:
            raise SlimtuneError(f"MoEBalance builtin_aux='keep' with aux_coef={aux_coef!r} would count the Switch loss "
                                "twice; valid: aux_coef=0 with 'keep', or builtin_aux='auto' / 'off'")
        self.builtin_aux = builtin_aux
        if mask_key is not None and (not isinstance(mask_key, str) or not mask_key):
            raise SlimtuneError(f"MoEBalance mask_key={show(mask_key)} is not valid; valid: a batch key such as "
                                "'attention_mask', or null (count every token)")
        self.mask_key = mask_key
        self.dead_threshold = check_number(dead_threshold, "dead_threshold", owner, 0, 1)
        self.dead_steps = check_int(dead_steps, "dead_steps", owner, 1)
        self.collapse_cv = check_number(collapse_cv, "collapse_cv", owner, 0)
        self.log_shares = check_bool(log_shares, "log_shares", owner)
        self.heatmap = check_bool(heatmap, "heatmap", owner)
        self.heatmap_dir = check_path(heatmap_dir, "heatmap_dir", owner)
        self.heatmap_every = check_int(heatmap_every, "heatmap_every", owner, 1)
        self.model = check_model_arg(model, owner)
        self.routers: list = []
        self.expert_bias: ExpertBias | None = None
        self.dead: DeadExperts | None = None
        self.steps = 0  # optimizer steps observed
        self.history_steps: list[int] = []
        self.history: list[Tensor] = []  # (layers, experts) shares per recorded step
        self.last_cv: list[float] = []
        self.last_dead: list[list[int]] = []
        self.warned: dict[str, tuple] = {}
        self.aux_source = "none"
        self.heatmap_files: dict[str, str] = {}
        self._pending_state: dict | None = None
        self._captures: list = []
        self._hooks: list = []
        self._builtin_restore: tuple | None = None

    # ------------------------------------------------------------------ checks

    def check_model(self, model, cfg) -> None:
        self._routers_of(model)

    def _routers_of(self, model) -> list:
        routers = find_routers(model)
        if not routers:
            families = ", ".join(sorted(a.family for a in FAMILIES.values()))
            raise SlimtuneError(f"MoEBalance found no MoE router in {type(model).__name__}; valid: a model of the "
                                f"families {families}, or a custom router declared with "
                                "slimtune.moe.register_router(router, num_experts, top_k)")
        if self.bias_rate is not None:
            for ref in routers:
                if ref.adapter.rebias is None and ref.adapter.native_bias is None:
                    raise SlimtuneError(f"MoEBalance bias_rate={self.bias_rate!r}: router {ref.name} "
                                        f"({type(ref.module).__name__}) cannot take a bias; valid: bias_rate=null, or "
                                        "register_router(..., rebias=fn)")
        return routers

    # ------------------------------------------------------------------ fit lifecycle

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            attach_loss_terms(pl_module, self)

    def on_fit_start(self, trainer, pl_module) -> None:
        model = self.model_for(pl_module)
        self.routers = self._routers_of(model)
        experts = [r.num_experts for r in self.routers]
        device = pl_module.device
        self.step_load = StepLoad(experts, device)
        # (entropy sum, tokens) per layer, on the model's device like the loads: no host sync inside the step
        self._entropy = torch.zeros(len(self.routers), 2, dtype=torch.float64, device=device)
        self.dead = DeadExperts(experts, self.dead_threshold, self.dead_steps)
        if self.bias_rate is not None:
            self.expert_bias = ExpertBias(experts, self.bias_rate)
            for ref, bias in zip(self.routers, self.expert_bias.bias):
                if ref.adapter.native_bias:  # DeepSeek-V3: start from the model's own (pretrained) correction bias
                    bias.copy_(getattr(ref.module, ref.adapter.native_bias).detach().float().cpu())
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        self._handle_builtin_aux(model)
        if self.expert_bias is not None:
            self._install_bias()
        self._captures = [capture_outputs(ref.module) for ref in self.routers]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        detach_loss_terms(pl_module, self)
        for capture in self._captures:
            capture.remove()
        for hook in self._hooks:
            hook.remove()
        self._captures, self._hooks = [], []
        if self._builtin_restore is not None:
            config, value = self._builtin_restore
            config.output_router_logits = value
            self._builtin_restore = None

    def _handle_builtin_aux(self, model) -> None:
        from slimtune.select import base_model

        config = getattr(base_model(model), "config", None)
        builtin_on = bool(getattr(config, "output_router_logits", False))
        turn_off = builtin_on and (self.builtin_aux == "off" or (self.builtin_aux == "auto" and self.aux_coef > 0))
        if turn_off:
            self._builtin_restore = (config, config.output_router_logits)
            config.output_router_logits = False
        if self.aux_coef > 0:
            self.aux_source = "slimtune"
        elif builtin_on and not turn_off:
            self.aux_source = "transformers"
        else:
            self.aux_source = "none"
        from lightning.pytorch.utilities import rank_zero_info

        if builtin_on:
            what = ("turned off for this fit: the Switch loss is this callback's train/loss_aux" if turn_off
                    else "kept: the model adds its own Switch loss to its returned loss")
            rank_zero_info(f"MoEBalance: transformers' router aux loss (output_router_logits) is {what} "
                           f"(builtin_aux={self.builtin_aux!r})")

    def _refresh_device_bias(self) -> None:
        """A copy of each layer's bias on its router's device (no host-to-device copy in every forward)."""
        self._device_bias = []
        for ref, bias in zip(self.routers, self.expert_bias.bias):
            weight = next(ref.module.parameters(), None)
            self._device_bias.append(bias.to(weight.device) if weight is not None else bias.clone())
            if ref.adapter.native_bias:
                self._push_native(ref, bias)

    def _install_bias(self) -> None:
        self._refresh_device_bias()
        for ref, bias in zip(self.routers, self.expert_bias.bias):
            if ref.adapter.native_bias:
                continue

            def hook(module, args, output, ref=ref, layer=self.routers.index(ref)):
                return ref.adapter.rebias(module, output, self._device_bias[layer])

            # first among the router's hooks: what capture_outputs records is the choice the experts really got
            self._hooks.append(ref.module.register_forward_hook(hook, prepend=True))

    @staticmethod
    def _push_native(ref, bias: Tensor) -> None:
        buffer = getattr(ref.module, ref.adapter.native_bias)
        with torch.no_grad():
            buffer.copy_(bias.to(buffer.device, buffer.dtype))

    # ------------------------------------------------------------------ the loss terms

    def _mask_and_sequences(self, batch) -> tuple[Tensor | None, int | None]:
        mask = None
        if self.mask_key is not None and isinstance(batch, Mapping) and batch.get(self.mask_key) is not None:
            mask = batch[self.mask_key]
        if mask is not None:
            return mask, mask.shape[0] if mask.dim() == 2 else None
        tensors = list(batch.values()) if isinstance(batch, Mapping) else (
            list(batch) if isinstance(batch, (list, tuple)) else [batch])
        ids = next((t for t in tensors if isinstance(t, Tensor) and t.dim() == 2), None)
        return None, ids.shape[0] if ids is not None else None

    def loss_terms(self, pl_module, batch, batch_idx) -> dict[str, Tensor]:
        mask, sequences = self._mask_and_sequences(batch)
        layers = []
        for layer, (ref, capture) in enumerate(zip(self.routers, self._captures)):
            for output in capture.outputs:
                logits, indices = ref.read(output)
                if mask is not None and mask.numel() != logits.shape[0]:
                    raise SlimtuneError(f"MoEBalance: batch[{self.mask_key!r}] has {mask.numel()} tokens but router "
                                        f"{ref.name} routed {logits.shape[0]}; valid: mask_key naming the mask of the "
                                        "batch the model ran on, or mask_key=null")
                probs = routing_probabilities(logits, ref.adapter.score)
                load = expert_load(indices, ref.num_experts, mask)
                prob_sum, tokens = mean_probability(probs, mask)
                self.step_load.add(layer, load, tokens)
                with torch.no_grad():
                    weight = token_mask(mask, probs.shape[0], probs.device)
                    p = probs.detach()
                    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(ref.num_experts)
                    self._entropy[layer] += torch.stack([(entropy * weight).sum(), weight.sum()]).to(
                        self._entropy.device, torch.float64)
                layers.append((layer, ref, logits, indices, probs, load, prob_sum, tokens))
        if not any(c > 0 for c in (self.aux_coef, self.z_coef, self.seq_coef)) or not layers:
            return {}
        terms: dict[str, Tensor] = {}
        if self.aux_coef > 0:
            if self.global_batch:
                step_loads, step_tokens = self.step_load.reduced()  # a collective: every rank, every micro-batch
            values = []
            for layer, ref, _, _, _, load, prob_sum, tokens in layers:
                if self.global_batch:
                    f_load, f_tokens = step_loads[layer].float(), step_tokens[layer]
                else:
                    f_load, f_tokens = load, tokens
                values.append(switch_loss(f_load.to(prob_sum.device), f_tokens, prob_sum, tokens, ref.top_k))
            terms["aux"] = self.aux_coef * torch.stack(values).mean()
        if self.z_coef > 0:
            values = []
            for _, _, logits, _, _, _, _, _ in layers:
                total, count = z_loss(logits, mask)
                values.append(total / count.clamp_min(1))
            terms["z"] = self.z_coef * torch.stack(values).mean()
        if self.seq_coef > 0:
            if sequences is None:
                raise SlimtuneError("MoEBalance seq_coef > 0 needs the batch's sequences and found no 2-D tensor in "
                                    "the batch; valid: a batch with input_ids / attention_mask (batch x sequence), or "
                                    "seq_coef=0")
            values = []
            for _, _, _, indices, probs, _, _, _ in layers:
                total, count = sequence_balance_loss(probs, indices, sequences, mask)
                values.append(total / count.clamp_min(1))
            terms["seq"] = self.seq_coef * torch.stack(values).mean()
        return terms

    # ------------------------------------------------------------------ after each optimizer step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.routers:
            return
        loads, _ = self.step_load.reduced()
        loads = [load.cpu() for load in loads]  # one host copy per optimizer step
        entropy = all_reduce_sum(self._entropy.clone()).cpu()
        self.step_load.reset()
        self._entropy.zero_()
        if all(float(load.sum()) == 0 for load in loads):
            return  # no router ran in this step's training forward (e.g. skipped steps)
        self.steps += 1
        if self.expert_bias is not None:
            self.expert_bias.update(loads)
            self._refresh_device_bias()
        metrics: dict[str, float] = {}
        shares, self.last_cv, self.last_dead = [], [], []
        for layer, (ref, load) in enumerate(zip(self.routers, loads)):
            dead = self.dead.observe(layer, load)
            cv = coefficient_of_variation(load)
            share = load_shares(load.double()).float()
            shares.append(share)
            self.last_cv.append(cv)
            self.last_dead.append(dead)
            key = f"moe/{ref.name}"
            metrics[f"{key}/cv"] = cv
            metrics[f"{key}/entropy"] = float(entropy[layer, 0] / entropy[layer, 1].clamp_min(1))
            metrics[f"{key}/dead"] = float(len(dead))
            if self.log_shares:
                metrics.update({f"{key}/expert{i}": float(s) for i, s in enumerate(share)})
            self._warn_collapse(ref.name, load, dead)
        metrics["moe/cv_max"] = max(self.last_cv)
        metrics["moe/cv_mean"] = sum(self.last_cv) / len(self.last_cv)
        metrics["moe/dead_experts"] = float(sum(len(d) for d in self.last_dead))
        if (self.steps - 1) % self.heatmap_every == 0 and len({r.num_experts for r in self.routers}) == 1:
            self.history_steps.append(trainer.global_step)
            self.history.append(torch.stack(shares))
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False)

    def _warn_collapse(self, layer: str, load: Tensor, dead: list[int]) -> None:
        from lightning.pytorch.utilities import rank_zero_warn

        report = collapse_report(layer, load, dead, self.collapse_cv)
        if report is None:
            self.warned.pop(layer, None)
            return
        seen = (tuple(report.overloaded), tuple(report.dead))
        if self.warned.get(layer) != seen:  # once per layer and set of experts, not every step
            self.warned[layer] = seen
            rank_zero_warn(f"MoEBalance: {report.message()} (step {self.steps})")

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.heatmap or not self.history or not trainer.is_global_zero:
            return
        folder = Path(self.heatmap_dir or trainer.default_root_dir)
        names = [r.name for r in self.routers]
        csv_path = write_heatmap_csv(folder / "moe_heatmap.csv", names, self.history_steps, self.history)
        png_path = write_heatmap_png(folder / "moe_heatmap.png", mean_shares(self.history))
        self.heatmap_files = {"moe_heatmap_csv": str(csv_path), "moe_heatmap_png": str(png_path)}
        self._log_wandb(trainer, names)

    def _log_wandb(self, trainer, names: list[str]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb

            mean = mean_shares(self.history)
            columns = ["layer", *[f"expert{i}" for i in range(mean.shape[1])]]
            table = wandb.Table(columns=columns, data=[[n, *row] for n, row in zip(names, mean.tolist())])
            payload = {"moe/heatmap_table": table}
            try:
                payload["moe/heatmap"] = wandb.Image(self.heatmap_files["moe_heatmap_png"])
            except Exception:  # wandb.Image needs Pillow; the table carries the same numbers
                pass
            logger.experiment.log(payload)

    # ------------------------------------------------------------------ state, report, export

    def state_dict(self) -> dict[str, Any]:
        return {"routers": [r.name for r in self.routers], "steps": self.steps,
                "expert_bias": self.expert_bias.state_dict() if self.expert_bias is not None else None,
                "dead": self.dead.state_dict() if self.dead is not None else None,
                "history_steps": list(self.history_steps), "history": [h.clone() for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # called before on_fit_start, when the routers are not known yet: applied there
        self._pending_state = dict(state_dict)

    def _apply_state(self, state: dict) -> None:
        names = [r.name for r in self.routers]
        if state.get("routers") and list(state["routers"]) != names:
            raise SlimtuneError(f"MoEBalance checkpoint state is for routers {list(state['routers'])[:3]}... not this "
                                f"model's {names[:3]}...; valid: resume with the model it was saved with")
        self.steps = int(state.get("steps", 0))
        if state.get("expert_bias") is not None:
            if self.expert_bias is None:
                raise SlimtuneError("MoEBalance checkpoint holds an aux-loss-free bias but bias_rate=null; valid: "
                                    "resume with the bias_rate it was trained with")
            self.expert_bias.load_state_dict(state["expert_bias"])
        if state.get("dead") is not None:
            self.dead.load_state_dict(state["dead"])
        self.history_steps = list(state.get("history_steps", []))
        self.history = [h.clone() for h in state.get("history", [])]

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"moe_aux_loss": self.aux_source}
        if self.last_cv:
            out["moe_cv_per_layer"] = [round(v, 4) for v in self.last_cv]
            out["moe_dead_experts"] = {r.name: d for r, d in zip(self.routers, self.last_dead) if d}
        out.update(self.heatmap_files)
        return out

    def export(self, model, out_dir: Path, tokenizer, cfg) -> dict[str, str]:
        if self.expert_bias is None or all(r.adapter.native_bias for r in self.routers):
            return {}  # DeepSeek-V3 saves its bias with the model
        path = Path(out_dir) / "moe" / "expert_bias.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({r.name: b.clone() for r, b in zip(self.routers, self.expert_bias.bias)}, path)
        return {"moe_expert_bias": str(path)}
