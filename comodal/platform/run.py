"""One run end to end: config -> scenario -> model + strategies -> trainer -> run directory.

A run directory is claimed before anything is generated or trained: created, checked to hold
nothing but a run's own files, locked against a second run (``.comodal-lock``, released by the
kernel when the process dies, so a kill never leaves it stale) and marked (``.comodal-run``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from comodal.build import build_plugins, check, check_resume
from comodal.config import RunConfig, to_dict
from comodal.core.files import atomic_write_text
from comodal.errors import ConfigError, DataError, TrainingError
from comodal.platform import checkpoint, distributed
from comodal.platform.decoder import SequenceDecoder
from comodal.platform.feature_cache import FeatureCache
from comodal.platform.live_log import LiveTensorBoard
from comodal.platform.metrics import POOLED, summaries
from comodal.platform.modalities import build_modalities
from comodal.platform.model import MultimodalEncoder
from comodal.platform.precision import resolve_device
from comodal.platform.results import RESULTS_FORMAT, write_run
from comodal.platform.trainer import Trainer
from comodal.scenarios.registry import build_scenario
from comodal.strategies.registry import build_strategies
from comodal.yaml_input import flatten

HEADLINE = ("recall@1", "recall@5", "recall@10", "zeroshot", "accuracy", "wer")
MARKER, LOCK, FORMAT = ".comodal-run", ".comodal-lock", 1
TOKENIZER = "tokenizer.json"  # sequence tasks' BPE tokenizer (HF tokenizers' JSON)
RUN_ENTRIES = frozenset({"config.yaml", "metrics.json", "summary.json", "matrices", "tb",
                         "checkpoints", TOKENIZER, MARKER, LOCK})  # everything a run writes


@dataclass
class RunResult:
    task_names: list[str]
    matrices: dict[str, torch.Tensor]
    summary: dict[str, dict[str, float]]
    out: Path | None
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: RunConfig, modalities: dict) -> MultimodalEncoder:
    """The shared encoder of ``config``, with the sequence decoder over the audio encoder's
    frames when ``scenario.class_incremental.target`` is ``sequence``."""
    encoders = {n: m.trainable for n, m in modalities.items() if m.trainable is not None}
    ci, dec = config.scenario.class_incremental, config.model.decoder
    decoder = None
    if ci is not None and ci.target == "sequence":
        decoder = SequenceDecoder(
            modalities[ci.modalities[0]].out_dim, dec.vocab_size, dim=dec.dim,
            layers=dec.layers, heads=dec.heads, ffn=dec.ffn, dropout=dec.dropout,
            max_length=dec.max_length, frame_stride=dec.frame_stride)
    return MultimodalEncoder(
        in_dims={n: m.out_dim for n, m in modalities.items()},
        joint_dim=config.model.joint_dim,
        encoders=encoders,
        temperature=config.model.temperature,
        learnable_temperature=config.model.learnable_temperature,
        score=config.model.score,
        head_init=config.model.head_init,
        head_bias=config.model.head_bias,
        decoder=decoder,
    )


def build_trainer(config: RunConfig, plugins: Sequence[Any] | None = None) -> Trainer:
    """Modalities, model, feature cache and strategies of ``config`` assembled into a trainer
    (``plugins`` replaces the configured strategies and plugins when given; otherwise the
    config's ``plugins`` are built afresh and follow its strategies). Seeds every generator
    first, so that the same config and seed give the same initial model."""
    seed_everything(config.seed)
    modalities = build_modalities(config.model.modalities)
    if plugins is None:
        plugins = (build_strategies(config.strategies, config.strategy_args)
                   + build_plugins(config.plugins))
    return Trainer(
        build_model(config, modalities), modalities,
        FeatureCache(config.data.cache_dir, progress=config.progress),
        config.train, config.eval, plugins,
        seed=config.seed, device=config.device, progress=config.progress,
        decoding=config.model.decoder,
    )


def identity(config: RunConfig) -> str:
    """The resolved config as text, without the fields that do not change results, and with
    the results format, so that a checkpoint an older comodal wrote is never resumed."""
    fields = {k: v for k, v in to_dict(config).items() if k not in ("out", "progress", "device")}
    fields["train"] = {k: v for k, v in fields["train"].items() if k != "check_ranks"}
    return yaml.safe_dump({**fields, "results_format": RESULTS_FORMAT}, sort_keys=True)


def claim(out: Path) -> IO[str]:
    """Make ``out`` this run's directory, before any data is generated or anything trained:
    create it, refuse it if it holds files a run did not write, mark it and lock it. Returns the
    open lock file; closing it (or the process ending) releases the lock."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file, not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        found = _foreign(out)
        if found:
            raise ConfigError(
                f"out: {out} is not a comodal run directory (it holds {', '.join(found[:5])}"
                f"{' ...' if len(found) > 5 else ''}); a run replaces checkpoints/, tb/, "
                "matrices/ and its result files, so it writes only into a new or empty "
                f"directory or one a run made ({MARKER}); choose another --out")
        atomic_write_text(out / MARKER, f"comodal run directory\nformat: {FORMAT}\n")
        lock = open(out / LOCK, "a+")  # held open for the whole run
    except OSError as err:
        where = f" ({err.filename})" if err.filename and Path(err.filename) != out else ""
        raise ConfigError(f"out: cannot use {out} as the run directory: "
                          f"{err.strerror or err}{where}") from err
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a run that has not written its name yet"
        lock.close()
        raise ConfigError(f"out: {out} is in use by another run ({holder}); wait for it to "
                          "finish or choose another --out") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, "
               f"started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock


def _foreign(out: Path) -> list[str]:
    """What in ``out`` a run did not write (nothing for a marked, new or empty directory).
    A directory an older comodal wrote before runs were marked is adopted when it holds only a
    run's entries, ``checkpoints/`` only checkpoints, and its metrics.json or a checkpoint (one
    that loads and holds a run config) shows that comodal made it: old ``run`` and ``compare``
    seed directories."""
    if (out / MARKER).is_file():
        return []
    names = sorted(p.name for p in out.iterdir() if not _leftover(p.name))
    found = [n for n in names if n not in RUN_ENTRIES]
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        found += [f"checkpoints/{p.name}" for p in sorted(ckpts.iterdir())
                  if not (checkpoint.PATTERN.match(p.name) or _leftover(p.name))]
    if found or set(names) <= {LOCK}:
        return found
    made = any(_comodal_checkpoint(p) for _, p in checkpoint.saved(ckpts))
    return [] if made or _comodal_metrics(out / "metrics.json") else names


def _leftover(name: str) -> bool:
    """A temporary file an atomic write left behind when its process was killed."""
    return name.startswith(".") and name.endswith(".tmp")


def _comodal_checkpoint(path: Path) -> bool:
    try:
        checkpoint.read(path)
    except DataError:
        return False
    return True


def _comodal_metrics(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"tasks", "matrices", "summary"} <= data.keys()


def run(config: RunConfig, resume: bool = False) -> RunResult:
    """Train through the configured scenario and write the run directory (if ``out`` is set),
    with a checkpoint after every task under ``<out>/checkpoints``. ``resume`` continues from
    the latest checkpoint there (a finished run then trains nothing); otherwise old
    checkpoints are removed and the run starts over. The config is checked (``check``, which
    imports its ``imports``) and the directory claimed first (see ``claim``), so a bad config
    or ``out`` fails before anything is generated or trained."""
    start = time.perf_counter()
    check(config)
    world, device = distributed.setup(str(resolve_device(config.device)))
    main = world is None or world.main
    if world is not None:  # this rank's device; progress bars on rank 0 only
        config = dataclasses.replace(config, device=device, progress=config.progress and main)
    out = Path(config.out) if config.out else None
    with claim(out) if out is not None and main else contextlib.nullcontext():
        if out is not None and not resume and main:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "tb", ignore_errors=True)  # resuming keeps it (see live_log)
        elif out is not None and resume:
            check_resume(config, out / "checkpoints")
        if world is not None:
            world.barrier()  # rank 0 has claimed the directory and cleared what it replaces
        trainer = build_trainer(config)
        with world.main_first() if world is not None else contextlib.nullcontext():
            scenario = build_scenario(config)  # generated data: written once, by rank 0
        live = [] if out is None or not main else [LiveTensorBoard(
            out / "tb", scenario.task_names, yaml.safe_dump(to_dict(config), sort_keys=False))]
        trainer.attach(*live)
        try:
            matrices = _fit(trainer, scenario, out, identity(config))
        finally:
            for plugin in live:
                plugin.close()
        summary = summaries(matrices, trainer.test_sizes)
        seconds = time.perf_counter() - start
        if out is not None and main:
            shutil.rmtree(out / "matrices", ignore_errors=True)  # a rerun replaces, never mixes
            reports = {p.name: p.results() for p in trainer.plugins if hasattr(p, "results")}
            write_run(out, to_dict(config), scenario.task_names, matrices, summary,
                      extra={"history": trainer.history, "seconds": round(seconds, 2),
                             "strategies": reports, "test_sizes": trainer.test_sizes,
                             "pooled_acc": [m for m in POOLED if m in matrices],
                             **({"tokenizer": {"digest": trainer.tokenizer.digest(),
                                               "vocab_size": trainer.tokenizer.vocab_size}}
                                if trainer.tokenizer is not None else {})})
            write_tensorboard(out / "tb", summary, to_dict(config))
            if trainer.tokenizer is not None:
                atomic_write_text(out / TOKENIZER, trainer.tokenizer.to_json())
    return RunResult(scenario.task_names, matrices, summary, out, seconds)


def _fit(trainer: Trainer, scenario: Any, out: Path | None,
         config: str) -> dict[str, torch.Tensor]:
    """``trainer.fit`` with checkpoints in ``out``; training stopped by an untrustworthy value
    keeps the finished tasks' checkpoints and says where ``--resume`` continues."""
    checkpoints = out / "checkpoints" if out is not None else None
    try:
        return trainer.fit(scenario, checkpoints, config)
    except TrainingError as err:
        if checkpoints is None:
            raise
        done = max((k for k, _ in checkpoint.saved(checkpoints)), default=0)
        kept = f"the checkpoints of tasks 1-{done} are kept in {checkpoints}" if done else \
            "no task had finished"
        raise TrainingError(f"{err}; {kept}: --resume continues from task {done + 1} "
                            f"({scenario.task_names[done]})") from err


def write_tensorboard(logdir: Path, summary: dict[str, dict[str, float]],
                      config: dict[str, Any]) -> None:
    """The summaries (``summary/<metric>/<key>`` at step 0) and the run's hyperparameters
    (every scalar of the resolved config by dotted key, for TensorBoard's HParams table) in
    an event file of their own, replacing the one a resumed run wrote before;
    ``LiveTensorBoard`` wrote the rest."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    for old in Path(logdir).glob("events.out.tfevents.*.summary"):
        old.unlink()
    scores = {f"summary/{metric}/{key}": value for metric, values in summary.items()
              for key, value in values.items() if value == value}
    with SummaryWriter(str(logdir), filename_suffix=".summary") as writer:
        for tag, value in scores.items():
            writer.add_scalar(tag, value, 0)
        # numbers, strings and booleans as they are; lists, {} and null as their YAML text
        values = {key: value if isinstance(value, (bool, int, float, str))
                  else yaml.safe_dump(value, default_flow_style=True).strip()
                  for key, value in flatten(config).items()}
        for part in hparams(values, scores):
            writer.file_writer.add_summary(part)
