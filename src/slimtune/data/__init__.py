"""Data: text packed into blocks, chat/instruction records with masked prompts, `datasets` sets; cached tokenization."""

from slimtune.data.datasets import (
    collate,
    default_corpus_path,
    default_instruct_path,
    load_raw,
    render_chat,
    tokenize,
)

__all__ = ["collate", "default_corpus_path", "default_instruct_path", "load_raw", "render_chat", "tokenize"]
