"""GPU check: a few QLoRA steps of a Llama-2-13B-shaped model with the qlora_13b recipe's settings.

    python benchmarks/gpu_check_qlora_13b.py             # needs one CUDA GPU (>= 24 GB); no download, random weights
    python benchmarks/gpu_check_qlora_13b.py --dry-run   # no GPU: the plan (shapes, parameters, memory estimate)
    python benchmarks/gpu_check_qlora_13b.py --strategy deepspeed_zero3             # all GPUs of the machine
    python benchmarks/gpu_check_qlora_13b.py --strategy deepspeed_zero3 --dry-run   # no GPU: the plan per GPU, and
                                                  # the same multi-process path on 2 CPU processes with a tiny Llama

`--strategy deepspeed_zero3` trains through Lightning with slimtune's `strategy=deepspeed_zero3` preset on every GPU
(`--devices N` for fewer): Lightning starts one process per GPU (this script again), each builds the model on its own
GPU and quantizes it, DeepSpeed partitions the 4-bit codes, the LoRA weights, their gradients and the paged 8-bit AdamW
states over the processes, with bf16-mixed precision and gradient checkpointing as the recipe says. It reports each
GPU's peak memory and the step times (the global batch is batch-size x GPUs).

It composes `recipe=qlora_13b`, builds the model from the bundled Llama-2-13B config with random weights directly in
bf16 on the GPU, quantizes every linear layer (but lm_head) to NF4 + double quantization in place with slimtune's
bitsandbytes swap, frees the bf16 copies, adds LoRA r=64 with gradient checkpointing (`prepare_for_training`), and
trains a few steps with paged 8-bit AdamW under bf16 autocast on random tokens. It prints JSON: peak GPU memory
(`torch.cuda.max_memory_allocated`), memory after quantization, step times and tokens/s, and writes it to
benchmarks/results/gpu_check_qlora_13b.json. The QLoRA paper reports 13B QLoRA fine-tuning within a 24 GB GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

C.offline()

GIB = 2**30


def plan(cfg, config) -> dict:
    """What the run will build, from a meta-device skeleton: no weights, no GPU."""
    from slimtune.models.loading import build_skeleton, count_parameters

    skeleton = build_skeleton(cfg.model)
    trainable, total = count_parameters(skeleton)
    layer = skeleton.get_base_model().model.layers[0]
    shapes = {}
    for name, module in layer.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(base, "weight"):
            shapes[name] = list(base.weight.shape)
    n_layers = config.num_hidden_layers
    quantized = n_layers * sum(a * b for a, b in shapes.values())
    other = total - trainable - quantized  # embeddings, lm_head, norms (bf16)
    nf4_dq_bits = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + 8-bit block absmax + fp32 second-level scale
    est = {
        "nf4_dq_base_gib": quantized * nf4_dq_bits / 8 / GIB,
        "bf16_rest_gib": other * 2 / GIB,
        "lora_fp32_gib": trainable * 4 / GIB,
        "lora_grads_fp32_gib": trainable * 4 / GIB,
        "paged_adamw_8bit_state_gib": trainable * 2 / GIB,
    }
    est["weights_and_optimizer_gib"] = sum(est.values())
    return {
        "model": str(cfg.model.name_or_path),
        "layers": n_layers, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads, "kv_heads": getattr(config, "num_key_value_heads", None),
        "vocab_size": config.vocab_size,
        "lora": {k: v for k, v in dict(cfg.model.lora).items()},
        "lora_targets": sorted({name.rsplit(".", 1)[-1] for name in shapes}),
        "linear_shapes_per_layer": shapes,
        "trainable_params": trainable, "total_params": total, "quantized_params": quantized,
        "trainable_percent": 100 * trainable / total,
        "optimizer": str(cfg.optimizer.name), "gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
        "compute_dtype": str(cfg.model.dtype),
        "estimate_before_activations": est,
    }


def gpu_run(cfg, config, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from slimtune.lightning import build_optimizer
    from slimtune.models.loading import (
        _swap_linear_for_bnb,
        count_parameters,
        dtype_of,
        prepare_for_training,
    )
    from slimtune.models.stats import compression_stats

    dtype = dtype_of(cfg.model)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    bf16_gib = torch.cuda.memory_allocated() / GIB
    t0 = time.perf_counter()
    _swap_linear_for_bnb(model, str(cfg.model.quantization), bool(cfg.model.double_quant), dtype)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t0
    model.config.use_cache = False
    quantized_gib = torch.cuda.memory_allocated() / GIB
    model = prepare_for_training(model, cfg.model)
    stats = compression_stats(model)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cfg = cfg.optimizer
    optimizer = build_optimizer(params, str(opt_cfg.name), float(opt_cfg.lr), float(opt_cfg.weight_decay),
                                tuple(opt_cfg.betas), float(opt_cfg.eps))
    clip = float(cfg.trainer.gradient_clip_val)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    model.train()
    torch.cuda.reset_peak_memory_stats()
    start_gib = torch.cuda.memory_allocated() / GIB
    step_s, losses = [], []
    for _ in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
        losses.append(float(loss))
    timed = step_s[args.warmup:]
    tokens = args.batch_size * args.seq_len
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / GIB,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "build_bf16_seconds": build_s, "quantize_seconds": quantize_s,
        "bf16_model_gib": bf16_gib, "after_quantization_gib": quantized_gib, "train_start_gib": start_gib,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "step_seconds": step_s, "median_step_seconds": C.median(timed),
        "tokens_per_s": tokens * len(timed) / sum(timed) if timed else None,
        "losses": losses, "trainable_params": trainable, "total_params": total,
        "bits_per_param": stats["bits_per_param"], "quantized_bits_per_param": stats["quantized_bits_per_param"],
    }


def zero3_plan(base_plan: dict, devices: int) -> dict:
    """Model states per GPU under ZeRO-3: everything the single-GPU estimate holds, partitioned over `devices`."""
    est = base_plan["estimate_before_activations"]
    per_gpu = {key: value / devices for key, value in est.items()}
    return {"devices": devices, "model_states_per_gpu_gib": per_gpu,
            "note": "plus, while a layer runs, its gathered 4-bit codes and LoRA weights, and the activations"}


class _StepTimer:
    """Lightning callback (built lazily: Lightning imports only here): step times and this GPU's peak memory."""

    def __new__(cls, on_gpu: bool):
        import lightning.pytorch as L
        import torch

        class StepTimer(L.Callback):
            def __init__(self):
                self.step_s, self.losses, self.peaks = [], [], None
                self._started = 0.0

            def on_train_start(self, trainer, pl_module):
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if on_gpu:
                    torch.cuda.synchronize()
                self._started = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if on_gpu:
                    torch.cuda.synchronize()
                self.step_s.append(time.perf_counter() - self._started)
                self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

            def on_train_end(self, trainer, pl_module):
                if on_gpu:
                    own = [torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB]
                else:
                    import resource

                    own = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 0.0]
                gathered = trainer.strategy.all_gather(torch.tensor(own, device=pl_module.device))
                self.peaks = gathered.reshape(-1, 2).tolist()

        return StepTimer()


def zero3_run(args, on_gpu: bool) -> dict | None:
    """Train under `strategy=deepspeed_zero3` on `args.devices` GPUs (or, with on_gpu False, 2 CPU processes and a
    tiny Llama: the same path, for --dry-run). Every process runs this; rank 0 returns the result, the others None."""
    import lightning.pytorch as L
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    from slimtune.config import compose_config
    from slimtune.lightning import CausalLMModule
    from slimtune.models import load_config
    from slimtune.models.loading import _local_cuda_device, _swap_linear_for_bnb, dtype_of, prepare_for_training

    devices = args.devices or (torch.cuda.device_count() if on_gpu else 2)
    overrides = ["recipe=qlora_13b", "strategy=deepspeed_zero3", f"trainer.devices={devices}",
                 f"data.batch_size={args.batch_size}", "trainer.accumulate_grad_batches=1"]
    if not on_gpu:  # the tiny Llama of the tests, fp32 on the CPU
        overrides += ["model=tiny_llama", "model.quantization=nf4", "model.dtype=float32",
                      "model.gradient_checkpointing=true", "model.lora.r=8", "trainer=cpu",
                      "trainer.accumulate_grad_batches=1", f"trainer.devices={devices}"]
    cfg = compose_config(overrides)
    config = load_config(cfg.model)
    dtype = dtype_of(cfg.model)
    device = torch.device("cuda", _local_cuda_device()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _swap_linear_for_bnb(model, str(cfg.model.quantization), bool(cfg.model.double_quant), dtype)
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    model.config.use_cache = False
    model = prepare_for_training(model, cfg.model)
    build_s = time.perf_counter() - t0
    module = CausalLMModule(model, None, optimizer=cfg.optimizer, scheduler=cfg.scheduler)
    steps = args.warmup + args.steps
    seq_len = args.seq_len if on_gpu else 32
    generator = torch.Generator().manual_seed(args.seed)
    rows = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, config.vocab_size, (steps * args.batch_size * devices, seq_len), generator=generator)]
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size)  # Lightning adds a DistributedSampler
    timer = _StepTimer(on_gpu)
    trainer = L.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=devices,
                        strategy=instantiate(cfg.trainer.strategy, _convert_="all"), precision=cfg.trainer.precision,
                        max_steps=steps, gradient_clip_val=float(cfg.trainer.gradient_clip_val), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    trainer.fit(module, loader)
    if not trainer.is_global_zero:
        return None
    timed = timer.step_s[args.warmup:]
    tokens = args.batch_size * devices * seq_len
    memory = "peak_allocated_gib, peak_reserved_gib" if on_gpu else "peak_rss_gib, -"
    return {
        "strategy": "deepspeed_zero3", "devices": devices, "accelerator": "gpu" if on_gpu else "cpu (dry run)",
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "model": "Llama-2-13B shape, random weights" if on_gpu else "tiny Llama (configs/model/tiny_llama.yaml)",
        "precision": str(cfg.trainer.precision), "optimizer": str(cfg.optimizer.name),
        "batch_size_per_device": args.batch_size, "seq_len": seq_len, "global_batch": args.batch_size * devices,
        "build_and_quantize_seconds_rank0": build_s, "warmup_steps": args.warmup, "timed_steps": len(timed),
        "step_seconds": timer.step_s, "median_step_seconds": C.median(timed),
        "tokens_per_s": tokens * len(timed) / sum(timed) if timed else None, "losses_rank0": timer.losses,
        "per_device_peaks": {"columns": memory, "values": timer.peaks},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="no GPU: build on the meta device and print the plan")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", choices=["single", "deepspeed_zero3"], default="single",
                   help="single: one GPU, a plain training loop; deepspeed_zero3: all GPUs through Lightning")
    p.add_argument("--devices", type=int, default=None, help="with --strategy deepspeed_zero3: GPUs (default: all)")
    p.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/gpu_check_qlora_13b"
                                              "[_deepspeed_zero3].json)")
    args = p.parse_args()
    suffix = "" if args.strategy == "single" else f"_{args.strategy}"
    args.out = args.out or str(C.RESULTS / f"gpu_check_qlora_13b{suffix}.json")

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: this check needs one NVIDIA GPU (>= 24 GB) with a CUDA build of torch and "
                 "bitsandbytes; run with --dry-run to see the plan without a GPU")

    from slimtune.config import compose_config
    from slimtune.models import load_config

    cfg = compose_config(["recipe=qlora_13b"])
    config = load_config(cfg.model)  # the bundled Llama-2-13B config: no hub access
    result = {"benchmark": "gpu_check_qlora_13b", "recipe": "qlora_13b",
              "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
              "plan": plan(cfg, config)}
    if args.strategy == "deepspeed_zero3":
        devices = args.devices or (torch.cuda.device_count() if torch.cuda.is_available() else 8)
        result["plan"]["deepspeed_zero3"] = zero3_plan(result["plan"], devices)
        run = zero3_run(args, on_gpu=not args.dry_run)
        if run is None:  # a process of rank > 0: rank 0 reports
            return
        result["run" if not args.dry_run else "cpu_dry_run"] = run
        if args.dry_run:
            print(json.dumps(result, indent=2, default=str))
            return
    elif args.dry_run:
        print(json.dumps(result, indent=2))
        return
    else:
        result["run"] = gpu_run(cfg, config, args)
    result["env"] = C.environment()
    C.write_json(Path(args.out), result)
    print(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
