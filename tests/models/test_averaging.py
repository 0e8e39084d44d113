"""The weight average whose horizon follows the run's length (levers=best's EMA)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from convcg_cli.models.averaging import EMA_DECAY_METRIC, RunLengthEMA, run_length_decay


def test_the_decay_spans_a_share_of_the_run_and_is_capped():
    assert run_length_decay(1250, 0.4, 0.998) == 0.998  # KuaiRand: 4 epochs of ~310 steps
    assert run_length_decay(260, 0.4, 0.998) == pytest.approx(1 - 1 / 104)
    assert run_length_decay(float("inf"), 0.4, 0.998) == 0.998
    assert run_length_decay(1, 0.4, 0.998) == 0.0  # a one-step run averages nothing away
    with pytest.raises(ValueError, match="horizon_share"):
        RunLengthEMA(horizon_share=0.0)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((self.w - 1.0) ** 2).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(20, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Metrics(L.pytorch.loggers.Logger):
    name, version = "m", "0"

    def __init__(self):
        super().__init__()
        self.seen: dict[str, float] = {}

    def log_metrics(self, metrics, step=None):
        self.seen.update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_the_trainer_sets_the_decay_from_its_steps_and_logs_it():
    ema, logger = RunLengthEMA(horizon_share=0.5, max_decay=0.999), _Metrics()
    trainer = L.Trainer(
        max_epochs=2, callbacks=[ema], logger=logger, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(_Tiny())
    assert ema.decay == pytest.approx(1 - 1 / 20)  # 40 steps, half of them
    assert logger.seen[EMA_DECAY_METRIC] == pytest.approx(ema.decay)
