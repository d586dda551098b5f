"""Several processes (``torchrun``): each holds the model and data, draws the same global batch and takes its share;
one ``all_reduce`` a step adds the gradients, each scaled by its share, with the loss and a stop flag. Rank 0 alone
logs, evaluates and writes files. Without torchrun: a world of one, no collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import RunError


class SetupError(RunError):
    """The processes cannot be set up as asked; the message is meant for the user."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_size: int = 1  # processes on this machine (they share its cores)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        self.main, self.distributed = self.rank == 0, self.size > 1  # rank 0 logs and writes; collectives when > 1


def setup(requested_device: str) -> World:
    """The device (under torchrun: the GPU of LOCAL_RANK), and under torchrun the process group (gloo or nccl)."""
    device = torch.device("cpu")
    if requested_device == "cuda" or (requested_device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= (visible := torch.cuda.device_count()):
            problem = f"process {local_rank} of this machine has no GPU of its own ({visible} visible)"
            raise SetupError(f"{problem}; start fewer processes or use --device cpu")
        device = torch.device("cuda", local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not started by torchrun
        return World(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_size=local_size, device=device)


def teardown(world: World, finished: bool = True) -> None:
    """Leave the process group; after a normal end, wait for every process first (gloo aborts early leavers)."""
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def share(batch: Tensor, world: World) -> Tensor:
    """This process's contiguous part of a global batch (of indices or of per-image parameters)."""
    return batch.tensor_split(world.size)[world.rank] if world.distributed else batch


def broadcast_parameters(module: torch.nn.Module, world: World) -> None:
    """Make every process start from rank 0's weights (they are equal already when seeded alike)."""
    if world.distributed:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def reduce_step(params, loss: Tensor, share: float, weight: float, stop: bool, world: World) -> tuple[float, bool]:
    """Add the gradients over the processes, each scaled by ``weight`` (this process's ``share`` of the global
    batch; --dp: 1); return the global batch's mean loss and whether any process asked to stop."""
    if not world.distributed:
        return loss.item(), stop
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1), loss.new_full((1,), float(stop))])
    flat[:-2].mul_(weight)
    flat[-2].mul_(share)
    dist.all_reduce(flat)
    for g, summed in zip(grads, flat[:-2].split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))
    return flat[-2].item(), bool(flat[-1].item() > 0)


def gather_objects(obj, world: World) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World):
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(world: World, fn, *args, share: bool = False):
    """``fn(*args)`` on rank 0 only, its RunError raised in every process; rank 0's result (all of them: ``share``)."""
    result, error = None, None
    if world.main:
        try:
            result = fn(*args)
        except RunError as e:
            error = e
    error = broadcast_object(error, world)
    if error is not None:
        raise error
    return broadcast_object(result, world) if share else result
