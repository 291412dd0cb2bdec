"""QLoRA trains the same with and without evaluations during the fit, through slimtune's run and through a user's own
LightningModule whose model came from transformers' BitsAndBytesConfig.

Before training, every 4-bit layer is set up as bitsandbytes sets it up on a CPU with avx512_bf16 (its packing flag
on), so these tests check on any CPU what bitsandbytes does on those: without slimtune's guard, the first evaluation
repacks the weights and every later training step gets no gradient through them.
"""

import lightning.pytorch as L
import pytest
import torch

from conftest import compose, tiny_run_overrides
from slimtune.quant.bnb4bit import guard_4bit, linear4bit_layers
from slimtune.run import finish, fit, prepare


def _as_on_an_avx512_bf16_cpu(model):
    layers = linear4bit_layers(model)
    assert layers
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_slimtune_run_trains_identically_with_evaluations(tmp_path, text_file):
    def train(name, *extra):
        cfg = compose(*tiny_run_overrides(tmp_path / name, f"data.path={text_file}", "trainer.max_steps=6",
                                          "trainer.val_check_interval=2", "export.merged=false", *extra))
        job = prepare(cfg)
        _as_on_an_avx512_bf16_cpu(job.model)
        finish(fit(job))
        return _trainable(job.model)

    evaluated = train("evaluated")  # perplexity at fit start and end, validation every 2 steps
    plain = train("plain", "callbacks=[]", "trainer.limit_val_batches=0")
    assert evaluated.keys() == plain.keys()
    assert all(torch.equal(evaluated[n], plain[n]) for n in plain), "evaluations changed what QLoRA trained"


class UserLM(L.LightningModule):
    """A user's own module: the model under `self.lm`, loaded by transformers with a BitsAndBytesConfig."""

    def __init__(self, folder, tokenizer):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        torch.manual_seed(0)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)
        self.lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        self.tokenizer = tokenizer

    def training_step(self, batch, batch_idx):
        return self.lm(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.lm(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_user_module_with_a_transformers_4bit_model_trains_identically_with_the_perplexity_callback(
        tmp_path, tiny_model_cfg, tiny_tokenizer, monkeypatch):
    """Exact and fast_4bit measurement (bitsandbytes' packed kernel, forced here on any CPU) both hand training the
    exact weights back: the adapters end equal to a run without evaluation."""
    from bitsandbytes.functional import has_avx512bf16
    from transformers import AutoModelForCausalLM

    from slimtune.callbacks import PerplexityEvaluation
    from slimtune.models import load_config
    from slimtune.quant import bnb4bit

    monkeypatch.setattr(bnb4bit, "cpu_packs_4bit", lambda: True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_config(tiny_model_cfg)).save_pretrained(tmp_path / "tiny")
    ids = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)

    def train(callbacks):
        module = UserLM(tmp_path / "tiny", tiny_tokenizer)
        _as_on_an_avx512_bf16_cpu(module.lm)
        if not callbacks:  # the reference: no evaluation, the guard applied by hand (from_pretrained leaves eval mode)
            guard_4bit(module.lm)
        trainer = L.Trainer(max_steps=4, callbacks=callbacks, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=1 if callbacks else 0, val_check_interval=2)
        trainer.fit(module, loader, loader)
        return _trainable(module.lm)

    text = " ".join(["The tide comes in and goes out twice a day."] * 40)
    reference = train([])
    ppl = {}
    for fast in (False, True):
        ppl[fast] = PerplexityEvaluation(text=text, seq_len=32, max_windows=2, progress=False, fast_4bit=fast)
        weights = train([ppl[fast]])
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[n], reference[n]) for n in reference), f"fast_4bit={fast} changed training"
    exact, fast = ppl[False].results["before"]["ppl"], ppl[True].results["before"]["ppl"]
    assert exact != fast  # the packed kernel did run
    if has_avx512bf16():  # elsewhere the forced packed layout is not what the CPU kernels read
        assert abs(fast - exact) / exact < 1e-2
