"""The worker of test_moe_losses' 2-rank gloo test: imports torch and slimtune.moe only, so each spawned process
starts in about a second."""

import os

import torch

from slimtune.moe import StepLoad, expert_load

E, TOKENS = 6, 15


def indices_of_rank(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.topk(torch.randn(TOKENS, E, generator=g), 2, dim=-1).indices


def rank_main(rank: int, port: int, result_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        acc = StepLoad([E])
        acc.add(0, expert_load(indices_of_rank(rank), E), TOKENS)
        loads, tokens = acc.reduced()
        if rank == 0:
            torch.save({"load": loads[0], "tokens": tokens}, result_path)
    finally:
        dist.destroy_process_group()
