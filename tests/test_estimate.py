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


def _under(strategy, devices=2, precision="32-true", ds_config=None, **model):
    """The tiny LoRA run under `strategy` on `devices` CPU processes (a DeepSpeed JSON's buckets with `ds_config`)."""
    cfg = _run_cfg(_model_cfg(**model), precision)
    cfg["estimate"] = {"strategy": strategy, "devices": devices}
    if ds_config is not None:
        cfg["trainer"]["strategy"] = {"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy", "config": ds_config}
    return estimate_run(cfg)


def test_zero_buckets_are_whole_on_gpus_and_the_pages_written_on_cpus():
    """DeepSpeed allocates each gradient bucket whole (torch.empty(reduce_bucket_size) in the parameters' dtype;
    ZeRO-2 two with overlap_comm, for each backward; ZeRO-3 one, for good): a GPU's allocator holds all of it, a CPU
    process only the pages the gradients are copied into."""
    zero2 = _under("deepspeed_zero2")
    zero3 = zero2.with_settings(strategy="deepspeed_zero3")
    n = zero2.params_trainable
    assert 0 < n < 200_000_000
    for est, copies, phase in ((zero2, 2, "backward"), (zero3, 1, "resident")):
        gpu = est.with_settings(on_gpu=True)
        assert gpu.line("zero_buckets").device == copies * 200_000_000 * 4
        assert est.line("zero_buckets").device == n * 4  # fp32 LoRA: 4 bytes per gradient value written
        assert gpu.line("zero_buckets").phase == est.line("zero_buckets").phase == phase
    bf16 = zero2.with_settings(precision="bf16-mixed", on_gpu=True)
    assert bf16.line("zero_buckets").device == 2 * 200_000_000 * 2  # the engine's 16-bit parameters' dtype
    _, buckets = strategy_of({"_target_": "x.DeepSpeedStrategy", "config": {"zero_optimization": {
        "stage": 2, "reduce_bucket_size": 1000, "overlap_comm": False}}}, 2)
    own = zero2.with_settings(buckets=buckets)
    assert own.line("zero_buckets").device == 1000 * 4  # fewer values than the model trains: the whole bucket
    assert own.with_settings(on_gpu=True).line("zero_buckets").device == 1000 * 4


def test_deepspeed_at_32_bits_keeps_an_fp32_master_copy_and_gradient_partition():
    zero2 = _under("deepspeed_zero2", devices=4)
    for est in (zero2, zero2.with_settings(strategy="deepspeed_zero3")):
        n = est.params_trainable
        assert est.value("master") == est.value("gradients") == 4 * n / 4
        assert est.value("optimizer") == pytest.approx(8 * n / 4, abs=4)


def test_offloaded_states_of_cpu_processes_are_their_own_memory():
    """Beside a GPU offloaded states are CPU memory per node (DeepSpeed's accounting, x1.5); on a CPU accelerator
    each process holds its share, plus ZeRO-3 offload's second fp32 gradient partition for the CPU optimizer."""
    cpu = _under("deepspeed_zero3_offload")
    gpu = cpu.with_settings(on_gpu=True)
    n = cpu.params_trainable
    assert gpu.value("optimizer") == 0 and gpu.line("optimizer").cpu > 0 and "offload_gradients" not in gpu.as_dict()
    assert cpu.line("optimizer").cpu == 0 and cpu.value("optimizer") == pytest.approx(8 * n / 2, abs=4)
    assert cpu.value("offload_gradients") == cpu.value("gradients") == 4 * n / 2
    assert cpu.model_states_cpu == 0
    zero3 = cpu.with_settings(strategy="deepspeed_zero3")
    assert cpu.peak == zero3.peak + cpu.value("offload_gradients")


def test_fsdp_gradients_cover_whole_units_as_fsdp_allocates_them():
    """FSDP with use_orig_params (slimtune's preset) gives every unit that trains a gradient for its whole flat
    parameter, frozen weights included: the estimate's gradient line equals the gradient storage a real FSDP keeps."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model_cfg = _model_cfg()
    model = load_model(model_cfg)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                           use_orig_params=True, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                           device_id=torch.device("cpu"))
        ids = torch.randint(0, TINY3["vocab_size"], (2, 16))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        storages = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                    for p in wrapped.parameters() if p.grad is not None}
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the units' flat gradients survive zero_grad: the memory stays with the process between steps
        flat = [m._flat_param for m in wrapped.modules()
                if isinstance(m, FullyShardedDataParallel) and getattr(m, "_flat_param", None) is not None]
        kept = sum(f.grad.untyped_storage().nbytes() for f in flat if f.grad is not None)
        views = [p for p in wrapped.parameters() if p.grad is not None]
    finally:
        dist.destroy_process_group()
    cfg = _run_cfg(model_cfg)
    cfg["estimate"] = {"strategy": "fsdp", "devices": 1}
    est = estimate_run(cfg)
    assert sum(storages.values()) == est.value("gradients") > 4 * est.params_trainable
    assert not views and kept == est.value("gradients")
    assert next(line for line in est.lines if line.key == "gradients").phase == "resident"


@pytest.mark.slow
def test_deepspeed_allocates_the_buckets_and_master_copy_the_estimate_counts(tmp_path):
    """A real DeepSpeed engine (one CPU process, gloo) after a step: its bucket buffers and fp32 master partition
    have the sizes the GPU estimate counts (ZeRO-2 with overlap_comm: two buckets per backward; ZeRO-3: one)."""
    script = tmp_path / "engine.py"
    script.write_text(f"""
import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.runtime.zero import stage_1_and_2
from slimtune.models import load_model
seen = {{}}
setup = stage_1_and_2.DeepSpeedZeroOptimizer.setup_buckets
def record(self):  # ZeRO-2 makes its buckets for each backward and frees them at its end
    setup(self)
    seen["buckets"] = [[b.numel(), b.element_size()] for bucket in self.ipg_buckets.values() for b in bucket.buffer]
stage_1_and_2.DeepSpeedZeroOptimizer.setup_buckets = record
stage = int(sys.argv[1])
model = load_model({_model_cfg()!r})
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
config = {{"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {{"stage": stage, "reduce_bucket_size": 100000, "overlap_comm": True,
                                "contiguous_gradients": True}}}}
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
ids = torch.randint(0, 2048, (1, 16))
engine.backward(engine(input_ids=ids, labels=ids).loss)
engine.step()
zero = engine.optimizer
if stage == 3:
    seen["buckets"] = [[b.buffer.numel(), b.buffer.element_size()] for b in zero.ipg_buckets.values()]
    master = zero.fp32_partitioned_groups_flat
else:
    master = zero.single_partition_of_fp32_groups
seen["master_bytes"] = sum(t.numel() * t.element_size() for t in master)
print("ENGINE " + json.dumps(seen))
""")
    import socket

    for stage in (2, 3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, str(script), str(stage), str(port)], capture_output=True, text=True,
                              env=env, timeout=600)
        line = next((line for line in done.stdout.splitlines() if line.startswith("ENGINE ")), None)
        assert line is not None, done.stderr[-2000:]
        import json

        engine = json.loads(line[len("ENGINE "):])
        config = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 100000, "overlap_comm": True}}
        est = _under(f"deepspeed_zero{stage}", devices=1, ds_config=config).with_settings(on_gpu=True)
        assert sum(numel * size for numel, size in engine["buckets"]) == est.value("zero_buckets")
        assert engine["master_bytes"] == est.value("master")


def test_zero3_keeps_gathered_what_its_reuse_distance_covers():
    """DeepSpeed's default stage3_max_reuse_distance (1e9) keeps a small model gathered from its forward into its
    backward; a large one only its last layers (and a tied embedding, last used as lm_head)."""
    from slimtune.estimate import numerics, zero3_kept_bytes

    est = _under("deepspeed_zero3", devices=2)
    num, params = numerics(est.settings), est.params
    total = sum(p.numel for p in params)
    embed = next(p.numel for p in params if p.name.endswith("embed_tokens.weight"))
    layer = (total - embed - 64) // 3  # 3 decoder layers and the final norm (64 values)
    assert zero3_kept_bytes(params, 10**9, "none", True, num) == 4 * total
    # a parameter stays when twice the values used after it (the tied embedding last, as lm_head) are below the distance
    assert zero3_kept_bytes(params, 2 * embed, "none", True, num) == 4 * embed
    reach = embed + 64 + layer + layer // 2
    partial = zero3_kept_bytes(params, 2 * reach, "none", True, num)
    assert 4 * (embed + 64 + 1.25 * layer) < partial < 4 * (embed + 64 + 1.75 * layer)
    assert zero3_kept_bytes(params, 3 * reach, "none", True, num, checkpointing=True) == partial
    # the first block's norm and frozen q/k/v have no backward use when the embeddings are frozen: released
    first_qkv_norm = 64 * 64 + 2 * 64 * 32 + 64
    assert zero3_kept_bytes(params, 10**9, "none", True, num, frozen_embeddings=True) == 4 * (total - first_qkv_norm)
    assert est.value("zero3_kept") == 4 * (total - first_qkv_norm) - est.value("gathered") / 2  # in-flight layer once


@pytest.mark.slow
def test_zero3_keeps_gathered_the_parameters_deepspeed_keeps(tmp_path):
    """A real ZeRO-3 engine (one CPU process): the parameters still gathered after the forward of a later step equal
    the estimate's rule (exactly where whole layers fall inside or outside the distance; within 10% where it cuts one,
    as DeepSpeed decides per module in execution order)."""
    script = tmp_path / "kept.py"
    script.write_text(f"""
import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from slimtune.models import load_model
kept = {{}}
for distance in map(int, sys.argv[2:]):
    model = load_model({_model_cfg()!r})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    zero = {{"stage": 3, "stage3_max_reuse_distance": distance, "stage3_param_persistence_threshold": 0,
             "stage3_prefetch_bucket_size": 0}}  # the reuse rule alone: no parameters gathered ahead of time
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={{
        "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True, "zero_optimization": zero}})
    ids = torch.randint(0, 2048, (1, 16))
    for step in range(3):  # DeepSpeed traces the modules in the first step and keeps parameters from then on
        loss = engine(input_ids=ids, labels=ids).loss
        kept[distance] = sum(p.ds_numel * 4 for p in model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE)
        kept[f"released {{distance}}"] = [n for n, p in model.named_parameters()
                                          if p.ds_status != ZeroParamStatus.AVAILABLE]
        engine.backward(loss)
        engine.step()
print("KEPT " + json.dumps(kept))
""")
    import json
    import socket

    from slimtune.estimate import numerics, zero3_kept_bytes

    est = _under("deepspeed_zero3", devices=1)
    total = sum(p.numel for p in est.params)
    embed = next(p.numel for p in est.params if p.name.endswith("embed_tokens.weight"))
    layer = (total - embed - 64) // 3
    distances = [10**9, 2 * embed, 2 * (embed + 64 + layer + layer // 2)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(port), *map(str, distances)], capture_output=True,
                          text=True, env=env, timeout=900)
    line = next((line for line in done.stdout.splitlines() if line.startswith("KEPT ")), None)
    assert line is not None, done.stderr[-2000:]
    measured = {int(k) if k.isdigit() else k: v for k, v in json.loads(line[len("KEPT "):]).items()}
    predicted = {d: zero3_kept_bytes(est.params, d, "none", True, numerics(est.settings), frozen_embeddings=True)
                 for d in distances}
    first_qkv_norm = 64 * 64 + 2 * 64 * 32 + 64  # layer 0's frozen q, k, v (2 kv heads of 16) and input norm
    assert measured[distances[0]] == predicted[distances[0]] == 4 * (total - first_qkv_norm)
    assert measured[distances[1]] == predicted[distances[1]] == 4 * embed
    assert measured[distances[2]] == pytest.approx(predicted[distances[2]], rel=0.1)


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
