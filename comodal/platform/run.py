"""One run end to end: config -> scenario -> model + strategies -> trainer -> run directory."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from comodal.config import RunConfig, to_dict
from comodal.platform.feature_cache import FeatureCache
from comodal.platform.metrics import summarize
from comodal.platform.modalities import build_modalities
from comodal.platform.model import MultimodalEncoder
from comodal.platform.results import write_run
from comodal.platform.trainer import Trainer
from comodal.scenarios.registry import build_scenario
from comodal.strategies.registry import build_strategies

HEADLINE = ("recall@1", "recall@5", "recall@10", "zeroshot", "accuracy")


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
    encoders = {n: m.trainable for n, m in modalities.items() if m.trainable is not None}
    return MultimodalEncoder(
        in_dims={n: m.out_dim for n, m in modalities.items()},
        joint_dim=config.model.joint_dim,
        encoders=encoders,
        temperature=config.model.temperature,
        learnable_temperature=config.model.learnable_temperature,
    )


def build_trainer(config: RunConfig, plugins: Sequence[Any] | None = None) -> Trainer:
    """Modalities, model, feature cache and strategies of ``config`` assembled into a trainer
    (``plugins`` replaces the configured strategies when given). Seeds every generator first,
    so that the same config and seed give the same initial model."""
    seed_everything(config.seed)
    modalities = build_modalities(config.model.modalities)
    if plugins is None:
        plugins = build_strategies(config.strategies, config.strategy_args)
    return Trainer(
        build_model(config, modalities), modalities,
        FeatureCache(config.data.cache_dir, progress=config.progress),
        config.train, config.eval, plugins,
        seed=config.seed, device=config.device, progress=config.progress,
    )


def identity(config: RunConfig) -> str:
    """The resolved config as text, without the fields that do not change results."""
    fields = {k: v for k, v in to_dict(config).items() if k not in ("out", "progress", "device")}
    return yaml.safe_dump(fields, sort_keys=True)


def run(config: RunConfig, resume: bool = False) -> RunResult:
    """Train through the configured scenario and write the run directory (if ``out`` is set),
    with a checkpoint after every task under ``<out>/checkpoints``. ``resume`` continues from
    the latest checkpoint there (a finished run then trains nothing); otherwise old
    checkpoints are removed and the run starts over."""
    start = time.perf_counter()
    out = Path(config.out) if config.out else None
    checkpoints = out / "checkpoints" if out is not None else None
    if checkpoints is not None and not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    trainer = build_trainer(config)
    scenario = build_scenario(config)
    matrices = trainer.fit(scenario, checkpoints, identity(config))
    summary = {m: summarize(r) for m, r in matrices.items()}
    seconds = time.perf_counter() - start
    if out is not None:
        for stale in (out / "tb", out / "matrices"):  # a rerun replaces, never mixes
            shutil.rmtree(stale, ignore_errors=True)
        reports = {p.name: p.results() for p in trainer.plugins if hasattr(p, "results")}
        write_run(out, to_dict(config), scenario.task_names, matrices, summary,
                  extra={"history": trainer.history, "seconds": round(seconds, 2),
                         "strategies": reports})
        write_tensorboard(out / "tb", scenario.task_names, matrices, summary, trainer.history)
    return RunResult(scenario.task_names, matrices, summary, out, seconds)


def write_tensorboard(logdir: Path, task_names: list[str], matrices: dict[str, torch.Tensor],
                      summary: dict[str, dict[str, float]], history: list[dict]) -> None:
    """A scalar per (metric, evaluated task) at step = tasks trained so far, the summaries, and
    the training loss per epoch."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for metric, matrix in matrices.items():
            for row, values in enumerate(matrix.tolist()):
                for name, value in zip(task_names, values, strict=True):
                    if value == value:
                        writer.add_scalar(f"eval/{metric}/{name}", value, row)
        for metric, values in summary.items():
            for key, value in values.items():
                if value == value:
                    writer.add_scalar(f"summary/{metric}/{key}", value, 0)
        for step, entry in enumerate(history):
            writer.add_scalar(f"train/loss/{task_names[entry['task']]}", entry["loss"], step)
