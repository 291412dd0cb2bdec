"""The teacher-logit cache: written once (resumably), read by sequence whatever the batch order and padding, reused
only when its fingerprint matches; training from it gives the gradient of online top-k distillation, with no teacher
loaded."""

import copy
import json

import lightning.pytorch as L
import pytest
import torch
from conftest import TINY_LLAMA, TINY_TOKENIZER_SPEC
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.callbacks import Distillation
from slimtune.distill import TopKLogprobs, kd_loss
from slimtune.distill.cache import CACHE_FILE, LogitCache, teacher_topk, write_logit_cache
from slimtune.errors import SlimtuneError
from slimtune.lightning import CausalLMDataModule, CausalLMModule

TOP_K = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = dict(TINY_LLAMA)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def sequences(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY_LLAMA["vocab_size"], (int(torch.randint(5, 15, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


class CountingTeacher:
    def __init__(self, model):
        self.model, self.rows = model.eval(), 0

    @torch.no_grad()
    def __call__(self, ids, mask):
        self.rows += ids.shape[0]
        return self.model(input_ids=ids, attention_mask=mask).logits


def test_written_cache_gives_each_sequences_top_k_and_resumes_an_interrupted_pass(tmp_path):
    teacher = tiny_llama(1)
    seqs = sequences()
    runner = CountingTeacher(teacher)
    folder = write_logit_cache(runner, seqs, tmp_path / "straight", {"tokenizer": "t", "teacher": "x"}, TOP_K,
                               batch_size=3, shard_sequences=3)
    cache = LogitCache(folder)
    assert len(cache) == 7 and runner.rows == 7
    for s in seqs:
        with torch.no_grad():
            full = teacher(input_ids=torch.tensor([s])).logits[0].log_softmax(-1)
        values, ids = cache.sequence(s)
        top = full.topk(TOP_K, -1)
        torch.testing.assert_close(values, top.values, rtol=1e-5, atol=1e-5)  # padding in the batch changes nothing
        assert torch.equal(ids.long(), top.indices)

    # an interrupted pass: only the first shard was written; the next pass writes the rest only
    resumed = tmp_path / "resumed"
    write_logit_cache(CountingTeacher(teacher), seqs, resumed, {"tokenizer": "t", "teacher": "x"}, TOP_K,
                      batch_size=3, shard_sequences=3)
    meta = json.loads((resumed / CACHE_FILE).read_text())
    meta["shards"], meta["complete"] = meta["shards"][:1], False
    (resumed / CACHE_FILE).write_text(json.dumps(meta))
    with pytest.raises(SlimtuneError, match="holds an unfinished cache"):
        LogitCache(resumed)
    runner = CountingTeacher(teacher)
    write_logit_cache(runner, seqs, resumed, {"tokenizer": "t", "teacher": "x"}, TOP_K, batch_size=3,
                      shard_sequences=3)
    assert runner.rows == 4
    again = LogitCache(resumed)
    for s in seqs:
        assert all(torch.equal(a, b) for a, b in zip(again.sequence(s), cache.sequence(s)))


def test_fingerprint_mismatches_are_refused_naming_the_part(tmp_path):
    seqs = sequences()
    folder = write_logit_cache(CountingTeacher(tiny_llama(1)), seqs, tmp_path / "c", {"tokenizer": "t", "teacher": "x"},
                               TOP_K)
    with pytest.raises(SlimtuneError, match=r"written for another tokenizer \('t', this run: 'u'\)") as err:
        LogitCache(folder, {"tokenizer": "u"})
    assert "\n" not in str(err.value)
    with pytest.raises(SlimtuneError, match="written for another data"):
        write_logit_cache(CountingTeacher(tiny_llama(1)), seqs[:-1], folder, {"tokenizer": "t", "teacher": "x"}, TOP_K)
    with pytest.raises(SlimtuneError, match="written for another top_k"):
        write_logit_cache(CountingTeacher(tiny_llama(1)), seqs, folder, {"tokenizer": "t", "teacher": "x"}, 4)
    with pytest.raises(SlimtuneError, match="has no entry for a training sequence of 3 tokens"):
        LogitCache(folder).sequence([1, 2, 3])
    with pytest.raises(SlimtuneError, match="holds no cache"):
        LogitCache(tmp_path / "empty")


def test_cached_top_k_loss_equals_the_online_top_k_loss():
    teacher, student = tiny_llama(1).eval(), tiny_llama(0)
    ids = torch.tensor(sequences(2, seed=4)[0])[None]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    values, indices = teacher_topk(t_logits, TOP_K, chunk_size=3)
    s_logits = student(input_ids=ids).logits
    online = kd_loss(s_logits, t_logits, loss="jsd", top_k=TOP_K, temperature=2.0)
    cached = kd_loss(s_logits, TopKLogprobs(values, indices), loss="jsd", top_k=TOP_K, temperature=2.0)
    torch.testing.assert_close(cached, online)


# --------------------------------------------------------------------------- through the callback


class FirstGrads(L.Callback):
    grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}


def fit_once(tmp_path, tokenizer, student, distill):
    """One step of a full fine-tune on the embedded chat set (prompt tokens masked, padded batches)."""
    data = CausalLMDataModule(tokenizer, {"path": "default_instruct", "block_size": 96, "batch_size": 4,
                                          "val_fraction": 0.0})
    module = CausalLMModule(copy.deepcopy(student), tokenizer, optimizer={"name": "sgd", "lr": 0.1})
    grads = FirstGrads()
    trainer = L.Trainer(max_steps=1, callbacks=[distill, grads], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return grads.grads


def test_training_from_the_cache_equals_online_top_k_and_loads_no_teacher(tmp_path, tiny_tokenizer):
    folder = tmp_path / "teacher"
    tiny_llama(1).save_pretrained(folder)
    teacher = {"name_or_path": str(folder), "tokenizer": TINY_TOKENIZER_SPEC}
    student = tiny_llama(0)
    settings = {"loss": "fkl", "top_k": TOP_K, "temperature": 1.5, "kd_weight": 1.0}

    online = fit_once(tmp_path, tiny_tokenizer, student, Distillation(teacher=teacher, **settings))
    writing = Distillation(teacher=teacher, cache_dir=str(tmp_path / "cache"), **settings)
    written = fit_once(tmp_path, tiny_tokenizer, student, writing)
    assert writing.teacher is None  # written, then dropped: the step ran from the cache
    reading = Distillation(teacher=teacher, cache_dir=str(tmp_path / "cache"), **settings)
    cached = fit_once(tmp_path, tiny_tokenizer, student, reading)
    assert reading.teacher is None and reading._runner is None  # never loaded
    for grads in (written, cached):
        assert grads.keys() == online.keys()
        for name in online:
            torch.testing.assert_close(grads[name], online[name], rtol=1e-4, atol=1e-7)
    ce_only = fit_once(tmp_path, tiny_tokenizer, student, Distillation(teacher=teacher, kd_weight=0.0))
    assert not torch.allclose(ce_only["model.embed_tokens.weight"], online["model.embed_tokens.weight"])

    # another top_k or another block size (other sequences): refused, naming what differs
    with pytest.raises(SlimtuneError, match="written for another top_k"):
        fit_once(tmp_path, tiny_tokenizer, student,
                 Distillation(teacher=teacher, cache_dir=str(tmp_path / "cache"), **{**settings, "top_k": 4}))


def test_cache_settings_are_checked():
    with pytest.raises(SlimtuneError, match="cache_dir needs top_k"):
        Distillation(teacher="org/model", cache_dir="c")
    with pytest.raises(SlimtuneError, match="cache_dir holds the teacher's logits only"):
        Distillation(teacher="org/model", cache_dir="c", top_k=4, hidden_layers=[[1, 1]])
