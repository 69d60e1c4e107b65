"""TensorBoard written while a run trains, so that a long run can be watched: the training
loss and learning rate after every epoch, and every evaluation row as it is computed.

Each task's points go to an event file of their own (suffix ``.part<k>``: part 0 holds the
evaluation before training and the config, part k the epochs of task k and the evaluation
after it). A resumed run deletes the parts of the tasks it trains again before writing them,
so no step is written twice, even for a task that was interrupted half-way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comodal._avalanche import SupervisedPlugin

PART = re.compile(r"^events\.out\.tfevents\..*\.part(\d+)$")


class LiveTensorBoard(SupervisedPlugin):
    """A trainer plugin writing ``train/loss/<task>`` and ``train/lr/<task>`` after every
    epoch at step = epochs trained in the whole run (0-based), and ``eval/<metric>/<task>``
    after every evaluation between tasks at step = tasks trained so far; flushed at each write.

    It reads the trainer's ``experience_index``, ``history`` (its last entry after each epoch:
    ``task``, ``loss``, ``lr``, the learning rate of the epoch's first step) and ``last_eval``
    (one dict of metric -> value per task, set before ``after_eval``). Evaluations during a task
    (``eval.every_epochs``) are not written."""

    across_ranks = "main"  # under torchrun, rank 0 alone writes

    def __init__(self, logdir: str | Path, task_names: Sequence[str],
                 config_text: str = "") -> None:
        super().__init__()
        self.logdir = Path(logdir)
        self.task_names = list(task_names)
        self.config_text = config_text  # the resolved config, written as text in part 0
        self.trained = 0  # tasks trained so far: the step of the next evaluation
        self.epochs = 0  # epochs in the trainer's history when last written
        self.in_task = False
        self.writer: Any = None

    def _open(self, part: int) -> None:
        """Start part ``part``, deleting what an earlier attempt wrote there and after."""
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.logdir.mkdir(parents=True, exist_ok=True)
        for path in self.logdir.iterdir():
            found = PART.match(path.name)
            if found and int(found.group(1)) >= part:
                path.unlink()
        self.writer = SummaryWriter(str(self.logdir), filename_suffix=f".part{part}")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # from the trainer's state rather than a count of calls: a resumed run starts mid-way
        self.trained, self.epochs = strategy.experience_index, len(strategy.history)
        self.in_task = True
        self._open(self.trained + 1)

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if len(strategy.history) == self.epochs:  # an epoch without batches (joint's later tasks)
            return
        self.epochs = len(strategy.history)
        entry = strategy.history[-1]
        name, step = self.task_names[entry["task"]], self.epochs - 1
        self.writer.add_scalar(f"train/loss/{name}", entry["loss"], step)
        self.writer.add_scalar(f"train/lr/{name}", entry["lr"], step)
        self.writer.flush()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.trained, self.in_task = strategy.experience_index + 1, False

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        if self.in_task:
            return
        if self.writer is None:  # the evaluation before any training
            self._open(0)
            if self.config_text:  # indented: a code block in TensorBoard's Markdown
                text = "\n".join(f"    {line}" for line in self.config_text.splitlines())
                self.writer.add_text("config", text, 0)
        for name, metrics in zip(self.task_names, strategy.last_eval, strict=True):
            for metric, value in metrics.items():
                self.writer.add_scalar(f"eval/{metric}/{name}", value, self.trained)
        self.writer.flush()

    def close(self) -> None:
        """Close the open event file (the run calls this when training ends)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
