"""Synthetic data from a teacher: chat JSONL the data layer reads, resumable with the same result as one pass."""

import json

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.data.datasets import load_raw, tokenize
from slimtune.distill.synthetic import REASONING_INSTRUCTION, generate_synthetic, load_prompts
from slimtune.errors import SlimtuneError


def teacher():
    torch.manual_seed(0)
    config = dict(TINY_LLAMA)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def test_answers_are_chat_jsonl_the_data_layer_reads_and_resume_gives_the_same_file(tmp_path, tiny_tokenizer):
    model = teacher()
    straight = generate_synthetic(model, tiny_tokenizer, tmp_path / "straight.jsonl", limit=5, max_new_tokens=6,
                                  batch_size=2, temperature=1.0, progress=False)
    lines = straight.read_text().splitlines()
    prompts = load_prompts("default_instruct", limit=5)
    assert len(lines) == 5
    for line, prompt in zip(lines, prompts):
        messages = json.loads(line)["messages"]
        assert messages[:-1] == prompt and messages[-1]["role"] == "assistant"
    data = tokenize(load_raw({"path": str(straight)}), tiny_tokenizer, {"block_size": 256, "val_fraction": 0.0})
    assert data.fmt == "chat" and len(data.train) == 5

    # interrupted in the middle of the second batch: one whole line and half of the next were written
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2] + "\n" + lines[3][:20])
    generate_synthetic(model, tiny_tokenizer, resumed, limit=5, max_new_tokens=6, batch_size=2, temperature=1.0,
                       progress=False)
    assert resumed.read_text() == straight.read_text()


def test_reasoning_prompt_and_bad_input(tmp_path, tiny_tokenizer):
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n")
    out = generate_synthetic(teacher(), tiny_tokenizer, tmp_path / "out.jsonl", prompts=source, max_new_tokens=3,
                             temperature=0, reasoning=True, progress=False)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["messages"][0]["content"] == f"What is 2 + 3?\n\n{REASONING_INSTRUCTION}"
    with pytest.raises(SlimtuneError, match="synthetic prompts '/nowhere.jsonl' do not exist"):
        load_prompts("/nowhere.jsonl")
    with pytest.raises(SlimtuneError, match="max_new_tokens=0 is not valid"):
        generate_synthetic(teacher(), tiny_tokenizer, tmp_path / "x.jsonl", prompts=source, max_new_tokens=0)
