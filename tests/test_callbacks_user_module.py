"""slimtune's callbacks in a user's own LightningModule: the model under another name than `.model`, found by itself,
by `model='attribute'` or `model=<module>`; one-line errors when there is no model or several; argument checks."""

import copy
import math

import lightning.pytorch as L
import pytest
import torch
from conftest import TINY_LLAMA

from slimtune.assets import TINY_TOKENIZER
from slimtune.data.datasets import default_corpus_path
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.callbacks import ActivationOutlierMonitor, CompressionStats, PerplexityEvaluation, PostTrainingQuantization
from slimtune.callbacks._base import resolve_model
from slimtune.select import linear_layers
from slimtune.errors import SlimtuneError
from slimtune.eval.perplexity import perplexity, tokenize_eval_text
from slimtune.quant import QuantLinear

TEXT = open(default_corpus_path(), encoding="utf-8").read()[:6000]
CALLBACKS = [PerplexityEvaluation, CompressionStats, PostTrainingQuantization, ActivationOutlierMonitor]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: on a busy shared CPU, OpenMP's threads make each op far slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = dict(TINY_LLAMA)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def tiny_lora_llama(seed: int = 0):
    """A frozen tiny Llama with LoRA adapters (a PEFT PeftModel): what PostTrainingQuantization quantizes."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


class UserLM(L.LightningModule):
    """A user's module: the LM under `self.lm` (or deeper), next to a head that is not part of the model."""

    def __init__(self, lm: nn.Module | None, tokenizer=None, nest: bool = False, **others: nn.Module):
        super().__init__()
        if nest:  # model='wrapper.lm'
            self.wrapper = nn.Module()
            self.wrapper.lm = lm
        elif lm is not None:
            self.lm = lm
        for name, module in others.items():
            setattr(self, name, module)
        self.head = nn.Linear(64, 3)  # trainable, not the LM: must not be counted, quantized or watched
        self.tokenizer = tokenizer

    @property
    def language_model(self) -> nn.Module:
        for path in ("wrapper.lm", "lm", "model", "student"):
            try:
                return self.get_submodule(path)
            except AttributeError:
                continue
        raise AttributeError("UserLM holds no language model")

    def training_step(self, batch, batch_idx):
        return self.language_model(input_ids=batch[0], labels=batch[0]).loss + 0.0 * self.head.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def loader():
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


def fit(module: L.LightningModule, callbacks: list, steps: int = 2, root=None) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root)
    trainer.fit(module, loader())
    return trainer


def one_line_error(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the model under self.lm


@pytest.mark.parametrize("form", ["found", "name", "object", "dotted"])
def test_every_callback_works_on_the_model_under_lm_and_nothing_else(form, tiny_tokenizer, tmp_path):
    lm = tiny_lora_llama()
    module = UserLM(lm, tiny_tokenizer, nest=form == "dotted")
    model_arg = {"found": None, "name": "lm", "object": lm, "dotted": "wrapper.lm"}[form]
    head_weight = module.head.weight.detach().clone()
    lm_linears = set(linear_layers(lm))
    lm_params = sum(p.numel() for p in lm.parameters())  # before quantization: what the layers stand for
    ids = tokenize_eval_text(TEXT, tiny_tokenizer)
    expected_ppl = perplexity(copy.deepcopy(lm), ids, 32, 2, progress=False)["ppl"]

    ptq = PostTrainingQuantization(method="rtn", bits=4, group_size=32, progress=False, verbose=False, model=model_arg)
    ppl = PerplexityEvaluation(text=TEXT, seq_len=32, max_windows=2, progress=False, model=model_arg)
    stats = CompressionStats(verbose=False, model=model_arg)
    monitor = ActivationOutlierMonitor(every_n_steps=1, plot=False, verbose=False, model=model_arg)
    fit(module, [ptq, ppl, stats, monitor], root=tmp_path)

    # PerplexityEvaluation measured the LM: its float perplexity is the one computed here, and all are finite.
    assert ppl.results["before_quant"]["ppl"] == pytest.approx(expected_ppl, rel=1e-5)
    assert all(math.isfinite(r["ppl"]) for r in ppl.results.values())
    assert {"before", "after"} <= set(ppl.results)
    # PostTrainingQuantization quantized the LM's linear layers (lm_head excluded) and left the head alone.
    quantized = {n.removesuffix(".base_layer") for n, m in lm.get_base_model().named_modules() if isinstance(m, QuantLinear)}
    assert quantized == lm_linears - {"lm_head"} and len(quantized) == ptq.n_layers == 14
    assert type(module.head) is nn.Linear and torch.equal(module.head.weight, head_weight)  # zero gradient: unchanged
    # CompressionStats counted the LM's parameters (quantized ones at their logical size), not the head's.
    assert stats.stats["total_params"] == lm_params
    assert stats.stats["trainable_params"] == sum(p.numel() for p in lm.parameters() if p.requires_grad)
    # ActivationOutlierMonitor watched exactly the LM's linear layers, named as the LM names them.
    rows = monitor.summary()
    assert {r["layer"] for r in rows} == lm_linears and all(r["calls"] > 0 for r in rows)
    assert (tmp_path / "outliers.csv").is_file()  # the table of a Trainer without loggers: in default_root_dir


def test_perplexity_of_a_plain_model_under_another_name_trains(tiny_tokenizer):
    lm = tiny_llama()
    ppl = PerplexityEvaluation(text=TEXT, seq_len=32, max_windows=2, progress=False)
    stats = CompressionStats(verbose=False)
    fit(UserLM(lm, tiny_tokenizer), [ppl, stats], steps=3)
    before, after = ppl.results["before"]["ppl"], ppl.results["after"]["ppl"]
    assert math.isfinite(before) and math.isfinite(after) and before != after  # the LM trained in between
    assert stats.stats["total_params"] == stats.stats["trainable_params"] == sum(p.numel() for p in lm.parameters())


# --------------------------------------------------------------------------- no model, several models


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_no_model_is_one_line_saying_where_to_put_it(callback, tiny_tokenizer):
    class NoModelLM(UserLM):
        pass

    module = NoModelLM(None, tiny_tokenizer)
    module.layers = nn.ModuleList([tiny_llama()])  # a model inside a container is not guessed at
    kwargs = {"text": TEXT} if callback is PerplexityEvaluation else {"method": "rtn"} if callback is PostTrainingQuantization else {}
    with pytest.raises(SlimtuneError) as err:
        fit(module, [callback(**kwargs)], steps=1)
    message = one_line_error(err)
    assert message.startswith(f"{callback.__name__} found no model in NoModelLM: store it as self.model, pass model=")


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_a_student_and_a_teacher_need_model_argument(callback, tiny_tokenizer):
    student, teacher = tiny_lora_llama(0), tiny_llama(1)
    kwargs = {"text": TEXT} if callback is PerplexityEvaluation else {"method": "rtn"} if callback is PostTrainingQuantization else {}
    with pytest.raises(SlimtuneError) as err:
        fit(UserLM(None, tiny_tokenizer, student=student, teacher=teacher), [callback(**kwargs)], steps=1)
    message = one_line_error(err)
    assert (f"{callback.__name__} found 2 models in UserLM: student (PeftModel), teacher (LlamaForCausalLM); "
            f"valid: pass model='student' or model='teacher' to {callback.__name__}") in message


def test_model_argument_picks_the_student():
    student, teacher = tiny_lora_llama(0), tiny_llama(1)
    module = UserLM(None, student=student, teacher=teacher)
    stats = CompressionStats(verbose=False, model="student")
    fit(module, [stats], steps=1)
    assert stats.stats["total_params"] == sum(p.numel() for p in student.parameters())
    assert stats.stats["trainable_params"] == sum(p.numel() for p in student.parameters() if p.requires_grad) > 0


def test_self_model_wins_and_an_unregistered_teacher_is_a_candidate():
    student, teacher = tiny_llama(0), tiny_llama(1)
    module = UserLM(None, model=student)
    module.__dict__["teacher"] = teacher  # kept out of parameters(), as distillation code does
    assert resolve_model(module) is student  # the documented place wins over any other candidate
    del module.model
    module.lm = student
    with pytest.raises(SlimtuneError, match=r"found 2 models in UserLM: lm \(LlamaForCausalLM\), teacher \(LlamaForCausalLM\)"):
        resolve_model(module, owner="CompressionStats")
    assert resolve_model(module, "teacher") is teacher
    del module.teacher
    module.peft = tiny_lora_llama(2)
    module.base = module.peft.get_base_model()  # held twice: beside its PEFT wrapper and inside it
    with pytest.raises(SlimtuneError, match=r"found 2 models in UserLM: lm \(LlamaForCausalLM\), peft \(PeftModel\);"):
        resolve_model(module)
    del module.lm
    assert resolve_model(module) is module.peft  # the outermost stands for the model it wraps
    assert resolve_model(student) is student  # the model itself, outside a LightningModule


@pytest.mark.parametrize("model, message", [
    ("missing", "CompressionStats model='missing': UserLM has no attribute 'missing'; valid: an attribute of UserLM "
                "holding the model (modules it holds: 'lm', 'head')"),
    ("lm.nothing", "CompressionStats model='lm.nothing': UserLM.lm has no attribute 'nothing'"),
    ("tokenizer", "CompressionStats model='tokenizer': UserLM.tokenizer is a {tokenizer}, not an nn.Module"),
    ("another", "CompressionStats model=<LlamaForCausalLM> is not held by the UserLM being fit"),
], ids=["missing", "missing-inside", "not-a-module", "not-held"])
def test_model_argument_that_names_no_model_fails_at_fit_start(model, message, tiny_tokenizer):
    module = UserLM(tiny_llama(), tiny_tokenizer)
    cb = CompressionStats(verbose=False, model=tiny_llama(1) if model == "another" else model)
    with pytest.raises(SlimtuneError) as err:
        fit(module, [cb], steps=1)
    assert message.format(tokenizer=type(tiny_tokenizer).__name__) in one_line_error(err)


# --------------------------------------------------------------------------- the tokenizer


def test_missing_tokenizer_says_where_to_put_it(text_file):
    with pytest.raises(SlimtuneError) as err:
        fit(UserLM(tiny_llama()), [PerplexityEvaluation(text=TEXT, seq_len=32, progress=False)], steps=1)
    assert one_line_error(err) == ("PerplexityEvaluation needs a tokenizer to tokenize its text and found none: pass "
                                   "tokenizer=<a tokenizer or its path> to PerplexityEvaluation, or store it as "
                                   "self.tokenizer in UserLM")
    ptq = PostTrainingQuantization(method="gptq", calibration=str(text_file), n_samples=2, seq_len=16, progress=False,
                                   verbose=False)
    with pytest.raises(SlimtuneError) as err:
        fit(UserLM(tiny_lora_llama()), [ptq], steps=1)
    assert one_line_error(err).startswith("PostTrainingQuantization needs a tokenizer for method=gptq's calibration text "
                                          "and found none: pass tokenizer=")


def test_tokenizer_path_is_loaded_or_refused_in_one_line(tmp_path):
    ppl = PerplexityEvaluation(text=TEXT, seq_len=32, max_windows=1, progress=False, tokenizer=TINY_TOKENIZER)
    fit(UserLM(tiny_llama()), [ppl], steps=1)
    assert math.isfinite(ppl.results["after"]["ppl"])
    bad = PerplexityEvaluation(text=TEXT, seq_len=32, progress=False, tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(SlimtuneError) as err:
        fit(UserLM(tiny_llama()), [bad], steps=1)
    assert one_line_error(err).startswith(f"PerplexityEvaluation tokenizer='{tmp_path / 'no-tokenizer'}' could not be loaded")


def test_perplexity_refuses_a_model_that_takes_no_input_ids(tiny_tokenizer):
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(50257, 50257 // 1000)

        def forward(self, idx, targets=None):
            return self.table(idx)

    module = UserLM(tiny_llama(), tiny_tokenizer)
    module.bigram = Bigram()
    with pytest.raises(SlimtuneError) as err:
        fit(module, [PerplexityEvaluation(text=TEXT, seq_len=32, progress=False, model="bigram")], steps=1)
    assert one_line_error(err).startswith("PerplexityEvaluation needs a causal LM called as model(input_ids=...) "
                                          "returning .logits; Bigram.forward takes (idx, targets)")


# --------------------------------------------------------------------------- argument checks


BAD_ARGUMENTS = [
    (PerplexityEvaluation, {"seq_len": "abc"}, "seq_len='abc' is not valid; valid: an int >= 2, or null"),
    (PerplexityEvaluation, {"seq_len": 1}, "seq_len=1 is not valid"),
    (PerplexityEvaluation, {"seq_len": 64.5}, "seq_len=64.5 is not valid"),
    (PerplexityEvaluation, {"seq_len": True}, "seq_len=True is not valid"),
    (PerplexityEvaluation, {"max_windows": -3}, "max_windows=-3 is not valid; valid: a positive int, or null"),
    (PerplexityEvaluation, {"max_windows": "all"}, "max_windows='all' is not valid"),
    (PerplexityEvaluation, {"batch_size": 0}, "batch_size=0 is not valid; valid: a positive int"),
    (PerplexityEvaluation, {"batch_size": 2.0}, "batch_size=2.0 is not valid"),
    (PerplexityEvaluation, {"progress": "false"}, "progress='false' is not valid; valid: true, false"),
    (PerplexityEvaluation, {"at": "fit_middle"}, "at=['fit_middle'] is not valid; valid: fit_start, fit_end"),
    (PerplexityEvaluation, {"at": []}, "at=[] is not valid; valid: fit_start, fit_end"),
    (PerplexityEvaluation, {"at": 3}, "at=3 is not valid"),
    (PerplexityEvaluation, {"name": ""}, "name='' is not valid; valid: a non-empty string"),
    (PerplexityEvaluation, {"name": 7}, "name=7 is not valid"),
    (PerplexityEvaluation, {"tokenizer": 5}, "tokenizer=5 is not valid; valid: null"),
    (PerplexityEvaluation, {"path": 5}, "path=5 is not valid; valid: a path, or null"),
    (PerplexityEvaluation, {"text": ""}, "text='' is not valid; valid: a non-empty string, or null"),
    (PerplexityEvaluation, {"text": ["a", "b"]}, "text=['a', 'b'] is not valid"),
    (PerplexityEvaluation, {"path": "x.txt", "text": "y"}, "PerplexityEvaluation takes path or text, not both"),
    (PerplexityEvaluation, {"model": 5}, "model=5 is not valid; valid: null"),
    (PerplexityEvaluation, {"model": ""}, "model='' is not valid"),
    (PerplexityEvaluation, {"model": "my lm"}, "model='my lm' is not valid"),
    (CompressionStats, {"name": ""}, "CompressionStats name='' is not valid"),
    (CompressionStats, {"name": None}, "CompressionStats name=None is not valid"),
    (CompressionStats, {"verbose": "yes"}, "CompressionStats verbose='yes' is not valid; valid: true, false"),
    (CompressionStats, {"model": ["lm"]}, "CompressionStats model=['lm'] is not valid"),
    (ActivationOutlierMonitor, {"threshold": "6"}, "threshold='6' is not valid; valid: a positive number"),
    (ActivationOutlierMonitor, {"threshold": float("nan")}, "threshold=nan is not valid"),
    (ActivationOutlierMonitor, {"threshold": -1.0}, "threshold=-1.0 is not valid"),
    (ActivationOutlierMonitor, {"every_n_steps": 2.0}, "every_n_steps=2.0 is not valid; valid: a positive int"),
    (ActivationOutlierMonitor, {"every_n_steps": -5}, "every_n_steps=-5 is not valid"),
    (ActivationOutlierMonitor, {"share_level": 1.0}, "share_level=1.0 is not valid; valid: a number in [0, 1)"),
    (ActivationOutlierMonitor, {"share_level": True}, "share_level=True is not valid"),
    (ActivationOutlierMonitor, {"ratio_level": 0}, "ratio_level=0 is not valid; valid: a positive number"),
    (ActivationOutlierMonitor, {"plot": "no"}, "plot='no' is not valid; valid: true, false"),
    (ActivationOutlierMonitor, {"verbose": 1}, "verbose=1 is not valid; valid: true, false"),
    (ActivationOutlierMonitor, {"name": ""}, "ActivationOutlierMonitor name='' is not valid"),
    (ActivationOutlierMonitor, {"patterns": 5}, "patterns=5 is not valid"),
    (ActivationOutlierMonitor, {"exclude": 5}, "exclude=5 is not valid; valid: a list of name patterns"),
    (ActivationOutlierMonitor, {"model": 2.5}, "ActivationOutlierMonitor model=2.5 is not valid"),
    (PostTrainingQuantization, {"method": "RTN"}, "method='RTN' is not valid; valid: rtn, gptq, nf4, gptq_nf4, awq, awq_gptq, smoothquant"),
    (PostTrainingQuantization, {"method": None}, "method=None is not valid"),
    (PostTrainingQuantization, {"bits": "4"}, "bits='4' is not valid; valid: 2, 3, 4, 8"),
    (PostTrainingQuantization, {"bits": 4.0}, "bits=4.0 is not valid"),
    (PostTrainingQuantization, {"group_size": -1}, "group_size=-1 is not valid; valid: a positive int or null"),
    (PostTrainingQuantization, {"symmetric": "true"}, "symmetric='true' is not valid; valid: true, false"),
    (PostTrainingQuantization, {"damp": "0.01"}, "damp='0.01' is not valid; valid: a float in [0, 1)"),
    (PostTrainingQuantization, {"n_samples": 1.5}, "n_samples=1.5 is not valid; valid: an int >= 1"),
    (PostTrainingQuantization, {"seq_len": 1}, "seq_len=1 is not valid; valid: an int >= 2"),
    (PostTrainingQuantization, {"seed": "0"}, "seed='0' is not valid; valid: an int"),
    (PostTrainingQuantization, {"lorc_rank": 2.5}, "lorc_rank=2.5 is not valid"),
    (PostTrainingQuantization, {"lorc_iters": 0}, "lorc_iters=0 is not valid"),
    (PostTrainingQuantization, {"scale_dtype": "fp16"}, "scale_dtype='fp16' is not valid; valid: float16, bfloat16, float32"),
    (PostTrainingQuantization, {"targets": 5}, "targets=5 is not valid"),
    (PostTrainingQuantization, {"exclude": 5}, "exclude=5 is not valid; valid: a list of name patterns"),
    (PostTrainingQuantization, {"progress": "yes"}, "progress='yes' is not valid; valid: true, false"),
    (PostTrainingQuantization, {"verbose": None}, "verbose=None is not valid; valid: true, false"),
    (PostTrainingQuantization, {"export_dir": 5}, "export_dir=5 is not valid; valid: a path, or null"),
    (PostTrainingQuantization, {"export_dir": ""}, "export_dir='' is not valid"),
    (PostTrainingQuantization, {"tokenizer": 3.0}, "tokenizer=3.0 is not valid"),
    (PostTrainingQuantization, {"model": 0}, "PostTrainingQuantization model=0 is not valid"),
]


@pytest.mark.parametrize("callback, kwargs, message", BAD_ARGUMENTS,
                         ids=[f"{c.__name__}-{'-'.join(k)}-{i}" for i, (c, k, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_are_one_line_errors_naming_the_value(callback, kwargs, message):
    extra = {"method": "rtn"} if callback is PostTrainingQuantization and "method" not in kwargs else {}
    with pytest.raises(SlimtuneError) as err:
        callback(**extra, **kwargs)
    assert message in one_line_error(err)


def test_good_arguments_are_kept():
    ppl = PerplexityEvaluation(text="x", seq_len=64, max_windows=None, batch_size=2, at="fit_end", name="wiki",
                               progress=False, model="lm")
    assert (ppl.seq_len, ppl.max_windows, ppl.batch_size, ppl.at, ppl.model) == (64, None, 2, ("fit_end",), "lm")
    from omegaconf import OmegaConf  # Hydra without _convert_: list-like settings arrive as ListConfig

    monitor = ActivationOutlierMonitor(patterns=OmegaConf.create(["q_proj"]), exclude=OmegaConf.create([]))
    assert monitor.patterns == ["q_proj"] and monitor.exclude == []
