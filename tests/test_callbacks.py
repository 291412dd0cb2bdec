"""slimtune's callbacks in a user's own LightningModule and Trainer, from both Lightning packages."""

import re

import pytest

from conftest import ROOT
from slimtune.callbacks import CompressionStats, PerplexityEvaluation
from slimtune.errors import SlimtuneError


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- snippet: own-trainer -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its own-trainer snippet"
    return match.group(1)


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_readme_snippet_runs_in_both_lightning_packages(package, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = readme_snippet()
    assert "import lightning.pytorch as L" in code
    code = code.replace("import lightning.pytorch as L", f"import {package} as L")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    ppl, stats, trainer = scope["ppl"], scope["stats"], scope["trainer"]
    assert type(trainer).__module__.startswith(package)
    assert set(ppl.results) == {"before", "after"}
    assert ppl.results["before"]["ppl"] != ppl.results["after"]["ppl"]  # the model trained in between
    assert stats.stats["trainable_params"] == stats.stats["total_params"] > 0
    assert stats.stats["bits_per_param"] == pytest.approx(32.0, rel=0.01)


def test_perplexity_state_survives_a_checkpoint():
    cb = PerplexityEvaluation(text="hello world", seq_len=4)
    cb.results = {"before": {"ppl": 12.5, "nll": 2.5, "windows": 1, "tokens": 4}}
    restored = PerplexityEvaluation(text="hello world", seq_len=4)
    restored.load_state_dict(cb.state_dict())
    assert restored.results == cb.results
    assert PerplexityEvaluation(name="a").state_key != PerplexityEvaluation(name="b").state_key


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, "seq_len=1 is not valid"),
    ({"max_windows": 0}, "max_windows=0 is not valid"),
    ({"at": ["fit_middle"]}, "at=['fit_middle'] is not valid; valid: fit_start, fit_end"),
    ({"path": "/no/such.raw"}, "'/no/such.raw' does not exist"),
])
def test_callback_arguments_are_checked(kwargs, message):
    with pytest.raises(SlimtuneError) as err:
        PerplexityEvaluation(**kwargs)
    assert message in str(err.value)


def test_compression_stats_counts_tied_weights_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    from slimtune.models.stats import compression_stats

    stats = compression_stats(model)
    assert stats["total_params"] == sum(p.numel() for p in model.parameters())  # parameters() de-duplicates ties
    assert isinstance(CompressionStats().state_dict(), dict)
