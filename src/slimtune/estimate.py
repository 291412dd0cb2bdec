"""How much memory a fine-tuning run needs per device, from the model's config alone (no weights are loaded).

`estimate_run(cfg)` reads a composed run config, builds the model on the meta device (`build_skeleton`: shapes, LoRA
targets, which parameters train) and adds up, per device:

* **weights**: each quantized linear layer exactly as bitsandbytes stores it (4-bit codes, block absmax, double
  quantization's second level and code tables; LLM.int8's int8 matrix and row scales), everything else in its dtype;
* **trainable parameters, gradients, optimizer states** (torch AdamW: two states in the parameter's dtype;
  bitsandbytes 8-bit AdamW: two uint8 states plus one fp32 absmax per 256 values, tensors under 4,096 values keep
  32-bit states; SGD without momentum: none), and under DeepSpeed with 16-bit precision DeepSpeed's own accounting
  (16-bit parameters and gradients, fp32 master weights and gradients, fp32 states);
* **activations**: the tensors autograd keeps for the backward pass of a Llama-style decoder (see
  `activation_bytes`), the logits and the loss, and the transients at the start of the backward pass;
* **the strategy**: ZeRO-2 shards gradients and optimizer states over the devices, ZeRO-3 and FSDP shard the
  parameters too and gather one layer at a time (ZeRO-3 keeps gathered what its reuse distance covers, FSDP's
  gradients cover whole units), offload moves optimizer states (and parameters) to CPU memory, DDP keeps a second
  copy of the gradients in its buckets, DeepSpeed allocates its gradient buckets whole. With a CPU accelerator the
  figures are each process's resident memory: offloaded states are its own, and of DeepSpeed's buckets only the
  pages gradients are written into count (untouched `torch.empty` pages are not resident on the CPU).

The model-state formulas equal DeepSpeed's `estimate_zero2/3_model_states_mem_needs` for a full fine-tune with 16-bit
mixed precision (tested), and the weights of an unquantized model equal accelerate's `calculate_maximum_sizes` (the
number `accelerate estimate-memory` prints); neither covers quantized bases, LoRA or activations, which this adds.

Pure arithmetic on config values: no Lightning import; torch only where the skeleton is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from slimtune.errors import SlimtuneError, choices

GIB = 2**30
# Strategy names the estimate understands (estimate.strategy, or read from trainer.strategy): "auto" is Lightning's
# choice (ddp on several devices, one device otherwise).
STRATEGIES = ("auto", "single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
              "deepspeed_zero3_offload")
SHARDED = ("fsdp", "deepspeed_zero3", "deepspeed_zero3_offload")  # parameters partitioned over the devices
# Lightning precision -> (kind, bits): "mixed" runs matmuls under autocast, "true" converts the module.
PRECISIONS = {
    "64-true": ("true", 64), "64": ("true", 64), "32-true": ("true", 32), "32": ("true", 32),
    "16-true": ("true", 16), "bf16-true": ("true", 16), "16-mixed": ("mixed", 16), "16": ("mixed", 16),
    "bf16-mixed": ("mixed", 16), "bf16": ("mixed", 16),
}
OPTIMIZER_STATES = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")  # = lightning OPTIMIZERS
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors with fewer values (min_8bit_size)
BNB_OPTIMIZER_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer: one fp32 absmax per 256 values and state
BNB_4BIT_BLOCK = 64  # bitsandbytes' default 4-bit blocksize (transformers' and slimtune's loaders use it)
DQ_BLOCK = 256  # double quantization: one fp32 absmax per 256 first-level absmax values
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and kernels, outside torch's allocator (typical for torch 2.x)
DEEPSPEED_CPU_BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for offloaded states (pinned staging buffers)
# Lightning's DeepSpeedStrategy defaults (a DeepSpeed JSON uses DeepSpeed's own: 5e8, overlap off for ZeRO-2)
LIGHTNING_DS_BUCKETS = {"reduce_bucket_size": 200_000_000, "overlap_comm": True, "contiguous_gradients": True,
                        "stage3_max_reuse_distance": 1_000_000_000}  # DeepSpeed's default (Lightning sets none)
LLAMA_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}
LLAMA_LINEARS = tuple(name for names in LLAMA_GROUPS.values() for name in names)


# --------------------------------------------------------------------------- what the run looks like


@dataclass(frozen=True)
class Architecture:
    """The shapes that set activation memory (a Llama-style decoder: attention + gated MLP, RMSNorm)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Architecture":
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if getattr(config, k, None) is None]
        if missing:
            raise SlimtuneError(f"the memory estimate covers Llama-style decoders; model_type "
                                f"{getattr(config, 'model_type', '?')!r} has no {', '.join(missing)}; valid: llama, "
                                "mistral, qwen2 and other models with those config fields")
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(str(config.model_type), int(config.num_hidden_layers), int(config.hidden_size),
                   int(config.intermediate_size), heads, int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim, int(config.vocab_size))


@dataclass(frozen=True)
class Param:
    """One parameter tensor of the model as the run builds it (from the meta skeleton)."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    quantized: bool = False  # a frozen linear weight that bitsandbytes stores quantized

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LinearSite:
    """One linear layer of a decoder block: how its input is kept for the backward pass."""

    name: str  # q_proj, ..., down_proj
    in_features: int
    out_features: int
    lora: bool  # has a LoRA adapter (A: in x r, B: r x out)
    trainable: bool  # its own weight trains (full fine-tune)
    quantized: bool


@dataclass(frozen=True)
class Settings:
    """Everything besides the model that sets memory; `estimate_run` reads it from the run config."""

    quantization: str = "none"  # none | nf4 | fp4 | int8
    double_quant: bool = True
    model_dtype_bytes: int = 4  # model.dtype
    precision: str = "32-true"
    finetune: str = "lora"
    lora_r: int = 8
    lora_dropout: float = 0.0
    optimizer: str = "adamw"
    micro_batch: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    accumulate_grad_batches: int = 1
    strategy: str = "single"
    devices_per_node: int = 1
    nodes: int = 1
    on_gpu: bool = True  # CUDA kernels (bool dropout masks, foreach AdamW); False: the CPU ones
    buckets: Mapping[str, Any] = field(default_factory=lambda: dict(LIGHTNING_DS_BUCKETS))

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Numerics:
    """Bytes per value of each kind of tensor under the precision and strategy."""

    frozen: float  # frozen weights that are not quantized
    trainable: float  # the working copy of the trainable parameters
    grad: float  # their gradients (the 16-bit ones under DeepSpeed)
    grad32: float  # DeepSpeed's fp32 gradient partition (0 elsewhere)
    master: float  # fp32 master weights (DeepSpeed 16-bit; 0 elsewhere)
    state: float  # dtype of torch AdamW's states (the master's under DeepSpeed)
    act: float  # activations out of matmuls (16-bit under autocast)
    residual: float  # the residual stream (the model's dtype under autocast)
    adapter: float  # LoRA weights (PEFT keeps them fp32 unless the module is cast)
    autocast: bool


def numerics(settings: Settings) -> Numerics:
    kind, bits = precision_of(settings.precision)
    md = settings.model_dtype_bytes
    strategy = settings.strategy
    if strategy.startswith("deepspeed") and bits == 16:
        # The DeepSpeed engine casts the whole module to 16-bit and keeps fp32 master weights in the optimizer.
        return Numerics(frozen=2, trainable=2, grad=2, grad32=4, master=4, state=4, act=2, residual=2, adapter=2,
                        autocast=False)
    if kind == "true":
        b = bits // 8
        adapter = b if bits != 32 else 4
        if bits == 32:  # the module keeps model.dtype; PEFT's adapters are fp32
            trainable = 4 if settings.finetune == "lora" else md
            if strategy.startswith("deepspeed"):
                # DeepSpeed at 32 bits still clones an fp32 master copy of each partition for its optimizer
                # (stage_1_and_2's single_partition_of_fp32_groups, stage3's fp32_partitioned_groups_flat); the
                # gradients pass through its buckets (counted there) into an fp32 gradient partition.
                return Numerics(frozen=md, trainable=trainable, grad=0, grad32=4, master=4, state=4, act=md,
                                residual=md, adapter=adapter, autocast=False)
            return Numerics(frozen=md, trainable=trainable, grad=trainable, grad32=0, master=0, state=trainable,
                            act=md, residual=md, adapter=adapter, autocast=False)
        return Numerics(frozen=b, trainable=b, grad=b, grad32=0, master=0, state=b, act=b, residual=b, adapter=b,
                        autocast=False)
    if strategy == "fsdp":  # FSDP's MixedPrecision: shards stay in model.dtype, compute gathers 16-bit copies
        trainable = 4 if settings.finetune == "lora" else md
        return Numerics(frozen=md, trainable=trainable, grad=trainable, grad32=0, master=0, state=trainable, act=2,
                        residual=2, adapter=2, autocast=False)
    trainable = 4 if settings.finetune == "lora" else md  # PEFT upcasts adapters of 16-bit models to fp32
    return Numerics(frozen=md, trainable=trainable, grad=trainable, grad32=0, master=0, state=trainable, act=2,
                    residual=md, adapter=4, autocast=True)


def precision_of(precision) -> tuple[str, int]:
    key = str(precision)
    if key not in PRECISIONS:
        raise SlimtuneError(f"trainer.precision={precision!r} has no memory estimate; valid: {choices(PRECISIONS)}")
    return PRECISIONS[key]


# --------------------------------------------------------------------------- weights and optimizer states


def quantized_bytes(shape: tuple[int, ...], quantization: str, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one linear weight (checked against real layers in the tests).

    4-bit: two codes per byte, one absmax per block of 64 (fp32, or uint8 with double quantization plus one fp32
    absmax per 256 blocks, a 256-entry fp32 code table and an fp32 offset), the 16-entry fp32 NF4/FP4 code table.
    LLM.int8: one int8 per weight and one fp32 scale per output row.
    """
    n = math.prod(shape)
    if quantization == "int8":
        return n + 4 * shape[0]
    blocks = -(-n // BNB_4BIT_BLOCK)
    codes = -(-n // 2) + 16 * 4
    if double_quant:
        return codes + blocks + 4 * -(-blocks // DQ_BLOCK) + 256 * 4 + 4
    return codes + 4 * blocks


def optimizer_state_bytes(name: str, numel: int, state_bytes: float) -> float:
    """Bytes of optimizer state for one parameter tensor of `numel` values."""
    if name not in OPTIMIZER_STATES:
        raise SlimtuneError(f"optimizer.name={name!r} has no memory estimate; valid: {choices(OPTIMIZER_STATES)}")
    if name == "sgd":  # slimtune builds SGD without momentum: no state
        return 0.0
    if name == "adamw":
        return 2 * state_bytes * numel + 4  # exp_avg, exp_avg_sq in the parameter's dtype; an fp32 step count
    if name == "paged_adamw_32bit" or numel < BNB_MIN_8BIT_SIZE:
        return 8.0 * numel  # two fp32 states
    return 2.0 * numel + 2 * 4 * -(-numel // BNB_OPTIMIZER_BLOCK)  # two uint8 states + their fp32 block absmax


def optimizer_bytes(name: str, numels: Iterable[int], state_bytes: float) -> float:
    """Optimizer state for all trainable tensors: `optimizer_state_bytes` each, plus bitsandbytes' two shared
    256-entry fp32 quantization maps once 8-bit states exist."""
    numels = list(numels)
    total = sum(optimizer_state_bytes(name, n, state_bytes) for n in numels)
    if name in ("adamw_8bit", "paged_adamw_8bit") and any(n >= BNB_MIN_8BIT_SIZE for n in numels):
        total += 2 * 256 * 4
    return total


# --------------------------------------------------------------------------- activations


def linear_sites(params: Iterable[Param]) -> list[LinearSite]:
    """The linear layers of the first decoder block, from the skeleton's parameter names."""
    sites: dict[str, dict[str, Any]] = {}
    for p in params:
        parts = p.name.split(".")
        if "layers" not in parts:
            continue
        at = parts.index("layers")
        if parts[at + 1] != "0":
            continue
        module = next((part for part in parts if part in LLAMA_LINEARS), None)
        if module is None:
            continue
        site = sites.setdefault(module, {"lora": False, "trainable": False, "quantized": False})
        if "lora_A" in parts or "lora_B" in parts:
            site["lora"] = True
        elif parts[-1] == "weight":
            site["out"], site["in"] = p.shape[0], p.shape[1]
            site["trainable"] = p.trainable
            site["quantized"] = p.quantized
    missing = [name for name in LLAMA_LINEARS if name not in sites or "in" not in sites[name]]
    if missing:
        raise SlimtuneError(f"the activation formula covers Llama-style decoder blocks ({', '.join(LLAMA_LINEARS)}); "
                            f"this model's first block has no {', '.join(missing)}; valid: llama, mistral, qwen2 and "
                            "other models with the same layer names")
    return [LinearSite(name, s["in"], s["out"], s["lora"], s["trainable"], s["quantized"])
            for name, s in ((name, sites[name]) for name in LLAMA_LINEARS)]


@dataclass(frozen=True)
class Activations:
    per_layer: float  # bytes autograd keeps for one decoder block (a block after the first)
    first_layer: float  # the first block (its input needs no gradient when the embeddings are frozen)
    blocks: float  # all blocks at the start of backward (checkpointing: block inputs + any recompute above `head`)
    head: float  # final norm, lm_head input, log-softmax output, labels, rotary tables
    transient: float  # at the start of backward: the gradients w.r.t. log-softmax and logits (+ a 16-bit cast)

    @property
    def peak(self) -> float:
        return self.blocks + self.head + self.transient


def activation_bytes(arch: Architecture, sites: list[LinearSite], settings: Settings, num: Numerics,
                     ragged_dequant: float = 0.0, frozen_linear_numel: int = 0,
                     lm_head_cast: float = 0.0) -> Activations:
    """Activation memory of one micro-batch (T = micro_batch x seq_len tokens) through a Llama-style decoder.

    Source: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), eq. 1 and
    its derivation: a GPT block keeps 34·s·b·h + 5·a·s²·b bytes in 16-bit (attention 11sbh + 5as²b, MLP 19sbh,
    layer norms 4sbh). Adapted, tensor by tensor, to what PyTorch autograd keeps for transformers' Llama block with
    SDPA attention, as measured with `torch.autograd.graph.saved_tensors_hooks` (tests/test_estimate.py):

    * no s² terms: SDPA's flash/memory-efficient kernels keep q, k, v, the output and an fp32 log-sum-exp per head
      and token (4·a·T bytes), not the attention matrix; no dropout masks in the block (Llama has none);
    * RMSNorm upcasts to fp32 and keeps its input (4·h·T) and the inverse RMS (4·T), twice per block;
    * the gated MLP keeps gate, SiLU(gate) and up (3·I·T in activation bytes), not GeLU's 4h;
    * a linear layer keeps its input only when its weight trains: a LoRA target keeps the input of lora_A (its own
      copy when PEFT or autocast casts it, else one copy per input shared by q/k/v, by gate/up; o_proj's input is
      SDPA's kept output) and the r-wide input of lora_B; LoRA dropout keeps a mask and the dropped input per target
      (the mask is bool on CUDA, the input's dtype on the CPU);
    * under autocast every linear whose weight is not in 16-bit keeps a 16-bit copy of the weight (LoRA A/B,
      unquantized frozen weights, full fine-tuning's weights);
    * the head keeps the log-softmax of the fp32 logits (4·T·V) and the labels (8·T); at the start of backward the
      gradient w.r.t. the log-softmax and w.r.t. the logits exist beside it (2 × 4·T·V, plus a 16-bit cast).

    With gradient checkpointing (transformers' non-reentrant one, per block) only each block's input (T·h) stays
    and one block is recomputed at a time during backward.
    """
    T, s = settings.tokens, settings.seq_len
    h, I, V = arch.hidden, arch.intermediate, arch.vocab
    kv, q_width = arch.kv_heads * arch.head_dim, arch.heads * arch.head_dim
    A, R, P = num.act, num.residual, num.adapter
    mask = 1 if settings.on_gpu else P
    lora_run = settings.finetune == "lora"
    by_name = {site.name: site for site in sites}
    norms_train = settings.finetune == "full"

    norm = 4 * h * T + 4 * T + (R * h * T if norms_train else 0)  # fp32 input, inverse RMS, normalized (weight trains)
    attention = 2 * q_width * A * T + 2 * kv * A * T + 4 * arch.heads * T
    mlp = 3 * I * A * T
    inputs = 0.0
    for group, names in LLAMA_GROUPS.items():
        group_sites = [by_name[n] for n in names]
        din = R if group in ("qkv", "mlp_in") else A  # norm outputs are in the residual dtype; o/down inputs from matmuls
        shared = False
        for site in group_sites:
            width = site.in_features
            if site.trainable:  # full fine-tune: the base linear keeps its input
                if num.autocast and din != A:
                    inputs += A * width * T  # autocast's per-op cast
                else:
                    shared = True
            if site.lora:
                if settings.lora_dropout > 0:
                    inputs += mask * width * T + (A if num.autocast and P != A else P) * width * T
                elif num.autocast and P != A:
                    inputs += A * width * T  # PEFT casts to the adapter dtype, autocast back: a copy per target
                elif din != P:
                    inputs += P * width * T
                else:
                    shared = True
                inputs += (A if num.autocast else P) * settings.lora_r * T  # lora_B's input
        if shared and group != "o":  # o_proj's input is the attention output SDPA keeps anyway
            inputs += din * group_sites[0].in_features * T
    casts = 0.0
    if num.autocast:
        for site in sites:
            if site.lora and P != A:
                casts += A * settings.lora_r * (site.in_features + site.out_features)
            if site.trainable and num.trainable != A:
                casts += A * site.in_features * site.out_features
    per_layer = 2 * norm + attention + mlp + inputs + casts + ragged_dequant
    if num.autocast and num.frozen != A:
        per_layer += A * frozen_linear_numel  # 16-bit copies of the unquantized frozen weights

    first = per_layer
    if lora_run and not settings.gradient_checkpointing:
        # The frozen embeddings' output needs no gradient: the first norm keeps nothing, the q/k/v inputs keep no
        # dropout mask and no frozen weight copy (only the adapters' weights need it).
        qkv = [by_name[n] for n in LLAMA_GROUPS["qkv"]]
        first -= 4 * h * T + 4 * T
        if settings.lora_dropout > 0:
            first -= sum(mask * site.in_features * T for site in qkv if site.lora)
        if num.autocast and num.frozen != A:
            first -= sum(A * site.in_features * site.out_features for site in qkv if not site.quantized)
        if num.autocast and P != A:  # nor lora_A's 16-bit weight copy (its input needs no gradient)
            first -= sum(A * settings.lora_r * site.in_features for site in qkv if site.lora)

    head = 4 * h * T + 4 * T + 4 * T * V + 8 * T + 4 + 2 * s * arch.head_dim * R  # ... + the loss, rotary cos/sin
    if norms_train:
        head += R * h * T + (A if num.autocast and R != A else R) * h * T + 8 * T  # normalized, lm_head input, ids
    head += lm_head_cast
    logits_bytes = A if (num.autocast or A != 4) else 4
    transient = 2 * 4 * T * V + (logits_bytes * T * V if logits_bytes != 4 else 0)
    if settings.gradient_checkpointing:
        # Blocks keep their input; during backward one block at a time is recomputed, after the head's gradients
        # are gone: only what exceeds them adds to the peak.
        blocks = arch.layers * R * h * T + max(0.0, per_layer - head - transient)
    else:
        blocks = first + (arch.layers - 1) * per_layer
    return Activations(per_layer, first, blocks, head, transient)


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    device: float  # bytes per device (accelerator)
    cpu: float = 0.0  # bytes of CPU memory per node (offloaded states)
    phase: str = "resident"  # resident: all through training; backward / step: the larger of the two adds


@dataclass
class Estimate:
    name: str
    model: str
    arch: Architecture
    settings: Settings
    params_total: int
    params_trainable: int
    params_quantized: int
    largest_layer_params: int
    lines: list[Line]
    activations: Activations
    gpu_gib: float | None = None
    notes: list[str] = field(default_factory=list)
    params: list[Param] = field(default_factory=list, repr=False)  # the inventory, to re-estimate other settings

    def with_settings(self, **changes) -> "Estimate":
        """The same model under other settings (e.g. strategy=..., devices_per_node=...), without rebuilding it."""
        other = estimate(self.arch, self.params, replace(self.settings, **changes), name=self.name, model=self.model,
                         gpu_gib=self.gpu_gib)
        other.lines[:0] = [line for line in self.lines if line.key == "buffers"]
        return other

    def line(self, key: str) -> Line:
        return next(line for line in self.lines if line.key == key)

    def value(self, key: str) -> float:
        found = [line for line in self.lines if line.key == key]
        return found[0].device if found else 0.0

    @property
    def resident(self) -> float:
        return sum(line.device for line in self.lines if line.phase == "resident")

    @property
    def backward(self) -> float:
        return sum(line.device for line in self.lines if line.phase == "backward")

    @property
    def step(self) -> float:
        return sum(line.device for line in self.lines if line.phase == "step")

    @property
    def peak(self) -> float:
        """Bytes per device at the peak: resident state + the larger of the backward and the optimizer-step phase."""
        return self.resident + max(self.backward, self.step)

    @property
    def model_states(self) -> float:
        """Parameters, gradients and optimizer states per device (DeepSpeed's "model states")."""
        keys = ("trainable", "gradients", "offload_gradients", "master", "optimizer", "gathered")
        return sum(line.device for line in self.lines if line.key in keys)

    @property
    def model_states_cpu(self) -> float:
        return sum(line.cpu for line in self.lines)

    @property
    def fits(self) -> bool | None:
        if self.gpu_gib is None:
            return None
        overhead = CUDA_CONTEXT_GIB * GIB if self.settings.on_gpu else 0.0
        return self.peak + overhead <= self.gpu_gib * GIB

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model, "strategy": self.settings.strategy, "devices": self.settings.devices,
            "params_total": self.params_total, "params_trainable": self.params_trainable,
            "params_quantized": self.params_quantized,
            **{f"{line.key}_bytes": line.device for line in self.lines},
            **{f"{line.key}_cpu_bytes": line.cpu for line in self.lines if line.cpu},
            "model_states_bytes": self.model_states, "peak_bytes": self.peak, "peak_gib": self.peak / GIB,
            "gpu_gib": self.gpu_gib, "fits": self.fits,
        }


def estimate(arch: Architecture, params: list[Param], settings: Settings, *, name: str = "", model: str = "",
             gpu_gib: float | None = None) -> Estimate:
    """The per-device memory of training `params` (the run's parameters) under `settings`."""
    if settings.strategy not in STRATEGIES or settings.strategy == "auto":
        raise SlimtuneError(f"estimate.strategy={settings.strategy!r} is not valid; valid: {choices(STRATEGIES)}")
    if gpu_gib is not None and not (isinstance(gpu_gib, (int, float)) and not isinstance(gpu_gib, bool)
                                    and math.isfinite(gpu_gib) and gpu_gib > 0):
        raise SlimtuneError(f"estimate.gpu_gib={gpu_gib!r} is not valid; valid: a GPU's memory in GiB > 0 (e.g. 24), "
                            "or null")
    num = numerics(settings)
    strategy, n_dev = settings.strategy, settings.devices
    quant = settings.quantization
    trainable = [p for p in params if p.trainable]
    frozen = [p for p in params if not p.trainable]
    quantized = [p for p in frozen if p.quantized and quant != "none"]
    plain_frozen = [p for p in frozen if not (p.quantized and quant != "none")]
    n_train = sum(p.numel for p in trainable)
    largest = largest_layer(params)
    sharded = strategy in SHARDED
    offload_params = strategy == "deepspeed_zero3_offload"
    offload_optim = strategy in ("deepspeed_zero2_offload", "deepspeed_zero3_offload")
    ds = strategy.startswith("deepspeed")
    per_dev = (1 / n_dev) if sharded else 1.0
    lines: list[Line] = []

    def add(key, label, total, *, shard=1.0, cpu=False, phase="resident"):
        # Offloaded states are CPU memory beside a GPU (DeepSpeed's accounting, x1.5 for its staging buffers); with a
        # CPU accelerator they are the process's own memory like everything else, its share counted as allocated.
        if cpu and settings.on_gpu:
            lines.append(Line(key, label, 0.0, total * DEEPSPEED_CPU_BUFFER / settings.nodes, phase))
        else:
            lines.append(Line(key, label, total * shard, 0.0, phase))

    q_bytes = sum(quantized_bytes(p.shape, quant, settings.double_quant) for p in quantized)
    quant_label = {"nf4": "NF4", "fp4": "FP4", "int8": "LLM.int8"}.get(quant, quant)
    if quantized:
        dq = " + double quant" if settings.double_quant and quant != "int8" else ""
        add("base_quantized", f"frozen base, {quant_label}{dq} ({_count(sum(p.numel for p in quantized))} params)",
            q_bytes, shard=per_dev, cpu=offload_params)
    frozen_numel = sum(p.numel for p in plain_frozen)
    if frozen_numel:
        what = "embeddings, norms, lm_head" if quantized else "frozen weights"
        add("base_other", f"{what}, {_dtype_name(num.frozen)} ({_count(frozen_numel)} params)",
            frozen_numel * num.frozen, shard=per_dev, cpu=offload_params)
    kind = "LoRA adapters" if settings.finetune == "lora" else "trainable weights"
    add("trainable", f"{kind}, {_dtype_name(num.trainable)} ({_count(n_train)} params)", n_train * num.trainable,
        shard=per_dev, cpu=offload_params)
    # Gradients: resident under DeepSpeed (its partitions), with accumulation (kept across micro-batches) and in
    # DDP's buckets; otherwise they exist from the backward pass to the optimizer step (Lightning sets them to None).
    grad_phase = "resident" if (ds or settings.accumulate_grad_batches > 1) else "step"
    if ds:
        # DeepSpeed: the 16-bit gradients of the layer in flight live in its buckets (below); partitions are fp32.
        grad_total = n_train * (num.grad + num.grad32) if strategy.startswith("deepspeed_zero2") else n_train * num.grad32
        add("gradients", f"gradients, {_dtype_name(num.grad)} + fp32 partition" if strategy.startswith(
            "deepspeed_zero2") and num.grad else "gradients, fp32 partition", grad_total, shard=1 / n_dev,
            cpu=offload_optim)
        if strategy == "deepspeed_zero2_offload" and settings.on_gpu:  # the 16-bit gradients stream to the CPU
            lines[-1] = replace(lines[-1], cpu=n_train * num.grad32 * DEEPSPEED_CPU_BUFFER / settings.nodes)
        if strategy == "deepspeed_zero3_offload" and not settings.on_gpu:
            # ZeRO-3 offload keeps a second fp32 gradient partition for the CPU optimizer (stage3's
            # subgroup_gradient_buffer beside grad_partitions_flat_buffer). Beside a GPU it is CPU memory, left to
            # DeepSpeed's accounting (and its 1.5x buffer factor) above.
            add("offload_gradients", "fp32 gradient partition of the CPU optimizer", n_train * 4, shard=1 / n_dev)
    elif strategy == "fsdp":
        # FSDP (use_orig_params, as slimtune's preset) keeps a gradient for a unit's whole flat parameter once one of
        # its parameters trains: with LoRA every decoder layer's frozen weights get gradient memory too. That flat
        # gradient outlives optimizer.zero_grad(set_to_none=True), which clears only the original parameters' views,
        # so from the first backward on it is resident (tests/test_estimate.py checks both against a real FSDP).
        root, units = fsdp_units(params)
        grad_numel = sum(numel for numel, trains in units if trains) + (root[0] if root[1] else 0)
        label = "gradients" if grad_numel == n_train else f"gradients of whole FSDP units ({_count(grad_numel)} values)"
        add("gradients", f"{label}, {_dtype_name(num.grad)}", grad_numel * num.grad, shard=per_dev, phase="resident")
    else:
        add("gradients", f"gradients, {_dtype_name(num.grad)}", n_train * num.grad, shard=per_dev, phase=grad_phase)
    if num.master:
        add("master", "fp32 master weights", n_train * num.master, shard=1 / n_dev, cpu=offload_optim)
    # DeepSpeed hands the optimizer one flat fp32 partition per parameter group instead of the tensors.
    states = optimizer_bytes(settings.optimizer, [n_train] if ds else [p.numel for p in trainable], num.state)
    add("optimizer", f"optimizer states, {settings.optimizer}", states, shard=(1 / n_dev if ds or sharded else 1.0),
        cpu=offload_optim)
    if sharded and strategy != "fsdp":
        # The layer in flight is gathered whole: DeepSpeed's estimator counts 4 bytes x the largest layer's
        # parameters (its 16-bit values and gradients).
        add("gathered", f"largest layer gathered ({_count(largest)} params: values + gradients)",
            2 * num.act * largest)
    if strategy in ("deepspeed_zero3", "deepspeed_zero3_offload"):
        distance = int(settings.buckets.get("stage3_max_reuse_distance", 1_000_000_000))
        kept = zero3_kept_bytes(params, distance, quant, settings.double_quant, num,
                                settings.gradient_checkpointing, settings.finetune == "lora") - largest * num.act
        if kept > 0:
            add("zero3_kept", f"parameters ZeRO-3 keeps gathered for the backward (stage3_max_reuse_distance "
                f"{distance:.3g})", kept, phase="backward")
    if strategy == "fsdp":
        # FSDP unshards a unit for its forward and backward: the root (embeddings, final norm, lm_head) stays whole
        # from the forward to the end of the backward (FULL_SHARD keeps the root unsharded), a decoder layer is
        # gathered with the next one prefetched (BACKWARD_PRE) and, when it trains, its whole unsharded gradient.
        root, units = fsdp_units(params)
        unit = max((numel for numel, _ in units), default=0)
        trains = any(t for _, t in units)
        gathered = root[0] + (2 + trains) * unit
        add("gathered", f"FSDP units gathered (root {_count(root[0])} + {2 + trains} x layer {_count(unit)} values)",
            gathered * num.act, phase="backward")
    if strategy == "ddp":
        add("ddp_buckets", "DDP gradient buckets (a second copy of the gradients)", n_train * num.grad)
    if ds and settings.buckets.get("contiguous_gradients", True):
        # DeepSpeed allocates each bucket whole: torch.empty(reduce_bucket_size) in the parameters' dtype per
        # communication dtype. ZeRO-2 makes them at the first gradient of each backward and frees them at its end
        # (setup_buckets / _release_ipg_buffers; overlap_comm doubles them); ZeRO-3 once, at init, for good.
        zero2 = strategy.startswith("deepspeed_zero2")
        copies = 2 if (zero2 and settings.buckets.get("overlap_comm")) else 1
        size = int(settings.buckets.get("reduce_bucket_size", LIGHTNING_DS_BUCKETS["reduce_bucket_size"]))
        label = f"ZeRO gradient buckets ({copies} x reduce_bucket_size {size:.3g})"
        elements = copies * size
        if not settings.on_gpu and n_train < elements:
            # On a CPU accelerator the buckets are untouched pages until gradients are copied in: only as many
            # values as the model has trainable ones become resident (a GPU's allocator reserves them all).
            elements = n_train
            label = f"ZeRO gradient buckets, pages written ({_count(n_train)} of {copies} x {size:.3g} values)"
        add("zero_buckets", label, elements * num.trainable, phase="backward" if zero2 else "resident")

    sites = linear_sites(params)
    ragged = 0.0
    if quant in ("nf4", "fp4") and not settings.on_gpu:
        # slimtune computes 4-bit layers whose width is not a multiple of the block size through an exact dequantize
        # on the CPU (bitsandbytes' CPU kernel is wrong there); autograd keeps that dequantized weight.
        ragged = sum(num.act * s.in_features * s.out_features for s in sites
                     if s.quantized and s.in_features % BNB_4BIT_BLOCK)
    frozen_linear = sum(s.in_features * s.out_features for s in sites if not s.trainable and not s.quantized)
    lm_head = next((p for p in params if p.name.endswith("lm_head.weight")), None)
    embed = next((p for p in params if p.name.endswith("embed_tokens.weight")), None)
    head_weight = lm_head or embed
    lm_head_cast = 0.0
    head_dtype = None if head_weight is None else (num.trainable if head_weight.trainable else num.frozen)
    if num.autocast and head_dtype is not None and head_dtype != num.act:  # autocast's 16-bit copy of lm_head
        lm_head_cast = num.act * head_weight.numel
    acts = activation_bytes(arch, sites, settings, num, ragged_dequant=ragged, frozen_linear_numel=frozen_linear,
                            lm_head_cast=lm_head_cast)
    layer_note = (f"{arch.layers} checkpointed blocks" if settings.gradient_checkpointing
                  else f"{arch.layers} blocks")
    lines.append(Line("activations", f"activations, {layer_note}, {settings.micro_batch} x {settings.seq_len} tokens",
                      acts.blocks, 0.0, "backward"))
    lines.append(Line("logits", f"logits and loss (fp32 log-softmax of {settings.tokens} x {arch.vocab} + gradients)",
                      acts.head + acts.transient, 0.0, "backward"))
    dequant = max((p.numel for p in quantized), default=0) * num.act
    if dequant:
        lines.append(Line("dequant", f"largest {quant_label} layer dequantized for its matmul", dequant, 0.0, "backward"))
    step_temp = 0.0
    if settings.optimizer == "adamw" and not ds:
        # torch AdamW: on CUDA the foreach path makes sqrt(v) for all tensors at once; on the CPU one at a time.
        step_temp = num.state * (n_train * per_dev if settings.on_gpu else max((p.numel for p in trainable), default=0))
    if step_temp:
        lines.append(Line("optimizer_step", "AdamW step temporaries (sqrt of the second moments)", step_temp, 0.0,
                          "step"))
    notes = [
        "activations: Korthikanti et al. 2022 (arXiv:2205.05198) per-block count adapted to transformers' Llama block "
        "with SDPA attention (no s^2 terms), RMSNorm in fp32, gated MLP, LoRA inputs (slimtune.estimate)",
        "model states: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs accounting (16-bit params + 18 bytes "
        "per trainable param under DeepSpeed); CPU figures include DeepSpeed's 1.5x buffer factor",
    ]
    if not settings.on_gpu:
        notes.append("CPU processes: offloaded states counted as the process's own memory (no 1.5x factor); ZeRO "
                     "buckets counted as the pages gradients are written to, not their full reduce_bucket_size")
    return Estimate(name, model, arch, settings, sum(p.numel for p in params), n_train,
                    sum(p.numel for p in quantized), largest, lines, acts, gpu_gib, notes, list(params))


def zero3_kept_bytes(params: list[Param], distance: int, quantization: str, double_quant: bool,
                     num: Numerics, checkpointing: bool = False, frozen_embeddings: bool = False) -> float:
    """Bytes of the parameters ZeRO-3 still holds gathered when the backward pass starts (from the second step on,
    once it has traced the modules): after a module's forward DeepSpeed releases a parameter only if its next use lies
    more than `stage3_max_reuse_distance` values of traced parameters ahead (`PartitionedParameterCoordinator.
    __params_to_release`). Between a parameter's forward and backward use lie the rest of the forward and the
    backward of the same modules, about twice the values after it (three times with gradient checkpointing, whose
    backward runs each block's forward again): the last parameters of the forward, up to half (a third of) the
    distance, stay; with DeepSpeed's default of 1e9, whole models under ~500M parameters. Values are counted as
    ZeRO-3 stores them (a 4-bit base as its uint8 codes). With frozen embeddings and no checkpointing the first
    block's input norm and frozen q/k/v weights have no backward use (their input needs no gradient): released."""
    kept, after, passes = 0.0, 0, 3 if checkpointing else 2
    order = list(params)  # the skeleton lists parameters in forward order (tied ones once, at their first use)
    if not any(p.name.endswith("lm_head.weight") for p in order):  # tied: the embedding is last used as lm_head
        order.sort(key=lambda p: p.name.endswith("embed_tokens.weight"))
    for p in reversed(order):
        parts = p.name.split(".")
        first_block = "layers" in parts and parts[parts.index("layers") + 1] == "0"
        unused = (frozen_embeddings and not checkpointing and first_block and not p.trainable
                  and ("input_layernorm" in parts or any(n in parts for n in LLAMA_GROUPS["qkv"])))
        if p.quantized and quantization != "none":
            stored = quantized_bytes(p.shape, quantization, double_quant)
            numel, size = -(-p.numel // 2) if quantization != "int8" else p.numel, stored
        else:
            numel = p.numel
            size = p.numel * (num.trainable if p.trainable else num.frozen)
        if passes * after < distance and not unused:
            kept += size
        after += numel
    return kept


def fsdp_units(params: Iterable[Param]) -> tuple[tuple[int, bool], list[tuple[int, bool]]]:
    """FSDP's units as slimtune's preset wraps them (wrap_modules "*DecoderLayer"): (values, any trains) of the root
    (everything outside the decoder layers) and of each decoder layer."""
    root, layers = [0, False], {}
    for p in params:
        parts = p.name.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            key = ".".join(parts[:parts.index("layers") + 2])
            layer = layers.setdefault(key, [0, False])
        else:
            layer = root
        layer[0] += p.numel
        layer[1] = layer[1] or p.trainable
    return (root[0], root[1]), [(numel, trains) for numel, trains in layers.values()]


def largest_layer(params: Iterable[Param]) -> int:
    """Parameters of the largest module (its own parameters), as DeepSpeed's `model_to_params` counts them."""
    by_module: dict[str, int] = {}
    for p in params:
        module = p.name.rsplit(".", 1)[0]
        by_module[module] = by_module.get(module, 0) + p.numel
    return max(by_module.values(), default=0)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _dtype_name(bytes_per_value: float) -> str:
    return {1: "int8", 2: "16-bit", 4: "fp32", 8: "fp64"}.get(bytes_per_value, f"{bytes_per_value} bytes")


# --------------------------------------------------------------------------- from a run config


def inventory(model, quantization: str = "none") -> list[Param]:
    """The parameters (tied ones once) and buffers of a model built by `build_skeleton`; a frozen linear weight
    outside lm_head and the adapters is marked quantized when the run quantizes (as both of slimtune's loaders do)."""
    from torch import nn

    quantized_ids: set[int] = set()
    if quantization != "none":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("lm_head") and "lora_" not in name:
                quantized_ids.add(id(module.weight))
    params = [Param(name, tuple(p.shape), bool(p.requires_grad), id(p) in quantized_ids and not p.requires_grad)
              for name, p in model.named_parameters()]
    return params


def buffer_bytes(model) -> int:
    """Bytes of the model's buffers (e.g. rotary inv_freq), at their own dtype."""
    return sum(b.numel() * b.element_size() for _, b in model.named_buffers())


def strategy_of(node, devices: int) -> tuple[str, dict[str, Any]]:
    """The estimate's strategy name and DeepSpeed bucket settings for a `trainer.strategy` value: a Lightning alias
    string or a `_target_` node (its class name and stage/offload arguments, or a DeepSpeed `config` dict/JSON)."""
    buckets = dict(LIGHTNING_DS_BUCKETS)
    if node is None or isinstance(node, str):
        alias = str(node or "auto")
        table = {"auto": "ddp" if devices > 1 else "single", "single_device": "single", "ddp": "ddp",
                 "fsdp": "fsdp", "deepspeed": "deepspeed_zero2", "deepspeed_stage_2": "deepspeed_zero2",
                 "deepspeed_stage_2_offload": "deepspeed_zero2_offload", "deepspeed_stage_3": "deepspeed_zero3",
                 "deepspeed_stage_3_offload": "deepspeed_zero3_offload"}
        if alias in table:
            return table[alias], buckets
        if alias.startswith("ddp"):
            return "ddp", buckets
        raise SlimtuneError(f"trainer.strategy={alias!r} has no memory estimate; valid: set estimate.strategy to one "
                            f"of {choices(STRATEGIES)}")
    node = dict(node)
    if node.get("name") in STRATEGIES and node["name"] != "auto":  # a factory node naming its strategy
        return str(node["name"]), buckets
    target = str(node.get("_target_", ""))
    cls = target.rsplit(".", 1)[-1].lower()
    if "deepspeed" in cls:
        stage = node.get("stage", 2)
        offload_optimizer = bool(node.get("offload_optimizer", False))
        offload_parameters = bool(node.get("offload_parameters", False))
        config = node.get("config")
        for key in LIGHTNING_DS_BUCKETS:
            if key in node:
                buckets[key] = node[key]
        if config is not None:
            ds = _deepspeed_json(config)
            zero = ds.get("zero_optimization", {}) or {}
            stage = zero.get("stage", stage)
            offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
            offload_parameters = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
            buckets = {"reduce_bucket_size": zero.get("reduce_bucket_size", 500_000_000),
                       "overlap_comm": zero.get("overlap_comm", stage == 3),
                       "contiguous_gradients": zero.get("contiguous_gradients", True),
                       "stage3_max_reuse_distance": zero.get("stage3_max_reuse_distance", 1_000_000_000)}
        if stage == 3:
            if offload_optimizer != offload_parameters:
                raise SlimtuneError(f"trainer.strategy: ZeRO-3 with offload_optimizer={offload_optimizer} and "
                                    f"offload_parameters={offload_parameters} has no memory estimate; valid: both on "
                                    "(deepspeed_zero3_offload) or both off (deepspeed_zero3)")
            return ("deepspeed_zero3_offload" if offload_parameters else "deepspeed_zero3"), buckets
        if stage in (1, 2):  # ZeRO-1 shards states only; counted as ZeRO-2 (gradients sharded too): a lower bound
            return ("deepspeed_zero2_offload" if offload_optimizer else "deepspeed_zero2"), buckets
        raise SlimtuneError(f"trainer.strategy.stage={stage!r} has no memory estimate; valid: 1, 2 or 3")
    if "fsdp" in cls:
        return "fsdp", buckets
    if "ddp" in cls:
        return "ddp", buckets
    if "single" in cls:
        return "single", buckets
    raise SlimtuneError(f"trainer.strategy._target_={target!r} has no memory estimate; valid: set estimate.strategy "
                        f"to one of {choices(STRATEGIES)}")


def _deepspeed_json(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(str(config)).expanduser()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SlimtuneError(f"trainer.strategy.config {str(path)!r} is not a readable DeepSpeed JSON "
                            f"({str(err).splitlines()[0]}); valid: a JSON file or a mapping") from err


def devices_of(devices, on_gpu: bool) -> int:
    """Devices per node as Lightning would use them: an int, a list or "0,1" string of indices, or -1/auto (all GPUs
    torch sees; one CPU process)."""
    if isinstance(devices, bool):
        raise SlimtuneError(f"trainer.devices={devices!r} is not valid; valid: a positive integer, -1, auto or a list")
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)) and devices:
        return len(devices)
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        return len([d for d in devices.split(",") if d.strip()])
    if on_gpu:
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def settings_of(cfg: Mapping) -> Settings:
    """The estimate's settings from a composed run config (plain values or a DictConfig)."""
    from slimtune.models.loading import dtype_of, finetune_of, quantization_of

    model, data = _plain(cfg.get("model")), _plain(cfg.get("data"))
    trainer, optimizer = _plain(cfg.get("trainer")), _plain(cfg.get("optimizer"))
    est = _plain(cfg.get("estimate"))
    finetune = finetune_of(model)
    lora = model.get("lora") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "auto":
        import torch

        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = accelerator != "cpu"
    devices = est.get("devices") or devices_of(trainer.get("devices", 1), on_gpu)
    strategy = est.get("strategy")
    strategy_node = trainer.get("strategy", "auto")
    name, buckets = strategy_of(strategy_node, devices)
    if strategy:
        if strategy not in STRATEGIES:
            raise SlimtuneError(f"estimate.strategy={strategy!r} is not valid; valid: {choices(STRATEGIES)}")
        name = strategy if strategy != "auto" else ("ddp" if devices > 1 else "single")
    if name == "single" and devices > 1:
        raise SlimtuneError(f"estimate.strategy=single with {devices} devices; valid: estimate.devices=1, or a "
                            "strategy for several devices (ddp, fsdp, deepspeed_zero2, deepspeed_zero3, ...)")
    precision = trainer.get("precision", "32-true")
    precision_of(precision)
    return Settings(
        quantization=quantization_of(model), double_quant=bool(model.get("double_quant", True)),
        model_dtype_bytes=dtype_of(model).itemsize, precision=str(precision), finetune=finetune,
        lora_r=int(lora.get("r", 8)), lora_dropout=float(lora.get("dropout", 0.0) or 0.0),
        optimizer=str(optimizer.get("name", "adamw")), micro_batch=int(data.get("batch_size", 1)),
        seq_len=int(data.get("block_size", 512)), gradient_checkpointing=bool(model.get("gradient_checkpointing", False)),
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches", 1) or 1), strategy=name,
        devices_per_node=int(devices), nodes=int(trainer.get("num_nodes", 1) or 1), on_gpu=on_gpu, buckets=buckets,
    )


def estimate_run(cfg: Mapping) -> Estimate:
    """The memory estimate of the run `cfg` describes: the model is built on the meta device from its config (the
    bundled configs of the Llama-2 recipes work offline), nothing is loaded, downloaded or written."""
    from slimtune.models.loading import build_skeleton, load_config

    settings = settings_of(cfg)
    model_cfg = _plain(cfg.get("model"))
    arch = Architecture.from_config(load_config(model_cfg))
    skeleton = build_skeleton(model_cfg)
    params = inventory(skeleton, settings.quantization)
    est = _plain(cfg.get("estimate"))
    source = model_cfg.get("name_or_path") or f"model.config ({arch.model_type})"
    result = estimate(arch, params, settings, name=str(cfg.get("name") or ""), model=str(source),
                      gpu_gib=est.get("gpu_gib"))
    buffers = buffer_bytes(skeleton)
    if buffers:
        result.lines.insert(0, Line("buffers", "buffers (rotary tables)", buffers))
    return result


def print_estimate(cfg) -> dict[str, Any]:
    """`python train.py ... estimate=true`: check what the estimate reads, print it, return its figures."""
    from slimtune.config import check_config

    check_config(cfg)
    result = estimate_run(cfg)
    print(format_estimate(result))
    return result.as_dict()


def _plain(node) -> dict:
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(node)


# --------------------------------------------------------------------------- printing


def format_estimate(est: Estimate) -> str:
    s, a = est.settings, est.arch
    strategy = {"single": "one device"}.get(s.strategy, s.strategy)
    where = "GPU" if s.on_gpu else "CPU process"
    lines = [
        "",
        f"slimtune memory estimate{': ' + est.name if est.name else ''} (no weights loaded)",
        f"model     {est.model}: {a.model_type}, {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, "
        f"{a.heads} heads ({a.kv_heads} kv), vocab {a.vocab}; {_count(est.params_total)} parameters, "
        f"{_count(est.params_trainable)} trainable",
        f"run       {s.finetune}, {s.quantization}{' + double quant' if s.double_quant and s.quantization in ('nf4', 'fp4') else ''}"
        f", precision {s.precision}, optimizer {s.optimizer}, micro-batch {s.micro_batch} x {s.seq_len} tokens, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, accumulation {s.accumulate_grad_batches}",
        f"strategy  {strategy} on {s.devices_per_node} {where}{'s' if s.devices_per_node > 1 else ''} per node x "
        f"{s.nodes} node{'s' if s.nodes > 1 else ''}",
        "",
    ]
    unit, size = ("GiB", GIB) if est.peak >= GIB else ("MiB", 2**20)
    shown = [line for line in est.lines if max(line.device, line.cpu) / size >= 0.0005]  # no 0.000 rows
    width = max(len(line.label) for line in shown) + 2
    lines.append(f"{'per device':<{width}}{unit:>9}   when")
    for line in shown:
        when = {"resident": "always", "backward": "backward", "step": "optimizer step"}[line.phase]
        if line.cpu and not line.device:
            lines.append(f"  {line.label:<{width - 2}}{'-':>9}   CPU: {line.cpu / GIB:.2f} GiB per node")
        else:
            lines.append(f"  {line.label:<{width - 2}}{line.device / size:>9.3f}   {when}")
    lines.append(f"{'peak per device (always + the larger of backward / step)':<{width}}{est.peak / size:>9.2f}")
    if est.model_states_cpu:
        lines.append(f"{'CPU memory per node (offloaded, x1.5 buffers)':<{width}}{est.model_states_cpu / GIB:>9.2f} GiB")
    if est.gpu_gib is not None:
        context = CUDA_CONTEXT_GIB if s.on_gpu else 0.0
        need = f"{est.peak / GIB:.2f} GiB" + (f" + {context:g} GiB CUDA context" if context else "")
        verdict = "fits" if est.fits else "does NOT fit"
        lines.append(f"{verdict} a {est.gpu_gib:g} GiB device: needs {need}")
    lines += ["", *(f"source: {note}" for note in est.notes)]
    return "\n".join(lines)
