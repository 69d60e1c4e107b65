"""Numbers a reviewer can trust, end to end: a non-finite loss or embedding stops the run with
a named error, duplicate partners can be retrieved, class-incremental Acc is pooled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import class_incremental, load_dict

from comodal.config import EvalConfig, ModalityConfig, RunConfig, TrainConfig
from comodal.core.data import MultimodalDataset
from comodal.errors import TrainingError
from comodal.platform import report
from comodal.platform import run as run_module
from comodal.platform.feature_cache import FeatureCache
from comodal.platform.modalities import build_modalities
from comodal.platform.results import format_summaries
from comodal.platform.run import build_model, build_trainer, run
from comodal.platform.trainer import ClassifyOutput, Trainer
from comodal.scenarios.registry import build_scenario
from comodal.scenarios.task import Scenario, Task


class PoisonLoss:
    """Adds NaN to the loss at one (task, epoch, step), all counted from 0."""

    def __init__(self, task: int, epoch: int, step: int) -> None:
        self.at, self.epoch, self.step = (task, epoch, step), -1, 0

    def before_training_exp(self, trainer: Trainer) -> None:
        self.epoch = -1

    def before_training_epoch(self, trainer: Trainer) -> None:
        self.epoch, self.step = self.epoch + 1, 0

    def before_backward(self, trainer: Trainer) -> None:
        if (trainer.experience_index, self.epoch, self.step) == self.at:
            trainer.loss = trainer.loss + float("nan")
        self.step += 1


class PoisonEmbedding:
    """Sets one evaluated row of one modality to NaN (``row`` counted over the test set)."""

    def __init__(self, modality: int, row: int, batch_size: int) -> None:
        self.modality, self.row, self.batch_size, self.start = modality, row, batch_size, 0

    def before_eval_exp(self, trainer: Trainer) -> None:
        self.start = 0

    def after_eval_forward(self, trainer: Trainer) -> None:
        out = trainer.outputs  # a pair's two embeddings, or a classify task's (logits, ...)
        outputs = list(out)
        local = self.row - self.start
        if 0 <= local < len(outputs[self.modality]):
            outputs[self.modality] = outputs[self.modality].clone()
            outputs[self.modality][local, 0] = float("nan")
        trainer.outputs = ClassifyOutput(*outputs) if isinstance(out, ClassifyOutput) else (
            tuple(outputs))
        self.start += self.batch_size


def test_a_nan_loss_stops_the_run_naming_task_epoch_and_step_and_keeps_checkpoints(
        tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny["scenario"]["tasks"] = tiny["scenario"]["tasks"][:2]
    tiny["train"]["epochs"] = 2
    tiny["out"] = str(tmp_path / "run")
    config = load_dict(tiny, tmp_path)
    monkeypatch.setattr(run_module, "build_strategies",
                        lambda names, args: [PoisonLoss(task=1, epoch=1, step=2)])
    with pytest.raises(TrainingError) as caught:
        run(config)
    message = str(caught.value)
    assert "'2:kitchen:audio-text'" in message and "nan" in message
    assert "epoch 2, step 3 of 5" in message  # 300 training rows in batches of 64
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "after_task_1.pt").is_file()
    assert not (checkpoints / "after_task_2.pt").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def _toy_pairs(n: int, groups: torch.Tensor) -> MultimodalDataset:
    """A perfect model's features: vision and text both the one-hot of the caption group
    (images differ by a little noise; rows with one caption have identical text)."""
    noise = 0.01 * torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    onehot = torch.eye(4)[groups]
    return MultimodalDataset("toy", f"toy-{n}-{groups.tolist()}",
                             {"vision": onehot + noise, "text": onehot})


def _toy_trainer(tmp_path: Path, plugins: list, eval_batch: int = 512) -> Trainer:
    config = RunConfig(progress=False, train=TrainConfig(epochs=1),
                       eval=EvalConfig(batch_size=eval_batch))
    config.data.cache_dir = str(tmp_path / "cache")
    config.model.joint_dim = 4  # identity heads: embeddings are the features
    config.model.modalities = {m: ModalityConfig(encoder="features", dim=4)
                               for m in ("vision", "text")}
    return build_trainer(config, plugins)


def test_duplicate_captions_reach_recall_at_1_with_a_perfect_model(tmp_path: Path) -> None:
    groups = torch.arange(20) % 4  # every caption is shared by 5 test rows
    data = _toy_pairs(20, groups)
    trainer = _toy_trainer(tmp_path, [])
    trainer.setup(Scenario([Task("dups", ("vision", "text"), data, data)]))
    (row,) = trainer.evaluate()
    assert row["recall@1_ab"] == 1.0 and row["recall@1_ba"] == 1.0


def test_identical_captions_share_a_group_when_their_frozen_features_differ_in_bits(
        tmp_path: Path) -> None:
    # "stop" is encoded in two batches padded to different lengths (batches of 2)
    captions = ["stop", "a much longer caption that pads its batch", "stop", "go"]
    data = MultimodalDataset("captions", "captions-1",
                             {"vision": torch.eye(4), "text": captions})
    config = RunConfig(progress=False)
    config.model.modalities = {"vision": ModalityConfig(encoder="features", dim=4),
                               "text": ModalityConfig(encoder="hf")}
    modalities = build_modalities(config.model.modalities)
    trainer = Trainer(build_model(config, modalities), modalities,
                      FeatureCache(tmp_path, batch_size=2, progress=False), config.train,
                      config.eval, progress=False)
    trainer.setup(Scenario([Task("captions", ("vision", "text"), data, data)]))
    vision_ids, text_ids = trainer.test_groups[0]
    assert text_ids[0] == text_ids[2] != text_ids[3]
    assert len(set(vision_ids.tolist())) == 4


@pytest.mark.parametrize("kind", ["pair", "classify"])
def test_non_finite_embeddings_at_evaluation_name_task_modality_and_row(
        tmp_path: Path, kind: str) -> None:
    groups = torch.arange(20) % 4
    data = _toy_pairs(20, groups)
    data.labels = groups
    poison = PoisonEmbedding(modality=1 if kind == "pair" else 0, row=13, batch_size=8)
    trainer = _toy_trainer(tmp_path, [poison], eval_batch=8)
    if kind == "pair":
        task, what = Task("poisoned", ("vision", "text"), data, data), "text embedding"
    else:
        task = Task("poisoned", ("vision",), data, data, kind="classify", classes=[0, 1, 2, 3])
        what = "vision logits"
    trainer.setup(Scenario([task]))
    trainer.grow_classes([0])
    with pytest.raises(TrainingError, match=rf"task 'poisoned': .* the {what} of test row 13 "
                                            r"holds nan \(1 of 20 rows"):
        trainer.evaluate()


def test_class_incremental_acc_is_pooled_over_test_rows_and_labelled_so(
        tiny: dict, tmp_path: Path) -> None:
    config = class_incremental(tiny)
    config["train"]["epochs"] = 2
    config["out"] = str(tmp_path / "cmp" / "finetune" / "seed0")
    loaded = load_dict(config, tmp_path)
    result = run(loaded)
    sizes = [len(task.test) for task in build_scenario(loaded).tasks]
    R = result.matrices["accuracy"]
    pooled = [sum(R[i, j].item() * sizes[j] for j in range(i)) / sum(sizes[:i])
              for i in range(1, len(sizes) + 1)]
    summary = result.summary["accuracy"]
    assert summary["acc"] == pytest.approx(pooled[-1])
    assert summary["avg_inc_acc"] == pytest.approx(sum(pooled) / len(pooled))
    assert summary["acc"] != pytest.approx(R[-1].mean().item())  # not tasks weighted equally
    recorded = json.loads((result.out / "metrics.json").read_text())
    assert recorded["test_sizes"] == sizes and recorded["pooled_acc"] == ["accuracy"]
    assert "acc (pooled)" not in format_summaries({"finetune": result.summary}, "accuracy")
    text = format_summaries({"finetune": result.summary}, "accuracy", pooled=True)
    assert "acc (pooled)" in text and "avg_inc_acc (pooled)" in text and "bwt (per task)" in text
    header = report.markdown(report.load_runs(tmp_path / "cmp")).splitlines()[0]
    assert "Last Acc (pooled)" in header and "Avg Acc (pooled)" in header
    assert "BWT (per task)" in header and "Forgetting (per task)" in header
