"""Scoring and heads as options (the CMCL code's pipeline): ``model.score`` (cosine or raw dot
products) in retrieval and zero-shot, cosine as the unchanged default, ``model.head_init`` and
``model.head_bias``, ``train.clip_grad_norm`` and the per-task ``linear`` schedule. DNS's
invariant on the dot scores evaluation ranks by, biased heads included, is in
test_projection.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import load_error

from comodal.config import (
    ModalityConfig,
    RunConfig,
    SchedulerConfig,
    TrainConfig,
    from_dict,
    load_config,
    to_dict,
)
from comodal.core.data import MultimodalDataset
from comodal.errors import ConfigError
from comodal.platform.metrics import retrieval_recalls
from comodal.platform.model import MultimodalEncoder
from comodal.platform.run import build_trainer
from comodal.platform.schedules import build_scheduler
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.base import Strategy
from comodal.strategies.finetune import Finetune

D = 8


def _config(tmp_path: Path, modalities: tuple[str, ...] = ("a", "b"), d: int = D,
            **train: Any) -> RunConfig:
    config = RunConfig(progress=False, train=TrainConfig(**{"epochs": 2, "batch_size": 32,
                                                            "lr": 0.01, **train}))
    config.data.cache_dir = str(tmp_path)
    config.model.joint_dim = d
    config.model.modalities = {m: ModalityConfig(encoder="features", dim=d) for m in modalities}
    return config


def _pairs(seed: int, n: int) -> MultimodalDataset:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, D, generator=g)
    b = a @ torch.randn(D, D, generator=g) + 0.3 * torch.randn(n, D, generator=g)
    return MultimodalDataset(f"toy{seed}", f"scoring-toy-{seed}-{n}", {"a": a, "b": b})


def _scenario() -> Scenario:
    return Scenario([Task(f"t{i}", ("a", "b"), _pairs(2 * i, 64), _pairs(2 * i + 1, 48))
                     for i in range(2)])


# ------------------------------------------------------------------ retrieval and zero-shot
@pytest.mark.parametrize(("score", "expected"), [
    ("cosine", {"recall@1_ab": 1.0, "recall@1_ba": 1.0, "recall@1": 1.0, "zeroshot": 1.0}),
    ("dot", {"recall@1_ab": 0.5, "recall@1_ba": 1.0, "recall@1": 0.75, "zeroshot": 0.5}),
])
def test_retrieval_and_zero_shot_rank_by_the_runs_scores(tmp_path: Path, score: str,
                                                         expected: dict[str, float]) -> None:
    """Identity heads on hand-built 2-d features. Query a0 = (1, 0): its partner t0 = (1, 0)
    has cosine 1 and dot 1, the other caption t1 = (3, 3.5) cosine 0.65 and dot 3, so cosine
    retrieves t0 and dot t1. Zero-shot with prototypes (1, 0) and (3, 3): a0 is class 0 by
    cosine, class 1 by dot; a1 = (0, 1) is class 1 either way."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [3.0, 3.5]])
    data = MultimodalDataset("hand", f"scoring-hand-{score}", {"a": a, "text": text},
                             labels=torch.tensor([0, 1]))
    config = _config(tmp_path, ("a", "text"), d=2)
    config.model.score = score
    config.eval.ks = [1]
    trainer = build_trainer(config, [Finetune()])
    trainer.setup(Scenario([Task("hand", ("a", "text"), data, data)]))
    # the class texts' features, as a task's stored class features reach the text head
    trainer.class_inputs[0] = {"text": torch.tensor([[1.0, 0.0], [3.0, 3.0]])}
    metrics = trainer.evaluate()[0]
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    raw = trainer.model.encode({"text": text}, "text")  # the model's scored embeddings
    assert torch.equal(raw, text if score == "dot" else F.normalize(text, dim=-1))


def test_cosine_is_the_default_and_a_config_without_the_keys_is_unchanged(
        tmp_path: Path) -> None:
    """Two runs, one config giving the new keys at their defaults and one without them,
    train the same model bit for bit, and cosine retrieval is the unit-norm head outputs'."""
    assert (RunConfig().model.score, RunConfig().model.head_init) == ("cosine", "auto")
    assert not RunConfig().model.head_bias and TrainConfig().clip_grad_norm is None
    given = to_dict(_config(tmp_path))
    given["model"].update(score="cosine", head_init="auto", head_bias=False)
    given["train"]["clip_grad_norm"] = None
    without = to_dict(_config(tmp_path))
    for key in ("score", "head_init", "head_bias"):
        del without["model"][key]
    del without["train"]["clip_grad_norm"]
    runs = []
    for data in (given, without):
        trainer = build_trainer(from_dict(RunConfig, data), [Finetune()])
        runs.append((trainer, trainer.fit(_scenario())))
    (first, m1), (second, m2) = runs
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    state = second.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in first.model.state_dict().items())
    test = first.scenario.tasks[1].test.columns
    with torch.no_grad():
        z = {m: F.normalize(first.model.heads[m](test[m]), dim=-1) for m in ("a", "b")}
    cfg = first.eval_cfg
    expected = retrieval_recalls(z["a"], z["b"], cfg.ks, cfg.pool_size, cfg.pool_draws,
                                 seed=first.seed + 1, groups=first.test_groups[1])
    assert m1["recall@1"][-1, 1].item() == pytest.approx(expected["recall@1"], abs=1e-6)


# ------------------------------------------------------------------ heads
def test_head_init_and_bias() -> None:
    widths = {"a": 8, "b": 6}
    auto = MultimodalEncoder(widths, joint_dim=8)
    assert torch.equal(auto.heads["a"].weight, torch.eye(8))  # square: identity
    wb = auto.heads["b"].weight  # 8 x 6: orthonormal columns
    assert torch.allclose(wb.T @ wb, torch.eye(6), atol=1e-5)
    assert all(head.bias is None for head in auto.heads.values())  # bias-free by default
    orthogonal = MultimodalEncoder(widths, joint_dim=8, head_init="orthogonal")
    wa = orthogonal.heads["a"].weight
    assert torch.allclose(wa.T @ wa, torch.eye(8), atol=1e-5)
    assert not torch.allclose(wa, torch.eye(8))
    with pytest.raises(ConfigError, match="model.head_init: identity needs every head square, "
                                          "but modality 'b' has width 6 and model.joint_dim "
                                          "is 8"):
        MultimodalEncoder(widths, joint_dim=8, head_init="identity")
    biased = MultimodalEncoder({"a": 8}, joint_dim=8, head_init="identity", head_bias=True,
                               score="dot")
    head = biased.heads["a"]
    assert torch.equal(head.bias, torch.zeros(8)) and head.bias.requires_grad
    x = torch.randn(5, 8)  # at init a head is the backbone's own embedding, unnormalised
    assert torch.equal(biased.encode({"a": x}, "a"), x)


@pytest.mark.parametrize(("override", "message"), [
    ("model.score=angle", "model.score: unknown value 'angle' (valid: cosine, dot)"),
    ("model.head_init=eye",
     "model.head_init: unknown value 'eye' (valid: auto, identity, orthogonal)"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm: must be positive (null: no clipping), "
                               "got 0.0"),
])
def test_bad_scoring_options_name_the_field(tiny: dict, tmp_path: Path, override: str,
                                            message: str) -> None:
    assert load_error(tiny, tmp_path, override).startswith(message)
    good = load_config(tmp_path / "config.yaml", ["model.score=dot", "model.head_bias=true",
                              "train.clip_grad_norm=1.0", "train.scheduler.name=linear"])
    assert (good.model.score, good.model.head_bias) == ("dot", True)
    assert to_dict(good)["train"]["clip_grad_norm"] == 1.0  # recorded with the run's config


# ------------------------------------------------------------------ clipping and schedule
def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


class GradNorms(Strategy):
    """Records the global gradient norm the projection hooks and the optimizer see."""

    name = "grad_norms"

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, list[float]] = {"after_backward": [], "before_update": []}

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.seen["after_backward"].append(_grad_norm(strategy.model))

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        self.seen["before_update"].append(_grad_norm(strategy.model))


def test_clip_grad_norm_bounds_what_the_hooks_and_the_optimizer_see(tmp_path: Path) -> None:
    bound = 0.05
    norms = {}
    for clip in (None, bound):  # off by default
        recorder = GradNorms()
        trainer = build_trainer(_config(tmp_path, clip_grad_norm=clip), [recorder])
        trainer.fit(_scenario())
        norms[clip] = recorder.seen
    assert max(norms[None]["before_update"]) > 2 * bound  # so the bound binds below
    for hook in ("after_backward", "before_update"):  # clipped before the projection hooks
        assert len(norms[bound][hook]) == 8  # 2 tasks x 2 epochs x 2 steps
        assert max(norms[bound][hook]) <= bound * (1 + 1e-5)


def test_linear_schedule_is_the_formula_and_restarts_at_every_task(tmp_path: Path) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    n = 30  # 10 steps x 3 epochs
    for warmup, w in ((0.0, 0), (1.0, 10)):
        scheduler = build_scheduler(
            optimizer, SchedulerConfig("linear", warmup_epochs=warmup, min_lr=0.01), 10, 3)
        lrs = []
        for _ in range(n):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        expected = [0.1 * (i + 1) / w if i < w else 0.01 + 0.09 * (n - i) / (n - w)
                    for i in range(n)]
        assert lrs == pytest.approx(expected)
        assert lrs[w] == pytest.approx(0.1)  # lr right after the warmup
    # in the trainer: one step per epoch (64 rows, batch 64), from lr again at each task
    config = _config(tmp_path, epochs=4, batch_size=64, lr=0.08)
    config.train.scheduler = SchedulerConfig("linear")
    trainer = build_trainer(config, [Finetune()])
    trainer.fit(_scenario())
    lrs = [entry["lr"] for entry in trainer.history]
    assert lrs == pytest.approx([0.08, 0.06, 0.04, 0.02] * 2)  # lr (4 - i) / 4, HF's form


def test_scoring_options_are_part_of_the_resolved_config() -> None:
    fields = {f.name for f in dataclasses.fields(RunConfig().model)}
    assert {"score", "head_init", "head_bias"} <= fields
    assert "clip_grad_norm" in to_dict(RunConfig())["train"]


def test_the_synth_twin_of_the_paper_preset_trains_with_its_settings(tiny: dict,
                                                                     tmp_path: Path) -> None:
    """``examples/cmcl_paper_synth.yaml`` (the paper's setting on synth-pairs) on the tiny
    corpus: dot scoring through biased heads learns every task well above chance (1 in 120
    test pairs) and the run records the setting."""
    from comodal.config import load_config
    from comodal.platform.run import run

    preset = Path(__file__).resolve().parents[1] / "examples" / "cmcl_paper_synth.yaml"
    data = tiny["data"]["synth_pairs"]
    config = load_config(preset, [f"data.cache_dir={tiny['data']['cache_dir']}",
                                  f"data.synth_pairs.train_size={data['train_size']}",
                                  f"data.synth_pairs.test_size={data['test_size']}",
                                  "progress=false", f"out={tmp_path}/run"])
    result = run(config)
    r1 = result.matrices["recall@1"]
    assert bool((r1[1:].diagonal() > 5 / 120).all()), r1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["score"] == "dot" and saved["model"]["head_bias"] is True
    assert saved["train"]["clip_grad_norm"] == 1.0
