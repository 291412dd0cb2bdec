"""Malformed `python train.py` invocations, run as users run them: each exits 2 with exactly one `error: ...` line on
stderr naming the bad value, no traceback, and leaves nothing behind (no output folder, no file in the working folder).

The subprocesses run two at a time (one module fixture runs every selected case), each in a fresh empty working
folder, so the default output_dir (outputs/<name>, relative) would show up there if anything were written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ROOT

TINY = "recipe=qlora_tiny"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    names: str  # the error line must contain this: the bad value (and usually its key)
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables (`{inputs}` expands here too)


class _RunsCodeWhenUnpickled:
    """A checkpoint that runs a shell command if anyone unpickles it unsafely (the test's cwd would gain PWNED)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _make_inputs(folder: Path) -> None:
    """Bad files for the cases; outside every case's working folder."""
    def file(name: str, content: bytes | str) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    file("binary.txt", bytes(range(256)) * 64)
    file("latin1.txt", ("Der Bär läuft über die Straße. " * 200).encode("latin-1"))
    file("garbage.jsonl", "this is not json\n{\"text\": \"fine\"}\n")
    file("fake.parquet", "just text")
    file("weights.bin", b"\x00\x01")
    file("notes.ckpt", "this is a text file, not a checkpoint\n")
    file("afile", "a file where a folder is expected\n")
    file("no_config_model/model.safetensors", b"\x00" * 16)
    file("adapter_folder/adapter_config.json", "{}")
    file("broken_config_model/config.json", "{not json")
    file("no_data_folder/slides.pdf", "%PDF-1.4")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "loops": {}, "optimizer_states": [],
                "hook": _RunsCodeWhenUnpickled()}, folder / "pickle_bomb.ckpt")
    torch.save({"weight": torch.zeros(2)}, folder / "plain_tensors.ckpt")
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0"},
               folder / "weights_only.ckpt")
    file("ds_not_json.json", '{"zero_optimization": {"stage": 2,}')
    file("ds_accumulation.json", '{"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}')
    file("ds_micro_batch.json", '{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 16}')
    # A DeepSpeed checkpoint folder as Lightning writes it (ZeRO-3, 2 processes), and one with a pickle bomb inside.
    ds_state = {"module": {}, "param_shapes": [{"model.w": torch.Size([2])}], "dp_world_size": 2, "global_step": 3,
                "ds_config": {"zero_optimization": {"stage": 3}}, "pytorch-lightning_version": "2.6.0", "loops": {}}
    for name in ("ds_checkpoint", "ds_checkpoint_bomb"):
        file(f"{name}/latest", "checkpoint")
        (folder / name / "checkpoint").mkdir()
        torch.save(ds_state, folder / name / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"hook": _RunsCodeWhenUnpickled()}, folder / "ds_checkpoint_bomb" / "checkpoint" /
               "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "loops": {}, "optimizer_states": [],
                "global_step": 3}, folder / "lightning.ckpt")
    (folder / "empty_extensions").mkdir()
    (folder / "readonly").mkdir()
    (folder / "readonly").chmod(0o555)


UNWRITABLE = "/proc/sys" if os.geteuid() == 0 else "{inputs}/readonly"  # root ignores mode bits, not /proc/sys


def _cases() -> list[Case]:
    """Every case; `{inputs}` stands for the folder of bad files made by the `inputs` fixture."""
    f = {name: "{inputs}/" + name for name in (
        "binary.txt", "latin1.txt", "garbage.jsonl", "fake.parquet", "weights.bin", "notes.ckpt", "afile",
        "no_config_model", "adapter_folder", "broken_config_model", "pickle_bomb.ckpt", "plain_tensors.ckpt",
        "weights_only.ckpt", "no_data_folder")}
    no_gpu = not torch.cuda.is_available()
    too_many = 64 if (os.cpu_count() or 1) < 64 else 100_000
    cases = [
        # reported in issue 8
        Case("lr_abc", (TINY, "optimizer.lr=abc"), "optimizer.lr='abc'"),
        Case("max_steps_abc", (TINY, "trainer.max_steps=abc"), "trainer.max_steps='abc'"),
        Case("data_binary", (TINY, f"data.path={f['binary.txt']}"), f["binary.txt"]),
        Case("ckpt_text_file", (TINY, f"ckpt_path={f['notes.ckpt']}"), f["notes.ckpt"]),
        Case("output_parent_is_file", (TINY, f"output_dir={f['afile']}/run"), f["afile"]),
        Case("output_no_permission", (TINY, f"output_dir={UNWRITABLE}/slimtune_run"), UNWRITABLE),
        Case("model_folder_no_config", (TINY, "model.config=null", f"model.name_or_path={f['no_config_model']}"),
             f["no_config_model"]),
        Case("accelerator_unavailable", (TINY, f"trainer.accelerator={'gpu' if no_gpu else 'tpu'}"),
             "gpu" if no_gpu else "tpu"),
        Case("devices_too_many", (TINY, "trainer.accelerator=cpu", f"trainer.devices={too_many}"), str(too_many)),
        Case("strategy_unknown", (TINY, "trainer.strategy=nope"), "'nope'"),
        Case("name_or_path_with_recipe_config", (TINY, "model.name_or_path=/nonexistent"), "/nonexistent"),
        # numbers of the wrong type or range
        Case("lr_negative", (TINY, "optimizer.lr=-1"), "optimizer.lr=-1"),
        Case("lr_nan", (TINY, "optimizer.lr=nan"), "optimizer.lr=nan"),
        Case("weight_decay_negative", (TINY, "optimizer.weight_decay=-0.5"), "optimizer.weight_decay=-0.5"),
        Case("betas_one_value", (TINY, "optimizer.betas=[0.9]"), "optimizer.betas=[0.9]"),
        Case("betas_above_one", (TINY, "optimizer.betas=[0.9,1.5]"), "optimizer.betas=[0.9, 1.5]"),
        Case("eps_string", (TINY, "optimizer.eps=small"), "optimizer.eps='small'"),
        Case("max_steps_zero", (TINY, "trainer.max_steps=0"), "trainer.max_steps=0"),
        Case("max_steps_fraction", (TINY, "trainer.max_steps=2.5"), "trainer.max_steps=2.5"),
        Case("never_stops", (TINY, "trainer.max_steps=-1", "trainer.max_epochs=-1"), "trainer.max_steps=-1"),
        Case("max_epochs_abc", (TINY, "trainer.max_epochs=abc"), "trainer.max_epochs='abc'"),
        Case("max_epochs_zero", (TINY, "trainer.max_epochs=0"), "trainer.max_epochs=0"),
        Case("devices_zero", (TINY, "trainer.devices=0"), "trainer.devices=0"),
        Case("accumulate_zero", (TINY, "trainer.accumulate_grad_batches=0"), "trainer.accumulate_grad_batches=0"),
        Case("clip_negative", (TINY, "trainer.gradient_clip_val=-1"), "trainer.gradient_clip_val=-1"),
        Case("val_interval_zero", (TINY, "trainer.val_check_interval=0"), "trainer.val_check_interval=0"),
        Case("limit_val_negative", (TINY, "trainer.limit_val_batches=-1"), "trainer.limit_val_batches=-1"),
        Case("log_every_zero", (TINY, "trainer.log_every_n_steps=0"), "trainer.log_every_n_steps=0"),
        Case("progress_bar_maybe", (TINY, "trainer.enable_progress_bar=maybe"), "trainer.enable_progress_bar='maybe'"),
        Case("precision_unknown", (TINY, "trainer.precision=banana"), "banana"),
        Case("block_size_zero", (TINY, "data.block_size=0"), "data.block_size=0"),
        Case("block_size_abc", (TINY, "data.block_size=abc"), "data.block_size='abc'"),
        Case("batch_size_negative", (TINY, "data.batch_size=-2"), "data.batch_size=-2"),
        Case("val_fraction_above_one", (TINY, "data.val_fraction=1.5"), "data.val_fraction=1.5"),
        Case("num_workers_negative", (TINY, "data.num_workers=-1"), "data.num_workers=-1"),
        Case("max_examples_abc", (TINY, "data.max_examples=abc"), "data.max_examples='abc'"),
        Case("lora_r_zero", (TINY, "model.lora.r=0"), "model.lora.r=0"),
        Case("lora_alpha_abc", (TINY, "model.lora.alpha=abc"), "model.lora.alpha='abc'"),
        Case("lora_dropout_above_one", (TINY, "model.lora.dropout=1.5"), "model.lora.dropout=1.5"),
        Case("warmup_steps_negative", (TINY, "scheduler.warmup_steps=-5"), "scheduler.warmup_steps=-5"),
        Case("warmup_ratio_above_one", (TINY, "scheduler.warmup_ratio=2"), "scheduler.warmup_ratio=2"),
        Case("seed_abc", (TINY, "seed=abc"), "seed='abc'"),
        Case("seed_negative", (TINY, "seed=-1"), "seed=-1"),
        Case("checkpoint_every_zero", (TINY, "checkpoint.every_n_train_steps=0"), "checkpoint.every_n_train_steps=0"),
        Case("save_top_k_abc", (TINY, "checkpoint.save_top_k=abc"), "checkpoint.save_top_k='abc'"),
        Case("save_top_k_without_metric", (TINY, "checkpoint.save_top_k=2"), "checkpoint.save_top_k=2"),
        Case("export_flag_maybe", (TINY, "export.merged=maybe"), "export.merged='maybe'"),
        # names that are not among the valid ones
        Case("dtype_unknown", (TINY, "model.dtype=float8"), "'float8'"),
        Case("quantization_unknown", (TINY, "model.quantization=int3"), "'int3'"),
        Case("finetune_unknown", (TINY, "model.finetune=half"), "'half'"),
        Case("full_finetune_of_nf4", (TINY, "model.finetune=full"), "model.finetune=full"),
        Case("optimizer_unknown", (TINY, "optimizer.name=nope"), "optimizer.name='nope'"),
        Case("scheduler_unknown", (TINY, "scheduler.name=nope"), "scheduler.name='nope'"),
        Case("data_format_unknown", (TINY, "data.format=nope"), "data.format='nope'"),
        Case("model_type_unknown", (TINY, "model.config.model_type=nope"), "'nope'"),
        Case("strategy_target_missing", (TINY, "strategy=ddp", "trainer.strategy._target_=nope.NopeStrategy"),
             "nope.NopeStrategy"),
        Case("trainer_argument_unknown", (TINY, "+trainer.nope=1"), "trainer.nope"),
        Case("logger_target_missing", (TINY, "logger._target_=nope.NopeLogger"), "nope.NopeLogger"),
        Case("callback_argument", (TINY, "callbacks.perplexity.max_windows=0"), "max_windows=0"),
        Case("lora_bias_unknown", (TINY, "model.lora.bias=some"), "model.lora.bias='some'"),
        # files and folders
        Case("data_missing", (TINY, "data.path=/nonexistent/train.txt"), "/nonexistent/train.txt"),
        Case("data_path_number", (TINY, "data.path=123"), "data.path=123"),
        Case("data_folder_without_data", (TINY, f"data.path={f['no_data_folder']}"), f["no_data_folder"]),
        Case("model_config_string", (TINY, "model.config=abc"), "model.config='abc'"),
        Case("model_config_bad_field", (TINY, "model.config.hidden_size=abc"), "'abc'"),
        Case("data_latin1", (TINY, f"data.path={f['latin1.txt']}"), f["latin1.txt"]),
        Case("data_jsonl_garbage", (TINY, f"data.path={f['garbage.jsonl']}"), f["garbage.jsonl"]),
        Case("data_fake_parquet", (TINY, f"data.path={f['fake.parquet']}"), f["fake.parquet"]),
        Case("data_unsupported_suffix", (TINY, f"data.path={f['weights.bin']}"), f["weights.bin"]),
        Case("ckpt_pickle_bomb", (TINY, f"ckpt_path={f['pickle_bomb.ckpt']}"), f["pickle_bomb.ckpt"]),
        Case("ckpt_plain_tensors", (TINY, f"ckpt_path={f['plain_tensors.ckpt']}"), f["plain_tensors.ckpt"]),
        Case("ckpt_weights_only", (TINY, f"ckpt_path={f['weights_only.ckpt']}"), f["weights_only.ckpt"]),
        Case("ckpt_missing", (TINY, "ckpt_path=/nonexistent/last.ckpt"), "/nonexistent/last.ckpt"),
        Case("ckpt_folder", (TINY, "ckpt_path={inputs}"), "{inputs}"),
        Case("ckpt_last_without_run", (TINY, "ckpt_path=last"), "ckpt_path=last"),
        Case("output_is_file", (TINY, f"output_dir={f['afile']}"), f["afile"]),
        Case("output_empty", (TINY, "output_dir="), "output_dir=''"),
        Case("model_missing_path", (TINY, "model.config=null", "model.name_or_path=/nonexistent"), "/nonexistent"),
        Case("model_adapter_folder", (TINY, "model.config=null", f"model.name_or_path={f['adapter_folder']}"),
             f["adapter_folder"]),
        Case("model_broken_config", (TINY, "model.config=null", f"model.name_or_path={f['broken_config_model']}"),
             f["broken_config_model"]),
        Case("gguf_file_with_config", (TINY, "model.gguf_file=model.gguf"), "model.gguf_file='model.gguf'"),
        Case("tokenizer_missing", (TINY, "model.tokenizer=/nonexistent/tokenizer"), "/nonexistent/tokenizer"),
        # strategies (issue 9)
        Case("strategy_preset_unknown", (TINY, "strategy=nope"), "'nope'"),
        Case("deepspeed_json_not_json", (TINY, "strategy=deepspeed_zero2", "trainer.strategy.config={inputs}/ds_not_json.json"),
             "{inputs}/ds_not_json.json"),
        Case("deepspeed_json_missing", (TINY, "strategy=deepspeed_zero3", "trainer.strategy.config=/nonexistent/ds.json"),
             "/nonexistent/ds.json"),
        Case("deepspeed_json_accumulation", (TINY, "strategy=deepspeed_zero2",
                                             "trainer.strategy.config={inputs}/ds_accumulation.json"),
             "gradient_accumulation_steps=4"),
        Case("deepspeed_json_micro_batch", (TINY, "strategy=deepspeed_zero2",
                                            "trainer.strategy.config={inputs}/ds_micro_batch.json"),
             "train_micro_batch_size_per_gpu=16"),
        Case("deepspeed_devices_too_many", (TINY, "strategy=deepspeed_zero3", f"trainer.devices={too_many}"),
             str(too_many)),
        Case("fsdp_devices_too_many", (TINY, "strategy=fsdp", "model.quantization=none", "callbacks=[]",
                                       f"trainer.devices={too_many}"),
             str(too_many)),
        Case("fsdp_with_4bit_base", (TINY, "strategy=fsdp"), "trainer.strategy=fsdp cannot shard"),
        Case("fsdp_with_slimtune_callbacks", (TINY, "strategy=fsdp", "model.quantization=none"),
             "cannot run under FSDP"),
        Case("ptq_under_deepspeed", ("recipe=lorc_w3_tiny", "strategy=deepspeed_zero2"),
             "PostTrainingQuantization cannot run under DeepSpeed"),
        Case("zero3_offload_with_sgd", (TINY, "strategy=deepspeed_zero3_offload", "optimizer.name=sgd"),
             "optimizer.name='sgd'"),
        Case("zero3_offload_without_cpu_adam", (TINY, "strategy=deepspeed_zero3_offload"), "CPU Adam",
             env=(("CXX", "/nonexistent/c++"), ("TORCH_EXTENSIONS_DIR", "{inputs}/empty_extensions"))),
        Case("ckpt_deepspeed_under_ddp", (TINY, "strategy=ddp", "ckpt_path={inputs}/ds_checkpoint"),
             "{inputs}/ds_checkpoint' is a DeepSpeed checkpoint (ZeRO stage 3) and trainer.strategy=ddp"),
        Case("ckpt_zero3_under_zero2", (TINY, "strategy=deepspeed_zero2", "ckpt_path={inputs}/ds_checkpoint"),
             "holds ZeRO stage 3 shards and trainer.strategy runs stage 2"),
        Case("ckpt_deepspeed_other_process_count", (TINY, "strategy=deepspeed_zero3", "ckpt_path={inputs}/ds_checkpoint"),
             "holds the ZeRO shards of 2 processes and this run starts 1"),
        Case("ckpt_deepspeed_pickle_bomb", (TINY, "strategy=deepspeed_zero3", "ckpt_path={inputs}/ds_checkpoint_bomb"),
             "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        Case("ckpt_file_under_deepspeed", (TINY, "strategy=deepspeed_zero2", "ckpt_path={inputs}/lightning.ckpt"),
             "{inputs}/lightning.ckpt' is a single-file checkpoint"),
        # distillation (issue 11): refused when the callbacks are built, before the teacher or anything else loads
        Case("distill_teacher_missing", ("recipe=kd_tiny", "callbacks.distill.teacher.config=null",
                                         "callbacks.distill.teacher.name_or_path=/nowhere/teacher"),
             "'/nowhere/teacher' does not exist"),
        Case("distill_on_policy_without_budget", ("recipe=kd_tiny", "callbacks.distill.on_policy=0.5"),
             "needs a generation budget"),
        # Hydra's composition, pre-checked by train.py
        Case("recipe_unknown", ("recipe=nope",), "'nope'"),
        Case("key_unknown", (TINY, "trainer.nope=1"), "trainer.nope"),
        Case("sweep_without_multirun", (TINY, "optimizer.lr=1e-3,1e-4"), "optimizer.lr=1e-3,1e-4"),
        Case("interpolation_unresolved", (TINY, "name=${nope}"), "nope"),
    ]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    _make_inputs(folder)
    yield folder
    (folder / "readonly").chmod(0o755)


@dataclass
class Outcome:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cwd_after: list[str]
    output_dir_created: bool


def _run_case(case: Case, inputs: Path, cwd: Path) -> Outcome:
    args = [arg.replace("{inputs}", str(inputs)) for arg in case.args]
    output_dir = next((a.split("=", 1)[1] for a in args if a.startswith("output_dir=")), "")
    existed = bool(output_dir) and Path(output_dir).exists()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.update({key: value.replace("{inputs}", str(inputs)) for key, value in case.env})
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    created = bool(output_dir) and not existed and Path(output_dir).exists()
    return Outcome(args, result.returncode, result.stdout, result.stderr, time.perf_counter() - started,
                   sorted(os.listdir(cwd)), created)


@pytest.fixture(scope="module")
def outcomes(request, inputs, tmp_path_factory) -> dict[str, Outcome]:
    """Runs the selected cases two at a time, each in a fresh empty working folder: {case id: Outcome}."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module.__name__ == __name__ and hasattr(item, "callspec") and "case" in item.callspec.params}
    cases = [case for case in CASES if case.id in selected]
    folders = [tmp_path_factory.mktemp(f"cwd_{case.id}") for case in cases]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda pair: _run_case(pair[0], inputs, pair[1]), zip(cases, folders)))
    total = time.perf_counter() - started
    slowest = sorted(zip(cases, results), key=lambda pair: -pair[1].seconds)[:3]
    print(f"\nbad-input sweep: {len(cases)} invocations of train.py in {total:.0f} s, two at a time (slowest: "
          + ", ".join(f"{case.id} {outcome.seconds:.0f} s" for case, outcome in slowest) + ")")
    return {case.id: outcome for case, outcome in zip(cases, results)}


def test_sweep_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, inputs, outcomes):
    outcome = outcomes[case.id]
    context = f"train.py {' '.join(outcome.args)}\nstdout:\n{outcome.stdout[-3000:]}\nstderr:\n{outcome.stderr[-3000:]}"
    assert outcome.returncode == 2, context
    assert "Traceback" not in outcome.stdout + outcome.stderr, context
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() != "error:", context
    assert case.names.replace("{inputs}", str(inputs)) in lines[0], context
    assert "weights_only=False" not in lines[0], context
    assert outcome.cwd_after == [], context  # no outputs/<name>, no log, no file a checkpoint's pickle would create
    assert not outcome.output_dir_created, context
