import json

import pytest

from slimtune.data import collate, load_raw, render_chat, tokenize
from slimtune.data import datasets as data_module
from slimtune.data.datasets import IGNORE_INDEX
from slimtune.errors import SlimtuneError


def cfg(path, **kw):
    return {"path": str(path), "block_size": 64, "val_fraction": 0.1, "seed": 1, **kw}


def test_text_is_packed_into_blocks_with_held_out_tail(text_file, tiny_tokenizer):
    data = tokenize(load_raw(cfg(text_file)), tiny_tokenizer, cfg(text_file))
    assert data.fmt == "text"
    n_train, n_val = len(data.train), len(data.val)
    assert n_val == -(-(n_train + n_val) // 10)
    stream = tiny_tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert all(len(row) == 64 for row in data.train["input_ids"])
    assert data.train[0]["input_ids"] == stream[:64] and data.train[0]["labels"] == stream[:64]
    # Validation is the tail of the stream: the blocks right after the training blocks.
    assert data.val[0]["input_ids"] == stream[64 * n_train: 64 * (n_train + 1)]


def test_tokenization_is_cached(text_file, tiny_tokenizer, monkeypatch):
    first = tokenize(load_raw(cfg(text_file)), tiny_tokenizer, cfg(text_file))

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds the result")

    monkeypatch.setattr(data_module, "_pack_texts", must_not_run)
    again = tokenize(load_raw(cfg(text_file)), tiny_tokenizer, cfg(text_file))
    assert again.train["input_ids"] == first.train["input_ids"]
    with pytest.raises(AssertionError, match="tokenized again"):  # another block size is another cache entry
        tokenize(load_raw(cfg(text_file)), tiny_tokenizer, cfg(text_file, block_size=32))


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _trained_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_chat_masks_everything_but_assistant_turns(tmp_path, tiny_tokenizer):
    rows = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many legs has a spider?"},
        {"role": "assistant", "content": "Eight legs."},
        {"role": "user", "content": "And an ant?"},
        {"role": "assistant", "content": "Six legs."},
    ]}] * 3
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    data = tokenize(load_raw(cfg(path)), tiny_tokenizer, cfg(path, block_size=256, val_fraction=0.0))
    assert data.fmt == "chat" and data.val is None
    trained = _trained_text(tiny_tokenizer, data.train[0])
    assert "Eight legs." in trained and "Six legs." in trained
    assert "spider" not in trained and "Be brief" not in trained and "ant?" not in trained
    full = tiny_tokenizer.decode(data.train[0]["input_ids"])
    assert "How many legs has a spider?" in full


def test_prompt_response_records(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Add {i} and {i}.", "response": f"The sum is {2 * i}."} for i in range(10)]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = tokenize(load_raw(cfg(path)), tiny_tokenizer, cfg(path, block_size=128, val_fraction=0.2))
    assert data.fmt == "instruct" and len(data.train) == 8 and len(data.val) == 2
    for example in data.train:
        trained = _trained_text(tiny_tokenizer, example)
        assert trained.startswith("The sum is") and "Add" not in trained


def test_render_chat_with_the_smollm2_style_template(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    out = render_chat(messages, tiny_tokenizer, max_length=64)
    assert len(out["input_ids"]) == len(out["labels"])
    assert sum(label != IGNORE_INDEX for label in out["labels"]) >= 2


def test_collate_pads_and_masks(tiny_tokenizer):
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], 0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_embedded_sets_load(tiny_tokenizer):
    corpus = tokenize(load_raw({"path": "default"}), tiny_tokenizer, {"block_size": 256})
    assert corpus.fmt == "text" and len(corpus.train) >= 20
    instruct = tokenize(load_raw({"path": "default_instruct"}), tiny_tokenizer, {"block_size": 512})
    assert instruct.fmt in ("chat", "instruct") and len(instruct.train) >= 50


@pytest.mark.parametrize("bad, message", [
    ({"path": "/no/such/file.txt"}, "data.path '/no/such/file.txt' does not exist"),
    ({"format": "xml"}, "data.format='xml' is not supported; valid: auto, text, chat, instruct"),
    ({"block_size": 0}, "data.block_size=0 is not valid"),
    ({"val_fraction": 1.5}, "data.val_fraction=1.5 is not valid"),
])
def test_bad_data_config(text_file, tiny_tokenizer, bad, message):
    config = {**cfg(text_file), **bad}
    with pytest.raises(SlimtuneError) as err:
        tokenize(load_raw(config), tiny_tokenizer, config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_columns(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(SlimtuneError, match=r"data columns \['answer', 'question'\] hold no known format"):
        tokenize(load_raw(cfg(path)), tiny_tokenizer, cfg(path))
