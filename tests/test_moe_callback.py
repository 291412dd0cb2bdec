"""MoEBalance in Lightning: the gradient Lightning hands the optimizer equals the hand-computed gradient of CE + the
global-batch Switch loss (gradient accumulation, padding, gradient checkpointing on and off, transformers' own aux
loss turned off so nothing counts twice); every transformers MoE family trains with all terms and the aux-loss-free
bias; the bias and statistics resume exactly; a custom registered router, its collapse warning, its declared-count
check; heatmap files; bad input."""

import copy
import csv
import math

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
from moe_tiny import FAMILY_CONFIGS, VOCAB, token_batches, tiny_moe
from torch import nn

from slimtune.callbacks import MoEBalance
from slimtune.errors import SlimtuneError
from slimtune.moe import find_routers, register_router, unregister_router
from slimtune.moe.heatmap import read_png_size

ACCUMULATE = 2
AUX = 0.5  # large, so a wrongly formed or double-counted term moves the gradient visibly
Z, SEQ = 0.05, 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class UserMoE(L.LightningModule):
    """A user's own module: the model under `self.lm`, dict batches, no knowledge of MoE balancing."""

    def __init__(self, lm, lr: float = 0.05):
        super().__init__()
        self.lm = lm
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.lm(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GradAtStep(L.Callback):
    grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.lm.named_parameters()
                          if p.grad is not None}


def trainer(tmp_path, callbacks, **kwargs):
    settings = dict(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    settings.update(kwargs)
    return L.Trainer(callbacks=callbacks, **settings)


def loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)


def hand_gradients(model, batches, coef, z_coef=0.0, seq_coef=0.0):
    """d/dθ of sum over micro-batches m of (CE_m + coef * mean_layers E * sum_i f_i P_i + z_coef * mean_layers z_m
    + seq_coef * mean_layers seq_m) / ACCUMULATE, where f is the load of micro-batches 1..m and P the masked mean
    probability of micro-batch m, z_m the masked mean squared logsumexp, seq_m the mean over sequences of DeepSeek's
    sequence-wise loss, all from the router logits transformers returns, by the direct formulas; also the step's load
    per layer."""
    model = copy.deepcopy(model).train()
    model.router_aux_loss_coef = 0.0  # its own aux loss out of the reference: only the formula below counts
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    loads = [torch.zeros(E) for _ in range(model.config.num_hidden_layers)]
    tokens = [0.0] * len(loads)
    for batch in batches:
        out = model(**batch, output_router_logits=True)
        mask = batch["attention_mask"].reshape(-1).float()
        terms = []
        for layer, logits in enumerate(out.router_logits):
            probs = torch.softmax(logits.float(), -1)
            chosen = torch.topk(probs, k, dim=-1).indices
            loads[layer] += torch.zeros(E).index_add_(0, chosen.flatten(), mask.repeat_interleave(k))
            tokens[layer] += float(mask.sum())
            f = loads[layer] / (tokens[layer] * k)
            P = (probs * mask[:, None]).sum(0) / mask.sum()
            terms.append(coef * E * (f * P).sum())
            z = (torch.logsumexp(logits.float(), -1) ** 2 * mask).sum() / mask.sum()
            rows, length = batch["attention_mask"].shape
            seq = 0.0
            for b in range(rows):
                real = mask.reshape(rows, length)[b]
                p, c = probs.reshape(rows, length, E)[b], chosen.reshape(rows, length, k)[b]
                counts = torch.stack([((c == i).any(-1).float() * real).sum() for i in range(E)])
                f_seq = counts * E / (k * real.sum())
                seq = seq + (f_seq * (p * real[:, None]).sum(0) / real.sum()).sum()
            terms[-1] = terms[-1] + z_coef * z + seq_coef * seq / rows
        ((out.loss + torch.stack(terms).mean()) / ACCUMULATE).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loads


def relative_error(a, b):
    return float(torch.cat([(a[n] - b[n]).flatten() for n in b]).norm() / torch.cat([b[n].flatten() for n in b]).norm())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_equals_hand_computed_summed_loss(checkpointing, tmp_path):
    model = tiny_moe("mixtral", output_router_logits=True, router_aux_loss_coef=0.3)  # transformers' aux loss on
    initial = copy.deepcopy(model)
    batches = token_batches(ACCUMULATE, pad_last=5)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    balance, grads = MoEBalance(aux_coef=AUX, z_coef=Z, seq_coef=SEQ, heatmap=False), GradAtStep()
    router_calls = []
    counter = find_routers(model)[0].module.register_forward_hook(lambda *_: router_calls.append(1))
    t = trainer(tmp_path, [balance, grads], accumulate_grad_batches=ACCUMULATE)
    t.fit(UserMoE(model), loader(batches))
    counter.remove()

    expected, loads = hand_gradients(initial, batches, AUX, Z, SEQ)
    assert relative_error(grads.grads, expected) < 1e-5
    # the test can fail: without any one of the terms, or with transformers' own aux loss counted as well, it is off
    for coefs in ((0.0, Z, SEQ), (AUX, 0.0, SEQ), (AUX, Z, 0.0)):
        without = hand_gradients(initial, batches, *coefs)[0]
        assert relative_error(grads.grads, without) > 1e-4
    # statistics of the step = the hand loads (padding excluded), whether or not the routers ran again in backward
    assert len(router_calls) == ACCUMULATE * (2 if checkpointing else 1)
    assert torch.allclose(balance.history[0], torch.stack([l / l.sum() for l in loads]), atol=1e-6)
    assert float(loads[0].sum()) == 2 * (2 * 12 * ACCUMULATE - 5 * ACCUMULATE)  # top-2 slots of the real tokens
    # transformers' aux loss was off during the fit, and is back on after it
    assert model.config.output_router_logits is True and balance.report()["moe_aux_loss"] == "slimtune"
    metrics = t.callback_metrics
    assert {"train/loss_aux", "moe/cv_max", "moe/model.layers.0.mlp.gate/cv", "moe/dead_experts",
            "moe/model.layers.1.mlp.gate/expert3"} <= set(metrics)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_family_trains_with_all_terms_and_the_bias(family, tmp_path):
    model = tiny_moe(family)
    routers = find_routers(model)
    assert len(routers) == 2 and all(r.num_experts == 4 and r.top_k == 2 for r in routers)
    # the adapter's re-choice with a zero bias is the router's own choice; a large bias forces an expert
    ref = routers[0]
    hidden = torch.randn(10, 32)
    with torch.no_grad():
        own = ref.module(hidden)
        if ref.adapter.rebias is not None:
            again = ref.adapter.rebias(ref.module, own, torch.zeros(4))
            order_own, order_again = own[2].sort(-1), again[2].sort(-1)
            assert torch.equal(order_own.values, order_again.values)
            assert torch.allclose(own[1].gather(1, order_own.indices), again[1].gather(1, order_again.indices),
                                  atol=1e-6)
            forced = ref.adapter.rebias(ref.module, own, torch.tensor([0.0, 0.0, 0.0, 100.0]))
            assert bool((forced[2] == 3).any(-1).all())
    balance = MoEBalance(aux_coef=0.01, z_coef=1e-3, seq_coef=1e-3, bias_rate=0.01, heatmap_dir=str(tmp_path / "hm"))
    t = trainer(tmp_path, [balance], max_steps=3)
    t.fit(UserMoE(model), loader(token_batches(3, pad_last=3)))
    metrics = t.callback_metrics
    for key in ("aux", "z", "seq"):
        assert math.isfinite(float(metrics[f"train/loss_{key}"])) and float(metrics[f"train/loss_{key}"]) > 0
    bias = balance.expert_bias.bias
    assert all(b.abs().max() > 0 for b in bias)  # three sign updates moved every layer's bias
    if family == "deepseek_v3":  # the bias lives in the model's own buffer, saved with it
        for r, b in zip(routers, bias):
            assert torch.equal(r.module.e_score_correction_bias.float(), b)
    rows = list(csv.DictReader(open(tmp_path / "hm" / "moe_heatmap.csv")))
    assert len(rows) == 3 * 2 * 4
    assert read_png_size(tmp_path / "hm" / "moe_heatmap.png") == (4 * 24, 2 * 24)


def test_bias_and_statistics_resume_exactly(tmp_path):
    batches = token_batches(2, pad_last=2)

    def run(epochs, ckpt_path=None, checkpoint_dir=None):
        torch.manual_seed(0)
        balance = MoEBalance(aux_coef=0.01, bias_rate=0.02, dead_threshold=0.5, dead_steps=50, heatmap=False)
        callbacks = [balance]
        if checkpoint_dir:
            callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1))
        t = trainer(tmp_path, callbacks, max_steps=-1, max_epochs=epochs, enable_checkpointing=bool(checkpoint_dir))
        module = UserMoE(tiny_moe("mixtral"))
        t.fit(module, loader(batches), ckpt_path=ckpt_path)
        return balance, module

    straight, straight_module = run(2)
    run(1, checkpoint_dir=tmp_path / "ckpt")
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed, resumed_module = run(2, ckpt_path=str(ckpt))
    assert resumed.steps == straight.steps == 4
    for a, b in zip(resumed.expert_bias.bias, straight.expert_bias.bias):
        assert torch.equal(a, b)
    for a, b in zip(resumed.dead.low_steps, straight.dead.low_steps):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(resumed.history, straight.history)) and len(resumed.history) == 4
    assert any(b.abs().max() > 0 for b in straight.expert_bias.bias)
    for (n, p), (_, q) in zip(resumed_module.lm.named_parameters(), straight_module.lm.named_parameters()):
        assert torch.equal(p, q), n


class ToyRouter(nn.Module):
    """A custom router: a linear gate plus a fixed skew (a stand-in for a router that has collapsed)."""

    def __init__(self, hidden, experts, top_k, skew):
        super().__init__()
        self.proj = nn.Linear(hidden, experts, bias=False)
        self.register_buffer("skew", torch.tensor(skew))
        self.top_k = top_k

    def forward(self, h):
        logits = self.proj(h) + self.skew
        weights, indices = torch.topk(torch.softmax(logits, -1), self.top_k, dim=-1)
        return logits, weights, indices


class ToyMoE(nn.Module):
    def __init__(self, skew, experts=4, hidden=16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.router = ToyRouter(hidden, experts, 2, skew)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(experts))
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids).reshape(-1, self.embed.embedding_dim)
        _, weights, indices = self.router(h)
        mixed = sum(weights[:, j:j + 1] * torch.stack([e(h) for e in self.experts], 1)[torch.arange(len(h)),
                                                                                      indices[:, j]]
                    for j in range(indices.shape[1]))
        logits = self.head(mixed)
        return nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)


class ToyModule(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_custom_router_collapse_warning_names_layer_and_experts(tmp_path):
    model = ToyMoE(skew=[20.0, 20.0, -20.0, -20.0])
    register_router(ToyRouter, num_experts=4, top_k=2)
    try:
        balance = MoEBalance(aux_coef=0.01, dead_steps=2, collapse_cv=0.9, heatmap=False)
        with pytest.warns(UserWarning, match=r"load collapse in router: .*overloaded experts \[0, 1\]") as record:
            trainer(tmp_path, [balance], max_steps=3).fit(ToyModule(model), loader(token_batches(3)))
        messages = [str(w.message) for w in record if "load collapse" in str(w.message)]
        assert any("dead experts [2, 3]" in m for m in messages)  # named once they stayed starved 2 steps
        assert balance.last_dead == [[2, 3]] and balance.last_cv[0] == pytest.approx(1.0)
        # a declared count that does not match what the router returns: one line at the first step
        mismatches = (({"num_experts": 5, "top_k": 2},
                       r"router router returned logits for 4 experts but is declared with num_experts=5; valid: "
                       r"num_experts=4"),
                      ({"num_experts": 4, "top_k": 3},
                       r"router router chose 2 experts per token but is declared with top_k=3; valid: top_k=2"))
        for declared, message in mismatches:
            register_router(ToyRouter, **declared)
            with pytest.raises(SlimtuneError, match=message):
                trainer(tmp_path, [MoEBalance(heatmap=False)], max_steps=1).fit(ToyModule(ToyMoE([0.0] * 4)),
                                                                                 loader(token_batches(1)))
    finally:
        unregister_router(ToyRouter)


def test_bad_input_is_one_line(tmp_path):
    from conftest import TINY_LLAMA
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(TINY_LLAMA)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    cases = [(lambda: MoEBalance().check_model(dense, None), "found no MoE router in LlamaForCausalLM; valid:"),
             (lambda: MoEBalance(aux_coef=-0.1), r"aux_coef=-0.1 is not valid; valid: a number >= 0"),
             (lambda: MoEBalance(z_coef=-1), r"z_coef=-1 is not valid"),
             (lambda: MoEBalance(bias_rate=0), r"bias_rate=0 is not valid; valid: a positive number"),
             (lambda: MoEBalance(bias_rate=-1e-3), r"bias_rate=-0.001 is not valid"),
             (lambda: MoEBalance(builtin_aux="keep"), "would count the Switch loss twice"),
             (lambda: MoEBalance(builtin_aux="both"), "builtin_aux='both' is not valid; valid: auto, off, keep"),
             (lambda: MoEBalance(builtin_aux=False), r"builtin_aux=False is not valid; .*write \"off\""),
             (lambda: register_router(ToyRouter, num_experts=4, top_k=5), "top_k=5 is not valid for num_experts=4"),
             (lambda: MoEBalance(bias_rate=0.1).check_model(ToyMoE([0.0] * 4), None), "found no MoE router")]
    for make, message in cases:
        with pytest.raises(SlimtuneError, match=message) as err:
            make()
        assert "\n" not in str(err.value)
    register_router(ToyRouter, num_experts=4, top_k=2)  # no rebias: the aux-loss-free bias cannot apply
    try:
        with pytest.raises(SlimtuneError, match=r"router router \(ToyRouter\) cannot take a bias"):
            MoEBalance(bias_rate=0.1).check_model(ToyMoE([0.0] * 4), None)
    finally:
        unregister_router(ToyRouter)


def test_keep_builtin_aux_leaves_transformers_loss_and_adds_none(tmp_path):
    model = tiny_moe("mixtral", output_router_logits=True, router_aux_loss_coef=0.3)
    balance = MoEBalance(aux_coef=0.0, builtin_aux="keep", heatmap=False)
    t = trainer(tmp_path, [balance])
    t.fit(UserMoE(model), loader(token_batches(1)))
    assert balance.report()["moe_aux_loss"] == "transformers" and "train/loss_aux" not in t.callback_metrics
    assert "moe/cv_max" in t.callback_metrics  # a monitor still


@pytest.mark.slow  # W&B starts its service process: ~10-20 s on 2 busy cores
def test_heatmap_goes_to_wandb_as_a_table(tmp_path, monkeypatch):
    import json

    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="moe-test")
    balance = MoEBalance(aux_coef=0.01, heatmap_dir=str(tmp_path / "hm"))
    try:
        trainer(tmp_path, [balance], max_steps=2, logger=logger).fit(UserMoE(tiny_moe("mixtral")),
                                                                    loader(token_batches(2)))
    finally:
        wandb.finish()
    (table_file,) = (tmp_path / "wandb").rglob("moe/heatmap_table*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["layer", "expert0", "expert1", "expert2", "expert3"]
    assert [row[0] for row in table["data"]] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(abs(sum(row[1:]) - 1) < 1e-5 for row in table["data"])  # each layer's mean shares
    assert (tmp_path / "hm" / "moe_heatmap.png").is_file()


def test_qlora_mixtral_in_causal_lm_module_with_checkpointing(tmp_path):
    """slimtune's own module and loader: NF4 attention (bitsandbytes), LoRA on attention, routers and fused experts,
    gradient checkpointing, transformers' aux loss on in the config (coefficient 1) and turned off for the fit."""
    from slimtune.lightning import CausalLMModule
    from slimtune.models.loading import load_model

    cfg = {"name_or_path": None, "dtype": "float32", "quantization": "nf4", "double_quant": True, "finetune": "lora",
           "gradient_checkpointing": True,
           "config": {"model_type": "mixtral", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
                      "router_aux_loss_coef": 1.0},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"}}
    model = load_model(cfg)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    balance = MoEBalance(aux_coef=0.01, bias_rate=0.01, heatmap=False)
    t = trainer(tmp_path, [balance], max_steps=2)
    t.fit(CausalLMModule(model, optimizer={"name": "adamw", "lr": 1e-3}), loader(token_batches(2)))
    metrics = {k: float(v) for k, v in t.callback_metrics.items()}
    # CausalLMModule logs its CE and the total: the total is CE + this callback's term, and the CE holds no
    # transformers aux loss (with coefficient 1 it would add about top_k = 2 to a CE of about ln 256 = 5.5)
    assert metrics["train/loss"] == pytest.approx(metrics["train/loss_ce"] + metrics["train/loss_aux"], rel=1e-6)
    assert metrics["train/loss_ce"] < math.log(VOCAB) + 0.5
    assert balance.steps == 2 and [r.name for r in balance.routers] == ["model.layers.0.mlp.gate",
                                                                        "model.layers.1.mlp.gate"]
    assert model.get_base_model().config.output_router_logits is True  # restored after the fit
