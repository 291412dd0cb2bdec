import os
from pathlib import Path

import pytest

# No network here or in CI: nothing may wait on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# Everything the tests read is inside the clone: the tokenizer shipped in the package and the embedded corpus.
TINY_TOKENIZER_SPEC = "pkg:slimtune/assets/tokenizers/tiny-bpe"  # as configs/model/tiny_llama.yaml names it

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "initializer_range": 0.3,
}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from slimtune.assets import TINY_TOKENIZER

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture
def tiny_model_cfg():
    return {
        "name_or_path": None,
        "config": dict(TINY_LLAMA),
        "tokenizer": TINY_TOKENIZER_SPEC,
        "dtype": "float32",
        "quantization": "nf4",
        "double_quant": True,
        "finetune": "lora",
        "gradient_checkpointing": False,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"},
    }


@pytest.fixture
def text_file(tmp_path):
    """Real English text: the embedded corpus (CC0, inside the package), copied to a plain file."""
    from slimtune.data import default_corpus_path

    path = tmp_path / "train.txt"
    path.write_text(Path(default_corpus_path()).read_text(encoding="utf-8"), encoding="utf-8")
    return path


def make_data_layout(folder: Path, tag: str = "") -> Path:
    """A small stand-in for ../shared/data (the layout slimtune.data.sources reads: wikitext-2-raw/, c4/), made of
    short generated lines; `tag` starts every text so a test can tell folders apart."""
    import json

    (folder / "wikitext-2-raw").mkdir(parents=True)
    (folder / "c4").mkdir()
    # WikiText-2's raw format: a blank line is " \n"
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_text(f" \n = {tag} test = \n \n {tag} line one . \n", encoding="utf-8")
    (folder / "wikitext-2-raw" / "wiki.valid.raw").write_text(f" \n = {tag} valid = \n", encoding="utf-8")
    rows = [json.dumps({"text": f"{tag} calibration document {i}. " * 10}) for i in range(50)]
    (folder / "c4" / "c4-validation-sample.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """SLIMTUNE_DATA pointing at a stand-in layout: presets that name wikitext2 / c4 build without ../shared."""
    folder = make_data_layout(tmp_path / "data", "STAND-IN")
    monkeypatch.setenv("SLIMTUNE_DATA", str(folder))
    return folder


def compose(*overrides):
    from slimtune.config import compose_config

    return compose_config(list(overrides))


def tiny_run_overrides(tmp_path, *extra):
    return [
        "recipe=qlora_tiny",
        f"output_dir={tmp_path / 'run'}",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        *extra,
    ]
