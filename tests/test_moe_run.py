"""The run with an upcycled MoE model (model=tiny_llama_moe, the CPU recipe's setup on a tiny model): MoEBalance
from its preset through the seam, routers trained beside LoRA, the heatmap, the report, the aux-loss-free bias
exported, and a merged model that stock transformers loads as a Mixtral."""

import csv
from pathlib import Path

import torch
from conftest import compose
from transformers import AutoModelForCausalLM

from slimtune.moe import find_routers
from slimtune.run import run


def test_upcycled_moe_run_with_balancing(tmp_path):
    cfg = compose("recipe=moe_upcycle_smollm2", "model=tiny_llama_moe", f"output_dir={tmp_path / 'run'}",
                  "data.block_size=32", "data.batch_size=2", "trainer.max_steps=4", "trainer.val_check_interval=2",
                  "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
                  "callbacks.moe_balance.bias_rate=0.01", "callbacks.moe_balance.seq_coef=0.001")
    report = run(cfg)
    out = Path(cfg.output_dir)
    assert report["steps"] == 4 and report["moe_aux_loss"] == "slimtune"
    assert len(report["moe_cv_per_layer"]) == 2
    rows = list(csv.DictReader(open(out / "moe_heatmap.csv")))
    assert len(rows) == 4 * 2 * 4 and (out / "moe_heatmap.png").is_file()
    bias = torch.load(report["moe_expert_bias"])
    assert set(bias) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert all(b.abs().max() > 0 for b in bias.values())
    merged = AutoModelForCausalLM.from_pretrained(report["merged_dir"])
    assert type(merged).__name__ == "MixtralForCausalLM"
    # the routers were trained (modules_to_save): they differ from the upcycled start, which the seed reproduces
    from slimtune.models.loading import load_base_model

    start = load_base_model(cfg.model)
    moved = [float((a.module.weight - b.module.weight).abs().max())
             for a, b in zip(find_routers(merged), find_routers(start))]
    assert all(m > 0 for m in moved), moved
    header = next(csv.reader(open(out / "logs" / "metrics.csv")))
    assert {"train/loss_aux", "train/loss_z", "train/loss_seq", "moe/cv_max"} <= set(header)
