"""Sparse upcycling: a tiny dense Llama becomes a Mixtral that computes the same function with zero noise (top-k
weights renormalised), that stock transformers saves and loads, and whose experts differ with noise."""

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import AutoConfig, AutoModelForCausalLM, MixtralForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.moe import find_routers
from slimtune.moe.upcycle import upcycle_to_mixtral


def dense_llama(**overrides):
    torch.manual_seed(0)
    config = {**TINY_LLAMA, "initializer_range": 0.05, **overrides}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).eval()


IDS = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))


def test_zero_noise_upcycled_model_computes_the_dense_function_and_round_trips(tmp_path):
    dense = dense_llama()
    moe = upcycle_to_mixtral(dense, num_experts=4, top_k=2).eval()
    assert isinstance(moe, MixtralForCausalLM)
    routers = find_routers(moe)
    assert [(r.num_experts, r.top_k) for r in routers] == [(4, 2)] * TINY_LLAMA["num_hidden_layers"]
    with torch.no_grad():
        expected = dense(input_ids=IDS).logits
        got = moe(input_ids=IDS).logits
        # the routers really choose different experts per token (so the equality is not a one-expert accident)
        _, _, chosen = routers[0].module(torch.randn(64, TINY_LLAMA["hidden_size"]))
    assert len(set(chosen.flatten().tolist())) == 4
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())

    moe.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, got)
    for (name, a), (_, b) in zip(moe.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_noise_makes_experts_differ_and_the_function_move():
    dense = dense_llama()
    moe = upcycle_to_mixtral(dense, num_experts=4, top_k=2, noise=0.05, seed=1).eval()
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])
    gate = dense.model.layers[0].mlp.gate_proj.weight
    assert torch.allclose(experts[0][: gate.shape[0]], gate, rtol=0.5, atol=1e-3)  # noise around the dense copy
    with torch.no_grad():
        assert not torch.allclose(moe(input_ids=IDS).logits, dense(input_ids=IDS).logits, atol=1e-5)
    same_seed = upcycle_to_mixtral(dense, num_experts=4, top_k=2, noise=0.05, seed=1)
    assert torch.equal(same_seed.model.layers[0].mlp.experts.gate_up_proj, experts)


def test_bad_upcycling_input_is_one_line():
    dense = dense_llama()
    cases = [(dict(num_experts=1), "num_experts=1 is not valid; valid: an int >= 2"),
             (dict(num_experts=4, top_k=5), "top_k=5 is not valid for num_experts=4"),
             (dict(noise=-0.1), r"noise=-0.1 is not valid; valid: a number >= 0")]
    for kwargs, message in cases:
        with pytest.raises(SlimtuneError, match=message) as err:
            upcycle_to_mixtral(dense, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(SlimtuneError, match="mlp_bias=false"):
        upcycle_to_mixtral(dense_llama(mlp_bias=True))
    moe = upcycle_to_mixtral(dense)
    with pytest.raises(SlimtuneError, match=r"model_type='mixtral'\) is not supported; valid: a dense model of type"):
        upcycle_to_mixtral(moe)


def test_lora_on_routers_and_fused_experts_merges_into_a_plain_mixtral(tmp_path):
    """PEFT's all-linear on an MoE model adapts each router's weight and the fused 3-D expert weights (ParamWrapper);
    slimtune's merged export folds those deltas in too, so the plain Mixtral computes what the adapted model did."""
    from peft import LoraConfig, get_peft_model

    from slimtune.models.merge import save_merged

    moe = upcycle_to_mixtral(dense_llama(), num_experts=4, top_k=2, noise=0.01)
    peft_model = get_peft_model(moe, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False)).eval()
    wrapped = {type(m).__name__ for n, m in peft_model.named_modules() if n.endswith(("mlp.gate", "mlp.experts"))}
    assert wrapped == {"ParamWrapper"}
    with torch.no_grad():
        adapted = peft_model(input_ids=IDS).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            unadapted = plain(input_ids=IDS).logits
    assert not torch.allclose(adapted, unadapted, atol=1e-4)  # the deltas matter
    merged = AutoModelForCausalLM.from_pretrained(save_merged(peft_model, tmp_path / "merged")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, adapted, atol=1e-4)
