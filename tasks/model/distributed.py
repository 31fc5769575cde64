"""Training in several processes with torch's own machinery: torchrun's launcher (its argument parser,
so its ``PET_*`` environment variables apply, and elastic launch) starts them, each joins a process
group (NCCL on GPU, gloo on CPU) and DistributedDataParallel averages the gradients. Imports only
torch, like the training core."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tasks.common.errors import PipelineError

T = TypeVar("T")

#: Loggers of torch's launcher that log each failed process's traceback; the caller reports failures itself.
LAUNCHER_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")

#: The rendezvous of a multi-node run, as torchrun reads it (its ``--rdzv-endpoint``): host:port of one node.
RDZV_ENDPOINT_ENV = "PET_RDZV_ENDPOINT"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; the default is a run of one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, the model and the reports."""
        return self.rank == 0

    def shard(self, items: T) -> T:
        """Every ``world``-th item from ``rank`` (a list, a numpy array: no copy for arrays)."""
        return items[self.rank :: self.world]  # type: ignore[index]


SINGLE = Ranks()


def launch(entrypoint: Callable[..., T], args: tuple[Any, ...], processes: int, nnodes: int) -> dict[int, T]:
    """Run ``entrypoint(*args)`` in ``processes`` processes on this node with torchrun's launcher; the
    return values of this node's processes, by global rank. Raises torch's ChildFailedError when one fails.

    The processes run a function, not a command, so they stay in this process's group: stopping or
    killing the stage's group (tasks/common/processes.py) stops them too. One node: a standalone
    rendezvous on a free local port. Several: a c10d rendezvous at ``PET_RDZV_ENDPOINT`` (and
    ``PET_RDZV_ID``, the job's name, the same on every node).
    """
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    if nnodes == 1:  # what torchrun's --standalone means
        placement = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", str(uuid.uuid4())]
    elif not os.environ.get(RDZV_ENDPOINT_ENV):
        raise PipelineError(
            f"train.nnodes={nnodes} needs {RDZV_ENDPOINT_ENV}=host:port (the rendezvous, on one of the nodes) "
            "and the same PET_RDZV_ID on every node"
        )
    else:
        placement = ["--rdzv-backend", "c10d"]
    # torchrun's parser requires a script; it is not run: the processes run ``entrypoint``.
    argv = ["--nnodes", str(nnodes), "--nproc-per-node", str(processes), *placement, "tasks.train"]
    config, _, _ = config_from_args(parse_args(argv))
    loggers = [logging.getLogger(name) for name in LAUNCHER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, entrypoint)(*args)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def join_process_group(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the group the launcher set up (RANK, WORLD_SIZE, LOCAL_RANK in the environment): NCCL with
    one CUDA device per process on GPU, gloo on CPU. The device this process trains on."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(
                f"train.processes asks for {int(os.environ['LOCAL_WORLD_SIZE'])} processes on this node, which has "
                f"{torch.cuda.device_count()} CUDA devices (NCCL needs one per process)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``module`` under DDP: its gradients are averaged over the processes in backward."""
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """``values`` added up over the processes (float64); unchanged in a run of one."""
    if not ranks.distributed:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def broadcast_buffers(module: nn.Module, ranks: Ranks) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process: the model every rank then
    evaluates is the one rank 0 saves."""
    if ranks.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
