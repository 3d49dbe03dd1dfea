"""Sweeps over several processes / GPUs: `torchrun --nproc-per-node N -m kvsqueeze sweep ...`.

torchrun starts N copies of the command with `WORLD_SIZE`, `RANK` and `LOCAL_RANK` in their environment. When
`WORLD_SIZE` > 1, `init_distributed` joins the process group (gloo on the CPU, nccl with `--device cuda`, each rank
then on `cuda:LOCAL_RANK`; with more ranks than GPUs they share the GPUs round-robin over gloo). Every rank loads the model and builds the same samples (they are deterministic for the
seed), reads the keys already in the store, and waits at a barrier before computing anything, so all ranks filter
against the same snapshot. The samples still to do are then dealt out round-robin (`i % world == rank` over the
list of samples with pending rows, i.e. after the resume filter): a resumed sweep whose first half is stored still
splits its second half evenly, and no two ranks get the same sample, because they all see the same list.

All ranks write to the one SQLite file (WAL mode; every row in its own `BEGIN IMMEDIATE` transaction, 60 s busy
timeout), whose UNIQUE key makes a duplicate row impossible even if two ranks computed the same key. Rank 0 creates
the file before the others open it. Each row's `meta_json` records `dist_rank` and `dist_world` (only in
distributed runs). After a final barrier, rank 0 prints the summary with the counts summed over the ranks; only
rank 0 shows a progress bar (its own share).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import KVSqueezeError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: `rank` of `world` processes (world 1: not distributed), on `device`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op when not distributed)."""
        if self.active:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """`values` reduced element-wise over the ranks (`op`: "sum" or "max"; unchanged when not distributed)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def shard(self, items: list) -> list:
        """This rank's share of `items`: those at index i with i % world == rank."""
        return items[self.rank :: self.world] if self.active else list(items)

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when it is not set.

    Raises KVSqueezeError when the variables are not integers or RANK is outside [0, WORLD_SIZE)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise KVSqueezeError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise KVSqueezeError(f"RANK={rank} and WORLD_SIZE={world} do not fit (0 <= RANK < WORLD_SIZE)")
    return rank, world, local


def rank_gpu(local_rank: int, n_gpus: int, local_world: int) -> tuple[int, str]:
    """(GPU index, backend) of a rank: `local_rank mod n_gpus`; nccl when every rank of the node has its own GPU
    (`local_world <= n_gpus`), else gloo (ranks share GPUs round-robin). KVSqueezeError when no GPU is visible."""
    if n_gpus < 1:
        raise KVSqueezeError("--device cuda under torchrun, but torch sees no CUDA GPU")
    return local_rank % n_gpus, ("nccl" if local_world <= n_gpus else "gloo")


def init_distributed(device: torch.device) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 and pick this rank's device.

    `device`: the resolved `--device`. With several ranks, cuda becomes `cuda:(LOCAL_RANK mod GPUs)`
    (`rank_gpu`): one rank per GPU uses nccl; more ranks than GPUs share them round-robin and use gloo (NCCL refuses
    two ranks on one GPU), which pays when a small model's sweep is bound by Python, not by the GPU. An explicit
    `cuda:N` is refused (all ranks would share one GPU); cpu uses gloo. Not distributed: `DistInfo` with world 1
    and `device` unchanged. Raises KVSqueezeError for the refused case or when no GPU is visible."""
    rank, world, local = world_from_env()
    if world == 1:
        return DistInfo(device=device)
    import torch.distributed as dist

    if device.type == "cuda":
        if device.index is not None:
            raise KVSqueezeError(f"--device {device} under torchrun: use --device cuda (rank r takes cuda:LOCAL_RANK)")
        n_gpus = torch.cuda.device_count()
        index, backend = rank_gpu(local, n_gpus, local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    return DistInfo(rank=rank, world=world, local_rank=local, device=device, backend=backend)
