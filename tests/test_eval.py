import math

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.eval import perplexity, read_eval_text


class Bigram(torch.nn.Module):
    """A model whose log-probabilities are known in closed form."""

    def __init__(self, vocab=7):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_is_exp_of_mean_nll_over_non_overlapping_windows():
    torch.manual_seed(0)
    model = Bigram()
    ids = torch.randint(0, 7, (103,))
    result = perplexity(model, ids, seq_len=10, progress=False)
    assert result["windows"] == 10 and result["tokens"] == 100
    logp = torch.log_softmax(model.table, dim=-1)
    nll = [-logp[w[:-1], w[1:]].mean().item() for w in ids[:100].view(10, 10)]
    assert result["ppl"] == pytest.approx(math.exp(sum(nll) / 10), rel=1e-5)
    assert perplexity(model, ids, 10, max_windows=3, progress=False)["windows"] == 3


def test_read_eval_text_joins_rows_like_the_gptq_papers(tmp_path):
    path = tmp_path / "w.raw"
    path.write_text(" \n = Title = \n \n Some text . \n")
    assert read_eval_text(path) == "" + "\n\n" + " = Title = \n" + "\n\n" + "" + "\n\n" + " Some text . \n"


def test_bad_eval_inputs(tmp_path):
    with pytest.raises(SlimtuneError, match="does not exist"):
        read_eval_text(tmp_path / "missing.raw")
    with pytest.raises(SlimtuneError, match="fewer than one window"):
        perplexity(Bigram(), torch.arange(5) % 7, seq_len=10, progress=False)
