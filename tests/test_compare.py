"""The comparison table of runs' reports (`python -m slimtune.compare`), the offline way to compare a sweep such as
`python train.py -m recipe=kd_tiny callbacks.distill.loss=fkl,rkl`."""

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from slimtune.compare import compare_reports
from slimtune.errors import SlimtuneError


def test_one_row_per_run_and_the_differing_columns_first(tmp_path):
    for loss, kd in (("fkl", 0.5), ("rkl", 0.25)):
        run = tmp_path / "sweep" / loss
        run.mkdir(parents=True)
        (run / "report.json").write_text(json.dumps({"name": "kd_tiny", "steps": 4, "distill_loss": loss,
                                                     "distill_last_kd": kd, "adapter_dir": str(run / "adapter"),
                                                     "report_path": str(run / "report.json")}))
    markdown = compare_reports([tmp_path / "sweep"], out=tmp_path / "table")
    lines = markdown.splitlines()
    assert lines[0] == "| run | distill_loss | distill_last_kd | name | steps |"
    assert lines[2].endswith("| fkl | 0.5 | kd_tiny | 4 |") and lines[3].endswith("| rkl | 0.25 | kd_tiny | 4 |")
    assert (tmp_path / "table.md").read_text() == markdown
    rows = list(csv.DictReader((tmp_path / "table.csv").read_text().splitlines()))
    assert [r["distill_loss"] for r in rows] == ["fkl", "rkl"] and "adapter_dir" not in rows[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimtuneError, match="no report.json in"):
        compare_reports([tmp_path / "empty"])


def test_missing_path_is_one_line():
    with pytest.raises(SlimtuneError, match="'/nowhere' does not exist"):
        compare_reports(["/nowhere"])


@pytest.mark.slow  # two short runs in a Hydra multirun: about a minute on 2 cores
def test_hydra_multirun_then_one_table(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), "-m", "recipe=kd_tiny",
               f"output_dir={tmp_path}/runs/${{callbacks.distill.loss}}", "callbacks.distill.loss=fkl,jsd",
               "trainer.max_steps=2", "trainer.val_check_interval=null", "export.merged=false",
               "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}/multirun"]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    table = subprocess.run([sys.executable, "-m", "slimtune.compare", str(tmp_path / "runs")], check=True,
                           capture_output=True, text=True).stdout
    assert "| fkl |" in table and "| jsd |" in table and table.splitlines()[0].startswith("| run | ")
