"""Exact resume: a run interrupted at any checkpoint of a 3-epoch run and resumed with ckpt_path=last ends with the
trainable weights (torch.equal) and the logged losses of the uninterrupted run, for LoRA, QLoRA and PTQ + LoRC."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, tiny_run_overrides
from slimtune.data.datasets import default_corpus_path
from slimtune.run import run

BLOCK, BATCH, STEPS_PER_EPOCH, EPOCHS, EVERY = 64, 4, 5, 3, 2

VARIANTS = {
    "lora": ["model.quantization=none"],
    "qlora": ["model.quantization=nf4"],
    "ptq_lorc": ["recipe=lorc_w3_tiny", f"callbacks.ptq_lorc_w3.calibration={default_corpus_path()}",
                 "callbacks.ptq_lorc_w3.n_samples=4"],
}


def _text_of_blocks(tokenizer, n_blocks: int) -> str:
    """Paragraphs of the embedded corpus until they tokenize (as the data layer packs them) into n_blocks blocks."""
    paragraphs = Path(default_corpus_path()).read_text().split("\n\n")
    text, tokens = "", 0
    for paragraph in paragraphs:
        if tokens >= n_blocks * BLOCK:
            break
        text += paragraph + "\n\n"
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    return text


def _overrides(out: Path, data: Path, variant: str, *extra):
    recipe = [o for o in VARIANTS[variant] if o.startswith("recipe=")]
    base = tiny_run_overrides(out, *[o for o in VARIANTS[variant] if not o.startswith("recipe=")])
    if recipe:
        base = [recipe[0] if o.startswith("recipe=") else o for o in base]
    return [*base, f"data.path={data}", f"data.block_size={BLOCK}", f"data.batch_size={BATCH}", "data.val_fraction=0.1",
            "model.lora.dropout=0.1", "trainer.max_steps=-1", f"trainer.max_epochs={EPOCHS}",
            "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=1",
            f"checkpoint.every_n_train_steps={EVERY}", "checkpoint.save_top_k=-1", "export.merged=false",
            "export.quantized=false", "callbacks.perplexity.max_windows=1", "seed=7", *extra]


def _logged(out: Path) -> list[tuple]:
    rows = csv.DictReader(open(out / "logs" / "metrics.csv"))
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in rows if r.get("train/loss") or r.get("val/loss")]


@pytest.mark.parametrize("variant", [
    "lora",
    pytest.param("qlora", marks=pytest.mark.slow),  # 1.5 min each on 2 cores: run by CI's slow step
    pytest.param("ptq_lorc", marks=pytest.mark.slow),
])
def test_resume_from_every_checkpoint_of_a_three_epoch_run_is_exact(tmp_path, tiny_tokenizer, variant):
    data = tmp_path / "train.txt"
    train_blocks = STEPS_PER_EPOCH * BATCH
    blocks = next(n for n in range(train_blocks, 2 * train_blocks) if n - -(-n // 10) >= train_blocks)  # 10% held out
    data.write_text(_text_of_blocks(tiny_tokenizer, blocks))
    straight = compose(*_overrides(tmp_path / "straight", data, variant))
    report = run(straight)
    out = Path(straight.output_dir)
    assert report["steps"] == STEPS_PER_EPOCH * EPOCHS, "the data must make 3 epochs of 5 steps"
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    losses = _logged(out)
    assert len([r for r in losses if r[1]]) == STEPS_PER_EPOCH * EPOCHS
    checkpoints = sorted(out.glob("checkpoints/step*.ckpt"), key=lambda p: int(p.stem[4:]))
    steps = [int(p.stem[4:]) for p in checkpoints]
    assert steps == list(range(EVERY, STEPS_PER_EPOCH * EPOCHS + 1, EVERY))  # mid-epoch and across epoch ends

    for ckpt in checkpoints[:-1]:
        # An interrupted run: its output folder holds its checkpoint and the log rows written until then.
        resumed_dir = tmp_path / f"resumed_{ckpt.stem}"
        (resumed_dir / "run" / "checkpoints").mkdir(parents=True)
        shutil.copy(ckpt, resumed_dir / "run" / "checkpoints" / "last.ckpt")
        shutil.copytree(out / "logs", resumed_dir / "run" / "logs")
        resumed = compose(*_overrides(resumed_dir, data, variant, "ckpt_path=last"))
        resumed_report = run(resumed)
        weights = load_file(Path(resumed.output_dir) / "adapter" / "adapter_model.safetensors")
        assert weights.keys() == final.keys()
        different = [k for k in final if not torch.equal(weights[k], final[k])]
        assert not different, f"resumed from {ckpt.name}: {len(different)} tensors differ, e.g. {different[0]}"
        assert _logged(Path(resumed.output_dir)) == losses, f"resumed from {ckpt.name}: logged losses differ"
        assert resumed_report["eval_ppl_before"] == report["eval_ppl_before"]
