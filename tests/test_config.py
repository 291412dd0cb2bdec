import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose
from slimtune.config import recipe_names
from slimtune.errors import SlimtuneError


def test_recipes_exist_with_command_comment():
    names = recipe_names()
    assert {"qlora_7b", "qlora_13b", "qlora_70b", "qlora_cpu"} <= set(names)
    for name in names:
        first = (ROOT / "recipes" / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# python train.py recipe={name}", first


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_composes_and_resolves(name):
    cfg = compose(f"recipe={name}")
    assert cfg.name == name
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.model.finetune in ("lora", "full")


@pytest.mark.parametrize("name", sorted(f.stem for f in (ROOT / "callbacks").glob("*.yaml")))
def test_every_callback_preset_builds_its_callback(name, tmp_path, data_dir):
    from slimtune.run import build_callbacks

    first = (ROOT / "callbacks" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 10  # each preset says what it does
    cfg = compose(f"callbacks=[{name}]", "model.quantization=none", f"output_dir={tmp_path}", "logger=none",
                  "trainer.enable_checkpointing=false")
    built = build_callbacks(cfg)
    assert [type(cb).__name__ for cb in built] == [cfg.callbacks[name]["_target_"].rsplit(".", 1)[1]]


def test_qlora_13b_is_the_paper_setup():
    cfg = compose("recipe=qlora_13b")
    assert cfg.model.name_or_path == "meta-llama/Llama-2-13b-hf"
    assert (cfg.model.quantization, cfg.model.double_quant, cfg.model.dtype) == ("nf4", True, "bfloat16")
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (64, 16, 0.1)
    assert cfg.model.lora.target_modules == "all-linear" and cfg.model.gradient_checkpointing
    assert cfg.optimizer.name == "paged_adamw_8bit" and cfg.optimizer.lr == 2e-4
    assert cfg.scheduler.name == "constant" and cfg.trainer.gradient_clip_val == 0.3
    assert cfg.data.dataset == "timdettmers/openassistant-guanaco"


def test_overrides_reach_any_key(tmp_path):
    cfg = compose("trainer.max_steps=20", "model.lora.r=16", f"data.path={tmp_path}")
    assert cfg.trainer.max_steps == 20 and cfg.model.lora.r == 16 and cfg.data.path == str(tmp_path)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("recipe=nope", "unknown recipe 'nope'; valid: "),
        ("model=nope", "unknown model 'nope'; valid: "),
        ("trainer.nope=1", "unknown config key 'trainer.nope'; valid keys under 'trainer': "),
        ("nope=1", "unknown config key 'nope'"),
    ],
)
def test_unknown_names_fail_in_one_line(override, expected):
    with pytest.raises(SlimtuneError) as err:
        compose(override)
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message
    if override.startswith("recipe"):
        assert "qlora_13b" in message


def _train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_help_lists_recipes_and_cfg_job_prints_config():
    help_text = _train("--help").stdout
    assert "recipe: " in help_text and "qlora_13b" in help_text and "qlora_cpu" in help_text
    job = _train("recipe=qlora_13b", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    printed = OmegaConf.create(job.stdout)
    assert printed.model.name_or_path == "meta-llama/Llama-2-13b-hf" and printed.name == "qlora_13b"


def test_cli_unknown_recipe_is_one_line_error():
    result = _train("recipe=nope")
    assert result.returncode == 2  # slimtune.errors.EXIT_STATUS: bad input
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: unknown recipe 'nope'; valid:")


def test_callback_argument_errors_reach_the_user_as_one_line(tmp_path):
    from slimtune.run import prepare

    cfg = compose("recipe=qlora_tiny", f"output_dir={tmp_path / 'run'}", "callbacks.perplexity.max_windows=0")
    with pytest.raises(SlimtuneError, match=r"^PerplexityEvaluation max_windows=0 is not valid"):
        prepare(cfg)
    assert not (tmp_path / "run").exists()
