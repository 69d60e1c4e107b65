"""Per-epoch overhead of comodal's Trainer and Avalanche 0.6's Naive against a plain loop.

One process trains copies of one ``MultimodalEncoder`` on the same cached-feature-like pairs in
the same batch order through three runners:

* ``plain``: a hand-written PyTorch loop (randperm batches, encode, InfoNCE, AdamW);
* ``trainer``: ``comodal.platform.trainer.Trainer`` with the ``finetune`` strategy;
* ``avalanche``: Avalanche's stock ``Naive`` template, minimally adapted to dict batches.

Each runner does one epoch per call. After a warm-up epoch the runners are timed in
interleaved rounds; the median seconds per epoch and its ratio to the plain loop are printed
and written to ``benchmarks/results/trainer_overhead.json``. The script asserts that the three
runners see the same batches and end every epoch with the same loss and weights, so the ratios
compare the same arithmetic. It asserts nothing about time.

    .venv/bin/python benchmarks/trainer_overhead.py [--heads 384] [--rounds 21] [--threads N]
        [--device cpu|cuda|auto]

On CUDA every runner keeps the data on the host and moves each batch to the device, as the
Trainer does; each epoch ends by reading its mean loss, which waits for the device's work.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # qpsolvers warns at import that no QP solver is installed
    from avalanche.benchmarks import DatasetExperience
    from avalanche.benchmarks.utils import make_avalanche_dataset
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

from _options import (  # beside this script
    add_device_option,
    add_output_options,
    device_info,
    parse_with_outputs,
    write_results,
)

from comodal.config import EvalConfig, ModalityConfig, TrainConfig
from comodal.core.data import BatchLoader, MultimodalDataset
from comodal.platform.feature_cache import FeatureCache
from comodal.platform.losses import InfoNCE
from comodal.platform.modalities import Modality
from comodal.platform.model import MultimodalEncoder
from comodal.platform.precision import resolve_device
from comodal.platform.trainer import Trainer
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.finetune import Finetune

RESULTS = Path(__file__).resolve().parent / "results" / "trainer_overhead.json"
PAIR = ("vision", "text")
TOLERANCE = 1e-5
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- data
def make_pairs(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached-feature-like vision/text rows; row i of each is a noisy view of one latent."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, dim, generator=g)
    vision = latent + 3.0 * torch.randn(n, dim, generator=g)  # noisy enough that the loss
    text = latent @ torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]  # keeps falling
    text = text + 3.0 * torch.randn(n, dim, generator=g)  # for 20-odd epochs
    return vision, text


def stack_dicts(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate dict samples of feature vectors: one stacked tensor per key."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def fresh_adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as ``Trainer.make_optimizer`` builds it (TrainConfig's weight_decay is 0)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             weight_decay=0.0)


# ----------------------------------------------------------------------------- runners
class PlainLoop:
    """The reference: the loop one would write by hand, with the BatchLoader's batch order."""

    name = "plain"

    def __init__(self, model: MultimodalEncoder, vision: torch.Tensor, text: torch.Tensor,
                 batch_size: int, lr: float, seed: int,
                 device: torch.device = CPU) -> None:
        self.model, self.vision, self.text, self.device = model, vision, text, device
        self.batch_size, self.lr = batch_size, lr
        self.generator = torch.Generator().manual_seed(seed)
        self.criterion = InfoNCE()

    def first_batch(self) -> torch.Tensor:
        """Indices of the next epoch's first batch, without advancing the generator."""
        g = torch.Generator()
        g.set_state(self.generator.get_state())
        return torch.randperm(len(self.vision), generator=g)[: self.batch_size]

    def prepare(self) -> None:
        """Nothing to do outside the timed epoch."""

    def epoch(self) -> float:
        """One epoch; returns the mean training loss."""
        model = self.model
        model.train()
        optimizer = fresh_adamw(model, self.lr)  # Trainer.train_experience does the same
        running, steps = torch.zeros((), device=self.device), 0
        order = torch.randperm(len(self.vision), generator=self.generator)
        for idx in order.split(self.batch_size):
            batch = {"vision": self.vision[idx].to(self.device),
                     "text": self.text[idx].to(self.device)}
            optimizer.zero_grad(set_to_none=True)
            za = model.encode(batch, "vision")
            zb = model.encode(batch, "text")
            loss = self.criterion(za, zb, model.scale)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            steps += 1
        return (running / steps).item()


class TrainerRunner:
    """comodal's Trainer with the finetune strategy; one ``train_experience`` = one epoch."""

    name = "trainer"

    def __init__(self, model: MultimodalEncoder, scenario: Scenario, cache_dir: str,
                 batch_size: int, lr: float, seed: int,
                 device: torch.device = CPU) -> None:
        dim = model.heads["vision"].in_features
        modalities = {m: Modality(m, ModalityConfig(encoder="features", dim=dim)) for m in PAIR}
        self.trainer = Trainer(
            model, modalities, FeatureCache(cache_dir, progress=False),
            TrainConfig(epochs=1, batch_size=batch_size, lr=lr), EvalConfig(),
            plugins=[Finetune()], seed=seed, device=str(device), progress=False,
        )
        self.trainer.setup(scenario)
        self.trainer.train_epochs = 1
        self.experience = self.trainer.benchmark.train_stream[0]
        self.model = self.trainer.model

    def first_batch(self) -> torch.Tensor:
        """The next epoch's first batch as the trainer's BatchLoader would draw it."""
        g = torch.Generator()
        g.set_state(self.trainer.generator.get_state())
        data = self.trainer.scenario.tasks[0].train
        loader = BatchLoader(data, self.trainer._collate, self.trainer.train_mb_size, 0,
                             shuffle=True, generator=g)
        return loader.batch_indices()[0]

    def prepare(self) -> None:
        """Nothing to do outside the timed epoch."""

    def epoch(self) -> float:
        """One epoch; returns the mean training loss the trainer recorded."""
        self.trainer.train_experience(self.experience)
        return self.trainer.history[-1]["loss"]


class DictNaive(Naive):
    """Avalanche's Naive with the overrides dict batches need (notes section 3)."""

    running: torch.Tensor
    steps: int

    @property
    def mb_x(self) -> dict[str, torch.Tensor]:
        return self.mbatch

    @property
    def mb_y(self) -> None:
        return None

    def _unpack_minibatch(self) -> None:
        self.mbatch = {k: v.to(self.device, non_blocking=True) for k, v in self.mbatch.items()}

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.model.encode(self.mb_x, m) for m in PAIR)

    def criterion(self) -> torch.Tensor:
        loss = self._criterion(*self.mb_output, self.model.scale)
        self.running += loss.detach()  # the same per-step bookkeeping the other two do
        self.steps += 1
        return loss

    def make_train_dataloader(self, num_workers: int = 0, shuffle: bool = True,
                              **kwargs: Any) -> None:
        # Stock 0.6 builds a plain DataLoader without the dataset's collate_fn for experiences
        # without task labels (notes section 2); pass it, as any dict-batch user must.
        self.dataloader = DataLoader(self.adapted_dataset, batch_size=self.train_mb_size,
                                     shuffle=shuffle, num_workers=num_workers,
                                     collate_fn=self.adapted_dataset.collate_fn)


class AvalancheRunner:
    """Avalanche 0.6's SupervisedTemplate (Naive) with an evaluator that has no metrics or
    loggers, so only the template's own machinery is measured.

    Batch order: each epoch draws ``torch.randperm(n, generator=g)`` from its own generator
    seeded like the others (the BatchLoader's draw), and trains on an experience whose dataset
    is ``dataset.subset(permutation)`` loaded with ``shuffle=False`` and the same batch size, so
    its k-th batch holds rows ``permutation.split(batch_size)[k]``, the plain loop's k-th batch.
    Building that subset is the benchmark's doing, not Avalanche's, so it happens in
    ``prepare()`` outside the timer.
    """

    name = "avalanche"

    def __init__(self, model: MultimodalEncoder, data: MultimodalDataset, batch_size: int,
                 lr: float, seed: int, device: torch.device = CPU) -> None:
        self.model, self.lr, self.batch_size, self.device = model, lr, batch_size, device
        self.dataset = make_avalanche_dataset(data, collate_fn=stack_dicts)
        self.generator = torch.Generator().manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No loggers specified": intended here
            evaluator = EvaluationPlugin(loggers=[])
        self.strategy = DictNaive(
            model=model, optimizer=fresh_adamw(model, lr), criterion=InfoNCE(),
            train_mb_size=batch_size, train_epochs=1, eval_mb_size=batch_size,
            device=device, evaluator=evaluator,
        )
        self.experience: DatasetExperience | None = None

    def prepare(self) -> None:
        """Build this epoch's experience: the dataset in the epoch's permutation order."""
        order = torch.randperm(len(self.dataset), generator=self.generator)
        self.experience = DatasetExperience(dataset=self.dataset.subset(order.tolist()),
                                            current_experience=0)

    def first_batch_rows(self) -> torch.Tensor:
        """The vision rows of the prepared experience's first training batch."""
        loader = DataLoader(self.experience.dataset, batch_size=self.batch_size,
                            shuffle=False, collate_fn=self.experience.dataset.collate_fn)
        return next(iter(loader))["vision"]

    def epoch(self) -> float:
        """One epoch (``train`` on the prepared experience); returns the mean training loss."""
        s = self.strategy
        s.optimizer = fresh_adamw(self.model, self.lr)  # as the other two runners do
        s.running, s.steps = torch.zeros((), device=self.device), 0
        s.train(self.experience, eval_streams=[], shuffle=False)
        return (s.running / s.steps).item()


# ----------------------------------------------------------------------------- checks
def max_weight_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between two models' state tensors (empty ones, such as the
    class ids of a model without classes, differ by nothing)."""
    sa, sb = a.state_dict(), b.state_dict()
    return max((float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].numel()), default=0.0)


def check_agreement(losses: dict[str, float], runners: list[Any], where: str) -> None:
    """Every runner ends the epoch with the plain loop's loss and weights."""
    ref = runners[0]
    for r in runners[1:]:
        gap = abs(losses[r.name] - losses[ref.name])
        assert gap <= TOLERANCE, f"{where}: {r.name} loss {losses[r.name]} vs {losses[ref.name]}"
        wgap = max_weight_gap(r.model, ref.model)
        assert wgap <= TOLERANCE, f"{where}: {r.name} weights differ from plain by {wgap:.2e}"


def timed_epoch(runner: Any) -> tuple[float, float]:
    """(seconds, mean loss) of one epoch of ``runner``."""
    runner.prepare()
    gc.collect()
    start = time.perf_counter()
    loss = runner.epoch()
    return time.perf_counter() - start, loss


# ----------------------------------------------------------------------------- report
def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per runner: median and best seconds per epoch, ratios to the plain loop, raw times.

    ``ratio_to_plain`` is the ratio of medians; ``paired_ratio`` is the median over rounds of
    (runner / plain) within the same round, which cancels slow drifts in machine load.
    """
    plain = times["plain"]
    med_plain = statistics.median(plain)
    return {
        name: {
            "median_s_per_epoch": statistics.median(ts),
            "min_s_per_epoch": min(ts),
            "ratio_to_plain": statistics.median(ts) / med_plain,
            "min_ratio_to_plain": min(ts) / min(plain),
            "paired_ratio": statistics.median(t / p for t, p in zip(ts, plain, strict=True)),
            "seconds": ts,
        }
        for name, ts in times.items()
    }


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    """The summary as a fixed-width table."""
    head = ("runner", "median s/epoch", "ratio to plain", "min s/epoch", "min ratio",
            "paired ratio")
    print(f"{head[0]:<10}" + "".join(f"{h:>16}" for h in head[1:]))
    for name, r in rows.items():
        cells = (f"{r['median_s_per_epoch']:.4f}", f"{r['ratio_to_plain']:.3f}",
                 f"{r['min_s_per_epoch']:.4f}", f"{r['min_ratio_to_plain']:.3f}",
                 f"{r['paired_ratio']:.3f}")
        print(f"{name:<10}" + "".join(f"{c:>16}" for c in cells))


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=384, metavar="D",
                   help="feature width = head width = joint width (default 384)")
    p.add_argument("--rounds", type=int, default=21, help="timed rounds (default 21)")
    p.add_argument("--n", type=int, default=4096, help="training pairs (default 4096)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own, one per core)")
    p.add_argument("--seed", type=int, default=0)
    add_device_option(p)
    add_output_options(p, RESULTS)
    return parse_with_outputs(p, argv, RESULTS,
                              {"heads": 16, "n": 128, "rounds": 1, "batch_size": 32})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the three runners, check they agree, time them and report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d, n, bs = args.heads, args.n, args.batch_size
    device = resolve_device(args.device)
    vision, text = make_pairs(n + 512, d, args.seed)
    full = MultimodalDataset(name="bench-pairs", fingerprint=f"bench-pairs:{n}:{d}:{args.seed}",
                             columns={"vision": vision, "text": text})
    train = full.subset(range(n), name="bench-train")
    test = full.subset(range(n, n + 512), name="bench-test")
    scenario = Scenario([Task("vision-text", PAIR, train, test)])

    base = MultimodalEncoder(in_dims=dict.fromkeys(PAIR, d), joint_dim=d).to(device)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cache_dir:
        runners = [
            PlainLoop(copy.deepcopy(base), train.columns["vision"], train.columns["text"],
                      bs, args.lr, args.seed, device),
            TrainerRunner(copy.deepcopy(base), scenario, cache_dir, bs, args.lr, args.seed,
                          device),
            AvalancheRunner(copy.deepcopy(base), train, bs, args.lr, args.seed, device),
        ]
        plain, trainer, avalanche = runners

        # Same batch order: the trainer's generator yields the plain loop's first batch, and
        # the Avalanche experience's first batch holds exactly those rows.
        first = plain.first_batch()
        assert torch.equal(trainer.first_batch(), first), "trainer batch order differs"
        avalanche.prepare()
        assert torch.equal(avalanche.first_batch_rows(), train.columns["vision"][first]), \
            "avalanche batch order differs"
        avalanche.generator = torch.Generator().manual_seed(args.seed)  # rewind for epoch 0

        warm = {r.name: timed_epoch(r)[1] for r in runners}
        check_agreement(warm, runners, "warm-up epoch")
        times: dict[str, list[float]] = {r.name: [] for r in runners}
        losses: list[dict[str, float]] = [warm]
        for k in range(args.rounds):
            round_losses = {}
            for r in runners[k % 3:] + runners[: k % 3]:  # rotate who goes first
                seconds, round_losses[r.name] = timed_epoch(r)
                times[r.name].append(seconds)
            check_agreement(round_losses, runners, f"round {k}")
            losses.append(round_losses)

    report = {
        "benchmark": "trainer_overhead",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
            **device_info(device),
        },
        "config": {"n": n, "dim": d, "batch_size": bs, "steps_per_epoch": -(-n // bs),
                   "lr": args.lr, "rounds": args.rounds, "seed": args.seed},
        "runners": summarize(times),
        "epoch_mean_loss": [ls["plain"] for ls in losses],
    }
    print(f"n={n} d={d} batch={bs} ({report['config']['steps_per_epoch']} steps/epoch), "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"on {device}")
    print(f"epoch-mean loss: {losses[0]['plain']:.4f} (warm-up) -> {losses[-1]['plain']:.4f}; "
          "all runners agree on every epoch's loss and weights")
    print_table(report["runners"])
    spread = max(max(ts) / min(ts) for ts in times.values())
    if spread > 2.0:
        print(f"note: some epochs took {spread:.1f}x the fastest one; other load on the machine "
              "disturbed this run (compare min and paired ratio, or rerun when idle)")
    write_results(args.out, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
