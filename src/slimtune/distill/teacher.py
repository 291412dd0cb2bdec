"""The teacher of a distillation: loading it by slimtune's model layer, freezing it, running it so its logits can be
computed chunk by chunk, and checking that its vocabulary can be compared with the student's. No Lightning.

A teacher is any causal LM `slimtune.models.loading` loads: a hub id, a local folder, a `.gguf` file (or a
`pkg:PACKAGE/path`), or a model config mapping as the `model` config group writes it (`name_or_path`, `config`,
`tokenizer`, `dtype`, `quantization`: none, nf4, fp4 or int8 through bitsandbytes), or an `nn.Module` given directly.
It is frozen (no parameter requires grad) and kept in eval mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtune.distill.losses import HeadInput
from slimtune.errors import SlimtuneError

__all__ = ["TeacherRunner", "aligned_vocab_size", "freeze", "load_teacher", "model_vocab_size", "teacher_config"]

_DEFAULTS = {"name_or_path": None, "gguf_file": None, "config": None, "tokenizer": None, "revision": None,
             "trust_remote_code": False, "dtype": "float32", "quantization": "none", "double_quant": True}


def teacher_config(teacher: Any, quantization: str | None = None, dtype: str | None = None) -> dict:
    """The model-layer config of a teacher given as a path / hub id or a mapping; `quantization` and `dtype`, when
    given, override the mapping's."""
    if isinstance(teacher, (str, os.PathLike)):
        cfg = {**_DEFAULTS, "name_or_path": os.fspath(teacher)}
    elif isinstance(teacher, Mapping):
        unknown = sorted(set(teacher) - set(_DEFAULTS) - {"finetune", "lora", "gradient_checkpointing"})
        if unknown:
            raise SlimtuneError(f"Distillation teacher has unknown keys {unknown}; valid: {', '.join(_DEFAULTS)}")
        cfg = {**_DEFAULTS, **{k: v for k, v in teacher.items() if k in _DEFAULTS}}
        if cfg.get("config") is not None:
            cfg["config"] = dict(cfg["config"])
    else:
        raise SlimtuneError(f"Distillation teacher=<{type(teacher).__name__}> is not valid; valid: an nn.Module, a hub "
                            "id, a model folder, a .gguf file, or a model config mapping (name_or_path / config, ...)")
    if quantization is not None:
        cfg["quantization"] = quantization
    if dtype is not None:
        cfg["dtype"] = dtype
    return cfg


def _described(cfg: Mapping) -> str:
    return repr(cfg["name_or_path"]) if cfg.get("name_or_path") else f"config({cfg['config'].get('model_type')})"


def load_teacher(cfg: Mapping, device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
    """(the frozen teacher in eval mode, its tokenizer or None) from a `teacher_config`; a teacher that does not load
    is a one-line SlimtuneError naming it."""
    from slimtune.models.loading import load_base_model, load_tokenizer, quantization_of

    try:
        quant = quantization_of(cfg)
        model = load_base_model(cfg, device=device if quant == "none" or torch.cuda.is_available() else None)
    except SlimtuneError as err:
        raise SlimtuneError(f"Distillation teacher {_described(cfg)} could not be loaded: {err}") from err
    except Exception as err:  # noqa: BLE001 - transformers' own errors (a broken folder, an unknown architecture)
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise SlimtuneError(f"Distillation teacher {_described(cfg)} could not be loaded ({first}); valid: a causal "
                            "LM the model layer loads (hub id, folder, .gguf, or a config)") from err
    tokenizer = None
    if cfg.get("tokenizer") or cfg.get("config") is None:
        try:
            tokenizer = load_tokenizer(cfg)
        except SlimtuneError:
            tokenizer = None  # no tokenizer to compare: the vocabulary sizes must then agree (aligned_vocab_size)
    return freeze(model), tokenizer


def freeze(model: nn.Module) -> nn.Module:
    """No parameter of `model` requires grad, it is in eval mode, and its bitsandbytes 4-bit layers compute with their
    exact weights (`guard_4bit`: no CPU repacking, exact dequantization of ragged layers)."""
    from slimtune.quant.bnb4bit import guard_4bit

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    guard_4bit(model)
    return model


def model_vocab_size(model: nn.Module) -> int:
    """The number of logits a causal LM produces (its output layer's rows; padded embeddings included)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 0:
        quant_state = getattr(weight, "quant_state", None)
        return int(quant_state.shape[0]) if quant_state is not None else int(weight.shape[0])
    return int(model.config.vocab_size)


def aligned_vocab_size(student_vocab: int, teacher_vocab: int, student_tokenizer=None, teacher_tokenizer=None) -> int | None:
    """How many leading logits the two models share: None when both have the same number and the same tokenizer;
    else the shorter tokenizer's length (same-family models whose embeddings are padded to different sizes). Two
    different tokenizers are refused in one line saying why."""
    shared = min(student_vocab, teacher_vocab)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        student_ids, teacher_ids = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        shorter, longer = sorted((student_ids, teacher_ids), key=len)
        for token, index in shorter.items():
            if longer.get(token) != index:
                s_id, t_id = student_ids.get(token), teacher_ids.get(token)
                raise SlimtuneError(
                    f"Distillation: the teacher's tokenizer differs from the student's (token {token!r} is id {s_id} "
                    f"for the student and {t_id} for the teacher); valid: a teacher of the student's tokenizer family, "
                    "since logit distillation compares probabilities of the same token ids")
        shared = min(len(student_tokenizer), len(teacher_tokenizer))
    elif student_vocab != teacher_vocab and student_tokenizer is None and teacher_tokenizer is None:
        pass  # no tokenizer to check: the leading ids are taken to be the same tokens (padded embeddings)
    for who, size in (("student", student_vocab), ("teacher", teacher_vocab)):
        if size < shared:
            raise SlimtuneError(f"Distillation: the tokenizer has {shared} tokens and the {who} only {size} logits; "
                                "valid: models whose output layer covers the tokenizer")
    return None if shared == student_vocab == teacher_vocab else shared


class TeacherRunner:
    """Runs the frozen teacher on a batch and returns what `kd_loss` takes: its last hidden states with its output
    layer (`HeadInput`, so logits are computed chunk by chunk) when that reproduces the model's own logits (checked
    once), else its logits."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._split: bool | None = None  # decoder + head give the model's logits (decided on the first batch)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _parts(self):
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return decoder, head

    @torch.no_grad()
    def _check_split(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        decoder, head = self._parts()
        if decoder is None or head is None or decoder is self.model:
            return False
        ids = input_ids[:1, :8]
        mask = attention_mask[:1, :8] if attention_mask is not None else None
        try:
            whole = self.model(input_ids=ids, attention_mask=mask).logits.float()
            split = head(decoder(input_ids=ids, attention_mask=mask).last_hidden_state).float()
        except Exception:  # noqa: BLE001 - a model whose parts cannot be called apart: use its logits
            return False
        # a model that scales or soft-caps its logits after the output layer (Gemma 2, Cohere) does not match
        return split.shape == whole.shape and torch.allclose(split, whole, rtol=1e-3, atol=1e-3)

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            hidden_states: bool = False, position_ids: torch.Tensor | None = None) -> tuple[Any, tuple | None]:
        """(HeadInput or logits, the hidden states of every layer when `hidden_states`); `position_ids` for
        left-padded rows (on-policy samples)."""
        if self.model.training:
            self.model.eval()
        device = self.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        if self._split is None:
            self._split = self._check_split(input_ids, attention_mask)
        extra = {"position_ids": position_ids.to(device)} if position_ids is not None else {}
        if self._split:
            decoder, head = self._parts()
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states, **extra)
            return HeadInput(out.last_hidden_state, head), (out.hidden_states if hidden_states else None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states, **extra)
        return out.logits, (out.hidden_states if hidden_states else None)
