"""Build `tiny-bpe/`: a byte-level BPE tokenizer (2,048 tokens) trained on slimtune's embedded CC0 texts.

    python src/slimtune/assets/tokenizers/build_tiny_bpe.py            # rewrites tiny-bpe/ beside this file
    python src/slimtune/assets/tokenizers/build_tiny_bpe.py OUT_DIR    # writes OUT_DIR instead

Deterministic: the same texts (and library versions) give the same files byte for byte; a test rebuilds it and
compares vocabulary, merges, special tokens and settings. It exists so that
tiny models and the tests need no tokenizer from outside the package (GPT-2's would have to be downloaded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB_SIZE = 2048
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ids 0, 1, 2: <|endoftext|> is bos, eos and pad; the ChatML markers render the data layer's chat template.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
CORPUS = Path(__file__).resolve().parents[2] / "corpus"
HERE = Path(__file__).resolve().parent / "tiny-bpe"


def training_texts(corpus: Path = CORPUS) -> list[str]:
    """The embedded corpus's paragraphs, then every message, prompt and response of the instruction set, in file order."""
    texts = [p for p in (corpus / "default_corpus.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    for line in (corpus / "default_instruct.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        texts.extend(m["content"] for m in record.get("messages", []))
        texts.extend(record[k] for k in ("system", "prompt", "response") if record.get(k))
    return texts


def build(out_dir: Path = HERE) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's layout: bytes -> printable symbols, no normalizer, no unknown token (every byte is in the alphabet),
    # nothing added around a sequence (the data layer adds EOS itself), offsets kept untrimmed for label masking.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


if __name__ == "__main__":
    target = build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(f"wrote {target}")
