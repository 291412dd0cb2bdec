"""LightningDataModule over slimtune's tokenized data; its loaders resume mid-epoch from a checkpoint."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from slimtune.data.datasets import TokenizedData, collate, load_raw, tokenize
from slimtune.errors import SlimtuneError


class CausalLMDataModule(L.LightningDataModule):
    """Train/validation loaders. The training loader is torchdata's `StatefulDataLoader`: Lightning stores its
    position in checkpoints, so `ckpt_path=last` continues with the very next batch instead of replaying the epoch."""

    def __init__(self, tokenizer, data_cfg: Any, data: TokenizedData | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = data_cfg
        self.batch_size = int(data_cfg.get("batch_size", 4))
        if self.batch_size <= 0:
            raise SlimtuneError(f"data.batch_size={self.batch_size} is not valid; valid: a positive integer")
        self.block_size = int(data_cfg.get("block_size", 256))
        self.num_workers = int(data_cfg.get("num_workers", 0))
        self.seed = int(data_cfg.get("seed", 42))
        self.data = data

    def prepare(self) -> TokenizedData:
        if self.data is None:
            self.data = tokenize(load_raw(self.cfg), self.tokenizer, self.cfg)
        return self.data

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _collate(self):
        return partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return StatefulDataLoader(self.prepare().train.with_format(None), batch_size=self.batch_size, shuffle=True,
                                  generator=generator, collate_fn=self._collate(), num_workers=self.num_workers,
                                  drop_last=len(self.data.train) > self.batch_size)

    def val_dataloader(self):
        val = self.prepare().val
        if val is None:
            return []
        return torch.utils.data.DataLoader(val.with_format(None), batch_size=self.batch_size, shuffle=False,
                                           collate_fn=self._collate(), num_workers=self.num_workers)

    def heldout_token_ids(self) -> torch.Tensor | None:
        """The held-out text as one token stream (packed text), or None when there is no validation split."""
        val = self.prepare().val
        if val is None or self.data.fmt != "text":
            return None
        return torch.tensor([t for row in val["input_ids"] for t in row], dtype=torch.long)
