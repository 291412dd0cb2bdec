"""The loss-term seam: a provider's term reaches the gradient exactly as the hand-computed summed loss does, under
gradient accumulation, bf16-mixed precision and gradient checkpointing, in slimtune's CausalLMModule and in a user's
own LightningModule that knows nothing of it."""

import copy

import lightning.pytorch as L
import pytest
import torch
from conftest import TINY_LLAMA
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.callbacks._base import SlimtuneCallback
from slimtune.errors import SlimtuneError
from slimtune.lightning import CausalLMModule
from slimtune.lightning.loss_terms import attach_loss_terms, capture_outputs, detach_loss_terms, loss_providers

STRENGTH = 2.0  # the term then moves the gradient by ~20%: plainly visible, not dominant
ACCUMULATE = 2


class LogitPenalty(SlimtuneCallback):
    """A loss-term provider: STRENGTH * mean(logits^2), read from the model's captured output."""

    name = "logit_l2"

    def __init__(self, strength: float = STRENGTH):
        self.strength = strength
        self.attn_calls_seen: list[int] = []  # captured calls of layer 0's attention, per training step

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        attach_loss_terms(pl_module, self)

    def on_fit_start(self, trainer, pl_module):
        model = self.model_for(pl_module)
        self.logits = capture_outputs(model)
        # inside a checkpointed decoder layer, as an MoE router is: recomputed in backward
        self.attention = capture_outputs(model.get_base_model().model.layers[0].self_attn)

    def teardown(self, trainer, pl_module, stage):
        detach_loss_terms(pl_module, self)
        self.logits.remove()
        self.attention.remove()

    def loss_terms(self, pl_module, batch, batch_idx):
        self.attn_calls_seen.append(len(self.attention.outputs))
        return {"logit_l2": self.strength * self.logits.last.logits.float().pow(2).mean()}


class GradAtStep(L.Callback):
    """The trainable gradients Lightning hands the optimizer, by parameter name inside the model."""

    grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            model = next(m for n, m in pl_module.named_children() if n in ("model", "lm"))
            self.grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


class UserLM(L.LightningModule):
    """A user's own module: the model under `self.lm`, a tuple batch, no knowledge of loss terms."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.lm(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def lora_llama():
    torch.manual_seed(0)
    config = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # a frozen base: checkpointed blocks need a graph from the embeddings
    for p in model.parameters():
        p.requires_grad_(False)
    # init_lora_weights=False: A and B both random, so both get gradients at the first step (B = 0 would zero A's)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))


IDS = torch.randint(0, TINY_LLAMA["vocab_size"], (2 * ACCUMULATE, 16), generator=torch.Generator().manual_seed(1))


def hand_gradients(model, autocast: bool, with_term: bool = True) -> dict[str, torch.Tensor]:
    """d/dθ of sum over the micro-batches of (CE + STRENGTH * mean(logits^2)) / ACCUMULATE, computed directly."""
    model = copy.deepcopy(model).train()
    for ids in IDS.split(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
            loss = out.loss + (STRENGTH * out.logits.float().pow(2).mean() if with_term else 0)
        (loss / ACCUMULATE).backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(a: dict, b: dict) -> float:
    diff = torch.cat([(a[n] - b[n]).flatten() for n in a]).norm()
    return float(diff / torch.cat([b[n].flatten() for n in a]).norm())


@pytest.mark.parametrize("kind", ["causal_lm_module", "user_module"])
def test_gradients_equal_the_hand_computed_gradient_of_the_summed_loss(kind, tmp_path):
    lm = lora_llama()
    initial = copy.deepcopy(lm)
    if kind == "causal_lm_module":
        module = CausalLMModule(lm, optimizer={"name": "sgd", "lr": 0.1})
        data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in IDS.split(2)]
        loader = torch.utils.data.DataLoader(data, batch_size=None)
    else:
        module = UserLM(lm)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(IDS), batch_size=2)
    original_step = module.training_step
    penalty, grads = LogitPenalty(), GradAtStep()
    attn_calls = []
    counter = lm.get_base_model().model.layers[0].self_attn.register_forward_hook(lambda *_: attn_calls.append(1))
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=ACCUMULATE, precision="bf16-mixed",
                        callbacks=[penalty, grads], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, loader)
    counter.remove()

    # Lightning's gradient is that of (CE + term) / 2 summed over both micro-batches, computed by hand. Tolerance: the
    # hand computation runs under the same bf16 autocast, so it performs the very operations Lightning does (bf16
    # matmuls, fp32 loss, backward per micro-batch into fp32 .grad): the two agree to the bit here, and 1e-6 (relative
    # norm) only allows for a reordered float32 sum. The reference must use the same autocast: bf16's 8-bit mantissa
    # alone moves this gradient ~7% away from its fp32 value (a random tiny Llama with large logits), more than a
    # wrongly scaled term would, so an fp32 reference could not tell a correct sum from a wrong one.
    same_autocast = hand_gradients(initial, autocast=True)
    assert grads.grads.keys() == same_autocast.keys() and len(same_autocast) == 2 * 14  # A and B of 14 layers
    error = relative_error(grads.grads, same_autocast)
    assert error <= 1e-6, error
    # The test can fail: the term's share of the gradient is far above that tolerance (~20%), and a term scaled
    # without the accumulation (added once per optimizer step instead of per micro-batch) would be off by as much.
    assert relative_error(grads.grads, hand_gradients(initial, autocast=True, with_term=False)) > 0.1

    # Each term on its own, and the total: train/loss_total, or train/loss in CausalLMModule (its CE as train/loss_ce)
    metrics = trainer.callback_metrics
    total_key = "train/loss" if kind == "causal_lm_module" else "train/loss_total"
    assert float(metrics["train/loss_logit_l2"]) > 0
    if kind == "causal_lm_module":
        assert float(metrics[total_key]) == pytest.approx(float(metrics["train/loss_ce"]) +
                                                          float(metrics["train/loss_logit_l2"]), rel=1e-5)
    else:
        assert "train/loss_ce" not in metrics and float(metrics[total_key]) > float(metrics["train/loss_logit_l2"])

    # Gradient checkpointing ran layer 0's attention twice per micro-batch (forward, recomputation in backward); the
    # capture recorded only the forward of each step.
    assert len(attn_calls) == 2 * ACCUMULATE
    assert penalty.attn_calls_seen == [1] * ACCUMULATE

    # Detached after fit: the user's training_step is the original again, nothing stays attached
    assert "training_step" not in vars(module) and not loss_providers(module)
    assert module.training_step.__func__ is type(module).training_step
    assert module.training_step == original_step


def test_bad_terms_and_providers_are_one_line_errors():
    module = UserLM(lora_llama())

    class Bad:
        name = "bad"

        def __init__(self, terms):
            self.terms = terms

        def loss_terms(self, pl_module, batch, batch_idx):
            return self.terms

    with pytest.raises(SlimtuneError, match="is not a loss-term provider"):
        attach_loss_terms(module, object())
    batch = (IDS[:2],)
    for terms, message in [({"kd": 1.0}, "returned float for 'kd'; valid: a floating scalar tensor"),
                           ({"kd": torch.ones(2)}, r"returned a \(2,\) torch.float32 tensor for 'kd'"),
                           ({"ce": torch.tensor(1.0)}, "returned the key 'ce', which is reserved"),
                           ({"k-d": torch.tensor(1.0)}, "returned the key 'k-d'; valid: a name such as 'kd'")]:
        provider = Bad(terms)
        attach_loss_terms(module, provider)
        attach_loss_terms(module, provider)  # idempotent
        assert loss_providers(module) == [provider]
        with pytest.raises(SlimtuneError, match=message) as err:
            module.training_step(batch, 0)
        assert "\n" not in str(err.value)
        detach_loss_terms(module, provider)
    assert "training_step" not in vars(module)


def test_capture_records_only_inside_a_wrapped_training_step():
    lm = lora_llama()
    module = UserLM(lm)
    seen = []

    class Reader:
        name = "reader"

        def loss_terms(self, pl_module, batch, batch_idx):
            seen.append(len(capture.outputs))
            return {}

    capture = capture_outputs(lm)
    with torch.no_grad():
        lm(input_ids=IDS[:1])  # outside a training step: not recorded
    assert capture.outputs == []
    with pytest.raises(SlimtuneError, match="holds nothing in this training step"):
        capture.last
    reader = Reader()
    attach_loss_terms(module, reader)
    module.training_step((IDS[:2],), 0)
    module.training_step((IDS[2:],), 1)
    assert seen == [1, 1]  # one forward each step, cleared in between
    assert capture.outputs == []  # and dropped when the step ends
    detach_loss_terms(module, reader)
    capture.remove()
