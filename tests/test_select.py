"""slimtune.select: the one layer-matching rule, and every method choosing the same layers by it."""

import pytest
import torch
from conftest import TINY_LLAMA
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.callbacks import ActivationOutlierMonitor, PostTrainingQuantization
from slimtune.errors import SlimtuneError
from slimtune.models.loading import lora_config
from slimtune.quant import QuantLinear, find_linear_layers
from slimtune.select import linear_layers, name_matches, select_layers, select_names

Q = "model.layers.0.self_attn.q_proj"
NAMES = [f"model.layers.{i}.{part}" for i in range(2) for part in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = dict(TINY_LLAMA)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


@pytest.mark.parametrize("pattern, matches", [
    ("q_proj", True),                 # the last part
    ("self_attn.q_proj", True),       # a dot-bounded suffix
    (Q, True),                        # the whole name
    ("proj", False),                  # not at a dot boundary: `endswith` alone would match
    ("_proj", False),
    ("attn.q_proj", False),           # "self_attn" is not "attn"
    ("layers.0", False),              # a middle part is not a suffix
    (r"model\.layers\.0\..*", True),  # a regex must match the whole name
    (r".*q_pro", False),
    (r"q_pro.", False),               # not a plain name, so a regex over the whole name: no
    (r".*\.(q|k)_proj", True),
])
def test_name_matches_plain_names_at_dot_boundaries_and_regexes_over_full_names(pattern, matches):
    assert name_matches(pattern, Q) is matches


def test_invalid_regex_is_one_line_error_naming_it():
    with pytest.raises(SlimtuneError) as err:
        select_names(NAMES, ["q_proj", "(unclosed"])
    assert "'(unclosed' is not a valid regular expression" in str(err.value) and "\n" not in str(err.value)


def test_select_names_all_linear_excludes_and_order():
    assert select_names(NAMES, "all-linear", ["lm_head"]) == NAMES[:-1]
    assert select_names(NAMES, "all-linear", ["mlp"]) == NAMES  # `mlp` is no suffix of any name
    assert select_names(NAMES, ["down_proj", "q_proj"], [r"model\.layers\.1\..*"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]  # names' order, not the patterns'


@pytest.mark.parametrize("targets, exclude, message", [
    (["proj"], (), "target pattern 'proj' matches no layer; valid: names ending in one of q_proj, k_proj"),
    (["lm_head"], ["lm_head"], "target pattern 'lm_head' only matches excluded layers (exclude=['lm_head'])"),
    ("all-linear", [r".*"], "targets='all-linear' with exclude=['.*'] leaves no layer"),
])
def test_selection_errors_are_one_line(targets, exclude, message):
    with pytest.raises(SlimtuneError) as err:
        select_names(NAMES, targets, exclude)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_peft_layers_count_once_under_their_plain_name():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = linear_layers(model)
    assert list(layers) == NAMES  # no lora_A / lora_B / base_layer entries, module order
    q = layers[Q]
    assert q.path == Q + ".base_layer" and type(q.layer) is nn.Linear and q.wrapper is not None
    assert q.outer is q.wrapper and layers["model.layers.0.self_attn.k_proj"].outer is layers[
        "model.layers.0.self_attn.k_proj"].layer


def test_patterns_name_non_linear_layers_and_methods_refuse_them():
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj = nn.Conv1d(128, 64, 1)
    assert "model.layers.0.mlp.down_proj" not in select_layers(model, "all-linear")
    assert "model.layers.0.mlp.down_proj" in select_layers(model, ["down_proj"])
    with pytest.raises(SlimtuneError, match="layer model.layers.0.mlp.down_proj is Conv1d"):
        ActivationOutlierMonitor(patterns=["down_proj"]).attach(model)
    with pytest.raises(SlimtuneError, match=r"layer model.layers.0.mlp.down_proj is \(Conv1d\); valid: nn.Linear"):
        PostTrainingQuantization(method="rtn", targets=["down_proj"], verbose=False).quantize(model)


def test_every_method_picks_the_same_layers_by_the_one_rule():
    targets = ["self_attn.q_proj", r"model\.layers\.1\.mlp\.(up|down)_proj"]
    exclude = ["model.layers.1.self_attn.q_proj"]
    expected = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]

    assert list(select_layers(tiny_llama(), targets, exclude)) == expected
    assert list(find_linear_layers(tiny_llama(), targets, exclude)) == expected  # quantizers (plain model: paths)

    # LoRA targets: a list with a regex reaches PEFT as the full names the rule picked
    lora_targets = ["self_attn.q_proj", r"model\.layers\.1\.mlp\.(up|down)_proj"]
    lora = get_peft_model(tiny_llama(), lora_config({"lora": {"target_modules": lora_targets}}, tiny_llama()))
    wrapped = [n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")]
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", *expected[1:]]

    # post-training quantization and the outlier monitor on that LoRA model
    for p in lora.parameters():
        p.requires_grad_(False)
    monitor = ActivationOutlierMonitor(patterns=targets, exclude=exclude).attach(lora)
    assert monitor._order == expected
    monitor.detach()
    PostTrainingQuantization(method="rtn", bits=4, group_size=32, targets=targets, exclude=exclude,
                             verbose=False).quantize(lora)
    quantized = [ref.name for ref in linear_layers(lora).values() if isinstance(ref.layer, QuantLinear)]
    assert quantized == expected


def test_lora_targets_keep_plain_names_for_peft_and_refuse_what_peft_would_not_match():
    model = tiny_llama()
    assert sorted(lora_config({"lora": {"target_modules": ["q_proj", "mlp.down_proj"]}}, model).target_modules) == [
        "mlp.down_proj", "q_proj"]  # PEFT's own list rule is the same for plain names
    assert lora_config({"lora": {"target_modules": "all-linear"}}, model).target_modules == "all-linear"
    with pytest.raises(SlimtuneError) as err:  # `endswith` without a dot boundary used to accept it
        lora_config({"lora": {"target_modules": ["proj"]}}, model)
    assert "model.lora.target_modules pattern 'proj' matches no layer" in str(err.value)
    with pytest.raises(SlimtuneError, match="'embed_tokens' matches no layer"):  # embeddings are no LoRA target here
        lora_config({"lora": {"target_modules": ["embed_tokens"]}}, model)
