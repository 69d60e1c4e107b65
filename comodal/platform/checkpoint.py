"""Checkpoints after every task, so that a killed run resumes from its last finished task and
ends with the metrics an uninterrupted run gives.

A checkpoint holds the model (with the classifier's class ids), every strategy's and
plugin's ``state_dict()`` by position in the trainer's plugins (buffers, moments, bases,
Fisher anchors; ``None`` for one without a ``state_dict``, whose state a resumed run cannot get
back, so ``comodal.build.check_resume`` refuses to resume a config whose ``plugins`` hold one),
the evaluation rows and training history so far, and every random state the rest of the run
draws from: the trainer's batch generator and torch's, numpy's and Python's global generators.
With ``train.keep_optimizer`` the optimizer's moments are saved too (otherwise every task
starts from fresh moments, and there is nothing to save); with ``train.precision: 16-mixed``
the grad scaler's state (its loss scale), so that a resumed run continues with the same scale.
Teachers are not saved either: a teacher is the model as it was at the start of its task, which
is the checkpointed model. Sequence tasks' tokenizer is saved as its JSON, which the trainer reads
back before it tokenises the targets (``Trainer.fit``). Files load with ``weights_only=True``
(tensors and plain containers only) and are written atomically, so a kill never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comodal.core.files import atomic_torch_save
from comodal.errors import ConfigError, DataError
from comodal.yaml_input import config_diff

PATTERN = re.compile(r"after_task_(\d+)\.pt$")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stateful(plugins: list[Any]) -> list[Any]:
    """The plugins whose state a checkpoint lists, by position: all but those that run on
    rank 0 only (``across_ranks: main``, the TensorBoard writer), so that every rank of a
    torchrun run, and a one-process run, reads the same list."""
    return [p for p in plugins if getattr(p, "across_ranks", None) != "main"]


def save(directory: Path, trainer: Any, rows: list, config: str) -> Path:
    """Write the checkpoint after task ``len(rows) - 1`` (rows include the one before
    training); ``config`` is the run's resolved config, to refuse resuming another run."""
    done = len(rows) - 1
    state = {
        "config": config,
        "tasks_done": done,
        "rows": rows,
        "history": trainer.history,
        "model": trainer.model.state_dict(),
        "class_ids": trainer.model.class_ids.tolist(),
        "optimizer": (trainer.optimizer.state_dict() if trainer.train_cfg.keep_optimizer
                      else None),
        "strategies": [p.state_dict() if hasattr(p, "state_dict") else None
                       for p in stateful(trainer.plugins)],
        "rng": rng_state(trainer.generator),
        "scaler": trainer.precision.state_dict(),  # 16-mixed's loss scale; None otherwise
        # sequence tasks' BPE vocabulary (JSON), so that a resumed run reads the same token ids
        "tokenizer": trainer.tokenizer.to_json() if trainer.tokenizer is not None else None,
    }
    path = Path(directory) / f"after_task_{done}.pt"
    atomic_torch_save(state, path)
    return path


def saved(directory: Path) -> list[tuple[int, Path]]:
    """The checkpoints in ``directory`` as (tasks done, path), fewest tasks first."""
    return sorted((int(m.group(1)), p) for p in Path(directory).glob("after_task_*.pt")
                  if (m := PATTERN.match(p.name)))


def read(path: Path) -> dict[str, Any]:
    """The state a checkpoint holds; a truncated file, or one that is not a comodal
    checkpoint, is a ``DataError`` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("config"), str):
            raise RuntimeError("it holds no run config")
    except Exception as err:  # torch.load fails in many ways on what is not a checkpoint
        reason = str(err).split("\n")[0] or "empty file"
        raise DataError(f"{path}: truncated or corrupt checkpoint ({reason}); delete it to "
                        "resume from the task before, or run without --resume to start "
                        "over") from err
    return state


def latest(directory: Path, config: str) -> dict[str, Any] | None:
    """The checkpoint of the most tasks in ``directory``, or None; a checkpoint of another
    config is an error naming the keys that differ, since resuming it would mix two runs."""
    found = saved(directory)
    if not found:
        return None
    path = found[-1][1]
    state = read(path)
    if state["config"] != config:
        raise ConfigError(f"{path}: this checkpoint is from a run with another config "
                          f"({'; '.join(config_diff(state['config'], config))}); resume with "
                          "that config, run without --resume to start over, or write the new "
                          "run elsewhere (--out)")
    return state


def restore(trainer: Any, state: dict[str, Any]) -> list:
    """Put the trainer where it was after the checkpoint's task; returns the rows so far."""
    trainer.model.grow(state["class_ids"])
    trainer.model.load_state_dict(state["model"])  # copies onto the model's device
    if state["optimizer"] is not None:
        trainer.optimizer = trainer.make_optimizer()  # over the grown classifier's parameters
        trainer.optimizer.load_state_dict(state["optimizer"])
    for plugin, plugin_state in zip(stateful(trainer.plugins), state["strategies"], strict=True):
        if plugin_state is not None:
            plugin.load_state_dict(plugin_state)
    trainer.precision.load_state_dict(state.get("scaler"))
    trainer.history = list(state["history"])
    set_rng_state(state["rng"], trainer.generator)
    return list(state["rows"])
