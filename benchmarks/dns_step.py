"""What DNS adds to a training step, and what its low-rank projection saves over the dense one.

Part 1, the Trainer. For each case (d, r) one process builds comodal ``Trainer`` objects on the
same two-task scenario over the pair (vision, text): each task's d-dimensional feature rows lie
in a task-specific random subspace of dimension r (a spectrum falling 100x across it) plus an
isotropic noise floor (eigenvalue 1e-6, against 1.25 down to 0.0125 for the signal), so that a
relative threshold of 1e-4 keeps rank r on both sides. Linear heads are d x d (in = out =
joint = d), batch 64. Runners:

* ``finetune``: the ``finetune`` strategy;
* ``dns-grad``: DNS with ``mode: grad`` (``after_backward`` projects each head's gradient);
* ``dns-update``: DNS with ``mode: update`` (``before_update``/``after_update`` project the
  optimizer's parameter change).

Every runner trains task 1 for one epoch (untimed; DNS has no memory yet, so the three end it
with the same weights, which is asserted), and DNS absorbs task 1's moments. Task 2 is then
trained one epoch per ``train_experience`` call, in interleaved rounds. Each call is split by
timestamps taken in the strategy's ``before_training_exp``/``after_training_exp``: the
training loop (reported per step, the headline), the projector rebuild (eigen-decompositions,
once per task) and, measured once after task 1, the moment absorption (once per task). During
the timed calls DNS skips absorbing task 2, so its memory and ranks stay those of task 1.

Part 2, the projection alone: ``project_dual(G, U, V)`` at k_in = k_out = k in dense form with
precomputed projectors (the reference cost, two d x d x d products), in low-rank form, and in
dense form without precomputed projectors (what DNS runs when ``auto`` picks dense). The script
asserts that the dense and low-rank results agree to 1e-5 and asserts nothing about time.

    .venv/bin/python benchmarks/dns_step.py [--cases 384:48 1024:128 1024:32] [--rounds 9]
        [--device cpu|cuda|auto]

On CUDA the data stays on the host (the Trainer moves each batch), the model and the
projection's matrices live on the device, and every clock reading waits for the device first.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _options import (  # beside this script
    add_device_option,
    add_output_options,
    device_info,
    parse_with_outputs,
    synchronize,
    write_results,
)

from comodal.config import EvalConfig, ModalityConfig, TrainConfig
from comodal.core.data import MultimodalDataset
from comodal.platform.feature_cache import FeatureCache
from comodal.platform.modalities import Modality
from comodal.platform.model import MultimodalEncoder
from comodal.platform.precision import resolve_device
from comodal.platform.trainer import Trainer
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.dns import DNS, DNSConfig
from comodal.strategies.finetune import Finetune
from comodal.strategies.projection import dual_flops, project_dual

RESULTS = Path(__file__).resolve().parent / "results" / "dns_step.json"
PAIR = ("vision", "text")
RANKS = (16, 64, 128, 256, 512, 1024)
TOLERANCE = 1e-5
CPU = torch.device("cpu")
NOISE = 1e-3  # std of the isotropic floor: eigenvalue 1e-6, top eigenvalue about 1.25
THRESHOLDS = {"input_rule": "relative", "input_threshold": 1e-4,
              "output_rule": "relative", "output_threshold": 1e-4}
TARGET_STEP_RATIO = 1.25  # dns / finetune per step at d = 1024
TARGET_SPEEDUP = 3.0  # dense / low-rank where k <= d / 4


# ----------------------------------------------------------------------------- data
def task_pairs(n: int, d: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision/text rows sharing a latent, each in its own random rank-``rank`` subspace."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -1, rank)  # std 1 -> 0.1: eigenvalues 1 -> 0.01 (x1.25)
    latent = torch.randn(n, rank, generator=g)

    def view() -> torch.Tensor:
        basis = torch.linalg.qr(torch.randn(d, rank, generator=g))[0]
        rows = (latent + 0.5 * torch.randn(n, rank, generator=g)) * scale
        return rows @ basis.T + NOISE * torch.randn(n, d, generator=g)

    return view(), view()


def make_task(name: str, n: int, d: int, rank: int, seed: int) -> Task:
    """One (vision, text) task: n training rows and 256 test rows."""
    vision, text = task_pairs(n + 256, d, rank, seed)
    full = MultimodalDataset(name=name, fingerprint=f"dns-step:{name}:{n}:{d}:{rank}:{seed}",
                             columns={"vision": vision, "text": text})
    return Task(name, PAIR, full.subset(range(n), name=f"{name}-train"),
                full.subset(range(n, n + 256), name=f"{name}-test"))


def make_scenario(n: int, d: int, rank: int, seed: int) -> Scenario:
    """Two tasks on the same pair, in independent subspaces."""
    return Scenario([make_task(f"task{i + 1}", n, d, rank, seed + i) for i in range(2)])


# ----------------------------------------------------------------------------- strategies
class Stamps:
    """Mixin: seconds in ``before_training_exp``, in the loop after it, and in
    ``after_training_exp``; ``absorb = False`` skips the strategy's own after_training_exp."""

    absorb = True

    def reset_clock(self) -> None:
        """Zero the per-call clock."""
        self.clock = {"rebuild": 0.0, "loop": 0.0, "absorb": 0.0, "hooks": 0.0}

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Time the strategy's per-task set-up; the loop starts when it returns."""
        start = time.perf_counter()
        super().before_training_exp(strategy, **kwargs)
        self.loop_start = time.perf_counter()
        self.clock["rebuild"] = self.loop_start - start

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """End the loop's clock, then time the strategy's per-task bookkeeping."""
        start = time.perf_counter()
        self.clock["loop"] = start - self.loop_start
        if self.absorb:
            super().after_training_exp(strategy, **kwargs)
        self.clock["absorb"] = time.perf_counter() - start


class TimedFinetune(Stamps, Finetune):
    """``finetune`` with the per-task clock."""


class TimedDNS(Stamps, DNS):
    """``dns`` with the per-task clock and the time spent in its per-step hooks."""

    def _timed(self, hook: str, strategy: Any, **kwargs: Any) -> None:
        """Run DNS's ``hook`` and add its seconds to the clock."""
        start = time.perf_counter()
        getattr(super(), hook)(strategy, **kwargs)
        self.clock["hooks"] += time.perf_counter() - start

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        """Timed DNS after_backward."""
        self._timed("after_backward", strategy, **kwargs)

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        """Timed DNS before_update."""
        self._timed("before_update", strategy, **kwargs)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        """Timed DNS after_update."""
        self._timed("after_update", strategy, **kwargs)


# ----------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """One Trainer with its (timed) strategy and the per-round records."""

    name: str
    trainer: Trainer
    plugin: Stamps
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def call(self, task: int) -> dict[str, Any]:
        """One ``train_experience`` on ``task``; its clock, loss and DNS state afterwards."""
        self.plugin.reset_clock()
        done = getattr(self.plugin, "projections", 0)
        gc.collect()
        start = time.perf_counter()
        self.trainer.train_experience(self.trainer.benchmark.train_stream[task])
        synchronize(self.trainer.device)
        record = {"total_s": time.perf_counter() - start, **self.plugin.clock,
                  "loss": self.trainer.history[-1]["loss"],
                  "steps": len(self.trainer.dataloader)}
        if isinstance(self.plugin, DNS):
            record["projections"] = self.plugin.projections - done
            record["kept"] = self.plugin.ranks[-1]["kept"]
        return record


def make_runner(name: str, plugin: Stamps, base: MultimodalEncoder, scenario: Scenario,
                cache_dir: str, args: argparse.Namespace) -> Runner:
    """A Trainer built as benchmarks/trainer_overhead.py builds it, set up on ``scenario``."""
    d = base.heads["vision"].in_features
    modalities = {m: Modality(m, ModalityConfig(encoder="features", dim=d)) for m in PAIR}
    trainer = Trainer(copy.deepcopy(base), modalities, FeatureCache(cache_dir, progress=False),
                      TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr),
                      EvalConfig(), plugins=[plugin], seed=args.seed, device=str(args.device),
                      progress=False)
    trainer.setup(scenario)
    trainer.train_epochs = 1
    return Runner(name, trainer, plugin)


def make_runners(d: int, scenario: Scenario, cache_dir: str,
                 args: argparse.Namespace) -> list[Runner]:
    """finetune, dns-grad and dns-update on copies of one model."""
    base = MultimodalEncoder(in_dims=dict.fromkeys(PAIR, d), joint_dim=d).to(args.device)
    plugins: dict[str, Stamps] = {"finetune": TimedFinetune()}
    for mode in ("grad", "update"):
        plugins[f"dns-{mode}"] = TimedDNS(DNSConfig(mode=mode, **THRESHOLDS))
    return [make_runner(name, p, base, scenario, cache_dir, args) for name, p in plugins.items()]


def max_weight_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between two models' state tensors (empty ones, such as the
    class ids of a model without classes, differ by nothing)."""
    sa, sb = a.state_dict(), b.state_dict()
    return max((float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].numel()), default=0.0)


def train_first_task(runners: list[Runner]) -> float:
    """Task 1 (untimed) on every runner; returns DNS's absorb seconds; checks equal weights."""
    absorbs = [r.call(0)["absorb"] for r in runners]
    ref = runners[0].trainer.model
    for r in runners[1:]:
        gap = max_weight_gap(r.trainer.model, ref)
        assert gap <= TOLERANCE, f"{r.name} differs from finetune after task 1 by {gap:.2e}"
        r.plugin.absorb = False  # keep task 1's memory through the timed calls
    return statistics.median(absorbs[1:])


def run_rounds(runners: list[Runner], rounds: int) -> None:
    """One warm-up call each, then ``rounds`` rounds of task 2, rotating who goes first."""
    for r in runners:
        r.call(1)
    for k in range(rounds):
        for r in runners[k % 3:] + runners[: k % 3]:
            record = r.call(1)
            if "projections" in record:  # two heads projected every step
                assert record["projections"] == 2 * record["steps"], record
            r.rounds.append(record)


# ----------------------------------------------------------------------------- case report
def per_step_ms(records: list[dict[str, Any]]) -> list[float]:
    """Milliseconds per training step of each recorded call."""
    return [1e3 * r["loop"] / r["steps"] for r in records]


def auto_form(kept: dict[str, Any]) -> str:
    """The form ``project_dual(form="auto")`` picks for a head with these kept ranks."""
    cost = dual_flops(kept["output_dim"], kept["input_dim"], kept["output"], kept["input"])
    return "lowrank" if cost["lowrank"] <= cost["dense"] else "dense"


def runner_summary(r: Runner, ft_ms: list[float], ft_total: list[float]) -> dict[str, Any]:
    """Medians, ratios to finetune (of medians and paired by round) and raw times of a runner."""
    ms, recs = per_step_ms(r.rounds), r.rounds
    totals = [x["total_s"] for x in recs]
    out = {"median_ms_per_step": statistics.median(ms), "min_ms_per_step": min(ms),
           "ratio_to_finetune": statistics.median(ms) / statistics.median(ft_ms),
           "paired_ratio": statistics.median(a / b for a, b in zip(ms, ft_ms, strict=True)),
           "hooks_ms_per_step": statistics.median(1e3 * x["hooks"] / x["steps"] for x in recs),
           "rebuild_ms": statistics.median(1e3 * x["rebuild"] for x in recs),
           "median_call_s": statistics.median(totals),
           "final_loss": recs[-1]["loss"], "ms_per_step": ms, "call_s": totals}
    if "kept" in recs[-1]:
        kept = recs[-1]["kept"]
        out["kept"] = kept
        out["auto_form"] = {m: auto_form(k) for m, k in kept.items()}
        out["kept_varied"] = any(x["kept"] != kept for x in recs)
    return out


def case_summary(runners: list[Runner], absorb_s: float) -> dict[str, dict[str, Any]]:
    """Per runner summary of one case."""
    ft = runners[0]
    ft_ms, ft_total = per_step_ms(ft.rounds), [x["total_s"] for x in ft.rounds]
    rows = {r.name: runner_summary(r, ft_ms, ft_total) for r in runners}
    for name, row in rows.items():  # a one-epoch task: loop, rebuild and absorb
        row["absorb_ms"] = 0.0 if name == "finetune" else 1e3 * absorb_s
        row["task_ratio_to_finetune"] = (row["median_call_s"] + row["absorb_ms"] / 1e3) \
            / statistics.median(ft_total)
    return rows


def print_case(d: int, rank: int, rows: dict[str, dict[str, Any]], steps: int) -> None:
    """A fixed-width table of one case."""
    kept = rows["dns-grad"]["kept"]
    ranks = ", ".join(f"{m} in {k['input']}/out {k['output']}" for m, k in kept.items())
    forms = ", ".join(sorted(set(rows["dns-grad"]["auto_form"].values())))
    print(f"\nd = {d}, task rank r = {rank}, {steps} steps/call; kept ranks: {ranks}; "
          f"auto form: {forms}")
    head = ("runner", "ms/step", "ratio", "paired", "min ms/step", "hooks ms/step",
            "rebuild ms", "absorb ms", "1-epoch task")
    print(f"{head[0]:<11}" + "".join(f"{h:>14}" for h in head[1:]))
    for name, r in rows.items():
        cells = (f"{r['median_ms_per_step']:.2f}", f"{r['ratio_to_finetune']:.3f}",
                 f"{r['paired_ratio']:.3f}", f"{r['min_ms_per_step']:.2f}",
                 f"{r['hooks_ms_per_step']:.2f}", f"{r['rebuild_ms']:.0f}",
                 f"{r['absorb_ms']:.0f}", f"{r['task_ratio_to_finetune']:.3f}")
        print(f"{name:<11}" + "".join(f"{c:>14}" for c in cells))


def trainer_case(d: int, rank: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build, train and time the three runners of one (d, r) case."""
    scenario = make_scenario(args.n, d, rank, args.seed)
    with tempfile.TemporaryDirectory() as cache_dir:
        runners = make_runners(d, scenario, cache_dir, args)
        absorb_s = train_first_task(runners)
        run_rounds(runners, args.rounds)
    rows = case_summary(runners, absorb_s)
    steps = runners[0].rounds[0]["steps"]
    print_case(d, rank, rows, steps)
    return {"dim": d, "task_rank": rank, "steps_per_call": steps, "runners": rows}


# ----------------------------------------------------------------------------- projection
def orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A random ``[d, k]`` matrix with orthonormal columns."""
    return torch.linalg.qr(torch.randn(d, k, generator=g))[0]


def median_times(fns: dict[str, Callable[[], Any]], reps: int,
                 device: torch.device = CPU) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved rep by rep."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def projection_row(d: int, k: int, reps: int, g: torch.Generator,
                   device: torch.device = CPU) -> dict[str, Any]:
    """Dense (cached and uncached projectors) vs low-rank ``project_dual`` at rank k."""
    grad, u, v = (t.to(device) for t in (torch.randn(d, d, generator=g), orthonormal(d, k, g),
                                         orthonormal(d, k, g)))
    cached = (v @ v.T, u @ u.T)
    gap = float((project_dual(grad, u, v, "dense", dense=cached)
                 - project_dual(grad, u, v, "lowrank")).abs().max())
    assert gap <= TOLERANCE, f"d={d} k={k}: dense and low-rank differ by {gap:.2e}"
    t = median_times({"dense": lambda: project_dual(grad, u, v, "dense", dense=cached),
                      "lowrank": lambda: project_dual(grad, u, v, "lowrank"),
                      "dense_uncached": lambda: project_dual(grad, u, v, "dense")}, reps, device)
    flops = dual_flops(d, d, k, k)
    return {"d": d, "k": k, "dense_ms": 1e3 * t["dense"], "lowrank_ms": 1e3 * t["lowrank"],
            "dense_uncached_ms": 1e3 * t["dense_uncached"],
            "speedup": t["dense"] / t["lowrank"], "flop_ratio": flops["dense"] / flops["lowrank"],
            "auto": "lowrank" if flops["lowrank"] <= flops["dense"] else "dense",
            "max_abs_gap": gap}


def projection_bench(d: int, reps: int, seed: int,
                     device: torch.device = CPU) -> list[dict[str, Any]]:
    """All ranks of ``RANKS`` below d, plus d / 4 and d itself."""
    g = torch.Generator().manual_seed(seed)
    ranks = sorted({k for k in RANKS if k < d} | {d // 4, d})
    rows = [projection_row(d, k, reps, g, device) for k in ranks]
    print(f"\nproject_dual at d = {d} (k_in = k_out = k; median of {reps} calls; "
          f"dense and low-rank agree to {TOLERANCE:g})")
    head = ("k", "dense ms", "lowrank ms", "speed-up", "flop ratio", "dense-uncached", "auto")
    print(f"{head[0]:>6}" + "".join(f"{h:>15}" for h in head[1:]))
    for r in rows:
        cells = (f"{r['dense_ms']:.3f}", f"{r['lowrank_ms']:.3f}", f"{r['speedup']:.2f}",
                 f"{r['flop_ratio']:.2f}", f"{r['dense_uncached_ms']:.3f}", r["auto"])
        print(f"{r['k']:>6}" + "".join(f"{c:>15}" for c in cells))
    return rows


# ----------------------------------------------------------------------------- main
def targets(cases: list[dict[str, Any]], proj: dict[int, list[dict[str, Any]]]) -> dict:
    """The issue's two targets, checked against what was measured (printed, not asserted)."""
    step = {f"d{c['dim']}_r{c['task_rank']}_{name}": c["runners"][name]["ratio_to_finetune"]
            for c in cases if c["dim"] == 1024 for name in ("dns-grad", "dns-update")}
    speed = {f"d{d}_k{r['k']}": r["speedup"] for d, rows in proj.items() for r in rows
             if r["k"] <= d // 4}
    out = {"step_ratio_max": TARGET_STEP_RATIO, "step_ratios_d1024": step,
           "step_met": {k: v <= TARGET_STEP_RATIO for k, v in step.items()},
           "speedup_min": TARGET_SPEEDUP, "speedups_k_le_d4": speed,
           "speedup_met": {k: v >= TARGET_SPEEDUP for k, v in speed.items()}}
    print("\ntargets: dns/finetune <= 1.25 at d = 1024: "
          + ", ".join(f"{k} {v:.2f} {'met' if v <= TARGET_STEP_RATIO else 'MISSED'}"
                      for k, v in step.items()))
    print("         low-rank >= 3x dense for k <= d/4: "
          + ", ".join(f"{k} {v:.1f}x {'met' if v >= TARGET_SPEEDUP else 'MISSED'}"
                      for k, v in speed.items()))
    return out


def parse_case(text: str) -> tuple[int, int]:
    """``D:R`` -> (head width, intrinsic rank of each task's features)."""
    d, r = text.split(":")
    return int(d), int(r)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", type=parse_case, metavar="D:R",
                   default=[(384, 48), (1024, 128), (1024, 32)],
                   help="head width : rank of each task's features (default 384:48 1024:128 "
                        "1024:32)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per case (default 9)")
    p.add_argument("--n", type=int, default=4096, help="training pairs per task (default 4096)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--proj-dims", nargs="+", type=int, default=[384, 1024])
    p.add_argument("--reps", type=int, default=11, help="calls per projection timing")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    add_device_option(p)
    add_output_options(p, RESULTS)
    return parse_with_outputs(p, argv, RESULTS, {"cases": [(16, 4)], "n": 128, "rounds": 1,
                                                 "batch_size": 32, "proj_dims": [16],
                                                 "reps": 1})


def machine(load_before: float, device: torch.device = CPU) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
            **device_info(device)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts, print the tables and write the JSON."""
    args = parse_args(argv)
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, on {args.device}; "
          f"n={args.n} per task, batch {args.batch_size}, {args.rounds} rounds; "
          f"DNS thresholds {THRESHOLDS}")
    cases = [trainer_case(d, r, args) for d, r in args.cases]
    proj = {d: projection_bench(d, args.reps, args.seed, args.device) for d in args.proj_dims}
    report = {"benchmark": "dns_step", "date": datetime.date.today().isoformat(),
              "machine": machine(load_before, args.device),
              "config": {"n": args.n, "batch_size": args.batch_size, "lr": args.lr,
                         "rounds": args.rounds, "seed": args.seed, "noise_std": NOISE,
                         "dns": THRESHOLDS, "cases": args.cases},
              "trainer": cases, "projection": proj, "targets": targets(cases, proj),
              "wall_s": time.perf_counter() - start}
    print(f"\n{report['wall_s']:.0f} s in all")
    write_results(args.out, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
