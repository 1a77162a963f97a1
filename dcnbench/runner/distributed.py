"""Distributed training under ``torchrun``: process group from the environment, rank queries,
reductions, and the sharding the training path uses when a process group is up.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per CPU slot)
and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR/PORT; :func:`init_from_env`
turns that into a process group (NCCL when CUDA is available, gloo otherwise). Without those
variables nothing is initialised and every helper here is the single-process identity.

A rank that dies must not leave the others waiting forever: collectives time out after
``DCNBENCH_DIST_TIMEOUT_S`` seconds (default 1800), and torchrun itself stops the remaining
workers and exits non-zero as soon as one worker fails.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

DEFAULT_TIMEOUT_S = 1800


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env() -> bool:
    """Join the process group torchrun describes; True when distributed (idempotent)."""
    if is_distributed():
        return True
    if not under_torchrun():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
    return True


def timeout_s() -> float:
    """Seconds a collective may wait: ``DCNBENCH_DIST_TIMEOUT_S`` (a positive number), default 1800."""
    raw = os.environ.get("DCNBENCH_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"DCNBENCH_DIST_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return seconds


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if is_distributed() else 1


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy on this rank's device); the tensor itself single-process."""
    if not is_distributed():
        return tensor
    out = tensor.to(device(), copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (picklable objects; [obj] single-process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) on every rank, in place."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def per_rank_batch(global_batch: int) -> int:
    """The per-rank share of a global batch; an error when ranks cannot share it evenly."""
    world = world_size()
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} is the global batch and must divide evenly over "
                         f"{world} processes; use a multiple of {world} (and scale lr linearly, see README)")
    return global_batch // world


def shard(n: int) -> list[int]:
    """This rank's indices of ``range(n)`` (strided, no padding: the union over ranks is exact)."""
    return list(range(rank(), n, world_size()))


def unshard(parts: list[list]) -> list:
    """Inverse of :func:`shard` on gathered per-rank lists: items back in dataset order."""
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


class SeededAugmentation(Dataset):
    """Each item drawn under its own seed (seed, epoch, index), so an image's random flip does not
    depend on which rank loads it: 1 and N processes see the same augmented images."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
            return self.dataset[index]
