"""Training data: plain text packed into blocks, chat/instruction records with prompt tokens masked, any `datasets` set.

Built on `datasets`, whose Arrow cache keeps the tokenized result: each tokenization gets an explicit fingerprint
(tokenizer contents + settings + source data), so a second run with the same inputs loads the cache and does not
tokenize again, and a changed tokenizer or block size never reuses a stale cache.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from slimtune.data.sources import SOURCES, is_named_source, load_named
from slimtune.errors import SlimtuneError, choices

FORMATS = ("auto", "text", "chat", "instruct")
TEXT_SUFFIXES = {".txt", ".raw", ".md", ".text"}
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", **{s: "text" for s in TEXT_SUFFIXES}}
IGNORE_INDEX = -100
_SNIFF_BYTES = 1 << 20  # the head of each data file checked for text before loading (datasets reports the rest)

# A plain ChatML template for tokenizers that ship none (GPT-2, many base models).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_corpus_path() -> str:
    return str(resources.files("slimtune.corpus") / "default_corpus.txt")


def default_instruct_path() -> str:
    return str(resources.files("slimtune.corpus") / "default_instruct.jsonl")


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def resolve_files(path) -> list[str]:
    """A file, a folder, a glob, or a list of those -> existing files; `default`/`default_instruct` name the embedded sets."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[str] = []
    for p in paths:
        p = str(p)
        if p in ("default", "default_corpus"):
            files.append(default_corpus_path())
            continue
        if p == "default_instruct":
            files.append(default_instruct_path())
            continue
        expanded = Path(p).expanduser()
        if expanded.is_dir():
            found = sorted(str(f) for f in expanded.iterdir() if f.suffix in BUILDERS)
        elif expanded.is_file():
            found = [str(expanded)]
        else:
            found = sorted(glob.glob(str(expanded)))
        if not found and expanded.is_dir():
            raise SlimtuneError(f"data.path folder {p!r} holds no data file; valid suffixes: {choices(sorted(BUILDERS))}")
        if not found:
            raise SlimtuneError(
                f"data.path {p!r} does not exist; valid: a file, a folder, a glob, 'default', or a named set ({choices(SOURCES)})"
            )
        files.extend(found)
    builders = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) > 1:
        bad = [f for f in files if Path(f).suffix.lower() not in BUILDERS]
        raise SlimtuneError(
            f"data.path files {bad or files} have unsupported or mixed types; valid suffixes: {choices(sorted(BUILDERS))}"
        )
    for f in files:
        check_file_type(f)
    return files


def check_file_type(path: str) -> None:
    """A data file must hold what its suffix says (UTF-8 text; JSON lines; Parquet), checked on its first megabyte so
    a binary or wrongly encoded file is one line here rather than a `datasets` traceback mid-load."""
    builder = BUILDERS[Path(path).suffix.lower()]
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as err:
        raise SlimtuneError(f"data.path file {path!r} cannot be read: {err.strerror or err}") from err
    if builder == "parquet":
        if head[:4] != b"PAR1":
            raise SlimtuneError(f"data.path file {path!r} is not a Parquet file; valid: a .parquet file written by "
                                "pyarrow/pandas, or rename it to its real type")
        return
    if b"\x00" in head:
        raise SlimtuneError(f"data.path file {path!r} is binary (it holds NUL bytes), not text; valid: UTF-8 text files "
                            f"({choices(sorted(s for s, b in BUILDERS.items() if b != 'parquet'))}) or .parquet")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as err:
        raise SlimtuneError(f"data.path file {path!r} is not UTF-8 text (byte 0x{head[err.start]:02x} at offset "
                            f"{err.start}); valid: UTF-8 text (convert it, e.g. iconv -t utf-8)") from err
    if Path(path).suffix.lower() == ".jsonl":
        lines = [line for line in text.splitlines() if line.strip()]
        first = lines[0] if lines else None
        if first is not None and (len(lines) > 1 or len(head) < _SNIFF_BYTES):  # only a complete first record
            try:
                is_object = isinstance(json.loads(first), dict)
            except ValueError:
                is_object = False
            if not is_object:
                raise SlimtuneError(f"data.path file {path!r} is not JSON lines (its first line is not a JSON object: "
                                    f"{first[:40]!r}); valid: one JSON object per line")


def load_raw(data_cfg):
    """The raw `datasets.Dataset` a data config names (local files or a dataset by name), not tokenized."""
    import datasets

    name = _get(data_cfg, "dataset")
    path = _get(data_cfg, "path")
    split = _get(data_cfg, "split", "train")
    try:
        if not name and isinstance(path, str) and is_named_source(path):
            raw = load_named(path)  # wikitext2, wikitext2:valid, c4: local copy or the hub (slimtune.data.sources)
        elif name:
            data_files = _get(data_cfg, "data_files")  # e.g. one shard of a large set (allenai/c4)
            if isinstance(data_files, Mapping):
                data_files = {str(k): v if isinstance(v, str) else list(v) for k, v in data_files.items()}
            elif data_files and not isinstance(data_files, str):
                data_files = list(data_files)
            hub_kwargs = {"data_files": data_files} if data_files else {}
            raw = datasets.load_dataset(str(name), _get(data_cfg, "dataset_config"), split=split, **hub_kwargs)
        else:
            files = resolve_files(path if path else "default")
            builder = BUILDERS[Path(files[0]).suffix.lower()]
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            raw = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except SlimtuneError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError, datasets.exceptions.DatasetsError) as err:
        what = f"data.dataset {name!r}" if name else f"data.path {path!r}"
        # DatasetGenerationError says only "An error occurred while generating the dataset": its cause names the problem
        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ else err
        raise SlimtuneError(f"{what} could not be loaded: {str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__}") from err
    max_examples = _get(data_cfg, "max_examples")
    if max_examples:
        raw = raw.select(range(min(int(max_examples), len(raw))))
    return raw


def detect_format(raw, data_cfg) -> str:
    fmt = str(_get(data_cfg, "format", "auto"))
    if fmt not in FORMATS:
        raise SlimtuneError(f"data.format={fmt!r} is not supported; valid: {choices(FORMATS)}")
    columns = set(raw.column_names)
    text_field = str(_get(data_cfg, "text_field", "text"))
    if fmt == "auto":
        if "messages" in columns:
            fmt = "chat"
        elif {"prompt", "response"} <= columns:
            fmt = "instruct"
        elif text_field in columns:
            fmt = "text"
        else:
            raise SlimtuneError(
                f"data columns {sorted(columns)} hold no known format; valid: 'messages', 'prompt'+'response', or data.text_field={text_field!r}"
            )
    needed = {"chat": {"messages"}, "instruct": {"prompt", "response"}, "text": {text_field}}[fmt]
    if not needed <= columns:
        raise SlimtuneError(f"data.format={fmt!r} needs columns {sorted(needed)}; the data has {sorted(columns)}")
    return fmt


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = f"{tokenizer.chat_template}|{tokenizer.eos_token_id}|{tokenizer.bos_token_id}"
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _pack_texts(texts: list[str], tokenizer, block_size: int, add_eos: bool = True) -> dict[str, list[list[int]]]:
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if add_eos and tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // block_size
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]
    return {"input_ids": blocks, "labels": blocks}


def render_chat(messages: list[dict[str, str]], tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids of a rendered conversation and labels that train only on the assistant turns."""
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full_text.startswith(upto) or not upto.startswith(prompt):
            raise SlimtuneError("the tokenizer's chat template does not render conversations prefix by prefix; use data.format=text")
        spans.append((len(prompt), len(upto)))
    encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = [
        token if any(span_start <= start < span_end for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, _end) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return {"input_ids": encoded["input_ids"], "labels": labels}


def _to_messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    if "messages" in example and example["messages"] is not None:
        return [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    messages = [{"role": "system", "content": example["system"]}] if example.get("system") else []
    return messages + [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}]


@dataclass
class TokenizedData:
    train: Any
    val: Any | None
    fmt: str


def tokenize(raw, tokenizer, data_cfg) -> TokenizedData:
    """Tokenize (cached by fingerprint) and split into train/validation."""
    fmt = detect_format(raw, data_cfg)
    block_size = int(_get(data_cfg, "block_size", 256))
    if block_size <= 0:
        raise SlimtuneError(f"data.block_size={block_size} is not valid; valid: a positive integer")
    val_fraction = float(_get(data_cfg, "val_fraction", 0.1))
    if not 0.0 <= val_fraction < 1.0:
        raise SlimtuneError(f"data.val_fraction={val_fraction} is not valid; valid: 0 <= value < 1")
    seed = int(_get(data_cfg, "seed", 42))
    text_field = str(_get(data_cfg, "text_field", "text"))
    if len(raw) == 0:
        raise SlimtuneError(f"data {_describe(data_cfg)} is empty; it needs at least one example")
    key = f"{raw._fingerprint}|{tokenizer_fingerprint(tokenizer)}|{fmt}|{block_size}|{text_field}|v1"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

    if fmt == "text":
        packed = raw.map(
            lambda batch: _pack_texts(batch[text_field], tokenizer, block_size),
            batched=True, batch_size=None, remove_columns=raw.column_names,
            new_fingerprint=fingerprint, desc="Tokenizing and packing",
        )
        if len(packed) == 0:
            if not any(str(text).strip() for text in raw[text_field]):  # error path only: reads the raw text
                raise SlimtuneError(f"data {_describe(data_cfg)} is empty; it needs text")
            raise SlimtuneError(
                f"data {_describe(data_cfg)} is shorter than one block of data.block_size={block_size} tokens; use more text or a smaller block_size"
            )
        n_val = math.ceil(len(packed) * val_fraction) if val_fraction > 0 and len(packed) > 1 else 0
        # The held-out blocks are the tail of the stream: no window straddles train and validation.
        train = packed.select(range(len(packed) - n_val))
        val = packed.select(range(len(packed) - n_val, len(packed))) if n_val else None
        return TokenizedData(train, val, fmt)

    ensure_chat_template(tokenizer)
    encoded = raw.map(
        lambda example: render_chat(_to_messages(example), tokenizer, block_size),
        remove_columns=raw.column_names, new_fingerprint=fingerprint, desc="Rendering chat template",
    )
    encoded = encoded.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]),
                             new_fingerprint=fingerprint + "f")
    if len(encoded) == 0:
        raise SlimtuneError(f"data {_describe(data_cfg)} has no example with an assistant response inside data.block_size={block_size}")
    n_val = math.ceil(len(encoded) * val_fraction) if val_fraction > 0 and len(encoded) > 1 else 0
    if n_val:
        split = encoded.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        return TokenizedData(split["train"], split["test"], fmt)
    return TokenizedData(encoded, None, fmt)


def _describe(data_cfg) -> str:
    name = _get(data_cfg, "dataset")
    return repr(name) if name else repr(_get(data_cfg, "path") or "default")


def collate(examples: list[Mapping[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    import torch

    length = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
