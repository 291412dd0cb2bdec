"""Evaluation (pure torch): perplexity with the GPTQ papers' protocol."""

from slimtune.eval.perplexity import perplexity, read_eval_text, tokenize_eval_text

__all__ = ["perplexity", "read_eval_text", "tokenize_eval_text"]
