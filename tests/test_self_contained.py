"""Nothing outside the clone: the tokenizer shipped in the package, named data sets found from any directory (or a
one-line error), and the tiny recipes run from an unrelated working directory."""

import fnmatch
import json
import os
import subprocess
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose, make_data_layout
from transformers import AutoTokenizer

from slimtune.assets import TINY_TOKENIZER
from slimtune.data import default_corpus_path, load_raw
from slimtune.data import sources
from slimtune.data.calibration import calibration_batches, calibration_source
from slimtune.errors import SlimtuneError
from slimtune.eval import read_eval_text
from slimtune.models import load_tokenizer

TOKENIZER_DIR = Path(TINY_TOKENIZER)


# --------------------------------------------------------------------------- the shipped tokenizer


def test_tiny_tokenizer_matches_the_tiny_llama_config(tiny_tokenizer):
    cfg = compose("recipe=qlora_tiny")
    loaded = load_tokenizer(cfg.model)  # through the config's pkg:slimtune/... spec, wherever the package lives
    assert cfg.model.tokenizer.startswith("pkg:slimtune/")
    assert loaded.get_vocab() == tiny_tokenizer.get_vocab()
    assert len(tiny_tokenizer) == cfg.model.config.vocab_size == 2048
    eos = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tiny_tokenizer.bos_token_id == tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id == eos
    assert cfg.model.config.bos_token_id == cfg.model.config.eos_token_id == eos


def test_tiny_tokenizer_is_lossless_and_chatml_markers_are_single_tokens(tiny_tokenizer):
    from slimtune.data import render_chat
    from slimtune.data.datasets import ensure_chat_template

    text = Path(default_corpus_path()).read_text(encoding="utf-8")[:5000] + " naïve café, 東京 \t\n"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text  # byte-level: any text, no unknown token
    assert len(ids) < len(text.encode()) / 2  # trained merges, not bytes
    assert tiny_tokenizer(text)["input_ids"] == ids  # nothing added around a sequence
    fresh = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    assert fresh.chat_template is None  # it ships none: the data layer's ChatML template renders chats
    ensure_chat_template(fresh)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    out = render_chat(messages, fresh, max_length=64)
    start, end = (fresh.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert out["input_ids"].count(start) == 2 and out["input_ids"].count(end) == 2
    trained = fresh.decode([t for t, label in zip(out["input_ids"], out["labels"]) if label != -100])
    assert trained.startswith("Hello there<|im_end|>")


def test_tiny_tokenizer_rebuilds_from_the_embedded_texts(tmp_path):
    sys.path.insert(0, str(TOKENIZER_DIR.parent))
    try:
        import build_tiny_bpe
    finally:
        sys.path.remove(str(TOKENIZER_DIR.parent))
    build_tiny_bpe.build(tmp_path / "rebuilt")
    # Compared as parsed JSON, not bytes: a newer library may lay the same tokenizer out differently.
    folders = (TOKENIZER_DIR, tmp_path / "rebuilt")
    shipped, rebuilt = (json.loads((folder / "tokenizer.json").read_text()) for folder in folders)
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"] and len(shipped["model"]["merges"]) == 2048 - 3 - 256
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert rebuilt[key] == shipped[key], key
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    shipped, rebuilt = (json.loads((folder / "tokenizer_config.json").read_text()) for folder in folders)
    assert rebuilt == shipped


def test_package_data_ships_the_tokenizer_and_its_readme():
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    patterns = re.findall(r'"([^"]+)"', re.search(r"slimtune = \[(.*?)\]", section, re.S).group(1))
    package = ROOT / "src" / "slimtune"
    shipped = [p.relative_to(package).as_posix() for p in TOKENIZER_DIR.parent.rglob("*") if p.is_file()]
    assert {"assets/tokenizers/tiny-bpe/tokenizer.json", "assets/tokenizers/tiny-bpe/README.md"} <= set(shipped)
    missing = [f for f in shipped if "__pycache__" not in f and not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"not in package-data: {missing}"


# --------------------------------------------------------------------------- named sources


@pytest.fixture
def project(tmp_path):
    """A project root whose ../shared/data holds a layout tagged 'SHARED'."""
    make_data_layout(tmp_path / "shared" / "data", "SHARED")
    root = tmp_path / "slimtune"
    root.mkdir()
    return root


def test_the_shared_layout_beside_the_project_is_found(project, monkeypatch):
    monkeypatch.delenv("SLIMTUNE_DATA", raising=False)
    path = sources.local_path("wikitext2", project)
    assert path == project.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    # the papers' string: the file's rows joined with "\n\n", a blank row as ""
    assert sources.eval_text("wikitext2", project) == "\n\n".join(["", " = SHARED test = \n", "", " SHARED line one . \n"])
    assert sources.local_path("wikitext2:valid", project).name == "wiki.valid.raw"
    c4 = sources.load_named("c4", project)
    assert c4.column_names == ["text"] and len(c4) == 50 and all(t.startswith("SHARED ") for t in c4["text"])


def test_slimtune_data_wins_over_the_sharedmake_data_layout(project, tmp_path, monkeypatch):
    env = make_data_layout(tmp_path / "mine", "MINE")
    monkeypatch.setenv("SLIMTUNE_DATA", str(env))
    assert sources.local_path("c4", project) == env / "c4" / "c4-validation-sample.jsonl"
    assert "MINE test" in sources.eval_text("wikitext2", project)
    wiki = sources.load_named("wikitext2:valid", project)  # one document: the file's text, as the hub's rows joined
    assert wiki["text"] == [" \n = MINE valid = \n"]
    # A set missing from $SLIMTUNE_DATA is looked for in the next place.
    (env / "c4" / "c4-validation-sample.jsonl").unlink()
    assert sources.local_path("c4", project) == project.parent / "shared" / "data" / "c4" / "c4-validation-sample.jsonl"


def test_the_hub_rows_give_what_the_local_files_give(project, monkeypatch):
    """The hub's wikitext-2-raw-v1 rows are the raw file's lines, a blank line (" \\n" in the file) as "". Without
    network here, rows in that form stand in for the hub: joined they must equal the local file, for training and
    calibration (one document) and for evaluation (the papers' "\\n\\n" join)."""
    import datasets

    monkeypatch.delenv("SLIMTUNE_DATA", raising=False)
    local_file = sources.local_path("wikitext2", project)
    local_doc, local_eval = sources.load_named("wikitext2", project)["text"], sources.eval_text("wikitext2", project)
    lines = local_file.read_text(encoding="utf-8").splitlines(keepends=True)
    hub_rows = datasets.Dataset.from_dict({"text": [line if line.strip() else "" for line in lines]})
    monkeypatch.setattr(sources, "_hub_rows", lambda name, root: hub_rows)
    monkeypatch.setattr(sources, "local_path", lambda name, root=None: None)
    assert sources.load_named("wikitext2", project)["text"] == local_doc == [local_file.read_text(encoding="utf-8")]
    assert sources.eval_text("wikitext2", project) == local_eval


def test_named_sets_through_the_data_layer_and_calibration(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("SLIMTUNE_DATA", str(make_data_layout(tmp_path / "data", "ENV")))
    assert all(t.startswith("ENV ") for t in load_raw({"path": "c4"})["text"])  # data.path=c4 works too
    assert read_eval_text("wikitext2").startswith("\n\n = ENV test = ")
    assert calibration_source(None) == calibration_source("c4") == {"path": "c4"}
    batches = calibration_batches(None, tiny_tokenizer, n_samples=4, seq_len=32, seed=0)
    assert len(batches) == 4 and all(b.shape == (1, 32) for b in batches)
    assert all("ENV calibration document" in tiny_tokenizer.decode(b[0]) for b in batches)  # drawn from that c4


def test_calibration_names_and_the_refused_default(tiny_tokenizer):
    assert calibration_source("corpus") == {"path": "default_corpus"}
    assert calibration_source({"path": "corpus", "max_examples": 3}) == {"path": "default_corpus", "max_examples": 3}
    assert len(calibration_batches("corpus", tiny_tokenizer, n_samples=2, seq_len=16)) == 2
    for bad in ("default", {"path": "default"}):
        with pytest.raises(SlimtuneError) as err:
            calibration_source(bad)
        message = str(err.value)
        assert "calibration='default' is ambiguous" in message and "\n" not in message
        assert "c4, " in message and "corpus" in message and "wikitext2" in message
    with pytest.raises(SlimtuneError, match="evaluation text 'c4' is not an evaluation set; valid: a path"):
        read_eval_text("c4")


_OFFLINE_PROBE = r"""
import sys
from slimtune.callbacks import PerplexityEvaluation, PostTrainingQuantization
from slimtune.errors import SlimtuneError

PostTrainingQuantization(method="rtn")  # needs no calibration data: nothing to find
for make in (lambda: PerplexityEvaluation(path="wikitext2"), lambda: PostTrainingQuantization(method="gptq")):
    try:
        make()
    except SlimtuneError as err:
        print(str(err))
    else:
        sys.exit("no error")
"""


def test_offline_with_no_copy_is_one_line_saying_what_was_tried(tmp_path):
    # A fresh process: an empty Hugging Face cache, offline, no SLIMTUNE_DATA, and a project root with no ../shared.
    root = tmp_path / "clone"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SLIMTUNE_DATA"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", SLIMTUNE_ROOT=str(root),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _OFFLINE_PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wiki, c4 = done.stdout.strip().splitlines()[-2:]
    for line, name, relative in ((wiki, "wikitext2", "wikitext-2-raw/wiki.test.raw"),
                                 (c4, "c4", "c4/c4-validation-sample.jsonl")):
        assert f"data source '{name}'" in line and "was not found" in line
        assert f"$SLIMTUNE_DATA (unset); ../shared/data={tmp_path / 'shared' / 'data' / relative}" in line
        assert "offline" in line and "fix: set SLIMTUNE_DATA to a folder holding wikitext-2-raw/ and c4/, or go online" in line
    assert "hub Salesforce/wikitext wikitext-2-raw-v1" in wiki
    assert c4.startswith("PostTrainingQuantization calibration data source 'c4'") and "hub allenai/c4" in c4


# --------------------------------------------------------------------------- any working directory


@pytest.mark.parametrize("recipe", ["qlora_tiny", "full_tiny", "lorc_w3_tiny"])
def test_tiny_recipe_runs_from_an_unrelated_directory(recipe, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SLIMTUNE_DATA", "SLIMTUNE_ROOT", "SLIMTUNE_TOKENIZER")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"recipe={recipe}", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "trainer.enable_progress_bar=false", "export.merged=false"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((elsewhere / "outputs" / recipe / "report.json").read_text())
    assert report["steps"] == 2
    assert (elsewhere / "outputs" / recipe / "logs" / "metrics.csv").is_file()
