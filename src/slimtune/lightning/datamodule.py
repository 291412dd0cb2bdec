"""LightningDataModule over slimtune's tokenized data; its loaders resume mid-epoch from a checkpoint."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from slimtune.data.datasets import TokenizedData, collate, load_raw, tokenize
from slimtune.data.sampling import GlobalBatchSampler
from slimtune.errors import SlimtuneError


class CausalLMDataModule(L.LightningDataModule):
    """Train/validation loaders. The training loader is torchdata's `StatefulDataLoader` over a `GlobalBatchSampler`:
    Lightning stores its position in checkpoints, so `ckpt_path=last` continues with the very next batch of the
    uninterrupted run's order (in later epochs too), and N processes of `batch_size` see the batches one process of
    N x `batch_size` sees."""

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
        train = self.prepare().train.with_format(None)
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = GlobalBatchSampler(len(train), self.batch_size, seed=self.seed, shuffle=True,
                                     drop_last=len(train) > self.batch_size * world_size, rank=rank,
                                     world_size=world_size)
        if len(sampler) == 0:
            raise SlimtuneError(f"the training split has {len(train)} examples, fewer than one global batch of "
                                f"{self.batch_size} x {world_size} processes; valid: a smaller data.batch_size or more data")
        # The loader's own generator only seeds workers; without it every iter() would draw from the global RNG and
        # shift LoRA dropout between a resumed run and the run it continues (same for the validation loader).
        return StatefulDataLoader(train, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate(),
                                  num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        val = self.prepare().val
        if val is None:
            return []
        # Its own generator: creating the iterator must not draw from the global RNG, which LoRA dropout uses.
        return torch.utils.data.DataLoader(val.with_format(None), batch_size=self.batch_size, shuffle=False,
                                           collate_fn=self._collate(), num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.seed))

    def heldout_token_ids(self) -> torch.Tensor | None:
        """The held-out text as one token stream (packed text), or None when there is no validation split."""
        val = self.prepare().val
        if val is None or self.data.fmt != "text":
            return None
        return torch.tensor([t for row in val["input_ids"] for t in row], dtype=torch.long)
