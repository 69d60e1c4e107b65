"""Steps per second of one comodal training run on 1 and 2 processes (torchrun, gloo on the
CPU), and the share of each step spent inside the collectives.

One command runs everything. The script, as the parent, launches itself under
``python -m torch.distributed.run --standalone --nproc-per-node N ... --worker`` once per
configuration and round:

* ``1x1``: one process, one torch thread (``OMP_NUM_THREADS=1``);
* ``1x2``: one process, two threads: the fair one-process baseline on a 2-core machine;
* ``2x1``: two processes of one thread each (the same threads per process as ``1x1``), so
  that the two processes use the two cores.

Each worker trains two workloads through comodal's own ``Trainer`` (``finetune`` strategy,
AdamW, ``setup(scenario)`` then one ``train_experience`` per epoch; no evaluation):

* ``wide_head``: a pair task of precomputed features, width d = 1024 for both modalities,
  ``MultimodalEncoder(in_dims={vision: d, text: d}, joint_dim=d)``, global batch 256, InfoNCE:
  a head wide enough that compute dominates;
* ``slu_conv``: the SLU audio encoder (``encoder: conv``: log-mel front end and four dilated
  conv + batch-norm layers, 64 channels, as ``examples/slu_fsc.yaml``) on random 16 kHz
  waveforms of 2 to 3 s, paired with 384-wide text features (a frozen MiniLM's width),
  global batch 64, InfoNCE. Under 2 processes its batch norms normalise by both ranks' rows
  (``distributed.share_batch_norm``, applied by the Trainer).

``train.batch_size`` is the global batch: under 2 processes each rank runs the encoders and
heads on its half of every batch's rows, all-gathers the embeddings, computes the loss on the
whole batch and all-reduces the gradients (``comodal.platform.distributed``). The first epoch
is a warm-up; the timed epochs follow. Reported per workload and configuration: steps per
second (timed steps / wall time of the timed epochs, data loading included; the median over
epochs), the median ``training_step`` time, and the communication per step: the time inside
``World.gather`` (forward all-gathers), ``_Gather.backward`` (their backward all-reduces),
``World.reduce_gradients`` (the gradient all-reduce, flattening included) and any other
collective (here the batch-norm statistics' all-reduces, forward and backward), which this
script times by wrapping those functions and ``torch.distributed.all_reduce`` /
``all_gather`` in the worker processes (a benchmark-only monkeypatch). Gloo's CPU
collectives block until every rank has joined, so that time includes waiting for the other
rank; ``transfer`` is, per collective, the shorter of the two ranks' times (the rank that
arrived last waited for nobody), summed over the step. The same wrappers count the bytes
handed to the collectives, which the script checks against the analytic volume per step
(``comm_volume``), also tabulated for N = 2, 4, 8 and a wav2vec2-base-size encoder. After
the workloads, each 2-process launch times gloo's all-reduce alone (after a barrier) for a
tiny, a 1 MiB and an 8 MiB tensor. The launches of one round start from the same weights and
batches, so they compute the same training: the script asserts that their epoch losses
agree to 1e-3 (after writing the report).

    .venv/bin/python benchmarks/distributed_scaling.py [--rounds 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _options import add_output_options, parse_with_outputs, write_results  # beside this script

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_scaling.json"
WORKLOADS = ("wide_head", "slu_conv")
CONFIGS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name: (processes, threads each)
CATEGORIES = ("gather", "gather_backward", "gradients", "other")
BUCKET = 1 << 24  # comodal.platform.distributed.BUCKET (not imported: the parent stays light)
FLOAT = 4  # bytes of a float32
LOSS_TOLERANCE = 1e-3  # epoch losses of 1 and 2 processes: summation order only


# ----------------------------------------------------------------------------- analytic
def comm_volume(dim: int, batch: int, n: int, params: int, modalities: int = 2,
                bn_channels: tuple[int, ...] = ()) -> dict[str, Any]:
    """Bytes one rank sends (and, as much, receives) per training step of the design in
    ``comodal.platform.distributed`` on ``n`` ranks, with ring collectives: ``modalities``
    float32 all-gathers of the ``batch x dim`` embeddings (a rank receives the other ranks'
    (n-1)/n of the rows), the backward all-reduce of each gathered embedding's gradient
    (``batch x dim``, 2(n-1)/n of it per rank), the gradient all-reduce of the ``params``
    trainable parameters (float32, 2(n-1)/n), and per batch-norm layer of C channels an
    all-reduce of 2C+1 float64 statistics forward and one of their gradients backward."""
    ring = (n - 1) / n
    embeddings = batch * dim * FLOAT
    parts = {
        "gather": modalities * ring * embeddings,
        "gather_backward": modalities * 2 * ring * embeddings,
        "gradients": 2 * ring * params * FLOAT,
        "batch_norm": sum(2 * 2 * ring * (2 * c + 1) * 8 for c in bn_channels),
    }
    return {
        "n": n, "dim": dim, "batch": batch, "params": params,
        "bytes_per_rank": parts, "total_bytes_per_rank": sum(parts.values()),
        # payloads: the tensors handed to the collectives (what the worker counts)
        "payload_bytes": {"gather": modalities * embeddings,
                          "gather_backward": modalities * embeddings,
                          "gradients": params * FLOAT,
                          "batch_norm": sum(2 * (2 * c + 1) * 8 for c in bn_channels)},
        "collectives": 2 * modalities + max(1, math.ceil(params / BUCKET)) + 2 * len(bn_channels),
    }


def analytic_table() -> list[dict[str, Any]]:
    """The volume at d = 1024, B = 256 for N = 2, 4, 8: the wide head (2d^2 + 1 parameters)
    and a wav2vec2-base-size trained encoder (95M parameters, heads included)."""
    rows = []
    for name, params in (("wide head d=1024", 2 * 1024 * 1024 + 1),
                         ("wav2vec2-base-size encoder", 95_000_000)):
        for n in (2, 4, 8):
            rows.append({"model": name, **comm_volume(1024, 256, n, params)})
    return rows


# ----------------------------------------------------------------------------- worker
class CommTimers:
    """Seconds and payload bytes inside the collectives, per category, for the current step;
    installed by monkeypatching ``comodal.platform.distributed`` and ``torch.distributed``."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.payload = dict.fromkeys(CATEGORIES, 0)
        self.calls = dict.fromkeys(CATEGORIES, 0)
        self.trace: list[tuple[str, float]] = []  # (category, seconds) of each collective
        self.inside: str | None = None

    def reset(self) -> None:
        self.__init__()

    def wrap(self, category: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.inside is not None:
                return fn(*args, **kwargs)
            self.inside = category
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[category] += time.perf_counter() - start
                self.inside = None
        return timed

    def wrap_collective(self, fn: Any, gathered: bool) -> Any:
        """``torch.distributed.all_reduce`` / ``all_gather``: bytes to the enclosing category,
        time too when no wrapped comodal function encloses the call (``other``)."""
        def timed(first: Any, *args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if gathered else first
            size = tensor.numel() * tensor.element_size() * (len(first) if gathered else 1)
            category = self.inside or "other"
            self.payload[category] += size
            self.calls[category] += 1
            start = time.perf_counter()
            try:
                return fn(first, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                self.trace.append((category, seconds))
                if self.inside is None:
                    self.seconds["other"] += seconds
        return timed

    def install(self) -> None:
        import torch.distributed as dist

        from comodal.platform import distributed

        distributed.World.gather = self.wrap("gather", distributed.World.gather)
        distributed.World.reduce_gradients = self.wrap("gradients",
                                                       distributed.World.reduce_gradients)
        distributed._Gather.backward = staticmethod(
            self.wrap("gather_backward", distributed._Gather.backward))
        self.originals = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather}
        dist.all_reduce = self.wrap_collective(dist.all_reduce, gathered=False)
        dist.all_gather = self.wrap_collective(dist.all_gather, gathered=True)


def wide_head(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Modalities, model and scenario of the wide-head pair task."""
    import torch

    from comodal.config import ModalityConfig
    from comodal.core.data import MultimodalDataset
    from comodal.platform.modalities import Modality
    from comodal.platform.model import MultimodalEncoder
    from comodal.scenarios.task import Scenario, Task

    d, n = args.dim, args.batch * args.steps
    g = torch.Generator().manual_seed(args.seed)
    latent = torch.randn(n + 16, d, generator=g)
    vision = latent + torch.randn(n + 16, d, generator=g)
    text = latent + torch.randn(n + 16, d, generator=g)
    data = [MultimodalDataset(name=f"wide-{split}", fingerprint=f"wide:{split}:{d}:{n}",
                              columns={"vision": vision[rows], "text": text[rows]})
            for split, rows in (("train", slice(0, n)), ("test", slice(n, n + 16)))]
    modalities = {m: Modality(m, ModalityConfig(encoder="features", dim=d))
                  for m in ("vision", "text")}
    torch.manual_seed(args.seed)
    model = MultimodalEncoder(in_dims=dict.fromkeys(modalities, d), joint_dim=d)
    scenario = Scenario([Task("wide", ("vision", "text"), *data)])
    return (modalities, model, scenario), {"dim": d, "joint_dim": d, "batch": args.batch}, {}


def slu_conv(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Modalities, model and scenario of the SLU conv-encoder pair task (audio, text)."""
    import torch

    from comodal.config import ModalityConfig
    from comodal.core.data import MultimodalDataset
    from comodal.platform.encoders import AudioConv
    from comodal.platform.modalities import Modality
    from comodal.platform.model import MultimodalEncoder
    from comodal.scenarios.task import Scenario, Task

    rate, n = 16000, args.audio_batch * args.audio_steps
    g = torch.Generator().manual_seed(args.seed)
    low, high = args.seconds
    lengths = (torch.rand(n + 4, generator=g) * (high - low) + low) * rate
    waves = [(0.1 * torch.randn(int(k), generator=g), rate) for k in lengths.tolist()]
    text = torch.randn(n + 4, args.text_dim, generator=g)
    data = [MultimodalDataset(name=f"slu-{split}", fingerprint=f"slu:{split}:{n}:{low}:{high}",
                              columns={"audio": waves[rows], "text": text[rows]})
            for split, rows in (("train", slice(0, n)), ("test", slice(n, n + 4)))]
    torch.manual_seed(args.seed)
    modalities = {
        "audio": Modality("audio", ModalityConfig(encoder="conv", dim=args.conv_dim,
                                                  sample_rate=rate, n_mels=40)),
        "text": Modality("text", ModalityConfig(encoder="features", dim=args.text_dim)),
    }
    model = MultimodalEncoder(in_dims={m: mod.out_dim for m, mod in modalities.items()},
                              joint_dim=args.conv_dim,
                              encoders={"audio": modalities["audio"].trainable})
    scenario = Scenario([Task("slu", ("audio", "text"), *data)])
    channels = tuple(m.num_features for m in model.modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert isinstance(model.encoders["audio"], AudioConv)
    info = {"dim": args.conv_dim, "joint_dim": args.conv_dim, "batch": args.audio_batch,
            "seconds": [low, high], "sample_rate": rate, "n_mels": 40,
            "text_dim": args.text_dim}
    return (modalities, model, scenario), info, {"bn_channels": channels}


def measure(name: str, args: argparse.Namespace, timers: CommTimers) -> dict[str, Any]:
    """Train the workload ``1 + epochs`` epochs through the Trainer; the first is a warm-up."""
    import torch

    from comodal.config import EvalConfig, TrainConfig
    from comodal.platform.feature_cache import FeatureCache
    from comodal.platform.trainer import Trainer
    from comodal.strategies.finetune import Finetune

    (modalities, model, scenario), info, extra = {"wide_head": wide_head,
                                                  "slu_conv": slu_conv}[name](args)
    batch = info["batch"]
    with tempfile.TemporaryDirectory() as cache_dir:
        trainer = Trainer(model, modalities, FeatureCache(cache_dir, progress=False),
                          TrainConfig(epochs=1, batch_size=batch, lr=1e-3, keep_optimizer=True),
                          EvalConfig(), plugins=[Finetune()], seed=args.seed, device="cpu",
                          progress=False)
        trainer.setup(scenario)
    experience = trainer.benchmark.train_stream[0]
    steps: list[dict[str, Any]] = []
    timing = False
    original = trainer.training_step

    def timed_step() -> None:
        timers.reset()
        start = time.perf_counter()
        original()
        seconds = time.perf_counter() - start
        if timing:
            steps.append({"seconds": seconds, "comm": dict(timers.seconds),
                          "payload": dict(timers.payload), "calls": dict(timers.calls),
                          "trace": list(timers.trace)})

    trainer.training_step = timed_step
    trainer.train_experience(experience)  # warm-up epoch
    timing = True
    epochs = []
    for _ in range(args.epochs):
        before = len(steps)
        start = time.perf_counter()
        trainer.train_experience(experience)
        epochs.append({"seconds": time.perf_counter() - start, "steps": len(steps) - before})
    params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {**info, **extra, "params": params, "epochs": epochs, "steps": steps,
            "losses": [h["loss"] for h in trainer.history],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def probe(all_reduce: Any, world: Any, reps: int) -> dict[str, dict[str, float]]:
    """This machine's gloo all-reduce alone: median ms over ``reps`` calls, each after a
    barrier (so no rank waits for another), for a tiny, a 1 MiB and an 8 MiB float32 tensor;
    and its bus bandwidth (2(N-1)/N x bytes / time, the bytes a rank sends in a ring)."""
    import torch

    found = {}
    for name, numel in (("4 B", 1), ("1 MiB", 1 << 18), ("8 MiB", 1 << 21)):
        tensor, times = torch.ones(numel), []
        for _ in range(reps):
            world.barrier()
            start = time.perf_counter()
            all_reduce(tensor)
            times.append(time.perf_counter() - start)
        ms = 1e3 * statistics.median(times)
        found[name] = {"ms": ms, "bus_GB_per_s": 2 * (world.size - 1) / world.size
                       * numel * FLOAT / ms / 1e6}
    return found


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: both workloads; rank 0 writes every rank's results."""
    import torch

    from comodal.platform import distributed
    from comodal.platform.trainer import Trainer

    # Avalanche, which the trainer imports, refuses to be first imported (it builds a logger)
    # in a non-main process once the process group exists: import it before joining
    assert Trainer is not None
    torch.set_num_threads(args.threads)
    world, _ = distributed.setup("cpu")
    timers = CommTimers()
    timers.install()
    found = {name: measure(name, args, timers) for name in args.workloads}
    ranks = world.objects(found) if world is not None else [found]
    alone = probe(timers.originals["all_reduce"], world, args.probe_reps) if world else None
    if world is None or world.main:
        args.worker_out.write_text(json.dumps({"world_size": len(ranks), "ranks": ranks,
                                               "all_reduce_alone": alone}))


# ----------------------------------------------------------------------------- parent
class Launch:
    """One torchrun launch of ``config`` (started at once); ``result()`` waits for it and
    returns rank 0's JSON."""

    def __init__(self, config: str, args: argparse.Namespace, tmp: Path, tag: str) -> None:
        procs, threads = CONFIGS[config]
        settings = ["--dim", args.dim, "--batch", args.batch, "--steps", args.steps,
                    "--audio-batch", args.audio_batch, "--audio-steps", args.audio_steps,
                    "--seconds", *args.seconds, "--conv-dim", args.conv_dim,
                    "--text-dim", args.text_dim, "--epochs", args.epochs, "--seed", args.seed,
                    "--threads", threads, "--probe-reps", args.probe_reps,
                    "--workloads", *args.workloads]
        self.config, self.out, self.log = config, tmp / f"{tag}.json", tmp / f"{tag}.log"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(procs), str(Path(__file__).resolve()), "--worker",
                   "--worker-out", str(self.out), *map(str, settings)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.start = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, text=True)

    def result(self) -> dict[str, Any]:
        code = self.process.wait(timeout=1800)
        if code != 0:
            sys.stderr.write(self.log.read_text()[-8000:])
            raise SystemExit(f"the {self.config} launch failed (exit {code})")
        found = json.loads(self.out.read_text())
        found["launch_seconds"] = time.perf_counter() - self.start
        return found


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(launches: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    """One configuration's numbers for ``workload`` over its launches (rounds)."""
    per_rank = [[run["ranks"][r][workload] for run in launches]
                for r in range(launches[0]["world_size"])]
    first = per_rank[0]
    epochs = [e for run in first for e in run["epochs"]]
    rate = [e["steps"] / e["seconds"] for e in epochs]
    ranks = []
    for runs in per_rank:
        steps = [s for run in runs for s in run["steps"]]
        step = median([s["seconds"] for s in steps])
        comm = {c: median([s["comm"][c] for s in steps]) for c in CATEGORIES}
        total = median([sum(s["comm"].values()) for s in steps])
        ranks.append({"step_ms": 1e3 * step, "comm_ms": 1e3 * total,
                      "comm_ms_by_kind": {c: 1e3 * v for c, v in comm.items()},
                      "comm_share": total / step if step else 0.0,
                      "payload_bytes": steps[-1]["payload"], "calls": steps[-1]["calls"]})
    # Gloo's collectives block until both ranks joined: the rank that arrives last waits for
    # nobody, so per collective the shorter of the two ranks' times is the transfer itself
    # and the rest of the longer one is waiting for the other rank.
    transfer: list[dict[str, float]] = []
    for k, run in enumerate(first):
        for i in range(len(run["steps"])):
            traces = [per_rank[r][k]["steps"][i]["trace"] for r in range(len(per_rank))]
            step = dict.fromkeys(CATEGORIES, 0.0)
            for calls in zip(*traces, strict=True):
                step[calls[0][0]] += min(t[1] for t in calls)
            transfer.append(step)
    transfer_ms = 1e3 * median([sum(t.values()) for t in transfer])
    return {
        "steps_per_s": median(rate),
        "transfer_ms": transfer_ms,
        "transfer_ms_by_kind": {c: 1e3 * median([t[c] for t in transfer]) for c in CATEGORIES},
        "transfer_share": transfer_ms / ranks[0]["step_ms"] if ranks[0]["step_ms"] else 0.0,
        "steps_per_s_by_round": [sum(e["steps"] for e in run["epochs"])
                                 / sum(e["seconds"] for e in run["epochs"]) for run in first],
        "step_ms": ranks[0]["step_ms"],
        "comm_ms": ranks[0]["comm_ms"],
        "comm_share": ranks[0]["comm_share"],
        "ranks": ranks,
        "timed_steps": sum(e["steps"] for e in epochs),
        "epoch_losses": [run["losses"] for run in first],
        "params": first[0]["params"],
        "threads_per_process": first[0]["threads"],
        "launch_seconds": [run["launch_seconds"] for run in launches],
    }


def loss_gap(rows: dict[str, dict[str, Any]]) -> float:
    """Largest difference between any configuration's epoch losses and ``1x1``'s, round by
    round (each round's launches train from the same weights on the same batches)."""
    ref = rows["1x1"]["epoch_losses"]
    return max((abs(a - b) for row in rows.values()
                for run, base in zip(row["epoch_losses"], ref, strict=True)
                for a, b in zip(run, base, strict=True)), default=0.0)


def print_table(report: dict[str, Any]) -> None:
    head = ("workload", "config", "steps/s", "vs 1x1", "vs 1x2", "step ms", "comm ms",
            "comm share", "gather", "gath bwd", "grads", "other", "transfer", "xfer share")
    print(f"{head[0]:<10}{head[1]:>7}" + "".join(f"{h:>11}" for h in head[2:]))
    for workload, rows in report["runners"].items():
        for config, r in rows.items():
            kinds = r["ranks"][0]["comm_ms_by_kind"]
            cells = (f"{r['steps_per_s']:.2f}", f"{r['speedup_vs_1x1']:.2f}",
                     f"{r['speedup_vs_1x2']:.2f}" if r["speedup_vs_1x2"] else "-",
                     f"{r['step_ms']:.1f}", f"{r['comm_ms']:.2f}",
                     f"{100 * r['comm_share']:.1f}%",
                     *(f"{kinds[c]:.2f}" for c in CATEGORIES), f"{r['transfer_ms']:.2f}",
                     f"{100 * r['transfer_share']:.1f}%")
            print(f"{workload:<10}{config:>7}" + "".join(f"{c:>11}" for c in cells))
    print("comm ms by kind (rank 0, median per step): forward all-gathers, their backward "
          "all-reduces, the gradient all-reduce, other collectives (batch-norm statistics); "
          "transfer: per collective the shorter of the ranks' times (the rest is waiting for "
          "the other rank)")
    print("analytic bytes per rank per step, d=1024, B=256 (ring collectives):")
    for row in report["analytic"]["table"]:
        b = row["bytes_per_rank"]
        print(f"  {row['model']:<28} N={row['n']}: gather {b['gather'] / 2**20:7.2f} MiB, "
              f"gather bwd {b['gather_backward'] / 2**20:7.2f} MiB, gradients "
              f"{b['gradients'] / 2**20:8.1f} MiB, total {row['total_bytes_per_rank'] / 2**20:8.1f}"
              f" MiB in {row['collectives']} collectives")


def parent(args: argparse.Namespace) -> dict[str, Any]:
    configs = args.configs
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    launches: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            order = configs[k % len(configs):] + configs[: k % len(configs)]
            print(f"round {k + 1}/{args.rounds}: {', '.join(order)}", flush=True)
            if args.smoke:  # the numbers mean nothing: start every launch at once
                started = [Launch(c, args, Path(tmp), f"{c}-{k}") for c in order]
                for run in started:
                    launches[run.config].append(run.result())
                continue
            for config in order:  # one at a time, so that they do not compete for the cores
                launches[config].append(Launch(config, args, Path(tmp), f"{config}-{k}")
                                        .result())
    runners: dict[str, dict[str, Any]] = {}
    measured: dict[str, Any] = {}
    for workload in args.workloads:
        rows = {c: summarize(launches[c], workload) for c in configs}
        for row in rows.values():
            row["speedup_vs_1x1"] = row["steps_per_s"] / rows["1x1"]["steps_per_s"]
            row["speedup_vs_1x2"] = (row["steps_per_s"] / rows["1x2"]["steps_per_s"]
                                     if "1x2" in rows else None)
        runners[workload] = rows
        if "2x1" not in rows:
            continue
        one = launches[configs[0]][0]["ranks"][0][workload]
        volume = comm_volume(one["joint_dim"], one["batch"], 2, one["params"],
                             bn_channels=tuple(one.get("bn_channels", ())))
        got = rows["2x1"]["ranks"][0]["payload_bytes"]
        measured[workload] = {
            "analytic_n2": volume,
            "payload_bytes_counted": got,
            "payload_bytes_expected": {"gather": volume["payload_bytes"]["gather"],
                                       "gather_backward":
                                           volume["payload_bytes"]["gather_backward"],
                                       "gradients": volume["payload_bytes"]["gradients"],
                                       "other": volume["payload_bytes"]["batch_norm"]},
            "max_epoch_loss_gap_to_1x1": loss_gap(rows),
        }
    report = {
        "benchmark": "distributed_scaling",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([".venv/bin/python", "benchmarks/distributed_scaling.py",
                             *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
            "torch": launches["1x1"][0]["ranks"][0][args.workloads[0]]["torch"],
        },
        "config": {"configs": {c: {"processes": CONFIGS[c][0], "threads_per_process":
                                   CONFIGS[c][1]} for c in configs},
                   "rounds": args.rounds, "epochs_timed": args.epochs, "warmup_epochs": 1,
                   "wide_head": {"dim": args.dim, "batch": args.batch,
                                 "steps_per_epoch": args.steps},
                   "slu_conv": {"conv_dim": args.conv_dim, "batch": args.audio_batch,
                                "steps_per_epoch": args.audio_steps, "seconds": args.seconds,
                                "text_dim": args.text_dim},
                   "seed": args.seed},
        "runners": runners,
        "communication": measured,
        "all_reduce_alone": [run["all_reduce_alone"] for run in launches.get("2x1", [])],
        "analytic": {
            "formula": "bytes sent (= received) per rank per step, ring collectives, float32: "
                       "M(N-1)/N*B*D*4 (forward all-gathers) + 2M(N-1)/N*B*D*4 (their "
                       "backward all-reduces) + 2(N-1)/N*P*4 (gradient all-reduce), M = 2 "
                       "modalities, B global batch, D joint width, P trainable parameters",
            "table": analytic_table(),
        },
        "wall_seconds": time.perf_counter() - start,
    }
    for workload, m in measured.items():
        counted, expected = m["payload_bytes_counted"], m["payload_bytes_expected"]
        for kind in ("gather", "gather_backward", "other"):  # exact: what the design hands over
            assert counted[kind] == expected[kind], (workload, kind, counted, expected)
        # the gradient all-reduce also carries one presence flag per parameter tensor
        assert 0 <= counted["gradients"] - expected["gradients"] < 4096, (workload, counted)
    print(f"{len(configs)} configurations x {args.rounds} rounds; {args.epochs} timed epochs "
          f"after 1 warm-up epoch per launch; wall {report['wall_seconds']:.0f} s")
    print_table(report)
    for workload, m in measured.items():
        print(f"{workload}: largest epoch-loss gap to 1x1: {m['max_epoch_loss_gap_to_1x1']:.2e}")
    for k, alone in enumerate(report["all_reduce_alone"]):
        print(f"gloo all-reduce alone, 2 processes (round {k + 1}): " + ", ".join(
            f"{size} {v['ms']:.2f} ms ({v['bus_GB_per_s']:.2f} GB/s bus)"
            for size, v in alone.items()))
    write_results(args.out, report)
    for workload, m in measured.items():  # the launches of a round train the same run
        assert m["max_epoch_loss_gap_to_1x1"] < LOSS_TOLERANCE, (workload, m)
    return report


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024, help="wide head: feature = joint width")
    p.add_argument("--batch", type=int, default=256, help="wide head: global batch")
    p.add_argument("--steps", type=int, default=8, help="wide head: steps per epoch")
    p.add_argument("--audio-batch", type=int, default=64, help="slu conv: global batch")
    p.add_argument("--audio-steps", type=int, default=4, help="slu conv: steps per epoch")
    p.add_argument("--seconds", type=float, nargs=2, default=[2.0, 3.0],
                   help="slu conv: waveform lengths drawn uniformly in this range")
    p.add_argument("--conv-dim", type=int, default=64, help="slu conv: channels = joint width")
    p.add_argument("--text-dim", type=int, default=384, help="slu conv: text feature width")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per launch")
    p.add_argument("--rounds", type=int, default=3, help="launches per configuration")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="processes x threads (1x1 is always run: the reference)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--probe-reps", type=int, default=25,
                   help="calls per size of the all-reduce probe (2 processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    add_output_options(p, RESULTS)
    args = parse_with_outputs(p, argv, RESULTS, {
        "dim": 64, "batch": 16, "steps": 3, "audio_batch": 8, "audio_steps": 3,
        "seconds": [0.2, 0.3], "epochs": 1, "rounds": 1, "configs": ["1x1", "2x1"],
        "probe_reps": 2,
    })
    if not args.worker:
        args.configs = ["1x1", *[c for c in dict.fromkeys(args.configs) if c != "1x1"]]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None
    return parent(args)


if __name__ == "__main__":
    main(sys.argv[1:])
