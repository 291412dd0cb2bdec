"""Sparse upcycling (Komatsuzaki et al. 2023): a dense Llama-style model turned into a Mixtral-style MoE model that
stock transformers loads (`MixtralForCausalLM`, saved and loaded with save_pretrained / from_pretrained).

Each decoder layer's MLP is copied into `num_experts` experts (transformers 5 stores them fused: `gate_up_proj`
(E, 2I, H) = [gate; up] per expert, `down_proj` (E, H, I)); each layer gets a new router (normal init with the
model's `initializer_range`), and everything else (embeddings, attention, norms, head) is copied unchanged. With
`noise=0` every expert is the dense MLP, and Mixtral renormalises the top-k weights to sum to one, so the upcycled
model computes the dense model's function whatever the router chooses; `noise > 0` multiplies each expert's weights by
(1 + noise x N(0, 1)) elementwise, so experts can differ from the first step (a symmetry breaker).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError

__all__ = ["UPCYCLABLE", "mixtral_config_from_dense", "upcycle_to_mixtral"]

UPCYCLABLE = ("llama", "mistral")  # decoder blocks Mixtral's attention, norms and gated SiLU MLP compute alike

_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
           "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout",
           "rope_parameters")


def _check_dense(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in UPCYCLABLE:
        raise SlimtuneError(f"upcycling a {type(model).__name__} (model_type={model_type!r}) is not supported; "
                            f"valid: a dense model of type {', '.join(UPCYCLABLE)}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise SlimtuneError(f"upcycling needs {flag}=false (Mixtral's layers have no biases); valid: a model "
                                f"without {flag}")


def mixtral_config_from_dense(dense_config, num_experts: int, top_k: int):
    from transformers import MixtralConfig

    for key, value, low in (("num_experts", num_experts, 2), ("top_k", top_k, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SlimtuneError(f"upcycle {key}={value!r} is not valid; valid: an int >= {low}")
    if top_k > num_experts:
        raise SlimtuneError(f"upcycle top_k={top_k} is not valid for num_experts={num_experts}; valid: an int in "
                            f"[1, {num_experts}]")
    kwargs = {key: getattr(dense_config, key) for key in _COPIED if getattr(dense_config, key, None) is not None}
    kwargs["sliding_window"] = getattr(dense_config, "sliding_window", None)
    kwargs.update(num_local_experts=num_experts, num_experts_per_tok=top_k, output_router_logits=False,
                  router_jitter_noise=0.0)
    return MixtralConfig(**kwargs)


@torch.no_grad()
def upcycle_to_mixtral(dense: nn.Module, num_experts: int = 4, top_k: int = 2, noise: float = 0.0,
                       seed: int = 0, dtype: torch.dtype | None = None):
    """A `MixtralForCausalLM` made from `dense` (see the module docstring); `dense` is left unchanged."""
    from transformers import MixtralForCausalLM

    _check_dense(dense)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise SlimtuneError(f"upcycle noise={noise!r} is not valid; valid: a number >= 0 (0: identical experts)")
    config = mixtral_config_from_dense(dense.config, num_experts, top_k)
    dtype = dtype or next(dense.parameters()).dtype
    moe = MixtralForCausalLM(config).to(dtype)  # built on the CPU: its rotary buffers are computed, not copied
    generator = torch.Generator().manual_seed(seed)
    dense_state = dense.state_dict()
    target = moe.state_dict()
    filled = set()
    for name, tensor in dense_state.items():
        if ".mlp." in name:
            continue
        if name not in target:
            raise SlimtuneError(f"upcycling found {name} in the dense model with no place in Mixtral; valid: a "
                                f"Llama-style model ({', '.join(UPCYCLABLE)})")
        target[name].copy_(tensor)
        filled.add(name)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp"
        gate, up, down = (dense_state[f"{prefix}.{p}_proj.weight"].float() for p in ("gate", "up", "down"))
        gate_up = torch.cat([gate, up], dim=0)
        experts_gate_up = gate_up.expand(num_experts, *gate_up.shape).clone()
        experts_down = down.expand(num_experts, *down.shape).clone()
        if noise > 0:
            experts_gate_up *= 1 + noise * torch.randn(experts_gate_up.shape, generator=generator)
            experts_down *= 1 + noise * torch.randn(experts_down.shape, generator=generator)
        target[f"{prefix}.experts.gate_up_proj"].copy_(experts_gate_up)
        target[f"{prefix}.experts.down_proj"].copy_(experts_down)
        router = torch.randn(target[f"{prefix}.gate.weight"].shape, generator=generator) * config.initializer_range
        target[f"{prefix}.gate.weight"].copy_(router)
        filled.update({f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj", f"{prefix}.gate.weight"})
    if config.tie_word_embeddings:
        filled.add("lm_head.weight")
    missing = [n for n in target if n not in filled and not n.endswith("inv_freq")]
    if missing:
        raise SlimtuneError(f"upcycling left {missing[:3]} unset; valid: a Llama-style dense model")
    moe.load_state_dict(target, strict=False)
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = getattr(dense, "generation_config", moe.generation_config)
    return moe.train(dense.training)
