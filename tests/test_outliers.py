"""ActivationOutlierMonitor on a tiny Llama with an injected outlier channel, standalone and in a Trainer."""

import csv

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.callbacks import ActivationOutlierMonitor
from slimtune.errors import SlimtuneError

LAYER = "model.layers.0.self_attn.q_proj"
CHANNEL = 5
IDS = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(outlier: bool = False):
    torch.manual_seed(0)
    config = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    if outlier:  # one hidden channel 100x larger in every token's embedding: it dominates the normalized inputs
        with torch.no_grad():
            model.model.embed_tokens.weight[:, CHANNEL] *= 100
    return model


def _row(rows, name):
    return next(r for r in rows if r["layer"] == name)


def test_injected_outlier_channel_flags_the_layer():
    clean_model = tiny_llama()
    monitor = ActivationOutlierMonitor().attach(clean_model)
    with torch.no_grad():
        clean_model(input_ids=IDS)
    clean = _row(monitor.summary(), LAYER)
    assert not clean["at_risk"] and clean["max_median_ratio"] < 20 and clean["calls"] == 1
    monitor.detach()

    model = tiny_llama(outlier=True)
    monitor = ActivationOutlierMonitor().attach(model)
    with torch.no_grad():
        model(input_ids=IDS)
    rows = monitor.summary()
    assert [r["layer"] for r in rows][:2] == [LAYER, "model.layers.0.self_attn.k_proj"]  # module order
    row = _row(rows, LAYER)
    assert row["at_risk"] and row["max_median_ratio"] > 50 and row["top_channel"] == CHANNEL
    assert row["outlier_channels"] == 1 and row["outlier_share"] == pytest.approx(1 / 64)
    assert row["kurtosis"] > 10 * clean["kurtosis"]
    assert row["tokens"] == IDS.numel() and row["channels"] == 64
    with pytest.warns(UserWarning, match=rf"activation outliers: .*{LAYER} \(max/median \d+.*method=awq.*smoothquant"):
        risky = monitor.check()
    assert LAYER in risky
    monitor.check()  # warns once per layer: a second check is silent for the same layers

    monitor.detach()
    with torch.no_grad():
        model(input_ids=IDS)
    assert _row(monitor.summary(), LAYER)["calls"] == 1  # detached: nothing more recorded

    restored = ActivationOutlierMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.summary() == monitor.summary() and restored.warned == monitor.warned


def test_lora_layers_count_once_under_their_plain_names():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(outlier=True), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    monitor = ActivationOutlierMonitor(patterns=[r"model\.layers\.0\..*_proj"]).attach(model)
    with torch.no_grad():
        model(input_ids=IDS)
    names = [r["layer"] for r in monitor.summary()]
    assert LAYER in names and not any("lora_" in n or "base_layer" in n for n in names)
    assert all(n.startswith("model.layers.0.") for n in names) and len(names) == 7
    assert _row(monitor.summary(), LAYER)["at_risk"]
    monitor.detach()


@pytest.mark.parametrize("kwargs, message", [
    ({"patterns": ["nope_proj"]}, "ActivationOutlierMonitor pattern 'nope_proj' matches no layer; valid: names ending in one of q_proj"),
    ({"threshold": 0}, "threshold=0 is not valid; valid: a positive number"),
    ({"every_n_steps": 0}, "every_n_steps=0 is not valid; valid: a positive int"),
    ({"share_level": 1.5}, "share_level=1.5 is not valid"),
    ({"patterns": []}, "patterns=[] is not valid"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SlimtuneError) as err:
        ActivationOutlierMonitor(**kwargs).attach(tiny_llama())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_in_a_trainer_logs_csv_and_warns(tmp_path, capsys):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger

    class MyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama(outlier=True)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (8, 16))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    monitor = ActivationOutlierMonitor(patterns=["q_proj", "down_proj"], every_n_steps=2)
    trainer = L.Trainer(max_steps=4, callbacks=[monitor], logger=CSVLogger(tmp_path, name="logs", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=LAYER):
        trainer.fit(MyLM(), loader)
    rows = list(csv.DictReader((tmp_path / "logs" / "outliers.csv").read_text().splitlines()))
    assert {r["step"] for r in rows} == {"0", "2"}  # sampled every 2 steps
    assert {r["layer"] for r in rows} == {f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.q_proj", "mlp.down_proj")}
    last = next(r for r in rows if r["step"] == "2" and r["layer"] == LAYER)
    assert last["calls"] == "2" and last["at_risk"] == "True"
    metrics = list(csv.DictReader((tmp_path / "logs" / "metrics.csv").read_text().splitlines()))
    assert any(r.get("outliers/layers_at_risk") for r in metrics)
    assert monitor._handles == []  # detached at train end
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out
    else:  # pragma: no cover - matplotlib is not a dependency
        assert (tmp_path / "logs" / "outliers.png").is_file()
