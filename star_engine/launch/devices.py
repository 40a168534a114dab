"""Which device a rank computes on: its own GPU, as the launcher made them visible, or
the node's CPU cores shared out."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..environment import job_setting
from .control import Dist

if TYPE_CHECKING:
    import torch


def select_device(kind: str, dist: Dist) -> torch.device:
    """`cuda`: this rank's GPU, as the launcher made them visible: the one GPU a task sees
    (srun --gpus-per-task=1, --gpu-bind), else the node's GPUs dealt out by node-local rank.
    Two ranks never share a GPU unless STAR_ENGINE_SHARE_GPUS=1. `cpu`: the node's cores
    shared out."""
    import torch  # here, so that the command line parses its arguments before PyTorch loads

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this PyTorch sees no GPU")
        device = torch.device("cuda", gpu_index(torch.cuda.device_count(), dist.local_rank, dist.local_world))
        if len(os.sched_getaffinity(0)) == 1:
            # Bound to one core (mpirun binds each of 2 ranks to one by default). NCCL's network
            # transport moves every message with threads of its own, which inherit this mask and
            # would share that core: about 6 ms a collective on H200s over sockets, 50 us with
            # the node's cores (as far as the job's cgroup allows).
            try:
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
            except OSError:
                pass
        torch.cuda.set_device(device)
        check_gpus_not_shared(dist, gpu_id(device))
        return device
    if kind != "cpu":
        raise ValueError(f"unknown device {kind!r}: expected cpu or cuda")
    if "OMP_NUM_THREADS" not in os.environ:  # ranks of one node would otherwise oversubscribe it
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))
    return torch.device("cpu")


def gpu_index(visible: int, local_rank: int, local_world: int) -> int:
    """Which of the GPUs this process sees it uses."""
    if visible == 1:
        return 0  # the launcher bound one GPU to this task
    if visible >= local_world:
        return local_rank
    raise ValueError(f"{local_world} ranks on this node see {visible} GPUs each: launch one rank per GPU "
                     "(srun --ntasks-per-node=<GPUs per node>, or --gpus-per-task=1)")


def gpu_id(device: torch.device) -> str:
    """The physical GPU behind `device`: its node and UUID (or, lacking one, its index
    before CUDA_VISIBLE_DEVICES renumbered them)."""
    import socket

    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        uuid = visible[device.index] if device.index < len(visible) and visible[device.index] else device.index
    return f"{socket.gethostname()}:{uuid}"


def check_gpus_not_shared(dist: Dist, gpu: str) -> None:
    """Raises, on every rank, if two ranks would use one GPU and sharing was not asked for."""
    gpus = dist.allgather(gpu)
    if job_setting("STAR_ENGINE_SHARE_GPUS") == "1":
        return
    owners: dict[str, list[int]] = {}
    for rank, name in enumerate(gpus):
        owners.setdefault(name, []).append(rank)
    shared = [ranks for ranks in owners.values() if len(ranks) > 1]
    if shared:
        ranks = shared[0]
        raise ValueError(f"ranks {', '.join(map(str, ranks))} would share one GPU ({gpus[ranks[0]]}): give each "
                         "rank a GPU of its own (srun --gpus-per-task=1, or as many ranks per node as GPUs), "
                         "or set STAR_ENGINE_SHARE_GPUS=1 if that is meant")
