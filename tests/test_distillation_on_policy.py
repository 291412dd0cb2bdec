"""On-policy distillation (GKD): completions sampled from the student on the batch's prompts, scored by the teacher;
the gradient Lightning steps with is the hand-computed one of CE on the data + JSD on the student's own tokens."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_distillation_callback import (IDS, LABELS, MASK, FirstGrads, dict_batches, relative_error, tiny_llama,
                                        trainer_for)

from slimtune.callbacks import Distillation
from slimtune.distill.on_policy import prompts_of, sample_completions
from slimtune.errors import SlimtuneError
from slimtune.lightning import CausalLMModule

MAX_NEW = 5
KD_WEIGHT = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prompts_are_the_masked_prefix_or_half_of_plain_text():
    prompts = prompts_of(IDS[:2], LABELS[:2], MASK[:2])
    assert torch.equal(prompts[0], IDS[0, :4])  # the data layer masked 4 prompt tokens
    assert torch.equal(prompts[1], IDS[1, :4])  # no masked prefix: half of its 9 real tokens
    generated = sample_completions(tiny_llama(0), prompts, MAX_NEW, eos_token_id=None)
    assert generated.input_ids.shape == (2, 4 + MAX_NEW)
    assert torch.equal(generated.labels[:, :4], torch.full((2, 4), -100))
    assert torch.equal(generated.labels[:, 4:], generated.input_ids[:, 4:])


def test_on_policy_gradient_is_ce_on_data_plus_jsd_on_the_students_samples(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1).eval()
    initial = copy.deepcopy(student)
    module = CausalLMModule(student, optimizer={"name": "sgd", "lr": 0.1})
    distill = Distillation(teacher=teacher, loss="jsd", beta=0.5, kd_weight=KD_WEIGHT, on_policy=1.0,
                           max_new_tokens=MAX_NEW)
    grads = FirstGrads()
    trainer_for(tmp_path, [distill, grads], accumulate=1).fit(
        module, torch.utils.data.DataLoader(dict_batches()[:1], batch_size=None))
    generated = distill.last_generated
    assert distill.on_policy_steps == 1 and distill.report()["distill_on_policy_steps"] == 1
    assert generated.input_ids.shape[1] == 4 + MAX_NEW

    # by hand: CE on the data batch + KD_WEIGHT * JSD(0.5) between teacher and student on the sampled completion
    hand = copy.deepcopy(initial).train()
    batch = dict_batches()[0]
    ce = hand(**batch).loss
    inputs = {"input_ids": generated.input_ids, "attention_mask": generated.attention_mask,
              "position_ids": generated.position_ids}
    s = hand(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    keep = generated.labels[:, 1:] != -100
    logq, logp = s[:, :-1][keep].log_softmax(-1), t[:, :-1][keep].log_softmax(-1)
    m = 0.5 * (logp.exp() + logq.exp())
    jsd = 0.5 * (logp.exp() * (logp - m.log())).sum(-1) + 0.5 * (logq.exp() * (logq - m.log())).sum(-1)
    (ce + KD_WEIGHT * jsd.mean()).backward()
    expected = {n: p.grad for n, p in hand.named_parameters()}
    assert relative_error(grads.grads, expected) < 1e-5
    ce_only = copy.deepcopy(initial).train()
    ce_only(**batch).loss.backward()
    assert relative_error(grads.grads, {n: p.grad for n, p in ce_only.named_parameters()}) > 1e-3


def test_on_policy_bad_settings():
    with pytest.raises(SlimtuneError, match="on_policy=0.5 samples completions .* needs a generation budget"):
        Distillation(teacher="org/model", on_policy=0.5)
    with pytest.raises(SlimtuneError, match=r"on_policy=1.5 is not valid; valid: a number in \[0, 1\]"):
        Distillation(teacher="org/model", on_policy=1.5, max_new_tokens=4)
    with pytest.raises(SlimtuneError, match="valid: on_policy=0 with cache_dir"):
        Distillation(teacher="org/model", on_policy=0.5, max_new_tokens=4, cache_dir="c", top_k=4)
