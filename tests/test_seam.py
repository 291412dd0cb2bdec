"""The run's seam for compression methods: a callback of one's own, named by `_target_` in the config, is checked,
ordered, reported and exported by the run exactly as slimtune's own methods are."""

import csv
import json
import re
import sys
import types
from pathlib import Path

import pytest
from conftest import ROOT, compose, tiny_run_overrides

from slimtune.callbacks import CompressionStats, PerplexityEvaluation, PostTrainingQuantization
from slimtune.callbacks._base import SlimtuneCallback, export_switch
from slimtune.errors import SlimtuneError
from slimtune.run import build_callbacks, run
from slimtune.select import select_layers

EVENTS: list[tuple] = []  # what the probes saw, in order


@pytest.fixture(autouse=True)
def _fresh_events():
    EVENTS.clear()
    yield
    EVENTS.clear()


class SeamProbe(SlimtuneCallback):
    """A method of a user's own: records each seam call and whether the output folder existed at that moment."""

    exports = ("probe",)

    def __init__(self, tag: str = "probe", run_order: int = 100, refuse: str | None = None):
        self.tag = tag
        self.run_order = run_order  # an instance may override the class's place
        self.refuse = refuse
        self.steps = 0

    def check_run(self, cfg):
        EVENTS.append(("check_run", self.tag, Path(cfg.output_dir).exists()))
        if self.refuse is not None:
            raise SlimtuneError(f"SeamProbe refuse={self.refuse!r} is not valid; valid: null")

    def check_model(self, model, cfg):
        EVENTS.append(("check_model", self.tag, Path(cfg.output_dir).exists(), type(model).__name__))

    def on_fit_start(self, trainer, pl_module):
        EVENTS.append(("fit_start", self.tag))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1

    def report(self):
        EVENTS.append(("report", self.tag))
        return {f"{self.tag}_steps": self.steps}

    def export(self, model, out_dir, tokenizer, cfg):
        EVENTS.append(("export", self.tag))
        if not export_switch(cfg, "probe"):
            return {}
        folder = Path(out_dir) / "probe"
        folder.mkdir()
        (folder / "layers.txt").write_text("\n".join(select_layers(model, ["q_proj"])))
        return {f"{self.tag}_dir": str(folder)}


def probe(name="probe", **settings):
    fields = ", ".join(f"{k}: {v}" for k, v in {"_target_": "test_seam.SeamProbe", "tag": name, **settings}.items())
    return f"+callbacks.{name}={{{fields}}}"


def quick(tmp_path, *extra):
    return compose(*tiny_run_overrides(tmp_path, "trainer.max_steps=3", "trainer.val_check_interval=null",
                                       "export.merged=false", "callbacks=[]", *extra))


def test_a_callback_of_ones_own_is_checked_reported_and_exported_through_the_seam(tmp_path):
    cfg = quick(tmp_path, probe(), "+export.probe=true")
    report = run(cfg)
    out = Path(cfg.output_dir)
    assert [e[0] for e in EVENTS] == ["check_run", "check_model", "fit_start", "report", "export"]
    assert EVENTS[0][2] is False and EVENTS[1][2] is False  # both checks ran before the output folder existed
    assert EVENTS[1][3] == "PeftModelForCausalLM"  # the built model, before training
    saved = json.loads((out / "report.json").read_text())
    assert saved["probe_steps"] == report["probe_steps"] == 3
    assert saved["probe_dir"] == str(out / "probe")
    assert (out / "probe" / "layers.txt").read_text().splitlines() == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_export_switch_off_writes_nothing_but_the_report_still_has_the_fields(tmp_path):
    cfg = quick(tmp_path, probe(), "+export.probe=false")
    report = run(cfg)
    assert report["probe_steps"] == 3 and "probe_dir" not in report
    assert not (Path(cfg.output_dir) / "probe").exists()


def test_a_bad_config_fails_in_check_run_before_the_output_folder_exists(tmp_path):
    cfg = quick(tmp_path, probe(refuse="yes"))
    with pytest.raises(SlimtuneError) as err:
        run(cfg)
    assert str(err.value) == "SeamProbe refuse='yes' is not valid; valid: null"
    assert not Path(cfg.output_dir).exists()
    assert [e[0] for e in EVENTS] == ["check_run"]  # nothing was loaded


@pytest.mark.parametrize("callbacks, message", [
    ([], "export.probe=true: no callback in this run writes it; valid: add a callback whose exports include 'probe'"),
    (["compression_stats"], "export.probe=true: no callback in this run writes it"),
])
def test_export_nobody_writes_is_refused_in_one_line(tmp_path, callbacks, message):
    cfg = quick(tmp_path, f"callbacks=[{','.join(callbacks)}]", "+export.probe=true")
    with pytest.raises(SlimtuneError) as err:
        run(cfg)
    assert message in str(err.value) and "export.probe=false" in str(err.value) and "\n" not in str(err.value)
    assert not Path(cfg.output_dir).exists()


def test_an_export_a_preset_writes_names_the_presets(tmp_path):
    cfg = quick(tmp_path, "export.compressed_tensors=true")
    with pytest.raises(SlimtuneError) as err:
        run(cfg)
    assert "needs a PostTrainingQuantization callback" in str(err.value)
    assert "presets: ptq_awq_w4, ptq_gptq_nf4, ptq_gptq_w4, ptq_lorc_w3, ptq_smoothquant_w8a8" in str(err.value)


def test_callbacks_are_sorted_stably_by_run_order_and_checked_in_that_order(tmp_path, data_dir):
    cfg = compose(*tiny_run_overrides(tmp_path, "model.quantization=none", "logger=none",
                                      "callbacks=[compression_stats,perplexity,ptq_gptq_w4]",
                                      probe("late", run_order=200), probe("middle", run_order=50),
                                      probe("also_middle", run_order=50)))
    ordered = [cb for cb in build_callbacks(cfg) if not type(cb).__module__.startswith("lightning")]
    kinds = [cb.tag if isinstance(cb, SeamProbe) else type(cb).__name__ for cb in ordered]
    # 10 < 50 = 50 < 100 = 100 < 200; equal places keep the config's order
    assert kinds == ["PostTrainingQuantization", "middle", "also_middle", "CompressionStats", "PerplexityEvaluation",
                     "late"]
    assert PostTrainingQuantization.run_order == 10
    assert PerplexityEvaluation.run_order == CompressionStats.run_order == SlimtuneCallback.run_order == 100

    cfg = quick(tmp_path / "checks", probe("late", run_order=200), probe("early", run_order=5))
    run(cfg)
    assert [e[1] for e in EVENTS if e[0] == "check_run"] == ["early", "late"]
    assert [e[1] for e in EVENTS if e[0] == "export"] == ["early", "late"]


def readme_method(monkeypatch) -> types.ModuleType:
    """The README's own-method snippet as the module `readme_method` (what `my_methods.py` would be)."""
    match = re.search(r"<!-- snippet: own-method -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, "README.md lost its own-method snippet"
    module = types.ModuleType("readme_method")
    exec(compile(match.group(1), "README.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "readme_method", module)
    return module


def test_the_readme_method_joins_a_run_through_both_seams(tmp_path, monkeypatch):
    readme_method(monkeypatch)
    z = "+callbacks.z={_target_: readme_method.ZLoss, coef: 0.001}"
    cfg = quick(tmp_path, z, "+export.z_loss=true")
    report = run(cfg)
    out = Path(cfg.output_dir)
    history = json.loads((out / "z_loss" / "history.json").read_text())
    assert len(history) == 3 and report["z_last"] == history[-1] and report["z_loss_dir"] == str(out / "z_loss")
    rows = [r for r in csv.DictReader((out / "logs" / "metrics.csv").open()) if r.get("train/loss_z")]
    assert len(rows) == 3
    for row in rows:  # the total is CE + the term, each logged on its own
        assert float(row["train/loss"]) == pytest.approx(float(row["train/loss_ce"]) + float(row["train/loss_z"]),
                                                         rel=1e-5)
        assert float(row["train/loss_z"]) > 0

    refused = quick(tmp_path / "fp16", z, "trainer.precision=16-true")
    with pytest.raises(SlimtuneError, match="trainer.precision=16 is not valid with it"):
        run(refused)
    assert not Path(refused.output_dir).exists()
