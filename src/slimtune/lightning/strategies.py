"""Lightning's DDP, DeepSpeed and FSDP strategies, on GPUs as Lightning ships them and on CPU processes too.

The presets in `configs/strategy/` target the factories below (`deepspeed`, `fsdp`); each returns Lightning's own class
on CUDA and a CPU-capable subclass otherwise, so `trainer.accelerator` alone decides and nobody names a subclass.

Why subclasses: Lightning refuses DeepSpeed and FSDP on a CPU accelerator, although both libraries run there on gloo
(DeepSpeed picks its CPU accelerator when torch finds no GPU). The CPU subclasses skip exactly the CUDA-only parts:
`DeepSpeedStrategy.setup_environment`'s CUDA check and `setup_distributed`'s device-index validation (CPU devices
have no index); the root device is `cpu` as for DDP on CPU. Everything else (ZeRO partitioning, checkpoints, gradient
accumulation, clipping) is Lightning's and DeepSpeed's own code. They make 2-process tests of ZeRO-2/3 and FSDP possible
on any machine, and give CPU-only users the same memory savings per process.

ZeRO-Offload trains the optimizer step on the CPU with DeepSpeed's `DeepSpeedCPUAdam` (a C++ op compiled on first use);
DeepSpeed refuses a torch optimizer there. The strategies used for offload hand DeepSpeed the same AdamW (same
parameter groups, learning rate, betas, eps, weight decay, and the LR scheduler re-pointed at it), so a LightningModule's
own `configure_optimizers` (slimtune's or a user's) needs no change.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from slimtune.errors import SlimtuneError

__all__ = [
    "CPUDeepSpeedStrategy",
    "CPUFSDPStrategy",
    "ClippingFSDPStrategy",
    "OffloadDeepSpeedStrategy",
    "deepspeed",
    "deepspeed_config",
    "fsdp",
    "full_weights",
    "offloads_optimizer",
    "on_cuda",
]


def on_cuda(accelerator: str | None) -> bool:
    """Whether a Trainer with this `accelerator` setting runs on CUDA GPUs (`auto`: when torch finds one)."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda"):
        return True
    return name == "auto" and torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed config as a dict: the mapping itself, or the JSON file it names (one-line error if it is not one)."""
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config)))  # a deep copy of plain values (Lightning edits the config in place)
    path = Path(str(config)).expanduser()
    valid = "valid: a DeepSpeed JSON file (https://www.deepspeed.ai/docs/config-json/) or the preset's mapping"
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise SlimtuneError(f"trainer.strategy.config {str(config)!r} {what}; {valid}")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SlimtuneError(f"trainer.strategy.config {str(config)!r} is not valid JSON ({reason}); {valid}") from err
    if not isinstance(loaded, dict):
        raise SlimtuneError(f"trainer.strategy.config {str(config)!r} holds a JSON {type(loaded).__name__}, not an "
                            f"object; {valid}")
    return loaded


def offloads_optimizer(config: Mapping[str, Any]) -> bool:
    """Whether a DeepSpeed config runs the optimizer step on the CPU (ZeRO-Offload) or NVMe (ZeRO-Infinity)."""
    device = ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return str(device).lower() in ("cpu", "nvme")


class _CPUAdamForOffload:
    """Swaps a torch Adam/AdamW from `configure_optimizers` for DeepSpeed's CPU Adam when the config offloads the
    optimizer (DeepSpeed's ZeRO-Offload refuses other optimizers); without offload, nothing changes."""

    def _init_optimizers(self):
        optimizer, scheduler_config = super()._init_optimizers()
        if offloads_optimizer(self.config) and "optimizer" not in self.config:
            optimizer = _as_cpu_adam(optimizer)
            if scheduler_config is not None:
                scheduler_config.scheduler.optimizer = optimizer
        return optimizer, scheduler_config


def _as_cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if type(optimizer).__name__ == "DeepSpeedCPUAdam":
            return optimizer
        raise SlimtuneError(f"ZeRO-Offload (offload_optimizer) trains with DeepSpeed's CPU Adam and cannot run "
                            f"{type(optimizer).__name__}; valid: optimizer.name=adamw, or a strategy without offload")
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiles its C++ op on first use (see README, "Scale")

    # The hyperparameters of each group (and initial_lr, which the LR scheduler set), not torch's implementation flags.
    kept = ("params", "lr", "betas", "eps", "weight_decay", "initial_lr")
    groups = [{key: group[key] for key in kept if key in group} for group in optimizer.param_groups]
    defaults = optimizer.defaults
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(defaults.get("decoupled_weight_decay", False))
    return DeepSpeedCPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                            weight_decay=defaults["weight_decay"], adamw_mode=decoupled)


class OffloadDeepSpeedStrategy(_CPUAdamForOffload, DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy on GPUs, with the CPU Adam swap for ZeRO-Offload."""


class CPUDeepSpeedStrategy(_CPUAdamForOffload, DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy on CPU processes (gloo): no CUDA check, no CUDA device-index validation."""

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own first raises unless the accelerator is CUDA

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        # Lightning's version first validates CUDA device indices against local ranks; CPU devices have none.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank) if self._device_rank_wanted else torch.device("cpu")

    _device_rank_wanted = False

    @contextmanager
    def _device_rank(self) -> Iterator[None]:
        """Lightning hands `deepspeed.initialize` the root device's index as `device_rank`, which DeepSpeed needs as
        an int (it is None for `cpu`); DeepSpeed's CPU accelerator maps any rank to the CPU."""
        self._device_rank_wanted = True
        try:
            yield
        finally:
            self._device_rank_wanted = False

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any):
        with self._device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    def _initialize_deepspeed_inference(self, model: torch.nn.Module) -> None:
        with self._device_rank():
            super()._initialize_deepspeed_inference(model)


def deepspeed(config: Mapping[str, Any] | str | os.PathLike, accelerator: str | None = "auto",
              **kwargs: Any) -> DeepSpeedStrategy:
    """DeepSpeed with `config` (a DeepSpeed config mapping, or the path of a JSON file): Lightning's
    `DeepSpeedStrategy` on CUDA, `CPUDeepSpeedStrategy` on CPU processes; with optimizer offload, the CPU Adam swap.

    `kwargs` go to `DeepSpeedStrategy` (e.g. `exclude_frozen_parameters`, `load_full_weights`).
    """
    settings = deepspeed_config(config)
    if on_cuda(accelerator):
        cls = OffloadDeepSpeedStrategy if offloads_optimizer(settings) else DeepSpeedStrategy
    else:
        cls = CPUDeepSpeedStrategy
    return cls(config=settings, **kwargs)


# ----------------------------------------------------------------------------------------------------------- FSDP


class ClippingFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, plus `trainer.gradient_clip_val` (clipping by norm), which Lightning's FSDP precision
    plugin refuses because it has no reference to the root FSDP module (torch's `clip_grad_norm_` is wrong on shards).
    The strategy has it: clipping calls `FullyShardedDataParallel.clip_grad_norm_` on the root, the global norm over
    every shard, as the torch FSDP docs prescribe. Every QLoRA recipe clips (max grad norm 0.3)."""

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # this plugin instance only

    def _clip_grad_by_norm(self, optimizer, clip_val) -> None:
        self.model.clip_grad_norm_(clip_val)


class CPUFSDPStrategy(ClippingFSDPStrategy):
    """Lightning's FSDPStrategy on CPU processes (gloo). Lightning refuses `FSDPStrategy` itself on a CPU accelerator
    (an exact-type check, so a subclass passes); torch's FSDP runs there once the CPU is named as its device."""

    strategy_name = "fsdp_cpu"

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            return super()._setup_model(model)
        # Lightning passes device_id=root_device.index, None on the CPU, and torch's FSDP then looks for a GPU; with
        # the CPU named it shards on the CPU. Lightning's own setup does the rest (activation checkpointing, metrics).
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        policy = self.kwargs.pop("auto_wrap_policy", None)  # Lightning would warn that a wrapped model ignores it
        try:
            return super()._setup_model(model)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy

    # Lightning gathers full state dicts with offload_to_cpu=True, which crashes torch's FSDP (a segmentation fault)
    # when the shards already live on the CPU; here the same gathers run without the (pointless) offload.
    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _full_state_dict_without_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        with _full_state_dict_without_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        with _full_state_dict_without_offload():
            return super().load_checkpoint(checkpoint_path, weights_only)

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(wrapper_cls=FullyShardedDataParallel, cpu_offload=self.cpu_offload,
                         mixed_precision=self.mixed_precision_config, sharding_strategy=self.sharding_strategy,
                         device_id=torch.device("cpu"), **self.kwargs):
            yield


@contextmanager
def _full_state_dict_without_offload() -> Iterator[None]:
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    original = lightning_fsdp._get_full_state_dict_context

    def without_offload(module, world_size: int, rank0_only: bool = True):
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                    state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                    optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                                                     rank0_only=rank0_only))

    lightning_fsdp._get_full_state_dict_context = without_offload
    try:
        yield
    finally:
        lightning_fsdp._get_full_state_dict_context = original


def _class_name_policy(patterns: tuple[str, ...], module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    return recurse or any(fnmatch.fnmatchcase(type(module).__name__, p) for p in patterns)


def fsdp(accelerator: str | None = "auto", wrap_modules: str | list[str] | None = "*DecoderLayer",
         **kwargs: Any) -> FSDPStrategy:
    """FSDP: Lightning's `FSDPStrategy` (with clipping by norm: `ClippingFSDPStrategy`) on CUDA, `CPUFSDPStrategy`
    on CPU processes.

    `wrap_modules`: class-name patterns of the modules FSDP shards as units (default: every transformers decoder
    layer, `LlamaDecoderLayer`, `Qwen2DecoderLayer`, ...); null: the whole model is one unit. Other `kwargs` go to
    `FSDPStrategy` (`sharding_strategy`, `state_dict_type`, `cpu_offload`, ...).
    """
    if wrap_modules and "auto_wrap_policy" not in kwargs:
        patterns = (wrap_modules,) if isinstance(wrap_modules, str) else tuple(wrap_modules)
        kwargs["auto_wrap_policy"] = functools.partial(_class_name_policy, patterns)
    cls = ClippingFSDPStrategy if on_cuda(accelerator) else CPUFSDPStrategy
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------- export


@contextmanager
def full_weights(trainer, model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model` on global rank 0 holds its whole, unsharded weights in plain modules, so exports
    (PEFT's save_pretrained, the merged model) read it as after a single-process run.

    Every process must enter the block (gathering is collective); the other ranks may leave it at once. DeepSpeed
    ZeRO-3 gathers the partitioned parameters (`deepspeed.zero.GatheredParameters`); FSDP summons the full parameters
    on rank 0 and, for the block, puts each wrapped module back in its parent's place. DDP, ZeRO-1/2 and single
    processes hold full weights already: nothing happens.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed as ds

        with ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
        return
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = strategy.model
        offload = strategy.root_device.type != "cpu"  # to keep GPU memory; on the CPU it would crash torch's FSDP
        with FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=True,
                                                         offload_to_cpu=offload):
            with _unwrapped_fsdp_modules(model):
                yield
        return
    yield


@contextmanager
def _unwrapped_fsdp_modules(model: torch.nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FullyShardedDataParallel):
                swapped.append((parent, name, child))
    for parent, name, wrapper in swapped:
        setattr(parent, name, wrapper.module)  # FullyShardedDataParallel.module: the module it wraps
    try:
        yield
    finally:
        for parent, name, wrapper in reversed(swapped):
            setattr(parent, name, wrapper)


# ------------------------------------------------------------------------------------------------ checks, up front


def cpu_adam_missing() -> str | None:
    """Why DeepSpeed's CPU Adam op (ZeRO-Offload's optimizer) cannot be loaded or built here, or None when it can.

    Without building it: the op is prebuilt into the deepspeed install, or a JIT build is cached (torch's extensions
    folder, $TORCH_EXTENSIONS_DIR), or ninja and a C++ compiler ($CXX, else c++) are there to build it (about 2 minutes
    on first use, see README "Scale").
    """
    import shutil

    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    if builder is None:
        return f"DeepSpeed's {get_accelerator()._name} accelerator has none"
    if installed_ops.get(builder.name, False):
        return None
    if not builder.is_compatible(verbose=False):
        return f"it is not compatible with this machine ({builder.error_log or 'see ds_report'})"
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    cached = any(root.glob(f"*/{builder.name}/{builder.name}*.so")) or any(root.glob(f"{builder.name}/{builder.name}*.so"))
    compiler = os.environ.get("CXX", "c++")
    missing = [tool for tool, found in (("ninja", shutil.which("ninja")),
                                        (f"C++ compiler ({compiler})", shutil.which(compiler))) if not found]
    if "ninja" in missing or (missing and not cached):  # torch runs ninja even to load a cached build
        where = "" if cached else f" ({root} holds no {builder.name} build)"
        return f"it can be neither built nor loaded here{where}: no {', no '.join(missing)}"
    return None
