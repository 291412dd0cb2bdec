"""Tiny MoE models of each transformers family, built from configs (shared by the MoE tests)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 256
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, bos_token_id=0,
            eos_token_id=0, pad_token_id=0)
FAMILY_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      head_dim=8),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16),
}
ROUTER_NAMES = {"gpt_oss": "model.layers.{}.mlp.router"}


def tiny_moe(family: str = "mixtral", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**BASE, **FAMILY_CONFIGS[family], **overrides}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    if family in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"):
        # these routers start at zero weights (all experts tie): give them a random start as training would
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                    p.normal_(0, 0.5)
    return model.train()


def token_batches(n: int, batch: int = 2, length: int = 12, seed: int = 1, pad_last: int = 0):
    """`n` dict batches of input_ids / attention_mask / labels; the first row of each padded on the right by
    `pad_last` tokens (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[0, -pad_last:] = 0
            ids[0, -pad_last:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
