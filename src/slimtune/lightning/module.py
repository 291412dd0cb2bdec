"""The LightningModule that fine-tunes a Hugging Face causal LM (LoRA/QLoRA or full)."""

from __future__ import annotations

import time
from typing import Any, Mapping

import lightning.pytorch as L
import torch

from slimtune.errors import SlimtuneError, choices
from slimtune.lightning.loss_terms import loss_providers

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


def build_optimizer(params, name: str = "adamw", lr: float = 2e-4, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    if name not in OPTIMIZERS:
        raise SlimtuneError(f"optimizer.name={name!r} is not supported; valid: {choices(OPTIMIZERS)}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    import bitsandbytes as bnb  # 8-bit and paged optimizers: bitsandbytes' (paged ones fall back on the CPU)

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


class CausalLMModule(L.LightningModule):
    """Next-token loss on a Hugging Face causal LM; checkpoints hold only trainable state.

    A LoRA run's checkpoint carries the adapters, optimizer and RNG state, not the frozen base (which is rebuilt from
    its source on resume), so checkpoints of a 13B QLoRA run are megabytes, not gigabytes.

    Logs the next-token cross-entropy as `train/loss_ce` and the training loss as `train/loss`: the same number, or,
    with loss terms attached (`slimtune.lightning.loss_terms`), the cross-entropy plus the terms (each also logged as
    `train/loss_<key>`).
    """

    loss_total_key = "train/loss"  # where the loss-terms wrapper logs the total (CE + terms)

    def __init__(self, model: torch.nn.Module, tokenizer=None, optimizer: Mapping[str, Any] | None = None,
                 scheduler: Mapping[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer_cfg = dict(optimizer or {})
        self.scheduler_cfg = dict(scheduler or {})
        name = str(self.optimizer_cfg.get("name", "adamw"))
        if name not in OPTIMIZERS:
            raise SlimtuneError(f"optimizer.name={name!r} is not supported; valid: {choices(OPTIMIZERS)}")
        schedule = str(self.scheduler_cfg.get("name", "constant"))
        if schedule not in SCHEDULERS:
            raise SlimtuneError(f"scheduler.name={schedule!r} is not supported; valid: {choices(SCHEDULERS)}")
        self.trainable_only = any(not p.requires_grad for p in model.parameters())
        # The frozen base is not in the checkpoint, so loading must not demand it.
        self.strict_loading = not self.trainable_only
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._step_started = 0.0
        self._rng_to_restore: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        from slimtune.quant.bnb4bit import guard_4bit

        guard_4bit(self.model)  # 4-bit layers added or packed since loading: gradients must flow after evaluations

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        size = batch["input_ids"].size(0)
        self.log("train/loss_ce", loss, on_step=True, on_epoch=False, batch_size=size)
        if not loss_providers(self):  # with loss terms attached, their wrapper logs the total (CE + terms) instead
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.tokens_seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if self._rng_to_restore is not None:  # resume: continue the interrupted run's random stream (LoRA dropout)
            torch.set_rng_state(self._rng_to_restore["torch"])
            if torch.cuda.is_available() and self._rng_to_restore.get("cuda") is not None:
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self._step_started

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise SlimtuneError("the model has no trainable parameter; valid: model.finetune=lora or full")
        opt = self.optimizer_cfg
        optimizer = build_optimizer(params, str(opt.get("name", "adamw")), float(opt.get("lr", 2e-4)),
                                    float(opt.get("weight_decay", 0.0)), tuple(opt.get("betas", (0.9, 0.999))),
                                    float(opt.get("eps", 1e-8)))
        from transformers import get_scheduler

        name = str(self.scheduler_cfg.get("name", "constant"))
        warmup_steps = int(self.scheduler_cfg.get("warmup_steps", 0) or 0)
        warmup_ratio = float(self.scheduler_cfg.get("warmup_ratio", 0.0) or 0.0)
        needs_total = name in ("cosine", "linear") or (name == "constant_with_warmup" and not warmup_steps and warmup_ratio)
        total = self._total_steps() if needs_total else 0
        warmup = warmup_steps or int(warmup_ratio * total)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total or None)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise SlimtuneError(f"scheduler.name={self.scheduler_cfg.get('name')!r} needs a known length; valid: set "
                                "trainer.max_steps or trainer.max_epochs, or scheduler.name=constant")
        if trainer.ckpt_path is not None and trainer.max_epochs not in (None, -1):
            # Counting epochs made Lightning build the training loader before the checkpoint is restored, and it
            # would then never receive the loader's saved position: drop it, so fit builds it again after restoring.
            trainer.fit_loop._combined_loader = None
        return int(total)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trainable_only:
            # FSDP-wrapped layers add wrapper names that FSDP's state dict leaves out: match the names it writes.
            trainable = {f"model.{_unwrapped_name(n)}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["slimtune"] = {
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "trainable_only": self.trainable_only,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("slimtune", {})
        self._rng_to_restore = state.get("rng")
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))


def _unwrapped_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
