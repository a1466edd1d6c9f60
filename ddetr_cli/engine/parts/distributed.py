"""Process-group plumbing for data-parallel training.

Detects a torchrun / SLURM launch from the environment, starts the process group
(NCCL on GPUs, gloo on CPU), and offers the handful of collectives the engine
needs. Every helper is a no-op in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank / world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); single process otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group when launched with several processes. On CUDA,
    each process takes GPU ``local_rank``. Returns the rank information."""
    info = env_dist_info()
    if not info.distributed or is_initialized():
        return current_info() if is_initialized() else info
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size)
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """The device this process should use (cuda:local_rank under multi-GPU DDP)."""
    if device.type == "cuda" and info.distributed:
        return torch.device("cuda", info.local_rank)
    return device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_info() -> DistInfo:
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    return not is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes; returns ``t``."""
    if is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def reduce_dict_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages a dict of floats over processes (same keys on every rank)."""
    if not is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    all_reduce_mean(t)
    return dict(zip(keys, t.tolist()))


def all_gather_object(obj: Any) -> list[Any]:
    """[obj from rank 0, obj from rank 1, ...]; [obj] in a single process."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
