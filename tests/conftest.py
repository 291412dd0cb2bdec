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
SHARED_DATA = Path(os.environ.get("SLIMTUNE_DATA", ROOT.parent / "shared" / "data"))
GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2"
os.environ.setdefault("SLIMTUNE_DATA", str(SHARED_DATA))
os.environ.setdefault("SLIMTUNE_TOKENIZER", str(GPT2_TOKENIZER))

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 50257,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "initializer_range": 0.3,
}


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    assert GPT2_TOKENIZER.is_dir(), f"the GPT-2 tokenizer is expected at {GPT2_TOKENIZER} (../shared/data)"
    tokenizer = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture
def tiny_model_cfg():
    return {
        "name_or_path": None,
        "config": dict(TINY_LLAMA),
        "tokenizer": str(GPT2_TOKENIZER),
        "dtype": "float32",
        "quantization": "nf4",
        "double_quant": True,
        "finetune": "lora",
        "gradient_checkpointing": False,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"},
    }


@pytest.fixture
def text_file(tmp_path):
    """Real English text: the first part of WikiText-2's validation split."""
    source = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw"
    path = tmp_path / "train.txt"
    path.write_text(source.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


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
