"""The shared trainer: one loop that fits the multimodal encoder through a scenario and calls
strategy plugins at Avalanche's moments, evaluating every task before and after each task."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from comodal._avalanche import (
    BasePlugin,
    BaseSGDPlugin,
    Clock,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from comodal.config import DecoderConfig, EvalConfig, TrainConfig
from comodal.core.data import (
    Batch,
    BatchLoader,
    InterleavedLoader,
    MultimodalDataset,
    concat,
    non_finite_rows,
    to_device,
)
from comodal.errors import ConfigError, TrainingError
from comodal.platform import checkpoint, distributed
from comodal.platform.avalanche_view import AvalancheCriterion, check_plugins, is_evaluator
from comodal.platform.feature_cache import FeatureCache, prepare_dataset
from comodal.platform.losses import InfoNCE
from comodal.platform.metrics import (
    accuracy,
    content_ids,
    retrieval_recalls,
    sequence_metrics,
    zero_shot_accuracy,
)
from comodal.platform.modalities import Modality, collate_samples
from comodal.platform.model import MultimodalEncoder, SequenceOutput, frozen_copy
from comodal.platform.precision import Precision, resolve_device
from comodal.platform.schedules import build_scheduler
from comodal.platform.sequences import SequenceTokenizer, target_tokens
from comodal.scenarios.task import Scenario, Task

TRAIN_HOOKS = (
    "before_training", "before_train_dataset_adaptation", "after_train_dataset_adaptation",
    "before_training_exp", "before_training_epoch", "before_training_iteration",
    "before_forward", "after_forward", "before_backward", "after_backward", "before_update",
    "after_update", "after_training_iteration", "after_training_epoch", "after_training_exp",
    "after_training",
)
EVAL_HOOKS = (
    "before_eval", "before_eval_dataset_adaptation", "after_eval_dataset_adaptation",
    "before_eval_exp", "before_eval_iteration", "before_eval_forward",
    "after_eval_forward", "after_eval_iteration", "after_eval_exp", "after_eval",
)
_NO_OPS = (BasePlugin, BaseSGDPlugin, SupervisedPlugin)


class ClassifyOutput(NamedTuple):
    """What a classify task's forward pass gives: logits over the classes seen so far and the
    classified modality's joint features (before normalisation)."""

    logits: torch.Tensor
    features: torch.Tensor


class PairOutput(tuple):
    """A pair task's two joint embeddings as the model scores them (``model.scored``:
    L2-normalised under ``score: cosine``, raw under ``dot``); ``raw`` holds the heads' outputs
    (Avalanche's view of the output, ``mb_output``, stacks those)."""

    raw: tuple[torch.Tensor, torch.Tensor]


def overrides(plugin: Any, hook: str) -> bool:
    """Whether ``plugin`` implements ``hook``: a method other than Avalanche's no-op, or one
    its instance answers for every callback (``EvaluationPlugin`` dispatches so)."""
    method = getattr(type(plugin), hook, None)
    if method is None:
        return callable(getattr(plugin, hook, None))
    return all(method is not getattr(c, hook, None) for c in _NO_OPS)


class Trainer:
    """Fits ``model`` through a scenario, calling plugins at Avalanche's moments with
    ``(trainer, **kwargs)`` as Avalanche calls ``(strategy, **kwargs)``; only the hooks a
    plugin overrides are called, from lists built once here.

    What a plugin may read (and replace: ``model``, ``optimizer``, ``adapted_dataset``,
    ``dataloader``, ``loss``, and in ``after_forward`` ``mb_output``, whose loss is then
    ``_criterion(mb_output, mb_y)``), Avalanche's template names first: ``model``,
    ``optimizer``, ``experience``, ``adapted_dataset``, ``dataloader``, ``mbatch`` (a
    ``Batch``), ``mb_x``, ``mb_y``, ``mb_task_id``, ``mb_output``, ``loss``, ``_criterion``,
    ``clock``, ``evaluator``, ``is_training``, ``is_eval``, ``train_mb_size``,
    ``eval_mb_size``, ``train_epochs``, ``device``, ``plugins``, ``current_eval_stream``,
    ``stop_training()`` and ``model_adaptation()``; then comodal's: ``scenario`` (the prepared
    tasks), ``experience_index``, ``generator`` (the batch order's), ``outputs`` (the step's
    ``ClassifyOutput``, ``SequenceOutput`` or ``PairOutput``), ``side_outputs`` (``(batch,
    output)`` of batches trained beside the main one), ``teacher`` and
    ``teacher_output(batch)``, ``forward``, ``task_loss``, ``criterion`` (InfoNCE), ``pair``,
    ``statistics_pass``, ``to_device``, ``history``, ``last_eval``, and on sequence tasks
    ``tokenizer`` and ``decode(batch)``. Strategies extend the training loader by declaring
    ``train_tasks(trainer)`` (which tasks' data to load) or ``wrap_loader(trainer, loader)``,
    and ask for a teacher with the class attribute ``uses_teacher = True``."""

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
        decoding: DecoderConfig | None = None,
    ) -> None:
        self.device = resolve_device(device)  # auto: CUDA when available
        self.world = distributed.current()  # None in a one-process run
        self.model = model.to(self.device)
        if self.world is not None:
            distributed.share_batch_norm(self.model)
        self.precision = Precision(train.precision, self.device)
        self.modalities, self.cache = modalities, cache
        self.train_cfg, self.eval_cfg, self.seed, self.progress = train, evaluation, seed, progress
        self.decoding = decoding or DecoderConfig()
        self.tokenizer: SequenceTokenizer | None = None  # sequence tasks' (made at setup)
        self.plugins = list(plugins)
        for plugin in self.plugins:  # strategies that name model parts check them up front
            if hasattr(plugin, "check"):
                plugin.check(self.model)
        self.clock = Clock()  # Avalanche's counters, called last, as its templates call it
        self._build_hooks()
        self.criterion = InfoNCE(symmetric=train.loss.symmetric)
        self._criterion = AvalancheCriterion(lambda: self.model, self.criterion)
        self.generator = torch.Generator().manual_seed(seed)
        self.train_epochs, self.train_mb_size = train.epochs, train.batch_size
        self.eval_mb_size, self.eval_every = evaluation.batch_size, evaluation.every_epochs
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer = self.make_optimizer()  # made now, so that a plugin may schedule it
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.experience: Any = None
        self.scenario: Scenario | None = None
        self.adapted_dataset: Any = None
        self.dataloader: Any = None
        self.current_eval_stream: list[Any] = []
        self.mbatch: Batch | None = None
        self.outputs: Any = None
        self.side_outputs: list[tuple[dict[str, Any], Any]] = []
        self._mb_output: Any = None
        self._replaced = False  # a plugin set mb_output: the step's loss is computed from it
        self.teacher: MultimodalEncoder | None = None
        self._teacher_cache: tuple[Any, Any] | None = None
        self.loss = torch.zeros(())
        self.is_training = False
        self._stop = False
        self.history: list[dict[str, Any]] = []
        self.last_eval: list[dict[str, float]] = []

    def attach(self, *plugins: Any) -> None:
        """Add plugins before ``fit``, e.g. an ``LRSchedulerPlugin`` built on
        ``trainer.optimizer``."""
        if self.scenario is not None:
            raise RuntimeError("plugins attach before fit")
        for plugin in plugins:
            if hasattr(plugin, "check"):
                plugin.check(self.model)
        self.plugins += plugins
        self._build_hooks()

    def _build_hooks(self) -> None:
        """Each callback's list of the plugins that override it: strategies and plugins in
        order, then the ``EvaluationPlugin`` (``evaluator``), then the clock, as Avalanche."""
        evaluators = [p for p in self.plugins if is_evaluator(p)]
        self.evaluator = evaluators[0] if evaluators else None
        called = [p for p in self.plugins if p not in evaluators] + evaluators + [self.clock]
        self._hooks = {
            hook: [getattr(p, hook) for p in called if overrides(p, hook)]
            for hook in TRAIN_HOOKS + EVAL_HOOKS
        }
        self._uses_teacher = any(getattr(p, "uses_teacher", False) for p in self.plugins)
        owners = [p for p in self.plugins if callable(getattr(p, "pair_loss", None))]
        if len(owners) > 1:
            raise ConfigError("strategies: " + " and ".join(p.name for p in owners) + " each "
                              "replace the pair task loss; stack one of them")
        self._pair_loss = owners[0].pair_loss if owners else None
        self._rehome = self.device.type == "cpu" and any(
            isinstance(p, SynapticIntelligencePlugin) for p in self.plugins)
        self._eval_loss = self.evaluator is not None or any(
            overrides(p, h) for p in self.plugins
            for h in ("after_eval_forward", "after_eval_iteration"))

    def _call(self, hook: str) -> None:
        for fn in self._hooks[hook]:
            fn(self)

    # ----------------------------------------------------------------- Avalanche's view
    @property
    def mb_x(self) -> Batch:
        return self.mbatch

    @property
    def mb_y(self) -> torch.Tensor:
        """Targets as Avalanche reads them: classifier rows of the labels (-1 for a class not
        grown yet), a sequence task's target tokens after ``[SOS]`` (``[B, L]``), or on pair
        tasks the task index of every row."""
        return self.targets(self.mbatch)

    @property
    def mb_task_id(self) -> torch.Tensor:
        """Task labels: 0 on class-incremental streams (one head or decoder), the task index
        on pairs."""
        batch = self.mbatch
        label = batch["task_id"] if batch.kind == "pair" else 0
        return torch.full((len(batch),), label, dtype=torch.long, device=self.device)

    @property
    def mb_output(self) -> Any:
        """The step's output as Avalanche reads it: logits (a sequence task's ``[B, L, V]``
        token logits), or a pair's ``[B, 2, D]`` stack of un-normalised embeddings (what
        ``model(mb_x)`` returns); built when first read."""
        if self._mb_output is None and self.outputs is not None:
            out = self.outputs
            self._mb_output = (out.logits if isinstance(out, (ClassifyOutput, SequenceOutput))
                               else torch.stack(getattr(out, "raw", out), dim=1))
        return self._mb_output

    @mb_output.setter
    def mb_output(self, value: Any) -> None:
        self._mb_output, self._replaced = value, True

    @property
    def is_eval(self) -> bool:
        return not self.is_training

    def targets(self, batch: Batch) -> torch.Tensor:
        if batch.kind == "classify":
            return self.model.class_rows(batch["label"].to(self.device))
        if batch.kind == "sequence":
            return batch["tokens"][:, 1:]
        return torch.full((len(batch),), batch["task_id"], dtype=torch.long, device=self.device)

    def stop_training(self) -> None:
        """Stop the current task's training at the next step (Avalanche's early stop)."""
        self._stop = True

    def model_adaptation(self, model: Any = None) -> Any:
        """Avalanche's hook to grow a model for an experience: comodal's classifier grows
        its classes when a task starts, so the model is returned as it is."""
        return model if model is not None else self.model

    def teacher_output(self, batch: dict[str, Any]) -> Any:
        """``forward(batch, teacher)`` without gradients, computed once per batch of the
        training step however many strategies ask for it."""
        if self._teacher_cache is None or self._teacher_cache[0] is not batch:
            with torch.no_grad():
                self._teacher_cache = (batch, self.forward(batch, self.teacher))
        return self._teacher_cache[1]

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
        """Prepared text of each class of ``task`` (zero-shot prototypes): its class texts, or
        its stored class text features (CMCL class files, through the text head), or None."""
        stored = getattr(task, "class_features", None)
        if (not task.class_texts and stored is None) or "text" not in self.modalities:
            return None
        if stored is not None and self.modalities["text"].config.encoder != "features":
            raise ConfigError(f"task {task.name!r}: its class texts are stored features, so "
                              "model.modalities.text needs encoder: features (with their dim)")
        classes = MultimodalDataset(
            name=f"{task.name} classes",
            fingerprint=f"class-features:{task.name}" if stored is not None
            else "class-texts:" + "|".join(task.class_texts),
            columns={"text": stored if stored is not None else list(task.class_texts)},
        )
        prepared = prepare_dataset(classes, "classes", {"text": self.modalities["text"]},
                                   self.cache)
        return self.to_device(self._gather_all(prepared))

    def _gather_all(self, data: MultimodalDataset) -> dict[str, Any]:
        return next(iter(BatchLoader(data, self._collate, len(data), -1, shuffle=False)))

    def make_loader(self, task_ids: Sequence[int]) -> Any:
        """Training batches of the given tasks (none: an empty loader). Several classify (or
        sequence) tasks share batches (one dataset of all their rows, so that every batch mixes
        classes); pair tasks keep a batch per task, so that InfoNCE's negatives come from the
        task's own data, and their batches interleave."""
        if not task_ids:
            return []
        data = {i: self.scenario.tasks[i].train for i in task_ids}
        classify = [i for i in task_ids if self.scenario.tasks[i].kind != "pair"]
        groups = [[i] for i in task_ids if i not in classify] + ([classify] if classify else [])
        loaders = [
            BatchLoader(data[g[0]] if len(g) == 1 else concat([data[i] for i in g], "joint"),
                        self._collate, self.train_mb_size, g[0], shuffle=True,
                        generator=self.generator)
            for g in groups
        ]
        return loaders[0] if len(loaders) == 1 else InterleavedLoader(loaders, self.generator)

    def train_tasks(self) -> list[int]:
        """The tasks whose data the current task trains on: its own, unless a strategy's
        ``train_tasks(trainer)`` says otherwise (``joint``)."""
        tasks = [self.experience_index]
        for plugin in self.plugins:
            if hasattr(plugin, "train_tasks"):
                tasks = plugin.train_tasks(self)
        return tasks

    def make_train_loader(self, task_ids: Sequence[int]) -> Any:
        """The one training loader: comodal's own batches of ``task_ids`` while
        ``adapted_dataset`` is the experience's dataset, else Avalanche's way (a shuffled
        ``DataLoader`` over the dataset a plugin put there, with its collate function); then
        each strategy's ``wrap_loader(trainer, loader)`` in stack order."""
        if self.adapted_dataset is self.experience.dataset:
            loader = self.make_loader(task_ids)
        else:
            loader = DataLoader(self.adapted_dataset, batch_size=self.train_mb_size,
                                shuffle=True, generator=self.generator,
                                collate_fn=self.adapted_dataset.collate_fn)
        for plugin in self.plugins:
            if hasattr(plugin, "wrap_loader"):
                loader = plugin.wrap_loader(self, loader)
        return loader

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
        """``batch`` (a ``Batch``, a batch dict or a tensor) on the trainer's device."""
        if self.device.type == "cpu":  # data is built on the CPU: nothing to move
            return batch
        return batch.to(self.device) if isinstance(batch, Batch) else to_device(batch,
                                                                                 self.device)

    # ----------------------------------------------------------------- training
    def fit(self, scenario: Scenario, checkpoints: Path | None = None,
            config: str = "") -> dict[str, torch.Tensor]:
        """Train through every task; return one matrix ``R[after_task, eval_task]`` per metric
        (row 0 is the evaluation before any training). With ``checkpoints`` (a directory), a
        checkpoint is written after every task and the run resumes from the latest one there
        (``config``, the resolved config as text, must match the one it was written with)."""
        state = checkpoint.latest(checkpoints, config) if checkpoints is not None else None
        self.setup(scenario, state.get("tokenizer") if state else None)
        rows = checkpoint.restore(self, state) if state else [self.evaluate()]
        self.clock.train_exp_counter = len(rows) - 1
        for exp in list(self.benchmark.train_stream)[len(rows) - 1:]:
            self.train_experience(exp)
            if self.world is not None and self.train_cfg.check_ranks:
                self.check_ranks()
            rows.append(self.evaluate())
            if checkpoints is not None and (self.world is None or self.world.main):
                checkpoint.save(checkpoints, self, rows, config)
        metrics = sorted({m for row in rows for col in row for m in col})
        nan = float("nan")
        return {
            m: torch.tensor([[col.get(m, nan) for col in row] for row in rows])
            for m in metrics
        }

    def setup(self, scenario: Scenario, tokenizer: str | None = None) -> None:
        """Prepare every task's data and build the Avalanche benchmark the loop iterates;
        sequence tasks' targets are tokenised (with ``tokenizer``, a checkpoint's JSON, or one
        trained on them: ``tokenize``)."""
        if self.scenario is not None:
            raise RuntimeError("this Trainer has already been fit; build a new one per run "
                               "so that row 0 is the model before any training")
        for plugin in self.plugins:
            kinds = getattr(plugin, "kinds", None)
            for task in scenario.tasks if kinds else ():
                if task.kind not in kinds:
                    raise ConfigError(f"strategy {plugin.name}: works on {' and '.join(kinds)} "
                                      f"tasks, but task {task.name!r} is a {task.kind} task")
        check_plugins(self.plugins, scenario, self.evaluator, self.train_cfg, self.eval_cfg)
        if self.world is not None:
            distributed.check_plugins(self.plugins)
        torch.manual_seed(self.seed)
        self.scenario = self.prepare(scenario)
        if any(task.kind == "sequence" for task in scenario.tasks):
            self.tokenize(tokenizer)
        self.class_inputs = [self._class_inputs(t) for t in self.scenario.tasks]
        self.test_groups = [self._content_groups(raw, task)
                            for raw, task in zip(scenario.tasks, self.scenario.tasks, strict=True)]
        self.benchmark = self.scenario.benchmark(
            collate_fn=lambda samples: collate_samples(samples, self.modalities, prepared=True)
        )
        self.current_eval_stream = list(self.benchmark.test_stream)

    def tokenize(self, tokenizer: str | None = None) -> None:
        """``tokenizer``: the BPE tokenizer of the sequence tasks' targets, restored from JSON
        (a resumed run's, so that its token ids are the checkpoint's) or trained on the targets
        of ``model.decoder.tokenizer_splits`` of every task; each task's datasets then get a
        ``tokens`` column, padded to one width so that rows of any tasks share a batch."""
        cfg, tasks = self.decoding, self.scenario.tasks
        if tokenizer is not None:
            self.tokenizer = SequenceTokenizer.from_json(tokenizer)
        else:
            texts = [text for task in tasks for split in cfg.tokenizer_splits
                     for text in getattr(task, split).meta["target"]]
            self.tokenizer = SequenceTokenizer.train(texts, cfg.vocab_size)
        columns = target_tokens(self.tokenizer, [(t.train, t.test) for t in tasks],
                                cfg.max_length)
        self.scenario = Scenario([
            task.with_data(*(dataclasses.replace(data, columns={**data.columns, "tokens": ids})
                             for data, ids in zip((task.train, task.test), pair, strict=True)))
            for task, pair in zip(tasks, columns, strict=True)])

    def check_ranks(self) -> None:
        """``train.check_ranks``: stop with a ``TrainingError`` naming what differs when the
        model, the optimizer's state or a strategy's state (buffers, moments, projectors)
        is not bitwise the same on every rank."""
        parts = {f"model {k}": v for k, v in self.model.state_dict().items()}
        parts["optimizer state"] = self.optimizer.state_dict()
        for plugin in self.plugins:
            if getattr(plugin, "across_ranks", None) == "main":
                continue  # on rank 0 only
            name = getattr(plugin, "name", type(plugin).__name__)
            state = plugin.state_dict() if hasattr(plugin, "state_dict") else {}
            for key, value in {**state, "projectors": getattr(plugin, "bases", None)}.items():
                parts[f"strategy {name} {key}"] = value
        digests = {key: distributed.digest(value) for key, value in parts.items()}
        found = self.world.objects(digests)
        differ = [(rank, key) for rank, theirs in enumerate(found) for key in digests
                  if theirs.get(key) != found[0].get(key)]
        if differ:
            task = self.scenario.tasks[self.experience_index]
            named = "; ".join(f"rank {rank}: {key}" for rank, key in differ[:5])
            raise TrainingError(
                f"train.check_ranks: after task {task.name!r} (task {self.experience_index + 1}"
                f" of {len(self.scenario)}) the ranks differ from rank 0 in {named}"
                f"{' ...' if len(differ) > 5 else ''}; a strategy or plugin changes its state "
                "from a rank's own rows or random draws (see across_ranks in the README)")

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
        """The optimizer over the model's trainable parameters, made once and kept (a
        scheduler a plugin built on it stays valid): at each task it takes the current
        parameters (a grown classifier's new ones too) and starts from fresh moments, unless
        ``train.keep_optimizer`` keeps the moments of the parameters still there."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.train_cfg
        if self.optimizer is None:
            kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}.get(cfg.optimizer,
                                                                         torch.optim.AdamW)
            return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        kept = set(params) if cfg.keep_optimizer else set()
        for p in list(self.optimizer.state):
            if p not in kept:
                del self.optimizer.state[p]
        self.optimizer.param_groups[0]["params"] = params
        return self.optimizer

    def train_experience(self, exp: Any) -> None:
        """One task: its loader, classes and optimizer, then the epochs (until they end or a
        plugin calls ``stop_training``)."""
        self.experience, self.is_training, self._stop = exp, True, False
        self.experience_index = exp.current_experience
        self.model.train()
        self.teacher = (frozen_copy(self.model) if self._uses_teacher and self.experience_index
                        else None)
        self._call("before_training")
        self._call("before_train_dataset_adaptation")
        self.adapted_dataset = exp.dataset
        self._call("after_train_dataset_adaptation")
        tasks = self.train_tasks()
        self.dataloader = self.make_train_loader(tasks)
        self.grow_classes(sorted({*range(self.experience_index + 1), *tasks}))
        self.optimizer = self.make_optimizer()
        self._call("before_training_exp")  # a plugin may replace the loader here (Replay)
        self.scheduler = build_scheduler(self.optimizer, self.train_cfg.scheduler,
                                         len(self.dataloader), self.train_epochs)
        total = self.train_epochs * len(self.dataloader)
        bar = tqdm(total=total, desc=f"train {exp.task.name}", disable=not self.progress,
                   leave=False)
        for epoch in range(self.train_epochs):
            self._call("before_training_epoch")
            if self._stop:
                break
            losses = []  # on the device: reading each step's loss would synchronise every step
            lr = self.optimizer.param_groups[0]["lr"]  # the epoch's first step's
            for batch in self.dataloader:
                if self._stop:
                    break
                self.mbatch = self.as_batch(batch)
                self.training_step()
                losses.append(self.loss.detach())
                bar.update()
            if losses:
                mean = self.epoch_loss(torch.stack(losses), epoch)
                self.history.append({"task": self.experience_index, "epoch": epoch,
                                     "loss": mean, "lr": lr})
                bar.set_postfix(loss=f"{mean:.4f}")
            self._call("after_training_epoch")
            last = epoch + 1 == self.train_epochs  # fit evaluates after the task anyway
            if self.eval_every and (epoch + 1) % self.eval_every == 0 and not last:
                self.evaluate()
        bar.close()
        self._call("after_training_exp")
        self._call("after_training")
        self.is_training = False

    def as_batch(self, batch: Any) -> Batch:
        """A loader's batch as a ``Batch`` on the device: Avalanche's loaders give
        ``[Batch, y, t]``, comodal's give batch dicts of one task."""
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if not isinstance(batch, Batch):
            task = self.scenario.tasks[batch["task_id"]]
            batch = Batch(batch, len(batch["index"]), task.kind, task.modalities)
        return self.to_device(batch)

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
        if self.world is not None and self.model.classifier is not None:
            # new rows are drawn from each rank's global generator, which a dropout on the
            # rank's own rows may have moved: rank 0's rows everywhere
            self.world.broadcast_(list(self.model.classifier.parameters()))

    def pair(self, batch: dict[str, Any]) -> tuple[str, ...]:
        return self.scenario.tasks[batch["task_id"]].modalities

    def task_of(self, batch: dict[str, Any]) -> Task:
        return self.scenario.tasks[batch["task_id"]]

    def forward(self, batch: dict[str, Any], model: MultimodalEncoder | None = None) -> Any:
        """A pair task's two joint embeddings, a classify task's ``ClassifyOutput`` or a
        sequence task's ``SequenceOutput``, of ``batch`` under ``model`` (default the one being
        trained; a teacher may be passed)."""
        model = model or self.model
        task = self.task_of(batch)
        if task.kind == "sequence":
            return model.sequence(batch, task.modalities[0])
        if task.kind == "classify":
            z = model.encode(batch, task.modalities[0], normalize=False)
            return ClassifyOutput(model.classify(z), z)
        raw = tuple(model.encode(batch, m, normalize=False) for m in task.modalities)
        out = PairOutput(model.scored(z) for z in raw)
        out.raw = raw
        return out

    def task_loss(self, batch: dict[str, Any], output: Any) -> torch.Tensor:
        """InfoNCE over a pair batch (logits: the scored embeddings' dot products times the
        logit scale), or the ``pair_loss(trainer, batch, output)`` of the one strategy that
        defines it (``co2l``'s asymmetric loss); cross-entropy over the classes seen so far on
        classify tasks; the teacher-forced cross-entropy of the target tokens on sequence
        tasks."""
        if isinstance(output, ClassifyOutput):
            return F.cross_entropy(output.logits, self.model.class_rows(batch["label"]))
        if isinstance(output, SequenceOutput):
            return self.model.decoder.loss(output.logits, batch["tokens"][:, 1:])
        if self._pair_loss is not None:
            return self._pair_loss(self, batch, output)
        return self.criterion(*output, self.model.scale)

    def training_step(self) -> None:
        """One optimizer step: ``compute_gradients`` (the loss, backward, the reduction over
        ranks and unscaling), clipping, the ``after_backward`` hooks, ``step``. The gradients
        are reduced over ranks (torchrun), unscaled (16-mixed), clipped to
        ``train.clip_grad_norm`` (their global norm over the trainable parameters), and only
        then handed to the ``after_backward`` hooks (projection strategies), ``before_update``
        and the optimizer: clipping before projecting, as the CMCL code (the Hugging Face
        Trainer clips before its pre-optimizer-step callback, where DNS projects). A
        projection never raises the norm (it is an orthogonal projection of the gradient)."""
        self._call("before_training_iteration")
        self._teacher_cache = None
        self.compute_gradients()
        self.clip_gradients()
        self._call("after_backward")
        self._call("before_update")
        if self._rehome:
            # Avalanche's SI keeps its weight snapshot as ``param.cpu().flatten()``, a view of
            # the live weights on the CPU, which the in-place step would then change too (its
            # penalty would stay 0): the step writes into fresh storage, as on a GPU
            with torch.no_grad():
                for p in self.model.parameters():
                    p.data = p.data.clone()
        # a step 16-mixed's scaler skips (inf or NaN gradients) does not advance the schedule
        if self.precision.step(self.optimizer) and self.scheduler is not None:
            self.scheduler.step()
        self._call("after_update")
        self._call("after_training_iteration")

    def compute_gradients(self) -> None:
        """The step's loss (``loss``) and its gradients in ``.grad``: the forward and loss
        hooks, backward, the reduction over ranks and 16-mixed's unscaling. A strategy that
        needs the gradient at other weights (``cflat``) calls it again from ``after_backward``;
        the teacher's outputs of the batch are kept between calls."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = torch.zeros((), device=self.device)  # plugins may add to it from here on
        self.side_outputs, self._mb_output, self._replaced = [], None, False
        with self.precision.autocast():  # forward and losses (plugins' too); 32: no autocast
            self._call("before_forward")
            self.outputs = self.forward(self.mbatch)
            self._call("after_forward")
            self.loss = self.loss + (self._criterion(self._mb_output, self.mb_y)
                                     if self._replaced
                                     else self.task_loss(self.mbatch, self.outputs))
            self._call("before_backward")
        self.precision.scale(self.loss).backward()
        self.reduce_gradients()
        self.precision.unscale_(self.optimizer)  # 16-mixed: plugins see the true gradients

    @contextlib.contextmanager
    def step_kept(self) -> Iterator[None]:
        """Put back the step's loss and outputs after further ``compute_gradients`` calls (at
        other weights: ``cflat``), so that the epoch loss and later hooks see the step's own."""
        kept = (self.loss, self.outputs, self.side_outputs, self._mb_output, self._replaced)
        try:
            yield
        finally:
            (self.loss, self.outputs, self.side_outputs, self._mb_output,
             self._replaced) = kept

    def clip_gradients(self) -> None:
        """``train.clip_grad_norm``: the global norm of the trainable parameters' gradients."""
        if self.train_cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad],
                self.train_cfg.clip_grad_norm)

    def reduce_gradients(self) -> None:
        """Under torchrun, every rank's gradients become their mean over ranks (the
        one-process gradient: see ``comodal.platform.distributed``); called after each
        training backward, and by strategies that backpropagate on their own (EWC)."""
        if self.world is not None:
            self.world.reduce_gradients(list(self.model.parameters()))

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def embed(self, task_id: int) -> dict[str, torch.Tensor]:
        """Every batch of ``dataloader`` (task ``task_id``'s test rows) through ``forward``,
        on the CPU: each modality's joint embeddings as the model scores them for a pair task
        (``model.scored``: L2-normalised under cosine scoring, raw under dot), the classified
        modality's logits for a classify task. With Avalanche metrics attached,
        each batch's loss is computed too (``_criterion`` of ``mb_output`` and ``mb_y``)."""
        task = self.scenario.tasks[task_id]
        keys = task.modalities[:1] if task.kind == "classify" else task.modalities
        out: dict[str, list[torch.Tensor]] = {m: [] for m in keys}
        for batch in self.dataloader:
            self.mbatch = self.as_batch(batch)
            self._call("before_eval_iteration")
            self._call("before_eval_forward")
            with self.precision.autocast():
                if task.kind == "classify" and self.model.classifier is None:
                    # no class learned yet: one placeholder column that matches no target (-1)
                    z = self.model.encode(self.mbatch, keys[0], normalize=False)
                    self.outputs = ClassifyOutput(z.new_full((len(z), 1), float("-inf")), z)
                else:
                    self.outputs = self.forward(self.mbatch)
            self.outputs = self.precision.float32(self.outputs)  # metrics in float32
            self._mb_output = None
            self._call("after_eval_forward")
            if self._eval_loss:
                self.loss = self._criterion(self.mb_output, self.mb_y)
            values = self.outputs[:1] if task.kind == "classify" else self.outputs
            for m, z in zip(keys, values, strict=True):
                out[m].append(z.cpu())
            self._call("after_eval_iteration")
        return {m: torch.cat(z) for m, z in out.items()}

    @torch.no_grad()
    def class_accuracy(self, task_id: int) -> float:
        """Accuracy on the task's test rows with the classifier's argmax over every class seen
        so far (0 before any class of it was trained: class-incremental evaluation)."""
        if self.model.classifier is None:
            if self._eval_loss:  # the plugins' metrics see every evaluation's batches
                self.embed(task_id)
            return 0.0
        task = self.scenario.tasks[task_id]
        m = task.modalities[0]
        logits = self.embed(task_id)[m]
        self.check_finite(task, m, logits, "logits of test row")
        predicted = self.model.class_ids.cpu()[logits.argmax(dim=1)]
        return accuracy(predicted, task.test.labels)

    @torch.no_grad()
    def decode(self, batch: dict[str, Any], model: MultimodalEncoder | None = None,
               width: int | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` (``[SOS] ... [EOS] [PAD]...``) that ``model`` (default the one
        trained; a teacher may be passed) decodes from ``batch``'s audio: beam search of
        ``model.decoder.beam_width`` (or ``width``; 1 is greedy) with its length penalty, in
        the model's current mode. Under torchrun each rank decodes its share of the rows and
        every rank gets all of them."""
        model, cfg = model or self.model, self.decoding
        memory, valid = model.decoder.memory(*model.frames(batch, self.pair(batch)[0]))
        if self.world is not None:
            rows = self.world.share(len(memory))
            memory, valid = memory[rows], valid[rows]
        ids = model.decoder.decode(memory, valid, width or cfg.beam_width, cfg.max_length,
                                   cfg.length_penalty)
        if self.world is None:
            return ids
        parts = self.world.objects(ids.cpu())
        width = max(p.shape[1] for p in parts)
        return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts]).to(ids.device)

    @torch.no_grad()
    def decoded(self, task_id: int) -> list[str]:
        """The decoded target string of each test row of sequence task ``task_id``
        (``dataloader``'s batches, with the evaluation hooks around each)."""
        texts: list[str] = []
        for batch in self.dataloader:
            self.mbatch = self.as_batch(batch)
            self._call("before_eval_iteration")
            self._call("before_eval_forward")
            with self.precision.autocast():
                ids = self.decode(self.mbatch)
                if self._eval_loss:
                    self.outputs = self.precision.float32(self.forward(self.mbatch))
            self._mb_output = None
            self._call("after_eval_forward")
            if self._eval_loss:
                self.loss = self._criterion(self.mb_output, self.mb_y)
            texts += self.tokenizer.decode(ids.cpu())
            self._call("after_eval_iteration")
        return texts

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        """Metrics of every task's test set under the current model, one dict per task (also
        kept as ``last_eval``). During a task's training (``eval.every_epochs``, Avalanche's
        periodic evaluation, for the plugins) the training state is put back after."""
        saved = (self.experience, self.dataloader, self.is_training, self.model.training)
        self.model.eval()
        self.is_training = False
        self._call("before_eval")
        results = []
        stream = self.current_eval_stream
        for exp in tqdm(stream, desc="evaluate", disable=not self.progress, leave=False):
            self.experience = exp
            self._call("before_eval_dataset_adaptation")
            self._call("after_eval_dataset_adaptation")
            i = exp.current_experience
            self.dataloader = BatchLoader(self.scenario.tasks[i].test, self._collate,
                                          self.eval_mb_size, i, shuffle=False)
            self._call("before_eval_exp")
            results.append(self.task_metrics(exp.current_experience))
            self._call("after_eval_exp")
        self.last_eval = results
        self._call("after_eval")
        self.experience, self.dataloader, self.is_training, training = saved
        self.model.train(training)
        return results

    def task_metrics(self, task_id: int) -> dict[str, float]:
        """One task's test metrics: accuracy for a classify task; intent accuracy, WER and CER
        of the beam-decoded targets for a sequence task; recalls (and zero-shot
        accuracy where the task has labels and class texts) for a pair task, both ranking by
        the model's scores (dot products of ``model.scored`` embeddings; the prototypes are
        the text head's embeddings of the class texts, scored alike)."""
        task = self.scenario.tasks[task_id]
        if task.kind == "classify":
            return {"accuracy": self.class_accuracy(task_id)}
        if task.kind == "sequence":
            return sequence_metrics(self.decoded(task_id), task.test.meta["target"],
                                    slots=task.test.name == "slurp")
        z = self.embed(task_id)
        for m in task.modalities:
            self.check_finite(task, m, z[m], "embedding of test row")
        a, b = task.modalities
        cfg = self.eval_cfg
        metrics = retrieval_recalls(z[a], z[b], cfg.ks, cfg.pool_size, cfg.pool_draws,
                                    seed=self.seed + task_id, groups=self.test_groups[task_id])
        prototypes = self.class_inputs[task_id]
        if prototypes is not None and task.test.labels is not None:
            with self.precision.autocast():
                protos = self.model.encode(prototypes, "text")
            protos = self.precision.float32(protos).cpu()
            self.check_finite(task, "text", protos, "embedding of class text")
            scored = [m for m in task.modalities if m != "text"]
            accs = [zero_shot_accuracy(z[m], protos, task.test.labels) for m in scored]
            metrics["zeroshot"] = sum(accs) / len(accs)
        return metrics

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
