"""The memory estimate (slimtune.estimate): each part against what the real libraries allocate (autograd's saved
tensors, bitsandbytes' quantized layers, the optimizers' states), the model states against DeepSpeed's own
estimator, the weights against accelerate's, hand-computed numbers for the tiny recipe, bad input, and the command."""

import functools
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_LLAMA, compose

from slimtune.errors import SlimtuneError
from slimtune.estimate import OPTIMIZER_STATES, estimate_run, print_estimate, quantized_bytes, strategy_of
from slimtune.models import load_model

TINY3 = {**TINY_LLAMA, "num_hidden_layers": 3}


def _model_cfg(dtype="float32", quantization="none", finetune="lora", dropout=0.0, targets="all-linear", r=8,
               config=None, checkpointing=False):
    return {"name_or_path": None, "config": dict(config or TINY3), "tokenizer": None, "dtype": dtype,
            "quantization": quantization, "double_quant": True, "finetune": finetune,
            "gradient_checkpointing": checkpointing,
            "lora": {"r": r, "alpha": 16, "dropout": dropout, "target_modules": targets, "bias": "none"}}


def _run_cfg(model_cfg, precision="32-true", batch=2, seq=32, optimizer="adamw", **trainer):
    return {"name": "t", "model": model_cfg, "data": {"batch_size": batch, "block_size": seq},
            "trainer": {"accelerator": "cpu", "devices": 1, "precision": precision, **trainer},
            "optimizer": {"name": optimizer}}


def _saved_tensor_bytes(model, precision: str, batch: int, seq: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward pass (each storage once, weights excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    ids = torch.randint(0, TINY3["vocab_size"], (batch, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.endswith("mixed"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype, quantization, finetune, dropout, targets, precision", [
    ("float32", "none", "lora", 0.0, "all-linear", "32-true"),
    ("float32", "nf4", "lora", 0.05, "all-linear", "32-true"),
    ("float32", "none", "lora", 0.0, ["q_proj", "v_proj"], "32-true"),
    ("float32", "none", "full", 0.0, "all-linear", "32-true"),
    ("float32", "none", "full", 0.0, "all-linear", "bf16-mixed"),
    ("float32", "int8", "lora", 0.0, "all-linear", "32-true"),
    ("bfloat16", "nf4", "lora", 0.1, "all-linear", "bf16-mixed"),  # the QLoRA recipes' numerics
    ("bfloat16", "nf4", "lora", 0.0, "all-linear", "32-true"),
])
def test_activations_equal_what_autograd_keeps(dtype, quantization, finetune, dropout, targets, precision):
    torch.manual_seed(0)
    model_cfg = _model_cfg(dtype, quantization, finetune, dropout, targets)
    model = load_model(model_cfg)
    model.train()
    measured = _saved_tensor_bytes(model, precision, batch=2, seq=32)
    est = estimate_run(_run_cfg(model_cfg, precision))
    assert est.activations.blocks + est.activations.head == measured


def test_ragged_4bit_layers_on_the_cpu_keep_their_dequantized_weight():
    config = {**TINY3, "intermediate_size": 160}  # down_proj's input width is not a multiple of the 64-value blocks
    model_cfg = _model_cfg(quantization="nf4", config=config)
    model = load_model(model_cfg)
    model.train()
    est = estimate_run(_run_cfg(model_cfg))
    assert est.activations.blocks + est.activations.head == _saved_tensor_bytes(model, "32-true", 2, 32)


def test_logits_peak_at_the_start_of_backward_is_three_fp32_copies():
    """The head's transient: log-softmax output + its gradient + the logits' gradient, as PyTorch allocates them
    (measured on the process's resident memory: the kernel's high-water mark, reset just before)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    tokens, vocab, hidden = 2048, 8192, 64
    x = torch.randn(tokens, hidden, requires_grad=True)
    weight, labels = torch.randn(vocab, hidden), torch.randint(0, vocab, (tokens,))
    torch.nn.functional.cross_entropy(x @ weight.t(), labels).backward()  # warm-up: allocator, kernels

    def status(key):
        line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    x.grad = None
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    torch.nn.functional.cross_entropy(x @ weight.t(), labels).backward()
    peak = status("VmHWM") - before
    model_cfg = _model_cfg(config={**TINY3, "vocab_size": vocab, "hidden_size": hidden})
    est = estimate_run(_run_cfg(model_cfg, batch=1, seq=tokens))
    predicted = 4 * tokens * vocab + est.activations.transient  # the kept log-softmax + the transient
    assert predicted == 3 * 4 * tokens * vocab
    assert abs(peak - predicted) / predicted < 0.1


# --------------------------------------------------------------------------- weights and optimizer states


@pytest.mark.parametrize("quantization, double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", True),
                                                        ("none", True)])
def test_weights_equal_the_loaded_models_storage(quantization, double_quant):
    from slimtune.models.stats import compression_stats

    model_cfg = {**_model_cfg(quantization=quantization), "double_quant": double_quant}
    model = load_model(model_cfg)
    stored = compression_stats(model)["size_mb"] * 2**20  # every parameter and buffer as stored, quant states included
    est = estimate_run(_run_cfg(model_cfg))
    weights = sum(est.value(key) for key in ("buffers", "base_quantized", "base_other", "trainable"))
    assert weights == pytest.approx(stored, abs=0.5)


def test_quantized_bytes_match_bitsandbytes_layers():
    import bitsandbytes as bnb

    from slimtune.models.stats import tensor_storage_bits

    for quant, dq, shape in (("nf4", True, (96, 200)), ("fp4", False, (96, 200)), ("nf4", True, (1536, 576)),
                             ("nf4", False, (576, 1536))):
        weight = bnb.nn.Params4bit(torch.randn(shape), requires_grad=False, quant_type=quant, compress_statistics=dq,
                                   quant_storage=torch.uint8).to("cpu")  # .to() on a device quantizes
        assert quantized_bytes(shape, quant, dq) == tensor_storage_bits(weight) // 8, (quant, dq, shape)
    layer = bnb.nn.Linear8bitLt(200, 96, bias=False, has_fp16_weights=False, device="meta")
    layer.weight = bnb.nn.Int8Params(torch.randn(96, 200), requires_grad=False, has_fp16_weights=False)
    assert quantized_bytes((96, 200), "int8", True) == tensor_storage_bits(layer.to("cpu").weight) // 8


@pytest.mark.parametrize("optimizer", OPTIMIZER_STATES)
def test_optimizer_states_equal_the_real_optimizers(optimizer):
    from slimtune.lightning.module import OPTIMIZERS, build_optimizer

    assert set(OPTIMIZER_STATES) == set(OPTIMIZERS)  # every optimizer a run can use has an estimate
    model_cfg = _model_cfg(r=64)  # adapters of 64 x 64 values and more (8-bit states) and of 32 x 64 (32-bit states)
    model = load_model(model_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, optimizer)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    storages = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    est = estimate_run(_run_cfg(model_cfg, optimizer=optimizer))
    assert est.value("optimizer") == sum(storages.values())


# --------------------------------------------------------------------------- anchors: DeepSpeed and accelerate


@functools.lru_cache(maxsize=None)
def _full_finetune(recipe: str, precision: str):
    """A full fine-tune of the recipe's model with AdamW (its skeleton built once; strategies via with_settings)."""
    return estimate_run(compose(f"recipe={recipe}", "model.quantization=none", "model.finetune=full",
                                "optimizer.name=adamw", f"trainer.precision={precision}"))


@pytest.mark.parametrize("recipe", ["full_tiny", "qlora_7b"])
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                                      "deepspeed_zero3_offload"])
def test_model_states_equal_deepspeeds_estimator(recipe, strategy):
    """A full fine-tune with 16-bit mixed precision and AdamW: the per-device model states (and the CPU memory of
    offloaded states) equal DeepSpeed's estimate_zero2/zero3_model_states_mem_needs for the same parameter counts."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    offload = strategy.endswith("offload")
    for devices in (1, 2, 4):
        est = _full_finetune(recipe, "bf16-mixed").with_settings(strategy=strategy, devices_per_node=devices,
                                                                 on_gpu=True)  # DeepSpeed estimates GPUs
        total, largest = est.params_total, est.largest_layer_params
        if strategy.startswith("deepspeed_zero2"):
            cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=devices, cpu_offload=offload)
        else:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=devices,
                                                                cpu_offload=offload, cpu_offload_params=offload)
        assert est.model_states == pytest.approx(gpu, rel=0.05)
        if offload:  # without offload DeepSpeed's CPU figure is the fp32 model each process loads, not a state
            assert est.model_states_cpu == pytest.approx(cpu, rel=0.05)


@pytest.mark.parametrize("recipe", ["full_tiny", "qlora_7b"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_precision_weights_equal_accelerates(recipe, dtype):
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM

    from slimtune.models import load_config

    overrides = [f"recipe={recipe}", "model.quantization=none", "model.finetune=full", f"model.dtype={dtype}"]
    if recipe == "full_tiny":  # accelerate's empty model unties embeddings; Llama-2's are untied anyway
        overrides.append("model.config.tie_word_embeddings=false")
    cfg = compose(*overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(cfg.model), dtype=getattr(torch, dtype))
    total, _ = calculate_maximum_sizes(model)  # what `accelerate estimate-memory` prints as the total size
    est = estimate_run(cfg)
    assert est.value("buffers") + est.value("trainable") == total


# --------------------------------------------------------------------------- hand-computed: the tiny recipe


def test_qlora_tiny_by_hand():
    """recipe=qlora_tiny: tiny Llama (V=2048, h=64, I=128, 2 layers, 4 heads, 2 kv heads of 16), NF4 + double quant,
    LoRA r=8 on all 7 linear layers, fp32, no dropout, AdamW, 4 x 64 tokens, CPU, 32-true."""
    est = estimate_run(compose("recipe=qlora_tiny"))
    V, h, I, L, r, T, s = 2048, 64, 128, 2, 8, 4 * 64, 64
    # (out, in) of q, k, v, o, gate, up, down
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    per_weight = [o * i // 2 + o * i // 64 + 4 + 256 * 4 + 4 + 16 * 4 for o, i in shapes]  # codes, DQ absmax, tables
    assert est.value("base_quantized") == L * sum(per_weight) == 2 * 26_680
    assert est.value("base_other") == 4 * (V * h + (2 * L + 1) * h)  # tied embeddings + 5 norms, fp32
    lora = L * sum(r * (o + i) for o, i in shapes)
    assert lora == 16_384 and est.value("trainable") == 4 * lora and est.value("gradients") == 4 * lora
    assert est.value("optimizer") == 8 * lora + 4 * 2 * L * 7  # exp_avg, exp_avg_sq, a step count per tensor
    assert est.value("buffers") == 2 * 4 * 16 // 2  # rotary inv_freq and original_inv_freq, fp32
    assert est.value("dequant") == 4 * 128 * 64
    # Per block: 2 RMSNorms (fp32 input + inverse RMS), q/out (T x 64) and k/v (T x 32) + fp32 log-sum-exp per head,
    # gate/SiLU/up (T x I), shared inputs of q/k/v, gate/up and down (o's is the attention output), lora_B inputs.
    block = 2 * (4 * h * T + 4 * T) + 4 * (2 * 64 + 2 * 32) * T + 4 * 4 * T + 4 * 3 * I * T + 4 * (h + h + I) * T \
        + 4 * 7 * r * T
    first = block - (4 * h * T + 4 * T)  # the frozen embeddings' output needs no gradient: no first norm input
    assert est.activations.per_layer == block and est.value("activations") == first + block
    head = 4 * h * T + 4 * T + 4 * T * V + 8 * T + 4 + 2 * s * 16 * 4  # norm, log-softmax, labels, loss, cos/sin
    assert est.value("logits") == head + 2 * 4 * T * V
    always = sum(est.value(key) for key in ("buffers", "base_quantized", "base_other", "trainable", "optimizer"))
    backward = est.value("activations") + est.value("logits") + est.value("dequant")
    step = est.value("gradients") + 4 * 1024  # AdamW on the CPU: sqrt(v) of the largest adapter (128 x 8), fp32
    assert est.peak == always + max(backward, step)


# --------------------------------------------------------------------------- strategies


def test_strategy_names_from_the_trainer_config():
    assert strategy_of("auto", 1)[0] == "single" and strategy_of("auto", 2)[0] == "ddp"
    assert strategy_of("deepspeed_stage_3_offload", 2)[0] == "deepspeed_zero3_offload"
    assert strategy_of({"_target_": "lightning.pytorch.strategies.FSDPStrategy"}, 2)[0] == "fsdp"
    assert strategy_of({"_target_": "some.factory", "name": "deepspeed_zero3"}, 2)[0] == "deepspeed_zero3"
    node = {"_target_": "x.DeepSpeedStrategy", "stage": 2, "reduce_bucket_size": 1000, "overlap_comm": False}
    name, buckets = strategy_of(node, 2)
    assert name == "deepspeed_zero2" and buckets["reduce_bucket_size"] == 1000 and not buckets["overlap_comm"]
    ds_json = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    assert strategy_of({"_target_": "x.DeepSpeedStrategy", "config": ds_json}, 2)[0] == "deepspeed_zero3_offload"
    for preset, expected in (("ddp", "ddp"), ("deepspeed_zero2", "deepspeed_zero2"), ("deepspeed_zero3", "deepspeed_zero3")):
        cfg = compose("recipe=qlora_tiny", f"strategy={preset}", "trainer.devices=2")
        assert estimate_run(cfg).settings.strategy == expected


def test_sharding_divides_what_each_strategy_shards():
    """7B full fine-tune, bf16-mixed: ZeRO-2 shards gradients and states, ZeRO-3/FSDP the parameters too; DDP adds a
    second copy of the gradients; offload moves states to the CPU."""
    def run(strategy, devices):
        return _full_finetune("qlora_7b", "bf16-mixed").with_settings(strategy=strategy, devices_per_node=devices,
                                                                      on_gpu=True)

    single, ddp = run("single", 1), run("ddp", 2)
    n = single.params_trainable
    assert ddp.value("ddp_buckets") == single.value("gradients") == 2 * n  # bf16 weights, bf16 gradients
    assert ddp.value("optimizer") == single.value("optimizer")
    z2, z3 = run("deepspeed_zero2", 4), run("deepspeed_zero3", 4)
    assert z2.value("trainable") == 2 * n and z3.value("trainable") == 2 * n / 4
    assert z2.value("optimizer") == z3.value("optimizer") == pytest.approx(8 * n / 4, rel=1e-6)
    fsdp = run("fsdp", 4)
    assert fsdp.value("trainable") == 2 * n / 4 and fsdp.value("gradients") == 2 * n / 4
    direct = estimate_run(compose("recipe=qlora_7b", "model.quantization=none", "model.finetune=full",
                                  "optimizer.name=adamw", "estimate.strategy=deepspeed_zero3", "estimate.devices=4",
                                  "trainer.accelerator=gpu"))
    assert [(line.key, line.device) for line in direct.lines] == [(line.key, line.device) for line in z3.lines]
    offload = run("deepspeed_zero3_offload", 4)
    assert offload.value("optimizer") == 0 and offload.line("optimizer").cpu > 0
    assert offload.peak < z3.peak < z2.peak < single.peak


# --------------------------------------------------------------------------- bad input and the command


@pytest.mark.parametrize("override, message", [
    ("estimate.strategy=zero4", "estimate.strategy='zero4' is not valid; valid: null (the run's trainer.strategy) or "
                                "one of auto, single, ddp, fsdp, deepspeed_zero2"),
    ("estimate.gpu_gib=0", "estimate.gpu_gib=0 is not valid; valid: a device's memory in GiB > 0"),
    ("estimate.gpu_gib=-24", "estimate.gpu_gib=-24 is not valid"),
    ("estimate.devices=0", "estimate.devices=0 is not valid; valid: a positive integer"),
    ("trainer.strategy=horovod", "trainer.strategy='horovod' has no memory estimate; valid: set estimate.strategy"),
    ("trainer.precision=transformer-engine", "trainer.precision='transformer-engine' has no memory estimate"),
])
def test_bad_input_is_one_line(override, message):
    cfg = compose("recipe=qlora_13b", "estimate=true", override)
    with pytest.raises(SlimtuneError) as err:
        print_estimate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_single_strategy_on_several_devices_is_refused():
    with pytest.raises(SlimtuneError, match="estimate.strategy=single with 4 devices; valid: estimate.devices=1"):
        estimate_run(compose("recipe=qlora_tiny", "estimate.strategy=single", "estimate.devices=4"))


def test_estimate_shorthand_and_fit_verdicts(capsys):
    cfg = compose("recipe=qlora_70b", "estimate=true", "estimate.gpu_gib=24")
    assert cfg.estimate.enabled is True
    report = print_estimate(cfg)
    out = capsys.readouterr().out
    assert report["fits"] is False and "does NOT fit a 24 GiB device" in out
    cfg = compose("recipe=qlora_70b", "estimate=true", "estimate.gpu_gib=80")
    assert print_estimate(cfg)["fits"] is True  # the QLoRA paper: 70B on one 48 GB GPU, so 80 GiB fits
    assert 40 < print_estimate(compose("recipe=qlora_70b", "estimate=true"))["peak_gib"] < 48


def test_train_py_estimate_prints_and_writes_nothing(tmp_path):
    """The issue's command, offline, on a machine without a GPU: exit 0, the table, no file anywhere."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "recipe=qlora_13b", "estimate=true",
                           "estimate.gpu_gib=24"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for part in ("slimtune memory estimate: qlora_13b (no weights loaded)", "frozen base, NF4 + double quant",
                 "LoRA adapters, fp32", "optimizer states, paged_adamw_8bit", "activations, 40 checkpointed blocks",
                 "fits a 24 GiB device", "Korthikanti"):
        assert part in out, part
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), "recipe=qlora_13b", "estimate=true",
                          "estimate.gpu_gib=0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: estimate.gpu_gib=0 is not valid; valid: a device's memory in GiB > 0 (e.g. 24), or null"]


def test_a_pretrained_model_trains_in_training_mode_with_checkpointing(tmp_path, tiny_tokenizer):
    """from_pretrained returns eval mode and Lightning keeps modules' modes: the loaded model must come back in training
    mode, or gradient checkpointing (transformers checkpoints only while training) silently keeps every activation."""
    from transformers import AutoModelForCausalLM

    from slimtune.models import load_config

    model_cfg = _model_cfg(quantization="nf4", checkpointing=True)
    AutoModelForCausalLM.from_config(load_config(model_cfg)).save_pretrained(tmp_path / "tiny")
    pretrained = {**model_cfg, "config": None, "name_or_path": str(tmp_path / "tiny")}
    model = load_model(pretrained)
    assert all(module.training for module in model.modules())
    checkpointed = _saved_tensor_bytes(model, "32-true", 2, 32)
    plain = _saved_tensor_bytes(load_model({**pretrained, "gradient_checkpointing": False}), "32-true", 2, 32)
    est = estimate_run(_run_cfg({**model_cfg, "gradient_checkpointing": False}))
    assert plain == est.activations.blocks + est.activations.head
    assert checkpointed < plain / 2
