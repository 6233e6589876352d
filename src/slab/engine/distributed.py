"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import check_device

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "all_reduce_sum", "all_gather_objects",
           "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module created the process group and destroys it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (or run alone) and pick this process's device.

    Backend: NCCL for CUDA devices, gloo for CPU. Multi-node runs use torchrun's rendezvous
    (``--nnodes``, ``--rdzv-endpoint``); nothing here launches processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = check_device(device)  # an unknown device or a missing GPU is the user's to fix, not torch's to trace
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1:
        if not dist.is_initialized():
            _init_process_group("nccl" if dev.type == "cuda" else "gloo", rank, world)
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """``init_process_group`` from torchrun's environment, safe across ``--max-restarts`` attempts.

    torchrun (c10d rendezvous, e.g. ``--standalone``) lets workers share the agent's TCPStore, and
    the store outlives a failed attempt: the restarted workers read the previous attempt's
    addresses and fail to connect (pytorch/pytorch#135712). Keys are therefore prefixed with the
    attempt number. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (set for torchrun) avoids the shared
    store altogether; then the plain ``env://`` path runs.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in os.environ:
        from datetime import timedelta
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore(f"slab/attempt_{attempt}", store), rank=rank,
                                world_size=world)
    else:
        dist.init_process_group(backend)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (in place; identity when running alone)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()
