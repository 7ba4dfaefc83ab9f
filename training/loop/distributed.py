"""Data-parallel training under torchrun: one process per device, gradients averaged by DDP.

Launch `cnnloop train` through torchrun; nothing else changes on the command line:

    torchrun --standalone --nproc_per_node=2 --no-python cnnloop train DATA --out RUN [flags]

(`torchrun --standalone --nproc_per_node=2 $(which cnnloop) train ...` works too: the console
script is a Python file.) `--standalone` starts the rendezvous on a free local port. CPU workers
talk over gloo, CUDA workers over NCCL with one GPU each (cuda:LOCAL_RANK, so nproc_per_node must
not exceed the visible GPUs). torchrun sets OMP_NUM_THREADS=1 per worker unless told otherwise; on
CPU pass `--num-threads` to give each worker its share of the cores. Trap: torchrun's parser reads
abbreviated options even after the script, and `--monitor` abbreviates its `--monitor-interval`, so
set the monitor by CNNLOOP_TRAIN_MONITOR=... or `monitor:` in the --config YAML (no other train
flag collides).

What a run means with N workers:
- `--batch-size` is per worker, the global batch is N x batch size, the learning rate is not scaled.
- each worker trains on its 1/N shard of the training images (DistributedSampler, or
  DistributedWeightedSampler for `--balance sampler`), reshuffled every epoch;
- every worker scores the whole validation split, and rank 0's epoch record is broadcast, so every
  worker takes the same early-stopping decision at the same epoch (a worker that stopped alone
  would leave the others waiting in a collective forever);
- rank 0 alone prints, draws progress bars and writes the run directory; the run's metrics.json
  records every worker's weight fingerprint, and training fails when they differ.
Only `cnnloop train` is distributed; `cnnloop cv` under torchrun would run whole on every worker.
"""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from training.errors import TrainingError


class LaunchEnv(BaseSettings):
    """What torchrun exports to each worker (WORLD_SIZE, RANK, LOCAL_RANK); the defaults are a plain run."""

    model_config = SettingsConfigDict(extra="ignore")

    world_size: int = Field(1, ge=1)
    rank: int = Field(0, ge=0)
    local_rank: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _rank_within_world(self) -> "LaunchEnv":
        if self.rank >= self.world_size:
            raise ValueError(f"RANK {self.rank} is not below WORLD_SIZE {self.world_size}")
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_launch_env() -> LaunchEnv:
    try:
        return LaunchEnv()
    except ValidationError as e:
        raise TrainingError(f"torchrun's WORLD_SIZE/RANK/LOCAL_RANK make no sense ({e.errors()[0]['msg']}); "
                            "launch with torchrun or unset them") from None


@contextmanager
def process_group(launch: LaunchEnv, device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the block (nothing to join for one process); yields this
    worker's device."""
    if launch.world_size == 1:
        yield device
        return
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise TrainingError(f"worker LOCAL_RANK {launch.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                "give torchrun --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block before the others: what it caches on disk, they only read."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def _comm_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average(values: dict[str, float]) -> dict[str, float]:
    """Each scalar averaged over all workers; every worker gets the same numbers back."""
    if world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))


def broadcast_from_main(obj):
    """Rank 0's `obj` on every worker: a decision taken once cannot come out differently elsewhere."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_for_training(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    # Buffers are not broadcast each forward: BatchNorm statistics are averaged once per epoch
    # instead (average_batchnorm_stats), so every worker's batches count, not rank 0's alone.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def average_batchnorm_stats(model: nn.Module) -> None:
    """Average BatchNorm running statistics over workers; each updated them from its own shard."""
    if world_size() == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for stat in (m.running_mean, m.running_var):
                dist.all_reduce(stat)
                stat.div_(world_size())


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names and raw bytes: equal only when every tensor is bit-identical."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def require_identical_replicas(model: nn.Module) -> list[str]:
    """Every worker's weight fingerprint, rank order. Raises when they differ: a gradient that missed
    the all-reduce trains each worker its own model, and nothing else would notice."""
    digests = [None] * world_size()
    dist.all_gather_object(digests, state_fingerprint(model.state_dict()))
    if len(set(digests)) > 1:
        raise TrainingError(f"workers finished with different weights (fingerprints {[d[:12] for d in digests]}); "
                            "the gradient sync is broken, do not use this run")
    return digests


class DistributedWeightedSampler(Sampler[int]):
    """WeightedRandomSampler split over workers: each draws the same seeded epoch of
    `num_replicas * num_samples` indices and keeps every num_replicas-th, so the shards together
    are one class-balanced epoch."""

    def __init__(self, weights: torch.Tensor, num_replicas: int, rank: int, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(self.weights) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=gen)
        return iter(drawn[self.rank :: self.num_replicas].tolist())
