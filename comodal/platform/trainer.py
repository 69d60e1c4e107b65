"""The shared trainer: one loop that fits the multimodal encoder through a scenario and calls
strategy plugins at Avalanche's moments, evaluating every task before and after each task."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from comodal._avalanche import BasePlugin, BaseSGDPlugin, SupervisedPlugin
from comodal.config import EvalConfig, TrainConfig
from comodal.errors import ConfigError, TrainingError
from comodal.platform import checkpoint
from comodal.platform.feature_cache import FeatureCache, prepare_dataset
from comodal.platform.losses import InfoNCE
from comodal.platform.metrics import accuracy, content_ids, retrieval_recalls, zero_shot_accuracy
from comodal.platform.modalities import Modality, collate_samples
from comodal.platform.model import MultimodalEncoder
from comodal.scenarios.data import (
    BatchLoader,
    InterleavedLoader,
    MultimodalDataset,
    concat,
    non_finite_rows,
)
from comodal.scenarios.task import Scenario, Task

TRAIN_HOOKS = (
    "before_training", "before_train_dataset_adaptation", "after_train_dataset_adaptation",
    "before_training_exp", "before_training_epoch", "before_training_iteration",
    "before_forward", "after_forward", "before_backward", "after_backward", "before_update",
    "after_update", "after_training_iteration", "after_training_epoch", "after_training_exp",
    "after_training",
)
EVAL_HOOKS = (
    "before_eval", "before_eval_exp", "before_eval_iteration", "before_eval_forward",
    "after_eval_forward", "after_eval_iteration", "after_eval_exp", "after_eval",
)
_NO_OPS = (BasePlugin, BaseSGDPlugin, SupervisedPlugin)


class ClassifyOutput(NamedTuple):
    """What a classify task's forward pass gives: logits over the classes seen so far and the
    classified modality's joint features (before normalisation)."""

    logits: torch.Tensor
    features: torch.Tensor


def overrides(plugin: Any, hook: str) -> bool:
    """Whether ``plugin`` implements ``hook`` (rather than inheriting Avalanche's no-op)."""
    method = getattr(type(plugin), hook, None)
    return method is not None and all(method is not getattr(c, hook, None) for c in _NO_OPS)


class Trainer:
    """Fits ``model`` through a scenario. Plugins receive ``(trainer, **kwargs)`` like
    Avalanche's ``(strategy, **kwargs)`` and may read or replace ``model``, ``optimizer``,
    ``dataloader``, ``mbatch``, ``mb_output`` and ``loss``; only the hooks a plugin overrides
    are called, from lists built once here."""

    def __init__(
        self,
        model: MultimodalEncoder,
        modalities: dict[str, Modality],
        cache: FeatureCache,
        train: TrainConfig,
        evaluation: EvalConfig,
        plugins: Sequence[Any] = (),
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.modalities, self.cache = modalities, cache
        self.train_cfg, self.eval_cfg, self.seed, self.progress = train, evaluation, seed, progress
        self.plugins = list(plugins)
        for plugin in self.plugins:  # strategies that name model parts check them up front
            if hasattr(plugin, "check"):
                plugin.check(self.model)
        self._hooks = {
            hook: [getattr(p, hook) for p in self.plugins if overrides(p, hook)]
            for hook in TRAIN_HOOKS + EVAL_HOOKS
        }
        self.criterion = InfoNCE(symmetric=train.loss.symmetric)
        self.generator = torch.Generator().manual_seed(seed)
        self.train_epochs, self.train_mb_size = train.epochs, train.batch_size
        self.optimizer: torch.optim.Optimizer | None = None
        self.experience: Any = None
        self.scenario: Scenario | None = None
        self.dataloader: Any = None
        self.mbatch: dict[str, Any] | None = None
        self.mb_output: tuple[torch.Tensor, ...] | None = None
        self.loss = torch.zeros(())
        self.is_training = False
        self.history: list[dict[str, Any]] = []

    def _call(self, hook: str) -> None:
        for fn in self._hooks[hook]:
            fn(self)

    # ----------------------------------------------------------------- data
    def _collate(self, key: str, values: Sequence[Any]) -> Any:
        return self.modalities[key].collate_prepared(values)

    def prepare(self, scenario: Scenario) -> Scenario:
        """Each task's data as training reads it (frozen backbones through the cache)."""
        tasks = []
        for task in scenario.tasks:
            missing = [m for m in task.modalities if m not in self.modalities]
            if missing:
                raise ConfigError(f"task {task.name!r} uses modality {missing[0]!r}, which the "
                                 f"model does not have (configured: {', '.join(self.modalities)})")
            mods = {m: self.modalities[m] for m in task.modalities}
            tasks.append(task.with_data(prepare_dataset(task.train, "train", mods, self.cache),
                                        prepare_dataset(task.test, "test", mods, self.cache)))
        return Scenario(tasks)

    def _class_inputs(self, task: Any) -> Any:
        """Prepared text of each class of ``task`` (zero-shot prototypes), or None."""
        if not task.class_texts or "text" not in self.modalities:
            return None
        classes = MultimodalDataset(
            name=f"{task.name} classes", fingerprint="class-texts:" + "|".join(task.class_texts),
            columns={"text": list(task.class_texts)},
        )
        prepared = prepare_dataset(classes, "classes", {"text": self.modalities["text"]},
                                   self.cache)
        return self.to_device(self._gather_all(prepared))

    def _gather_all(self, data: MultimodalDataset) -> dict[str, Any]:
        return next(iter(BatchLoader(data, self._collate, len(data), -1, shuffle=False)))

    def make_loader(self, task_ids: Sequence[int]) -> BatchLoader | InterleavedLoader:
        """Training batches of the given tasks; the current task reads ``adapted_dataset``,
        which plugins may replace. Several classify tasks share batches (one dataset of all
        their rows, so that every batch mixes classes); pair tasks keep a batch per task, so
        that InfoNCE's negatives come from the task's own data, and their batches interleave."""
        current = getattr(self, "experience_index", None)
        data = {i: self.adapted_dataset if i == current else self.scenario.tasks[i].train
                for i in task_ids}
        classify = [i for i in task_ids if self.scenario.tasks[i].kind == "classify"]
        groups = [[i] for i in task_ids if i not in classify] + ([classify] if classify else [])
        loaders = [
            BatchLoader(data[g[0]] if len(g) == 1 else concat([data[i] for i in g], "joint"),
                        self._collate, self.train_mb_size, g[0], shuffle=True,
                        generator=self.generator)
            for g in groups
        ]
        return loaders[0] if len(loaders) == 1 else InterleavedLoader(loaders, self.generator)

    def ordered_loader(self, task_id: int, batch_size: int | None = None) -> BatchLoader:
        """A task's training batches in order (by default of the evaluation batch size), for
        statistics a strategy takes after a task."""
        return BatchLoader(self.scenario.tasks[task_id].train, self._collate,
                           batch_size or self.eval_cfg.batch_size, task_id, shuffle=False)

    def statistics_pass(self, task_id: int,
                        batch_size: int | None = None) -> Iterable[dict[str, Any]]:
        """``ordered_loader``'s batches on the device with the model in eval mode (no batch-norm
        statistics move, no dropout), for the statistics a strategy takes after a task; the
        previous mode comes back when the batches run out or the loop over them is left."""
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.ordered_loader(task_id, batch_size):
                yield self.to_device(batch)
        finally:
            self.model.train(was_training)

    def to_device(self, batch: Any) -> Any:
        if self.device.type == "cpu":  # data is built on the CPU: nothing to move
            return batch
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        return batch

    # ----------------------------------------------------------------- training
    def fit(self, scenario: Scenario, checkpoints: Path | None = None,
            config: str = "") -> dict[str, torch.Tensor]:
        """Train through every task; return one matrix ``R[after_task, eval_task]`` per metric
        (row 0 is the evaluation before any training). With ``checkpoints`` (a directory), a
        checkpoint is written after every task and the run resumes from the latest one there
        (``config``, the resolved config as text, must match the one it was written with)."""
        self.setup(scenario)
        state = checkpoint.latest(checkpoints, config) if checkpoints is not None else None
        rows = checkpoint.restore(self, state) if state else [self.evaluate()]
        for exp in list(self.benchmark.train_stream)[len(rows) - 1:]:
            self.train_experience(exp)
            rows.append(self.evaluate())
            if checkpoints is not None:
                checkpoint.save(checkpoints, self, rows, config)
        metrics = sorted({m for row in rows for col in row for m in col})
        nan = float("nan")
        return {
            m: torch.tensor([[col.get(m, nan) for col in row] for row in rows])
            for m in metrics
        }

    def setup(self, scenario: Scenario) -> None:
        """Prepare every task's data and build the Avalanche benchmark the loop iterates."""
        if self.scenario is not None:
            raise RuntimeError("this Trainer has already been fit; build a new one per run "
                               "so that row 0 is the model before any training")
        for plugin in self.plugins:
            kinds = getattr(plugin, "kinds", None)
            for task in scenario.tasks if kinds else ():
                if task.kind not in kinds:
                    raise ConfigError(f"strategy {plugin.name}: works on {' and '.join(kinds)} "
                                      f"tasks, but task {task.name!r} is a {task.kind} task")
        torch.manual_seed(self.seed)
        self.scenario = self.prepare(scenario)
        self.class_inputs = [self._class_inputs(t) for t in self.scenario.tasks]
        self.test_groups = [self._content_groups(raw, task)
                            for raw, task in zip(scenario.tasks, self.scenario.tasks, strict=True)]
        self.benchmark = self.scenario.benchmark(
            collate_fn=lambda samples: collate_samples(samples, self.modalities, prepared=True)
        )

    def _content_groups(self, raw: Task, task: Task) -> tuple[torch.Tensor, ...] | None:
        """A pair task's ``content_ids`` of its test rows per modality, so that retrieval
        counts duplicate partners as positives. Text compares as the raw strings: a frozen text
        backbone's features of one caption differ in the last bits between batches padded to
        different lengths."""
        if task.kind != "pair":
            return None
        return tuple(content_ids((raw if m == "text" else task).test.columns[m])
                     for m in task.modalities)

    @property
    def test_sizes(self) -> list[int]:
        """Each task's number of test rows (weights of pooled class-incremental accuracy)."""
        return [len(task.test) for task in self.scenario.tasks]

    def make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.train_cfg
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train_experience(self, exp: Any) -> None:
        """One task: build its loader and optimizer, then run the epochs."""
        self.experience, self.is_training = exp, True
        self.experience_index = exp.current_experience
        self.model.train()
        self._call("before_training")
        self._call("before_train_dataset_adaptation")
        self.adapted_dataset = self.scenario.tasks[self.experience_index].train
        self._call("after_train_dataset_adaptation")
        self.dataloader = self.make_loader([self.experience_index])
        self.grow_classes([self.experience_index])
        self.optimizer = self.make_optimizer()
        self._call("before_training_exp")
        total = self.train_epochs * len(self.dataloader)
        bar = tqdm(total=total, desc=f"train {exp.task.name}", disable=not self.progress,
                   leave=False)
        for epoch in range(self.train_epochs):
            self._call("before_training_epoch")
            losses = []  # on the device: reading each step's loss would synchronise every step
            for batch in self.dataloader:
                self.mbatch = self.to_device(batch)
                self.training_step()
                losses.append(self.loss.detach())
                bar.update()
            if losses:
                mean = self.epoch_loss(torch.stack(losses), epoch)
                self.history.append({"task": self.experience_index, "epoch": epoch, "loss": mean})
                bar.set_postfix(loss=f"{mean:.4f}")
            self._call("after_training_epoch")
        bar.close()
        self._call("after_training_exp")
        self._call("after_training")
        self.is_training = False

    def epoch_loss(self, losses: torch.Tensor, epoch: int) -> float:
        """Mean of an epoch's step losses; a non-finite one stops training with a
        ``TrainingError`` naming the task, the epoch and the first bad step. Checked once per
        epoch (one host synchronisation), so at most the rest of that epoch trains on a
        non-finite loss; the epoch's hooks and the task's checkpoint never see it."""
        mean = losses.double().mean().item()  # float64: finite float32 losses cannot overflow
        if math.isfinite(mean):
            return mean
        step = int((~torch.isfinite(losses)).nonzero()[0])
        task = self.scenario.tasks[self.experience_index]
        raise TrainingError(
            f"task {task.name!r} (task {self.experience_index + 1} of {len(self.scenario)}): "
            f"the training loss is {losses[step].item()} at epoch {epoch + 1}, step "
            f"{step + 1} of {len(losses)}; training stopped. Lower train.lr, or look for "
            "non-finite values in the task's data")

    def grow_classes(self, task_ids: Iterable[int]) -> None:
        """Classifier rows for the classes of these tasks (before the optimizer is built)."""
        for i in task_ids:
            task = self.scenario.tasks[i]
            if task.kind == "classify":
                self.model.grow(task.classes)

    def pair(self, batch: dict[str, Any]) -> tuple[str, ...]:
        return self.scenario.tasks[batch["task_id"]].modalities

    def task_of(self, batch: dict[str, Any]) -> Task:
        return self.scenario.tasks[batch["task_id"]]

    def forward(self, batch: dict[str, Any], model: MultimodalEncoder | None = None) -> Any:
        """A pair task's two joint embeddings, or a classify task's ``ClassifyOutput``, of
        ``batch`` under ``model`` (default the one being trained; a teacher may be passed)."""
        model = model or self.model
        task = self.task_of(batch)
        if task.kind == "classify":
            z = model.encode(batch, task.modalities[0], normalize=False)
            return ClassifyOutput(model.classify(z), z)
        a, b = task.modalities
        return model.encode(batch, a), model.encode(batch, b)

    def task_loss(self, batch: dict[str, Any], output: Any) -> torch.Tensor:
        """InfoNCE over a pair batch; cross-entropy over the classes seen so far otherwise."""
        if isinstance(output, ClassifyOutput):
            return F.cross_entropy(output.logits, self.model.class_rows(batch["label"]))
        return self.criterion(*output, self.model.scale)

    def training_step(self) -> None:
        """The one place that calls ``zero_grad``, ``backward`` and ``step``."""
        self._call("before_training_iteration")
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = torch.zeros((), device=self.device)  # plugins may add to it from here on
        self._call("before_forward")
        self.mb_output = self.forward(self.mbatch)
        self._call("after_forward")
        self.loss = self.loss + self.task_loss(self.mbatch, self.mb_output)
        self._call("before_backward")
        self.loss.backward()
        self._call("after_backward")
        self._call("before_update")
        self.optimizer.step()
        self._call("after_update")
        self._call("after_training_iteration")

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def embed(self, data: MultimodalDataset, pair: Sequence[str],
              head: Any = None) -> dict[str, torch.Tensor]:
        """Joint embeddings of every row of ``data`` for each modality in ``pair`` (with
        ``head``: ``head`` of the unnormalised embeddings, e.g. the classifier's logits)."""
        loader = BatchLoader(data, self._collate, self.eval_cfg.batch_size, -1, shuffle=False)
        out: dict[str, list[torch.Tensor]] = {m: [] for m in pair}
        for batch in loader:
            self.mbatch = self.to_device(batch)
            self._call("before_eval_iteration")
            self._call("before_eval_forward")
            if head is None:
                self.mb_output = tuple(self.model.encode(self.mbatch, m) for m in pair)
            else:
                self.mb_output = tuple(head(self.model.encode(self.mbatch, m, normalize=False))
                                       for m in pair)
            self._call("after_eval_forward")
            for m, z in zip(pair, self.mb_output, strict=True):
                out[m].append(z.cpu())
            self._call("after_eval_iteration")
        return {m: torch.cat(z) for m, z in out.items()}

    @torch.no_grad()
    def class_accuracy(self, data: MultimodalDataset) -> float:
        """Accuracy on ``data`` with the classifier's argmax over every class seen so far (0
        before any class of it was trained: class-incremental evaluation)."""
        if self.model.classifier is None:
            return 0.0
        m = self.experience.task.modalities[0]
        logits = self.embed(data, (m,), head=self.model.classify)[m]
        self.check_finite(self.experience.task, m, logits, "logits of test row")
        predicted = self.model.class_ids.cpu()[logits.argmax(dim=1)]
        return accuracy(predicted, data.labels)

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        """Metrics of every task's test set under the current model, one dict per task."""
        was_training = self.model.training
        self.model.eval()
        self._call("before_eval")
        results = []
        stream = self.benchmark.test_stream
        for exp in tqdm(stream, desc="evaluate", disable=not self.progress, leave=False):
            self.experience = exp
            self._call("before_eval_exp")
            task = exp.task
            if task.kind == "classify":
                results.append({"accuracy": self.class_accuracy(task.test)})
                self._call("after_eval_exp")
                continue
            z = self.embed(task.test, task.modalities)
            for m in task.modalities:
                self.check_finite(task, m, z[m], "embedding of test row")
            a, b = task.modalities
            cfg = self.eval_cfg
            metrics = retrieval_recalls(z[a], z[b], cfg.ks, cfg.pool_size, cfg.pool_draws,
                                        seed=self.seed + exp.current_experience,
                                        groups=self.test_groups[exp.current_experience])
            prototypes = self.class_inputs[exp.current_experience]
            if prototypes is not None and task.test.labels is not None:
                protos = self.model.encode(prototypes, "text").cpu()
                self.check_finite(task, "text", protos, "embedding of class text")
                scored = [m for m in task.modalities if m != "text"]
                accs = [zero_shot_accuracy(z[m], protos, task.test.labels) for m in scored]
                metrics["zeroshot"] = sum(accs) / len(accs)
            results.append(metrics)
            self._call("after_eval_exp")
        self._call("after_eval")
        self.model.train(was_training)
        return results

    def check_finite(self, task: Task, modality: str, values: torch.Tensor, what: str) -> None:
        """Stop at a non-finite evaluation output (a NaN row would otherwise score), naming the
        task, the modality and the first bad row."""
        bad = non_finite_rows(values)
        if len(bad):
            first = int(bad[0])
            row = values[first].reshape(-1)
            raise TrainingError(
                f"task {task.name!r}: at evaluation the {modality} {what} {first} holds "
                f"{row[~torch.isfinite(row)][0].item()} ({len(bad)} of {len(values)} rows are "
                "not finite); lower train.lr, or look for non-finite values in the data")
