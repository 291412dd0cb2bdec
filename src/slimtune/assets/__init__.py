"""Files shipped inside the package (see each folder's README): `TINY_TOKENIZER`, a 2,048-token byte-level BPE
tokenizer (CC0) for tiny models, tests and examples; `AutoTokenizer.from_pretrained(TINY_TOKENIZER)` loads it offline.
In configs the same folder is `pkg:slimtune/assets/tokenizers/tiny-bpe`."""

from pathlib import Path

TINY_TOKENIZER = str(Path(__file__).resolve().parent / "tokenizers" / "tiny-bpe")

__all__ = ["TINY_TOKENIZER"]
