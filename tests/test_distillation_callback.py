"""The Distillation callback: the gradient Lightning steps with is the hand-computed gradient of CE + KD (in slimtune's
CausalLMModule and in a user's own LightningModule), the KD loss goes down, the teacher never changes and never reaches
the optimizer or a checkpoint, teachers load as the model layer loads models (4-bit included), vocabularies are
aligned or refused, hidden-state distillation trains its projections."""

import copy

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA, TINY_TOKENIZER_SPEC
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.callbacks import Distillation
from slimtune.errors import SlimtuneError
from slimtune.lightning import CausalLMModule
from slimtune.lightning.loss_terms import loss_providers

KD_WEIGHT = 0.7
TEMPERATURE = 2.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared CPU
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = {**TINY_LLAMA, **overrides}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def lora_student(seed=0):
    model = tiny_llama(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))


IDS = torch.randint(1, TINY_LLAMA["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(3))
LABELS = IDS.clone()
LABELS[0, :4] = -100   # a prompt
LABELS[1, 9:] = -100   # padding
MASK = torch.ones_like(IDS)
MASK[1, 9:] = 0


def dict_batches():
    return [{"input_ids": IDS[i:i + 2], "attention_mask": MASK[i:i + 2], "labels": LABELS[i:i + 2]} for i in (0, 2)]


class UserLM(L.LightningModule):
    """A user's own module: a tuple batch, the model under `self.lm`, nothing about distillation."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def training_step(self, batch, batch_idx):
        ids, mask, labels = batch
        return self.lm(input_ids=ids, attention_mask=mask, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class FirstGrads(L.Callback):
    grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            model = next(m for n, m in pl_module.named_children() if n in ("model", "lm"))
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trainer_for(tmp_path, callbacks, steps=1, accumulate=2, **kwargs):
    return L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                     enable_checkpointing=kwargs.pop("enable_checkpointing", False), enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kwargs)


def hand_gradients(student, teacher, ce_weight=1.0):
    """d/dθ of the mean over both micro-batches of ce_weight * CE + KD_WEIGHT * T^2 * mean KL(p_T || q_T), the KL
    over the positions whose next label is kept, written with F.kl_div."""
    student = copy.deepcopy(student).train()
    for batch in dict_batches():
        out = student(**batch)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["labels"][:, 1:] != -100
        s = out.logits[:, :-1][keep] / TEMPERATURE
        t = t_logits[:, :-1][keep] / TEMPERATURE
        kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
        loss = ce_weight * out.loss + KD_WEIGHT * TEMPERATURE ** 2 * kl
        (loss / 2).backward()
    return {n: p.grad for n, p in student.named_parameters() if p.requires_grad}


def relative_error(a, b):
    return float(torch.cat([(a[n] - b[n]).flatten() for n in b]).norm() / torch.cat([b[n].flatten() for n in b]).norm())


@pytest.mark.parametrize("kind", ["causal_lm_module", "user_module"])
def test_gradient_is_the_hand_computed_gradient_of_ce_plus_kd(kind, tmp_path):
    student, teacher = lora_student(0), tiny_llama(1).eval()
    initial = copy.deepcopy(student)
    if kind == "causal_lm_module":
        module = CausalLMModule(student, optimizer={"name": "sgd", "lr": 0.1})
        loader = torch.utils.data.DataLoader(dict_batches(), batch_size=None)
    else:
        module = UserLM(student)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(IDS, MASK, LABELS), batch_size=2)
    distill = Distillation(teacher=teacher, loss="fkl", temperature=TEMPERATURE, kd_weight=KD_WEIGHT, chunk_size=5)
    grads = FirstGrads()
    trainer = trainer_for(tmp_path, [distill, grads])
    trainer.fit(module, loader)

    expected = hand_gradients(initial, teacher)
    assert grads.grads.keys() == expected.keys()
    assert relative_error(grads.grads, expected) < 1e-5
    assert distill._runner._split  # the teacher's logits were computed chunk by chunk from its hidden states
    # the KD term moves the gradient far more than that tolerance
    ce_only = copy.deepcopy(initial).train()
    for batch in dict_batches():
        (ce_only(**batch).loss / 2).backward()
    assert relative_error(grads.grads, {n: p.grad for n, p in ce_only.named_parameters() if p.requires_grad}) > 0.05
    assert float(trainer.callback_metrics["train/loss_kd"]) > 0
    assert not loss_providers(module)  # detached after fit


def test_ce_weight_rescales_the_steps_own_loss(tmp_path):
    student, teacher = lora_student(0), tiny_llama(1).eval()
    initial = copy.deepcopy(student)
    module = CausalLMModule(student, optimizer={"name": "sgd", "lr": 0.1})
    grads = FirstGrads()
    distill = Distillation(teacher=teacher, temperature=TEMPERATURE, kd_weight=KD_WEIGHT, ce_weight=0.25)
    trainer_for(tmp_path, [distill, grads]).fit(module, torch.utils.data.DataLoader(dict_batches(), batch_size=None))
    assert relative_error(grads.grads, hand_gradients(initial, teacher, ce_weight=0.25)) < 1e-5
    assert relative_error(grads.grads, hand_gradients(initial, teacher, ce_weight=1.0)) > 1e-2


def test_kd_loss_decreases_and_the_teacher_never_changes_nor_enters_optimizer_or_checkpoint(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1)  # a full fine-tune: the checkpoint holds the whole student
    teacher_before = {n: p.clone() for n, p in teacher.state_dict().items()}
    module = CausalLMModule(student, optimizer={"name": "adamw", "lr": 3e-3})
    distill = Distillation(teacher=teacher, loss="jsd", beta=0.5, ce_weight=0.0, kd_weight=1.0)
    seen = []

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
            seen.append(not any(id(p) in params for p in teacher.parameters()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/loss_kd"]))

    trainer = trainer_for(tmp_path, [distill, Watch()], steps=30, accumulate=1, enable_checkpointing=True)
    trainer.fit(module, torch.utils.data.DataLoader(dict_batches()[:1] * 30, batch_size=None))
    assert seen[0] is True  # no teacher parameter in the optimizer
    kd = seen[1:]
    assert len(kd) == 30 and kd[-1] < 0.5 * kd[0], kd
    assert all(torch.equal(teacher.state_dict()[n], v) for n, v in teacher_before.items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path,
                      weights_only=False)
    state = ckpt["state_dict"]
    assert set(state) == {f"model.{n}" for n in student.state_dict()}  # the student, and nothing of the teacher
    stored = {v.data_ptr() for v in state.values()}
    assert not any(p.data_ptr() in stored for p in teacher.parameters())
    assert not any(torch.is_tensor(v) for v in ckpt["callbacks"][distill.state_key].values())


def test_teacher_loaded_from_a_config_in_4bit_and_from_a_folder(tmp_path):
    teacher_cfg = {"config": dict(TINY_LLAMA), "tokenizer": TINY_TOKENIZER_SPEC}
    from slimtune.quant.bnb4bit import linear4bit_layers

    distill = Distillation(teacher=teacher_cfg, teacher_quantization="nf4")
    module = CausalLMModule(lora_student(0), optimizer={"name": "sgd", "lr": 0.1})
    trainer_for(tmp_path, [distill]).fit(module, torch.utils.data.DataLoader(dict_batches(), batch_size=None))
    assert len(linear4bit_layers(distill.teacher)) == 14  # 7 linear layers in each of 2 blocks
    assert not any(p.requires_grad for p in distill.teacher.parameters())
    assert distill.last_terms["kd"] > 0 and distill.report()["distill_teacher"] == "config:llama"

    folder = tmp_path / "teacher"
    tiny_llama(2).save_pretrained(folder)
    distill = Distillation(teacher={"name_or_path": str(folder), "tokenizer": TINY_TOKENIZER_SPEC}, loss="tvd")
    module = CausalLMModule(lora_student(0), optimizer={"name": "sgd", "lr": 0.1})
    trainer_for(tmp_path, [distill]).fit(module, torch.utils.data.DataLoader(dict_batches(), batch_size=None))
    assert distill.last_terms["kd"] > 0


def test_padded_teacher_vocabulary_is_aligned_and_a_different_tokenizer_refused(tmp_path, tiny_tokenizer):
    teacher = tiny_llama(1, vocab_size=TINY_LLAMA["vocab_size"] + 64)  # same tokenizer, embeddings padded
    distill = Distillation(teacher=teacher, teacher_tokenizer=tiny_tokenizer, tokenizer=tiny_tokenizer)
    module = CausalLMModule(lora_student(0), optimizer={"name": "sgd", "lr": 0.1})
    trainer_for(tmp_path, [distill], accumulate=1).fit(module, torch.utils.data.DataLoader(dict_batches()[:1],
                                                                                          batch_size=None))
    assert distill._vocab_size == len(tiny_tokenizer) == TINY_LLAMA["vocab_size"]

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: (index + 1) % len(tiny_tokenizer) for token, index in tiny_tokenizer.get_vocab().items()}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=None)))
    distill = Distillation(teacher=tiny_llama(1), teacher_tokenizer=other, tokenizer=tiny_tokenizer)
    module = CausalLMModule(lora_student(0), optimizer={"name": "sgd", "lr": 0.1})
    with pytest.raises(SlimtuneError, match="the teacher's tokenizer differs from the student's") as err:
        trainer_for(tmp_path, [distill]).fit(module, torch.utils.data.DataLoader(dict_batches(), batch_size=None))
    assert "\n" not in str(err.value)


def test_hidden_state_distillation_trains_its_projection(tmp_path):
    teacher = tiny_llama(1, hidden_size=96, intermediate_size=192)
    student = lora_student(0)  # PEFT's wrapper passes output_hidden_states=None on: the callback asks for them
    distill = Distillation(teacher=teacher, hidden_layers=[[1, 1], [-1, -1]], hidden_loss="cosine", hidden_weight=0.5)
    module = CausalLMModule(student, optimizer={"name": "adamw", "lr": 1e-2},
                            scheduler={"name": "cosine", "warmup_steps": 1})
    seen = {}

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["weight"] = distill.hidden.projections[0].weight.detach().clone()

        def on_train_end(self, trainer, pl_module):
            groups = trainer.optimizers[0].param_groups
            seen["lrs"] = [g["lr"] for g in groups]
            seen["in_optimizer"] = any(distill.hidden.projections[0].weight is p for p in groups[-1]["params"])

    trainer = trainer_for(tmp_path, [distill, Watch()], steps=3, accumulate=1, enable_checkpointing=True)
    trainer.fit(module, torch.utils.data.DataLoader(dict_batches() * 2, batch_size=None))
    projection = distill.hidden.projections[0]
    assert projection.weight.shape == (96, 64) and seen["in_optimizer"]
    assert len(seen["lrs"]) == 2 and seen["lrs"][0] == seen["lrs"][1] < 1e-2  # the same cosine schedule
    assert not torch.allclose(projection.weight.detach(), seen["weight"])  # trained
    assert distill.last_terms["hidden"] > 0
    assert not any("projection" in n for n, _ in student.named_parameters())  # the student stays the student
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    saved = ckpt["callbacks"][distill.state_key]["projections"]
    torch.testing.assert_close(saved["projections.0.weight"], projection.weight.detach())
    assert len(ckpt["optimizer_states"][0]["param_groups"]) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"teacher": None}, "teacher=None is not valid"),
    ({"teacher": "/nowhere/teacher"}, "Distillation teacher: model path '/nowhere/teacher' does not exist"),
    ({"teacher": 3}, "teacher=<int> is not valid"),
    ({"teacher": "org/model", "beta": 2}, r"beta=2 is not valid; valid: a number in \[0, 1\]"),
    ({"teacher": "org/model", "temperature": 0.0}, "temperature=0.0 is not valid; valid: a number > 0"),
    ({"teacher": "org/model", "teacher_quantization": "int4"}, "teacher_quantization='int4' is not valid"),
    ({"teacher": "org/model", "kd_weight": -1}, "kd_weight=-1 is not valid"),
    ({"teacher": "org/model", "hidden_layers": "all"}, "hidden_layers='all' is not valid"),
    ({"teacher": {"name_or_path": "org/model", "wrong": 1}}, r"teacher has unknown keys \['wrong'\]"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError, match=message) as err:
        Distillation(**kwargs)
    assert "\n" not in str(err.value)


def test_hidden_pairs_naming_missing_layers_are_refused_at_setup(tmp_path):
    distill = Distillation(teacher=tiny_llama(1), hidden_layers=[[1, 5]])
    module = CausalLMModule(lora_student(0), optimizer={"name": "sgd", "lr": 0.1})
    with pytest.raises(SlimtuneError, match=r"\[1, 5\]: the teacher has no layer 5; valid: 0 \(embeddings\) to 2"):
        trainer_for(tmp_path, [distill]).fit(module, torch.utils.data.DataLoader(dict_batches(), batch_size=None))
