"""One run across processes (``torchrun``): every rank holds the same model, strategies and
batch order, and computes only its share of each batch's rows.

The design keeps one run's arithmetic that of one process: each rank draws the same global
batch (same seed), runs the encoders on its contiguous share of the rows, and all-gathers the
embeddings with gradients (``gather``), so every loss sees the whole batch and is computed
identically on every rank. The backward of a gather sums the gathered gradient over ranks, so a
rank's gradient is N times its rows' share plus the terms every rank computes in full (the
temperature, a classifier on gathered features, a weight penalty); their mean over ranks
(``reduce_gradients``, one all-reduce per bucket of 2^24 elements, once a step) is the
one-process gradient exactly.

``torch.nn.parallel.DistributedDataParallel`` is not used as the wrapper: it synchronises
gradients for one ``forward`` per ``backward`` over a fixed set of parameters, and a comodal
step forwards several batches (replayed side batches, a teacher), grows its classifier at every
task, and strategies backpropagate outside training steps (EWC's Fisher). The collective DDP
issues, the mean all-reduce of gradients, is issued by the trainer after each backward.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from comodal.errors import ConfigError

# How a strategy's or plugin's state stays the same on every rank (its ``across_ranks``):
ACROSS_RANKS = {
    "replicated": "computed from gathered outputs and the shared seed, identical everywhere",
    "reduced": "its statistics are summed over the ranks' rows (all-reduce)",
    "main": "runs on rank 0 only and never calls the model (logging)",
}
BUCKET = 1 << 24  # gradient elements per all-reduce


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` processes."""

    rank: int
    size: int
    local_rank: int
    device: torch.device  # where the collectives' own tensors live (CUDA under NCCL)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous rows of ``n``; shares differ by at most one row."""
        return _shares(n, self.size)[self.rank]

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` rows of every rank's ``local`` share, in order, on every rank, with
        gradients flowing back to each rank's own rows (summed over ranks)."""
        return _Gather.apply(local, n, self.size, self.rank)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks, in place."""
        dist.all_reduce(tensor)
        return tensor

    def total(self, n: int) -> int:
        """``n`` summed over ranks (row counts)."""
        return int(self.sum_(torch.tensor([float(n)], dtype=torch.float64,
                                          device=self.device)).item())

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every rank's gradients replaced by their mean over ranks, in buckets of about
        ``BUCKET`` elements; a parameter without a gradient on every rank keeps none."""
        for bucket in _buckets([p for p in params if p.requires_grad]):
            sizes = [p.numel() for p in bucket]
            present = torch.tensor([float(p.grad is not None) for p in bucket],
                                   device=bucket[0].device)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                              .reshape(-1).float() for p in bucket] + [present])
            dist.all_reduce(flat)
            flat /= self.size
            parts = flat[: sum(sizes)].split(sizes)
            # which gradients another rank had is read (a host synchronisation) only when this
            # rank lacks one
            seen = (flat[sum(sizes):].tolist() if any(p.grad is None for p in bucket)
                    else [1.0] * len(bucket))
            for p, part, there in zip(bucket, parts, seen, strict=True):
                if p.grad is not None:
                    p.grad.copy_(part.view_as(p))
                elif there > 0:
                    p.grad = part.view_as(p).to(p.dtype).clone()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` on every rank, in place."""
        for tensor in tensors:
            dist.broadcast(tensor, 0)

    def barrier(self) -> None:
        dist.barrier()

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        found: list[Any] = [None] * self.size
        dist.all_gather_object(found, value)
        return found

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it writes shared files: generated data, caches), the
        others after it, reading what it wrote."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def _buckets(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``params`` in consecutive groups of about ``BUCKET`` elements, one device each."""
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if bucket and (size + p.numel() > BUCKET or p.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


def _shares(n: int, size: int) -> list[slice]:
    base, extra = divmod(n, size)
    bounds = [0]
    for r in range(size):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return [slice(bounds[r], bounds[r + 1]) for r in range(size)]


class _Gather(torch.autograd.Function):
    """All-gather of uneven row shares (padded to the largest for the collective); backward
    sums the gathered gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, n: int, size: int, rank: int) -> torch.Tensor:
        shares = _shares(n, size)
        width = shares[0].stop - shares[0].start
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous())
        ctx.shares, ctx.width, ctx.rank = shares, width, rank
        return torch.cat([p[: s.stop - s.start] for p, s in zip(parts, shares, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.shares[ctx.rank]], None, None, None


_WORLD: World | None = None


def current() -> World | None:
    """This process's ``World`` under torchrun, None in a one-process run."""
    return _WORLD


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[World | None, str]:
    """Join the process group torchrun describes (gloo on the CPU, NCCL on CUDA, from
    ``device``) once per process; returns the world (None without torchrun) and the device
    this rank computes on (``cuda:<local rank>`` for CUDA)."""
    global _WORLD
    if not launched():
        return None, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"device: {device!r} under torchrun needs a CUDA device per "
                              f"process on each node; local rank {local_rank} has none "
                              f"({torch.cuda.device_count()} visible)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if _WORLD is None:
        # Avalanche refuses to create its default loggers in a process that joined a group
        # before importing it: import it first
        import comodal._avalanche  # noqa: F401
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
            # left to the interpreter's teardown, gloo's threads can abort the process
            atexit.register(dist.destroy_process_group)
        _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank,
                       torch.device(device))
    return _WORLD, device


def share_batch_norm(model: torch.nn.Module) -> None:
    """Make every batch-norm layer of ``model`` normalise a training batch by the statistics
    of all ranks' rows, as one process would (``SyncBatchNorm`` runs on CUDA only). The
    layers keep their class and parameter names, so checkpoints are a one-process run's."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(_batch_norm_over_ranks, module)


def _batch_norm_over_ranks(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not self.training or _WORLD is None:
        return type(self).forward(self, x)
    channels, dims = x.shape[1], [0, *range(2, x.dim())]
    stats = torch.cat([x.double().sum(dims), (x.double() ** 2).sum(dims),
                       x.new_tensor([x.numel() / channels], dtype=torch.float64)])
    stats = dist_nn.all_reduce(stats)  # its backward sums the gradient over ranks too
    n = stats[-1]
    mean = stats[:channels] / n
    var = (stats[channels:-1] / n - mean**2).clamp(min=0)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked += 1
            factor = (1 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            unbiased = var * n / (n - 1).clamp(min=1)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
    shape = (1, channels, *[1] * (x.dim() - 2))
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def rows_of(value: Any) -> int:
    """How many rows a batch column holds (a tensor, or a dict of per-row tensors)."""
    if isinstance(value, torch.Tensor):
        return len(value)
    if isinstance(value, dict):
        return rows_of(next(iter(value.values())))
    return len(value)


def take_rows(value: Any, rows: slice) -> Any:
    """Rows ``rows`` of a batch column (tensors and lists by row, dicts column by column)."""
    if isinstance(value, dict):
        return {k: take_rows(v, rows) for k, v in value.items()}
    return value[rows]


def local_batch(batch: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """This rank's rows of ``batch``'s columns ``keys`` (all of them in one process)."""
    world = _WORLD
    if world is None:
        return batch
    return {k: take_rows(batch[k], world.share(rows_of(batch[k]))) for k in keys}


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's share of ``n`` rows computed from ``local_batch``, on every rank (``local``
    itself in one process)."""
    world = _WORLD
    return local if world is None else world.gather(local, n)


def digest(value: Any) -> str:
    """A hash of tensors and plain containers, for comparing state across ranks."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            for key in sorted(v, key=str):
                h.update(f"K{key!r}".encode())
                walk(v[key])
        elif isinstance(v, (list, tuple, set, frozenset)):
            items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
            h.update(f"L{len(items)}".encode())
            for item in items:
                walk(item)
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()


def check_plugins(plugins: Sequence[Any]) -> None:
    """Under torchrun, refuse a strategy or plugin that does not say how its state stays the
    same on every rank (its ``across_ranks``): it would run, and drift, unnoticed."""
    for plugin in plugins:
        how = getattr(plugin, "across_ranks", None)
        if how not in ACROSS_RANKS:
            name = getattr(plugin, "name", type(plugin).__name__)
            said = "does not declare" if how is None else f"declares {how!r} for"
            raise ConfigError(
                f"{name} {said} how its state stays the same on every process "
                f"(across_ranks: {', '.join(ACROSS_RANKS)}), so it cannot run under torchrun; "
                "run it in one process, or give its class an across_ranks that holds")
