"""GradualPruning and OneShotPruning through slimtune's run and the real Trainer on a tiny Llama: the schedule's
target is reached and logged, pruned weights stay zero through optimizer steps and the LoRA merge, resume equals the
uninterrupted run, masks are identical on every rank of 2 CPU processes, and bad input is one line."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose, tiny_run_overrides
from slimtune.callbacks import GradualPruning, OneShotPruning
from slimtune.errors import SlimtuneError
from slimtune.prune import CubicSchedule
from slimtune.run import finish, fit, prepare, run

STEPS, END, EVERY = 10, 6, 2


def _overrides(out: Path, text_file, *extra):
    return [*tiny_run_overrides(out, f"data.path={text_file}", "model.quantization=none",
                                "callbacks=[gradual_pruning]", f"trainer.max_steps={STEPS}",
                                f"callbacks.gradual_pruning.end_step={END}",
                                f"callbacks.gradual_pruning.update_every={EVERY}", "optimizer.lr=5e-3",
                                "trainer.limit_val_batches=0"), *extra]


def _pruning(job):
    return next(cb for cb in job.callbacks if isinstance(cb, (GradualPruning, OneShotPruning)))


def _logged_targets(out: Path) -> dict[int, float]:
    rows = csv.DictReader(open(out / "logs" / "metrics.csv"))
    return {int(r["step"]): float(r["prune/target_sparsity"]) for r in rows if r.get("prune/target_sparsity")}


def test_full_finetune_reaches_the_target_and_pruned_weights_stay_zero_through_optimizer_steps(tmp_path, text_file):
    cfg = compose(*_overrides(tmp_path, text_file, "model.finetune=full", "optimizer.weight_decay=0.1"))
    job = prepare(cfg)
    callback = _pruning(job)
    seen = {}
    from lightning.pytorch import Callback

    class AtEnd(Callback):  # records the masks at the end of the schedule and the weights then
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == END:
                seen["masks"] = {n: m.clone() for n, m in callback.masks.items()}
                seen["weights"] = {n: r.layer.weight.detach().clone() for n, r in callback._refs.items()}

    job.callbacks.append(AtEnd())
    report = finish(fit(job))
    out = Path(cfg.output_dir)
    assert report["prune_sparsity"] == 0.5 and report["prune_target"] == 0.5
    assert report["prune_sparsity_q_proj"] == report["prune_sparsity_down_proj"] == 0.5
    for name, mask in seen["masks"].items():
        weight = callback._refs[name].layer.weight.detach()
        assert int((~mask).sum()) == mask.numel() // 2
        assert (weight[~mask] == 0).all(), name  # 4 more AdamW steps with weight decay: still zero
        assert not torch.equal(weight[mask], seen["weights"][name][mask])  # the kept weights trained on
    schedule = CubicSchedule(0.5, 0, END, update_every=EVERY)
    logged = _logged_targets(out)
    assert logged == pytest.approx({s: schedule.target(s) for s in range(STEPS)})
    assert logged[1] == 0.0 and 0 < logged[2] < logged[4] < logged[6] == 0.5
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    measured = {int(r["step"]): float(r["prune/sparsity"]) for r in rows if r.get("prune/sparsity")}
    assert measured == pytest.approx({s: schedule.target(s) for s in schedule.update_steps()}, abs=1e-3)
    merged = load_file(out / "merged" / "model.safetensors")
    assert all(torch.equal(merged[f"{n}.weight"] == 0, ~seen["masks"][n].cpu()) for n in seen["masks"])
    table = list(csv.DictReader(open(out / "pruning" / "sparsity.csv")))
    assert len(table) == 14 and {float(r["sparsity"]) for r in table} == {0.5}


def test_lora_prunes_the_base_and_the_merge_keeps_the_zeros(tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    cfg = compose(*_overrides(tmp_path, text_file, "callbacks.gradual_pruning.score=wanda",
                              "callbacks.gradual_pruning.start_step=1", "callbacks.gradual_pruning.granularity=row",
                              "callbacks.gradual_pruning.mask_adapter=true"))
    job = prepare(cfg)
    report = finish(fit(job))
    callback = _pruning(job)
    assert report["prune_sparsity"] == 0.5
    merged = load_file(Path(cfg.output_dir) / "merged" / "model.safetensors")
    for name, ref in callback._refs.items():
        mask = callback.masks[name].cpu()
        assert ((~mask).sum(dim=1) == mask.shape[1] // 2).all()  # per output row
        delta = ref.wrapper.get_delta_weight("default").detach()
        assert delta[~mask].abs().max() > 0, "the adapter trained on pruned positions: the merge must mask it"
        weight = merged[f"{name}.weight"]
        assert (weight[~mask] == 0).all()
        torch.testing.assert_close(weight[mask], (ref.layer.weight.detach() + delta)[mask])
    # mask_adapter: the trained LoRA model computes what the merged model computes
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = job.model.eval()(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(report["merged_dir"]).eval()(input_ids=ids).logits
    torch.testing.assert_close(trained, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))


def test_structured_pruning_exports_a_smaller_model_that_computes_as_the_pruned_one(tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    cfg = compose(*_overrides(tmp_path, text_file, "callbacks.gradual_pruning.granularity=channels",
                              "trainer.max_steps=3", "callbacks.gradual_pruning.end_step=2",
                              "callbacks.gradual_pruning.final_sparsity=0.25", "export.shrunk=true"))
    report = run(cfg)
    assert report["prune_shrunk_channels_removed"] == 32  # a quarter of 128 in each block
    merged = AutoModelForCausalLM.from_pretrained(report["merged_dir"]).eval()
    small = AutoModelForCausalLM.from_pretrained(report["shrunk_dir"]).eval()
    assert small.config.intermediate_size == 96 and small.model.layers[1].mlp.down_proj.weight.shape == (64, 96)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in merged.parameters()) - 2 * 3 * 32 * 64
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def _resume_overrides(out, text_file, *extra):
    return _overrides(out, text_file, "callbacks.gradual_pruning.score=wanda", "callbacks.gradual_pruning.start_step=1",
                      "model.lora.dropout=0.1", "checkpoint.every_n_train_steps=4", "checkpoint.save_top_k=-1", "export.merged=false", *extra)


@pytest.mark.slow  # 40 s on 2 busy cores: run by CI's slow step
def test_resume_mid_schedule_ends_where_the_uninterrupted_run_ends(tmp_path, text_file):
    straight = compose(*_resume_overrides(tmp_path / "a", text_file))
    job = prepare(straight)
    finish(fit(job))
    straight_masks = {n: m.cpu() for n, m in _pruning(job).masks.items()}
    ckpt = Path(straight.output_dir) / "checkpoints" / "step4.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    pruning_state = next(v for k, v in state.items() if "GradualPruning" in k)
    assert pruning_state["last_update"] == 3 and pruning_state["accumulators"]  # between updates 3 and 5
    resumed_dir = tmp_path / "b"
    (resumed_dir / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, resumed_dir / "run" / "checkpoints" / "last.ckpt")
    resumed = compose(*_resume_overrides(resumed_dir, text_file, "ckpt_path=last"))
    job = prepare(resumed)
    report = finish(fit(job))
    assert report["steps"] == STEPS
    masks = {n: m.cpu() for n, m in _pruning(job).masks.items()}
    assert masks.keys() == straight_masks.keys() and all(torch.equal(masks[n], straight_masks[n]) for n in masks)
    a = load_file(Path(straight.output_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(resumed.output_dir) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logged_targets(Path(resumed.output_dir))[9] == 0.5


MASK_DUMP = '''
import torch
from lightning.pytorch import Callback


class DumpMasks(Callback):
    """Test helper: every rank writes its pruning masks and pruned weights at fit end."""

    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        from slimtune.callbacks import GradualPruning, OneShotPruning

        cb = next(c for c in trainer.callbacks if isinstance(c, (GradualPruning, OneShotPruning)))
        torch.save({"masks": {n: m.cpu() for n, m in cb.masks.items()},
                    "weights": {n: r.layer.weight.detach().cpu() for n, r in cb._refs.items()}},
                   f"{self.folder}/rank{trainer.global_rank}.pt")
'''


def _two_processes(tmp_path, args):
    (tmp_path / "dump_masks.py").write_text(MASK_DUMP)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(tmp_path), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    args = [*args, "trainer.devices=2", "data.batch_size=2", "export.merged=false",
            "+callbacks.dump._target_=dump_masks.DumpMasks", f"+callbacks.dump.folder={tmp_path}"]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["masks"]
    for name, mask in ranks[0]["masks"].items():
        assert int((~mask).sum()) == mask.numel() // 2
        assert torch.equal(mask, ranks[1]["masks"][name])
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])


@pytest.mark.slow  # 2 processes, about a minute each
@pytest.mark.parametrize("strategy, finetune", [("ddp", "full"), ("deepspeed_zero2", "lora")])
def test_masks_are_identical_on_every_rank_of_two_processes(tmp_path, text_file, strategy, finetune):
    # Wanda scores come from each rank's own batches: without the broadcast the masks would differ
    _two_processes(tmp_path, _overrides(tmp_path / "run", text_file, f"strategy={strategy}",
                                        "callbacks.gradual_pruning.score=wanda", "callbacks.gradual_pruning.start_step=1",
                                        f"model.finetune={finetune}", "trainer.max_steps=6",
                                        "callbacks.gradual_pruning.end_step=4"))


@pytest.mark.slow
def test_one_shot_sparsegpt_gives_every_rank_the_same_pruned_base(tmp_path, text_file):
    preset = "callbacks.oneshot_sparsegpt_50"
    _two_processes(tmp_path, tiny_run_overrides(
        tmp_path / "run", f"data.path={text_file}", "model.quantization=none", "callbacks=[oneshot_sparsegpt_50]",
        "strategy=ddp", "trainer.max_steps=2", "trainer.limit_val_batches=0", f"{preset}.calibration=corpus",
        f"{preset}.n_samples=4", f"{preset}.seq_len=64", f"{preset}.progress=false"))


@pytest.mark.parametrize("method, extra, pattern", [
    pytest.param("sparsegpt", [], None, marks=pytest.mark.slow),
    pytest.param("wanda", ["callbacks.oneshot_sparsegpt_50.nm='2:4'"], (2, 4), marks=pytest.mark.slow),
])
def test_one_shot_pruning_at_fit_start_then_lora_recovery_keeps_the_masks(tmp_path, text_file, method, extra, pattern):
    preset = "callbacks.oneshot_sparsegpt_50"
    overrides = [*tiny_run_overrides(tmp_path, f"data.path={text_file}", "model.quantization=none",
                                     "callbacks=[oneshot_sparsegpt_50,perplexity]", "trainer.max_steps=4",
                                     "callbacks.perplexity.max_windows=2", "trainer.limit_val_batches=0",
                                     f"{preset}.method={method}", f"{preset}.calibration=corpus",
                                     f"{preset}.n_samples=4", f"{preset}.seq_len=64", f"{preset}.progress=false",
                                     *extra)]
    cfg = compose(*overrides)
    job = prepare(cfg)
    report = finish(fit(job))
    callback = _pruning(job)
    ppl = next(cb for cb in job.callbacks if type(cb).__name__ == "PerplexityEvaluation")
    assert ppl.results["after_prune"]["ppl"] != ppl.results["before_prune"]["ppl"]
    assert report["prune_sparsity"] == 0.5 and report["prune_layers"] == 14
    merged = load_file(Path(cfg.output_dir) / "merged" / "model.safetensors")
    for name, mask in callback.masks.items():
        weight = merged[f"{name}.weight"]
        assert torch.equal(weight == 0, ~mask.cpu())
        if pattern:
            assert ((weight != 0).reshape(weight.shape[0], -1, pattern[1]).sum(-1) == pattern[0]).all()
    # resume: a fresh callback rebuilds the pruned (SparseGPT-updated) base from its state, without calibrating
    fresh_job = prepare(compose(*overrides))
    fresh = _pruning(fresh_job)
    fresh.load_state_dict(callback.state_dict())
    fresh.prune = None  # calling it would fail: restoring must not prune again

    class Trainer:
        ckpt_path = None
        callbacks = []

    from lightning.pytorch.strategies import SingleDeviceStrategy

    Trainer.strategy = SingleDeviceStrategy(torch.device("cpu"))
    fresh.on_fit_start(Trainer, fresh_job.module)
    for name, ref in fresh._refs.items():
        torch.testing.assert_close(ref.layer.weight, callback._refs[name].layer.weight)


@pytest.mark.parametrize("kwargs, message", [
    ({"final_sparsity": 1.0, "end_step": 5}, r"final_sparsity=1.0 is not valid; valid: a number in \[0, 1\)"),
    ({"final_sparsity": -0.1, "end_step": 5}, "final_sparsity=-0.1 is not valid"),
    ({"end_step": 5, "start_step": 8}, "end_step=5 is before start_step=8"),
    ({"end_step": None}, "end_step=None is not valid"),
    ({"end_step": 5, "granularity": "nm", "nm": "4:4"}, "N:M pattern 4:4 is not valid"),
    ({"end_step": 5, "granularity": "nm", "nm": "2:4", "final_sparsity": 0.3}, "contradicts nm='2:4'"),
    ({"end_step": 5, "score": "wanda"}, "score=wanda needs start_step >= 1"),
    ({"end_step": 5, "score": "obs"}, "score='obs' is not valid; valid: magnitude, wanda, movement, taylor"),
    ({"end_step": 5, "granularity": "block"}, "granularity='block' is not valid"),
    ({"end_step": 5, "layer_sparsity": {"self_attn": 1.2}}, r"layer_sparsity\['self_attn'\]=1.2 is not valid"),
])
def test_bad_gradual_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError, match=message):
        GradualPruning(**kwargs)


@pytest.mark.parametrize("extra, message", [
    (["callbacks.gradual_pruning.end_step=50"], "end_step=50 is beyond trainer.max_steps=10; valid: end_step <= 10"),
    (["callbacks.gradual_pruning.score=movement", "callbacks.gradual_pruning.start_step=1"],
     "score=movement needs gradients of the pruned weights and model.finetune=lora freezes them"),
    (["callbacks.gradual_pruning.targets=[nothing_here]"], "targets pattern 'nothing_here' matches no layer"),
    (["callbacks.gradual_pruning.granularity=nm", "callbacks.gradual_pruning.final_sparsity=null",
      "callbacks.gradual_pruning.nm='3:5'"], "M=5 does not divide the input width"),
    (["callbacks.gradual_pruning.layer_sparsity={.*mlp.*: 0.3, no_such: 0.2}"], "pattern 'no_such' matches no target"),
    (["export.shrunk=true"], "export.shrunk=true needs structured pruning and GradualPruning has granularity=layer"),
    (["callbacks.gradual_pruning.granularity=heads", "callbacks.gradual_pruning.targets=[q_proj]"],
     "needs model.layers.0.self_attn.o_proj among the targets"),
])
def test_bad_runs_are_refused_before_training(tmp_path, text_file, extra, message):
    with pytest.raises(SlimtuneError, match=message):
        prepare(compose(*_overrides(tmp_path, text_file, *extra)))
    assert not (tmp_path / "run").exists()


def test_one_shot_bad_input():
    with pytest.raises(SlimtuneError, match="method='obs' is not valid; valid: magnitude, wanda, sparsegpt"):
        OneShotPruning(method="obs")
    with pytest.raises(SlimtuneError, match="quant_bits=4 is not valid with method=wanda"):
        OneShotPruning(method="wanda", quant_bits=4, calibration="corpus")
    with pytest.raises(SlimtuneError, match=r"sparsity=1.5 is not valid; valid: a number in \[0, 1\)"):
        OneShotPruning(method="magnitude", sparsity=1.5)
    with pytest.raises(SlimtuneError, match="calibration"):
        OneShotPruning(method="sparsegpt", calibration="/no/such/file.jsonl")


# --------------------------------------------------------------------------- the callback's update, without a Trainer


class _Trainer:
    """What the callback reads of a Trainer outside a fit: one process, no checkpoint."""

    world_size, global_step, ckpt_path, callbacks = 1, 0, None, []

    def __init__(self):
        from lightning.pytorch.strategies import SingleDeviceStrategy

        self.strategy = SingleDeviceStrategy(torch.device("cpu"))


def _tiny_llama(trainable=False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA))
    return model.requires_grad_(trainable)


def _started(callback, model):
    callback.setup(_Trainer(), model, "fit")
    callback.on_fit_start(_Trainer(), model)
    return callback


def test_per_layer_targets_keep_attention_denser():
    model = _tiny_llama()
    cb = _started(GradualPruning(0.5, end_step=4, layer_sparsity={".*self_attn.*": 0.25}), model)
    cb.update(2)  # on the way: each layer at its own final times the schedule's fraction
    fraction = cb.schedule.target(2) / 0.5
    for name, mask in cb.masks.items():
        final = 0.25 if "self_attn" in name else 0.5
        assert int((~mask).sum()) == round(final * fraction * mask.numel())
    cb.update(4)
    s = cb.sparsity()["by_type"]
    assert s["q_proj"] == s["o_proj"] == 0.25 and s["up_proj"] == s["down_proj"] == 0.5


def test_owl_gives_outlier_rich_blocks_lower_sparsity_averaging_the_target():
    model = _tiny_llama()
    with torch.no_grad():  # block 1 gets heavy outliers
        model.model.layers[1].mlp.up_proj.weight[:, :3] *= 40
    cb = _started(GradualPruning(0.5, end_step=1, owl={"lambda": 0.1, "threshold": 5}), model)
    cb.update(1)
    per_block = {}
    for name, mask in cb.masks.items():
        block = name.split(".")[2]
        z, n = per_block.get(block, (0, 0))
        per_block[block] = (z + int((~mask).sum()), n + mask.numel())
    s0, s1 = (z / n for z, n in (per_block["0"], per_block["1"]))
    assert s1 < s0 and s0 - s1 == pytest.approx(0.2, abs=0.01)
    assert cb.layer_final["model.layers.0.mlp.up_proj"] == pytest.approx(0.6)


@pytest.mark.parametrize("granularity, extra", [("global", {}), ("nm", {"nm": "2:4", "final_sparsity": None}),
                                                 ("heads", {}), ("channels", {})])
def test_every_granularity_reaches_its_pattern_gradually(granularity, extra):
    model = _tiny_llama()
    kwargs = {"final_sparsity": 0.5, **extra}
    cb = _started(GradualPruning(end_step=4, granularity=granularity, **kwargs), model)
    cb.update(1)
    middle = sum(int((~m).sum()) for m in cb.masks.values())
    cb.update(4)
    final = {n: m.clone() for n, m in cb.masks.items()}
    pruned = sum(int((~m).sum()) for m in final.values())
    assert 0 < middle < pruned
    if granularity == "global":
        assert pruned == round(0.5 * sum(m.numel() for m in final.values()))
    elif granularity == "nm":
        assert all((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all() for m in final.values())
        assert cb.schedule.target(1) >= 0.25  # 2:4's first step zeros 1 of 4 once the target passes 0.25
        assert middle == sum(m.numel() for m in final.values()) // 4
    elif granularity == "heads":
        q, o = final["model.layers.0.self_attn.q_proj"], final["model.layers.0.self_attn.o_proj"]
        assert len((~q.any(dim=1)).nonzero().flatten().div(16, rounding_mode="floor").unique()) == 2  # of 4 heads
        assert torch.equal(~q.any(dim=1), ~o.any(dim=0))
        assert set(final) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qo"}
    else:
        up, down = final["model.layers.1.mlp.up_proj"], final["model.layers.1.mlp.down_proj"]
        assert int((~up.any(dim=1)).sum()) == 64 and torch.equal(~up.any(dim=1), ~down.any(dim=0))


@pytest.mark.parametrize("score", ["movement", "taylor"])
def test_gradient_scores_accumulate_at_optimizer_steps_and_pick_the_masks(score):
    model = _tiny_llama(trainable=True)
    cb = _started(GradualPruning(0.5, start_step=1, end_step=1, score=score, targets=["down_proj"]), model)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight.copy_(torch.ones_like(layer.weight))
    grad = torch.linspace(-1, 1, layer.weight.numel()).reshape(layer.weight.shape)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    layer.weight.grad = grad.clone()
    cb.on_before_optimizer_step(_Trainer(), model, None)
    cb.update(1)
    mask = cb.masks["model.layers.0.mlp.down_proj"]
    # movement keeps weights moving away from zero (-W * grad high: negative grads); taylor keeps |W * grad| high
    expected = (-grad) > (-grad).median() if score == "movement" else grad.abs() >= grad.abs().flatten().kthvalue(grad.numel() // 2 + 1).values
    assert int((~mask).sum()) == mask.numel() // 2
    if score == "movement":
        assert torch.equal(mask, expected)
    else:
        assert (grad.abs()[mask].min() >= grad.abs()[~mask].max())
    layer.weight.grad = torch.ones_like(grad)
    cb.on_before_optimizer_step(_Trainer(), model, None)  # gradients of pruned weights are zeroed
    assert (layer.weight.grad[~mask] == 0).all() and (layer.weight.grad[mask] == 1).all()


def test_masks_exported_reload_into_a_new_run(tmp_path):
    model = _tiny_llama()
    cb = _started(GradualPruning(0.5, end_step=1, granularity="row"), model)
    cb.update(1)
    folder = cb.write_tables(tmp_path / "pruning")
    rows = list(csv.DictReader(open(folder / "sparsity.csv")))
    assert len(rows) == 14 and all(float(r["sparsity"]) == 0.5 for r in rows)
    fresh = _tiny_llama()
    again = _started(GradualPruning(0.7, start_step=5, end_step=6, masks=str(folder / "masks.safetensors")), fresh)
    for name, mask in cb.masks.items():
        assert torch.equal(again.masks[name], mask)
        assert (fresh.get_submodule(name).weight[~mask] == 0).all()
    with pytest.raises(SlimtuneError, match="not a target"):
        _started(GradualPruning(0.5, end_step=1, targets=["q_proj"], masks=str(folder / "masks.safetensors")),
                 _tiny_llama())
