"""slimtune as an installed package: the wheel carries configs/, recipes/ and callback presets, and its `slimtune`
console script runs a recipe from any directory with nothing of the checkout on the path."""

import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from conftest import ROOT

from slimtune.config import PACKAGED_ROOT, PROJECT_FOLDERS, project_root

_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "outputs", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "results", "lightning_logs")


def _isolation() -> list[str]:
    """Build with this environment's setuptools when it can build wheels itself (>= 70.1), else let pip fetch one."""
    try:
        major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return []
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) else []


def test_a_checkout_is_its_own_project_root():
    assert project_root() == ROOT
    assert not PACKAGED_ROOT.exists()  # only a wheel has slimtune/_project


@pytest.mark.slow
def test_the_wheel_runs_a_recipe_from_an_unrelated_directory(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)  # pip builds in the source folder: keep the checkout clean
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *_isolation(),
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("slimtune-*.whl"))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel),
                              "-q"], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    for folder in PROJECT_FOLDERS:  # every file of the checkout's folders is in the wheel
        def files(top):
            return {p.relative_to(top) for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

        assert files(site / "slimtune" / "_project" / folder) == files(ROOT / folder), folder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SLIMTUNE_ROOT", "SLIMTUNE_DATA", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    where = subprocess.run([sys.executable, "-c", "import slimtune, slimtune.config as c; print(slimtune.__file__); "
                            "print(c.project_root())"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=300)
    module_file, root = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(root) == site / "slimtune" / "_project"
    script = site / "bin" / "slimtune"  # the console script pip wrote for this interpreter
    done = subprocess.run([str(script), "recipe=qlora_tiny", "trainer.max_steps=2", "trainer.val_check_interval=2",
                           "trainer.enable_progress_bar=false", "export.merged=false"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert (elsewhere / "outputs" / "qlora_tiny" / "report.json").is_file()
    assert (elsewhere / "outputs" / "qlora_tiny" / "adapter" / "adapter_config.json").is_file()
    listed = subprocess.run([str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "qlora_13b" in listed.stdout and "ptq_gptq_w4" in listed.stdout
    bad = subprocess.run([str(script), "recipe=nope"], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "unknown recipe 'nope'; valid: " in bad.stderr
