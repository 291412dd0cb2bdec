"""Knowledge distillation in any Lightning trainer: a frozen teacher's distribution added to the student's loss.

`Distillation` adds, through the loss-term seam (`slimtune.lightning.loss_terms`), the term
`kd_weight * KD(teacher || student)` (logged as `train/loss_kd`) to the training step's own loss, in slimtune's
`CausalLMModule` and in a user's own LightningModule alike; with `ce_weight` != 1 it also adds
`(ce_weight - 1) * CE` (`train/loss_ce_rescale`), so the total is `ce_weight * CE + kd_weight * KD` (e.g.
`ce_weight=0.5, kd_weight=0.5` is the usual interpolation; `ce_weight=0` distils alone). With `hidden_layers`, MSE or
cosine between chosen layer pairs is added as `hidden_weight * H` (`train/loss_hidden`), through learned projections
where the widths differ: they are added to the optimizer as a parameter group with the first group's settings (its
learning-rate schedule extended to them) and saved in this callback's checkpoint state, not in the model.

The student's logits are those of the step's own forward (`capture_outputs`: the student runs once); its inputs
(input_ids, attention_mask, labels) are read from that same call, so a user's module may take any batch format as
long as it calls the model with `input_ids`. Positions follow the labels as the data layer masks them (-100: padding
and prompt tokens), shifted as the model shifts them (`slimtune.distill.losses`).

The teacher (`slimtune.distill.teacher`): an `nn.Module`, or anything the model layer loads (hub id, folder, .gguf,
`pkg:` path, or a model config mapping), optionally 4-bit / 8-bit (`teacher_quantization`: nf4, fp4, int8 through
bitsandbytes), on the student's device or `teacher_device`. It is frozen and in eval mode, kept by this callback and
not by the LightningModule: it is never in the optimizer and never in a checkpoint. Its logits are computed chunk by
chunk from its last hidden states. Teacher and student must share a tokenizer family; vocabularies padded to different
sizes are compared on the shared tokens, different tokenizers are refused.

Instead of a live teacher, a teacher-logit cache (`cache_dir`, with `top_k`) gives the same top-k loss with no teacher in
memory; with `on_policy` = lambda, that share of steps distils on completions the student samples itself (GKD).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.callbacks._base import (
    SlimtuneCallback,
    check_int,
    check_model_arg,
    check_number,
    check_path,
    check_tokenizer_arg,
    is_sequence,
    resolve_tokenizer,
    show,
)
from slimtune.distill.cache import LogitCache, data_fingerprint, weights_fingerprint, write_logit_cache
from slimtune.distill.hidden import HIDDEN_LOSSES, HiddenStateLoss
from slimtune.distill.losses import KDSpec, check_spec, kd_loss
from slimtune.distill.teacher import TeacherRunner, aligned_vocab_size, freeze, load_teacher, model_vocab_size, teacher_config
from slimtune.errors import SlimtuneError, choices
from slimtune.lightning.loss_terms import attach_loss_terms, capture_outputs, detach_loss_terms

TEACHER_QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


class _StudentInputs:
    """What the student was last called with (input_ids, attention_mask, labels): a forward pre-hook, which also asks
    the student's training forwards for their hidden states when hidden-state distillation needs them (an argument
    of the call: PEFT's causal-LM wrapper passes output_hidden_states=None on, overriding the config's switch)."""

    def __init__(self, module: nn.Module, hidden_states: bool = False):
        self.inputs: dict[str, Any] = {}
        self.hidden_states = hidden_states
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask"), "labels": kwargs.get("labels")}
        if self.hidden_states and module.training and torch.is_grad_enabled() and not kwargs.get("output_hidden_states"):
            return args, {**kwargs, "output_hidden_states": True}
        return None

    def remove(self) -> None:
        self._handle.remove()
        self.inputs = {}


class Distillation(SlimtuneCallback):
    """Adds knowledge-distillation terms from a frozen teacher to the training loss (see the module docstring).

    Args:
        teacher: an nn.Module, a hub id / folder / .gguf / `pkg:` path, or a model config mapping.
        loss: fkl, rkl, jsd, tvd, skl, srkl (`slimtune.distill.losses`). temperature: > 0 (the loss is multiplied by
            T^2). beta: JSD's mixture weight in [0, 1]. alpha: skew KL's in [0, 1]. top_k: compare only the teacher's
            k most likely tokens (null: the whole vocabulary).
        kd_weight: the KD term's weight (>= 0). ce_weight: the step's own loss's weight (>= 0; 1 leaves it as is).
        chunk_size: positions per chunk of the vocabulary-sized computation.
        teacher_quantization: none, nf4, fp4, int8 (a loaded teacher; null: as its config says). teacher_dtype:
            float32, bfloat16, float16 (null: as its config says). teacher_device: null (the student's) or a device.
        teacher_tokenizer / tokenizer: to check the vocabularies (defaults: the teacher's own when loaded, the
            LightningModule's `tokenizer`).
        hidden_layers: null, or [[student_layer, teacher_layer], ...] indices of `output_hidden_states` (0: embeddings).
        hidden_loss: mse or cosine. hidden_weight: > 0 with hidden_layers.
        model: the student (null: `pl_module.model` or its only transformers / PEFT model).
        cache_dir: a teacher-logit cache folder (`slimtune.distill.cache`; needs top_k): written by one teacher pass
            over the training data at fit start when absent, then the student trains from it and the teacher leaves
            memory; reused, without loading the teacher, when its tokenizer, data and teacher fingerprint match, and
            refused in one line when they do not. cache_batch_size: sequences per teacher batch while writing.
        on_policy: GKD's lambda in [0, 1]: the share of steps whose KD term is taken on completions the student
            samples from the batch's prompts (`slimtune.distill.on_policy`), up to max_new_tokens, at
            generation_temperature.
    """

    name = "distillation"
    run_order = 20  # after methods that change the student at fit start (PTQ: 10), before measuring callbacks

    def __init__(self, teacher: Any = None, loss: str = "fkl", temperature: float = 1.0, beta: float = 0.5,
                 alpha: float = 0.1, top_k: int | None = None, kd_weight: float = 1.0, ce_weight: float = 1.0,
                 chunk_size: int = 1024, teacher_quantization: str | None = None, teacher_dtype: str | None = None,
                 teacher_device: str | None = None, teacher_tokenizer: Any = None, tokenizer: Any = None,
                 hidden_layers: Any = None, hidden_loss: str = "mse", hidden_weight: float = 1.0, model: Any = None,
                 cache_dir: str | None = None, cache_batch_size: int = 8, on_policy: float = 0.0,
                 max_new_tokens: int | None = None, generation_temperature: float = 1.0):
        owner = "Distillation"
        check_spec(loss, temperature, beta, alpha, top_k, owner=owner)
        self.spec = KDSpec(loss, float(temperature), float(beta), float(alpha), top_k)
        self.kd_weight = check_number(kd_weight, "kd_weight", owner, 0.0, low_open=False)
        self.ce_weight = check_number(ce_weight, "ce_weight", owner, 0.0, low_open=False)
        self.chunk_size = check_int(chunk_size, "chunk_size", owner, 1)
        if teacher is None:
            raise SlimtuneError("Distillation teacher=None is not valid; valid: an nn.Module, a hub id, a model folder, "
                                "a .gguf file, or a model config mapping")
        if teacher_quantization is not None and teacher_quantization not in TEACHER_QUANTIZATIONS:
            raise SlimtuneError(f"Distillation teacher_quantization={show(teacher_quantization)} is not valid; valid: "
                                f"{choices(TEACHER_QUANTIZATIONS)}, or null")
        if isinstance(teacher, nn.Module):
            if teacher_quantization not in (None, "none") or teacher_dtype is not None:
                raise SlimtuneError("Distillation teacher_quantization / teacher_dtype apply to a teacher it loads; "
                                    "valid: null with an nn.Module teacher (quantize it before passing it)")
            self._teacher_cfg = None
            self._teacher: nn.Module | None = freeze(teacher)
        else:
            self._teacher_cfg = teacher_config(teacher, teacher_quantization, teacher_dtype)
            from slimtune.models.loading import check_source, dtype_of, quantization_of

            quantization_of(self._teacher_cfg)
            dtype_of(self._teacher_cfg)
            try:
                check_source(self._teacher_cfg)
            except SlimtuneError as err:
                raise SlimtuneError(f"Distillation teacher: {err}") from None
            self._teacher = None
        self.teacher_device = teacher_device
        self.teacher_tokenizer = check_tokenizer_arg(teacher_tokenizer, owner)
        self.tokenizer = check_tokenizer_arg(tokenizer, owner)
        if hidden_layers is not None and (not is_sequence(hidden_layers) or not hidden_layers):
            raise SlimtuneError(f"Distillation hidden_layers={show(hidden_layers)} is not valid; valid: null, or a "
                                "list of [student_layer, teacher_layer] pairs")
        self.hidden_layers = [list(p) if is_sequence(p) else p for p in hidden_layers] if hidden_layers else None
        if hidden_loss not in HIDDEN_LOSSES:
            raise SlimtuneError(f"Distillation hidden_loss={show(hidden_loss)} is not valid; valid: {choices(HIDDEN_LOSSES)}")
        self.hidden_loss = hidden_loss
        self.hidden_weight = check_number(hidden_weight, "hidden_weight", owner, 0.0)
        self.model = check_model_arg(model, owner)
        self.cache_dir = check_path(cache_dir, "cache_dir", owner)
        self.cache_batch_size = check_int(cache_batch_size, "cache_batch_size", owner, 1)
        if self.cache_dir is not None and top_k is None:
            raise SlimtuneError("Distillation cache_dir needs top_k (the cache stores the teacher's k most likely tokens "
                                "per position); valid: top_k=<a positive int>, e.g. 64, or cache_dir=null")
        if self.cache_dir is not None and self.hidden_layers:
            raise SlimtuneError("Distillation cache_dir holds the teacher's logits only, and hidden_layers needs its "
                                "hidden states; valid: cache_dir=null with hidden_layers, or hidden_layers=null")
        self.on_policy = check_number(on_policy, "on_policy", owner, 0.0, 1.0, low_open=False, high_open=False)
        self.max_new_tokens = check_int(max_new_tokens, "max_new_tokens", owner, 1, none_ok=True)
        self.generation_temperature = check_number(generation_temperature, "generation_temperature", owner, 0.0)
        if self.on_policy > 0 and self.max_new_tokens is None:
            raise SlimtuneError(f"Distillation on_policy={self.on_policy:g} samples completions from the student and "
                                "needs a generation budget; valid: max_new_tokens=<a positive int>, or on_policy=0")
        if self.on_policy > 0 and (self.cache_dir is not None or self.hidden_layers):
            raise SlimtuneError(f"Distillation on_policy={self.on_policy:g} scores the student's own samples with the "
                                "live teacher's logits; valid: on_policy=0 with cache_dir or hidden_layers")
        self.on_policy_steps = 0
        self.last_generated = None
        self._cache: LogitCache | None = None
        self._sequences: list | None = None
        self.hidden: HiddenStateLoss | None = None
        self._pending_hidden_state: dict | None = None
        self._runner: TeacherRunner | None = None
        self._vocab_size: int | None = None
        self._teacher_tokenizer_loaded = None
        self.last_terms: dict[str, float] = {}
        self._hooks: list = []

    # ------------------------------------------------------------------ teacher

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def describe_teacher(self) -> str:
        if self._teacher_cfg is None:
            return f"<{type(self._teacher).__name__}>"
        cfg = self._teacher_cfg
        return str(cfg["name_or_path"]) if cfg.get("name_or_path") else f"config:{cfg['config'].get('model_type')}"

    def _load_teacher(self, device) -> None:
        if self._teacher is None:
            self._teacher, self._teacher_tokenizer_loaded = load_teacher(self._teacher_cfg, device)
        quantized = any(getattr(p, "quant_state", None) is not None or p.dtype in (torch.int8, torch.uint8)
                        for p in self._teacher.parameters())
        if device is not None and not quantized:
            self._teacher.to(device)
        self._runner = TeacherRunner(self._teacher)

    # ------------------------------------------------------------------ seam

    def check_strategy(self, strategy) -> None:
        super().check_strategy(strategy)
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if self.hidden_layers and isinstance(strategy, DeepSpeedStrategy):
            raise SlimtuneError("Distillation hidden_layers adds projection parameters to the optimizer, which "
                                "DeepSpeed wraps and partitions itself; valid: hidden_layers=null under DeepSpeed")

    def report(self) -> dict[str, Any]:
        report = {"distill_teacher": self.describe_teacher(), "distill_loss": self.spec.loss,
                  "distill_temperature": self.spec.temperature}
        report.update({f"distill_last_{k}": v for k, v in self.last_terms.items()})
        if self.on_policy > 0:
            report["distill_on_policy_steps"] = self.on_policy_steps
        return report

    # ------------------------------------------------------------------ teacher-logit cache

    def _teacher_key(self) -> str:
        if self._teacher_cfg is None:
            return f"module:{weights_fingerprint(self._teacher)}"
        keys = ("name_or_path", "gguf_file", "config", "revision", "dtype", "quantization")
        return json.dumps({k: self._teacher_cfg.get(k) for k in keys}, sort_keys=True, default=str)

    def _cache_fingerprint(self, tokenizer) -> dict:
        from slimtune.data.datasets import tokenizer_fingerprint

        fingerprint = {"teacher": self._teacher_key(), "top_k": int(self.spec.top_k),
                       "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None}
        if self._sequences is not None:
            fingerprint["data"] = data_fingerprint(self._sequences)
        return fingerprint

    def _use_cache(self, trainer, tokenizer) -> bool:
        """Load the cache when it is there (checked against this run's fingerprint); False when it must be written."""
        from slimtune.distill.cache import read_cache_meta

        self._sequences = _training_sequences(trainer)
        meta = read_cache_meta(Path(self.cache_dir))
        if meta is not None and meta.get("complete"):
            self._cache = LogitCache(self.cache_dir, self._cache_fingerprint(tokenizer))
            return True
        if self._sequences is None:
            raise SlimtuneError(f"Distillation cache_dir={self.cache_dir!r} holds no finished cache and the training "
                                "sequences are not at hand to write one; valid: fit with a LightningDataModule whose "
                                "train_dataloader() has a dataset of rows with input_ids, or write the cache with "
                                "slimtune.distill.cache.write_logit_cache")
        return False

    def _write_cache(self, trainer, tokenizer) -> None:
        import gc

        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        fingerprint = self._cache_fingerprint(tokenizer)
        fingerprint.pop("data", None)  # computed by the writer from the same sequences
        if trainer.is_global_zero:  # one process writes the shared folder; the others wait, then read it
            write_logit_cache(lambda ids, mask: self._runner.run(ids, mask)[0], self._sequences, self.cache_dir,
                              fingerprint, int(self.spec.top_k), self._vocab_size, batch_size=self.cache_batch_size,
                              chunk_size=self.chunk_size, pad_id=int(pad_id), progress=True)
        trainer.strategy.barrier("distillation_cache")
        self._cache = LogitCache(self.cache_dir, self._cache_fingerprint(tokenizer))
        # the student trains from the cache: the teacher leaves memory
        self._teacher = None if self._teacher_cfg is not None else self._teacher
        self._runner = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        device = self.teacher_device if self.teacher_device is not None else trainer.strategy.root_device
        student = self.model_for(pl_module)
        student_tokenizer = resolve_tokenizer(pl_module, self.tokenizer, "Distillation", required=False)
        if self.cache_dir is not None and self._use_cache(trainer, student_tokenizer):
            attach_loss_terms(pl_module, self)  # from the cache: the teacher is never loaded
            return
        self._load_teacher(torch.device(device))
        teacher_tokenizer = self.teacher_tokenizer if self.teacher_tokenizer is not None else self._teacher_tokenizer_loaded
        if isinstance(teacher_tokenizer, (str, os.PathLike)):
            teacher_tokenizer = resolve_tokenizer(pl_module, teacher_tokenizer, "Distillation teacher_tokenizer")
        self._vocab_size = aligned_vocab_size(model_vocab_size(student), model_vocab_size(self._teacher),
                                              student_tokenizer, teacher_tokenizer)
        if self.cache_dir is not None:
            self._write_cache(trainer, student_tokenizer)
            attach_loss_terms(pl_module, self)
            return
        if self.hidden_layers is not None:
            s_cfg, t_cfg = _text_config(student), _text_config(self._teacher)
            self.hidden = HiddenStateLoss(self.hidden_layers, s_cfg.hidden_size, t_cfg.hidden_size,
                                          s_cfg.num_hidden_layers + 1, t_cfg.num_hidden_layers + 1, self.hidden_loss)
            if self._pending_hidden_state is not None:  # resume: the projections as the checkpoint saved them
                self.hidden.load_state_dict(self._pending_hidden_state)
                self._pending_hidden_state = None
        attach_loss_terms(pl_module, self)

    def on_fit_start(self, trainer, pl_module) -> None:
        student = self.model_for(pl_module)
        self._remove_hooks()
        self._outputs = capture_outputs(student)
        self._inputs = _StudentInputs(student, hidden_states=self.hidden is not None)
        self._hooks = [self._outputs, self._inputs]
        if self.hidden is not None:
            self.hidden.to(pl_module.device)
            if self.hidden.projections is not None:
                _train_with(trainer, list(self.hidden.parameters()))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        detach_loss_terms(pl_module, self)
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the terms

    def loss_terms(self, pl_module, batch, batch_idx) -> dict[str, torch.Tensor]:
        output = self._outputs.last
        inputs = self._inputs.inputs
        input_ids = inputs.get("input_ids")
        if input_ids is None and isinstance(batch, Mapping):
            input_ids = batch.get("input_ids")
        if not isinstance(input_ids, torch.Tensor):
            raise SlimtuneError("Distillation needs the student to be called with input_ids (a tensor) in "
                                "training_step; valid: model(input_ids=..., attention_mask=..., labels=...)")
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        if labels is None and isinstance(batch, Mapping):
            labels = batch.get("labels")
        if self.on_policy > 0 and float(torch.rand(())) < self.on_policy:
            kd = self._on_policy_kd(pl_module, input_ids, labels, attention_mask)
        else:
            if self._cache is not None:
                teacher, teacher_states = self._cache.lookup(input_ids, attention_mask), None
            else:
                teacher, teacher_states = self._runner.run(input_ids, attention_mask,
                                                           hidden_states=self.hidden is not None)
            kd = kd_loss(output.logits, teacher, labels, attention_mask, spec=self.spec, chunk_size=self.chunk_size,
                         vocab_size=self._vocab_size)
        terms = {"kd": self.kd_weight * kd}
        if self.ce_weight != 1.0:
            ce = getattr(output, "loss", None)
            if ce is None:
                raise SlimtuneError(f"Distillation ce_weight={self.ce_weight:g} needs the student's own loss, and it was "
                                    "called without labels; valid: ce_weight=1, or call the model with labels=")
            terms["ce_rescale"] = (self.ce_weight - 1.0) * ce
        if self.hidden is not None:
            student_states = getattr(output, "hidden_states", None)
            if student_states is None:
                raise SlimtuneError("Distillation hidden_layers: the student returned no hidden states; valid: a "
                                    "transformers model (called with output_hidden_states=True during training)")
            mask = attention_mask if attention_mask is not None else None
            terms["hidden"] = self.hidden_weight * self.hidden(student_states, teacher_states, mask)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return terms

    def _on_policy_kd(self, pl_module, input_ids, labels, attention_mask) -> torch.Tensor:
        """GKD: the divergence on completions the student samples from this batch's prompts (a second forward of
        the student, with gradient), scored by the teacher."""
        from slimtune.distill.on_policy import prompts_of, sample_completions

        student = self.model_for(pl_module)
        tokenizer = resolve_tokenizer(pl_module, self.tokenizer, "Distillation", required=False)
        config = _text_config(student)
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = pad if pad is not None else (config.pad_token_id if config.pad_token_id is not None else 0)
        eos = eos if eos is not None else config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        generated = sample_completions(student, prompts_of(input_ids, labels, attention_mask), self.max_new_tokens,
                                       self.generation_temperature, int(pad), eos)
        self.last_generated = generated
        self.on_policy_steps += 1
        logits = student(input_ids=generated.input_ids, attention_mask=generated.attention_mask,
                         position_ids=generated.position_ids).logits
        teacher, _ = self._runner.run(generated.input_ids, generated.attention_mask,
                                      position_ids=generated.position_ids)
        return kd_loss(logits, teacher, generated.labels, spec=self.spec, chunk_size=self.chunk_size,
                       vocab_size=self._vocab_size)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        # the hidden-state projections are this callback's; the teacher is in no checkpoint
        state: dict[str, Any] = {"loss": self.spec.loss, "temperature": self.spec.temperature}
        if self.hidden is not None and self.hidden.projections is not None:
            state["projections"] = {k: v.detach().cpu().clone() for k, v in self.hidden.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        projections = state_dict.get("projections")
        if projections:
            if self.hidden is not None:
                self.hidden.load_state_dict(projections)
            else:
                self._pending_hidden_state = dict(projections)


def _train_with(trainer, params: list) -> None:
    """Add `params` to the trainer's optimizer as a group with the first group's settings (learning rate, weight
    decay, ...), and extend its learning-rate schedulers to the new group, so they follow the same schedule."""
    from torch.optim.lr_scheduler import LRScheduler

    optimizer = trainer.optimizers[0]
    if any(p is q for group in optimizer.param_groups for p in group["params"] for q in params):
        return
    group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    optimizer.add_param_group({**group, "params": params})
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        extendable = isinstance(scheduler, LRScheduler) and not any(
            hasattr(scheduler, name) for name in ("_schedulers", "max_lrs", "T_i", "cycle_momentum"))
        if not extendable:
            raise SlimtuneError(f"Distillation hidden_layers trains projections in the optimizer's own schedule, and "
                                f"{type(scheduler).__name__} cannot take a new parameter group; valid: a LambdaLR-style "
                                "scheduler (slimtune's constant, cosine, linear), no scheduler, or hidden_layers=null")
        scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(group["lr"])


def _training_sequences(trainer) -> list | None:
    """The token ids of every training example, in dataset order, when the fit has a LightningDataModule whose training
    loader reads a dataset of rows with input_ids (slimtune's data layer); None otherwise."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None
    dataset = getattr(datamodule.train_dataloader(), "dataset", None)
    try:
        rows = [dataset[i] for i in range(len(dataset))]
    except (TypeError, KeyError, IndexError):
        return None
    if not rows or not all(isinstance(row, Mapping) and "input_ids" in row for row in rows):
        return None
    return [[int(t) for t in row["input_ids"]] for row in rows]


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
