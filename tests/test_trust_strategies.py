"""Strategies whose reported numbers could be silently wrong: relation_kd distils only pairs
its teacher learned, kd distils the trained encoder, every statistics pass leaves batch-norm
statistics alone, DNS keep_norms protects partner directions whatever the scales, and DNS with
the paper's preset is the paper's formula."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comodal.config import ModalityConfig, RunConfig, TrainConfig
from comodal.core.data import MultimodalDataset
from comodal.errors import ConfigError
from comodal.platform.model import MultimodalEncoder
from comodal.platform.run import build_trainer
from comodal.scenarios.task import Scenario, Task
from comodal.strategies.distill import KD, KDConfig, RelationKD
from comodal.strategies.dns import DNS, DNSConfig
from comodal.strategies.ewc import EWC
from comodal.strategies.finetune import Finetune
from comodal.strategies.gpm import GPM
from comodal.strategies.projection import kept_rank
from comodal.strategies.registry import STRATEGIES, build_strategies
from comodal.strategies.replay import ER, ERConfig

D = 8


def _config(tmp_path: Path, modalities: str, epochs: int = 1, batch: int = 16,
            lr: float = 0.01, optimizer: str = "sgd") -> RunConfig:
    config = RunConfig(progress=False, train=TrainConfig(epochs=epochs, batch_size=batch, lr=lr,
                                                         optimizer=optimizer))
    config.data.cache_dir = str(tmp_path)
    config.model.joint_dim = D
    config.model.learnable_temperature = False
    config.model.modalities = {m: ModalityConfig(encoder="features", dim=D)
                               for m in modalities.split()}
    return config


def _rows(seed: int, n: int, modalities: str, rank: int = D,
          scale: dict[str, float] | None = None, classes: list[int] | None = None,
          ) -> MultimodalDataset:
    """Views of one latent per modality (of rank ``rank``, noisy when full rank; ``scale``
    multiplies a column), with labels cycling through ``classes`` if given."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, rank, generator=g)
    columns = {}
    for i, m in enumerate(modalities.split()):
        mix = torch.randn(rank, D, generator=torch.Generator().manual_seed(100 + i))
        noise = 0.1 * torch.randn(n, D, generator=g) if rank == D else 0
        columns[m] = (latent @ mix + noise) * (scale or {}).get(m, 1.0)
    labels = torch.tensor(classes)[torch.arange(n) % len(classes)] if classes else None
    return MultimodalDataset(f"rows{seed}", f"rows-{seed}-{n}-{modalities}-{rank}-{scale}",
                             columns, labels)


# ----------------------------------------------------------------------------- relation_kd
class RelationRecorder(RelationKD):
    """relation_kd that records what its term added at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, float]] = []

    def before_backward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        before = float(strategy.loss.detach())
        super().before_backward(strategy, **kwargs)
        self.steps.append((strategy.experience_index, float(strategy.loss.detach()) - before))


def test_relation_kd_distils_only_pairs_the_teacher_trained(tmp_path: Path) -> None:
    """vision-text, audio-text, audio-vision, vision-text: at the third task audio and vision
    were each trained, but never together, so nothing is distilled; the repeated pair is."""
    modalities = "vision text audio"
    stream = [("vision", "text"), ("audio", "text"), ("audio", "vision"), ("vision", "text")]
    tasks = [Task(f"t{i}", pair, _rows(i, 64, modalities), _rows(10 + i, 32, modalities))
             for i, pair in enumerate(stream)]
    recorder = RelationRecorder()
    trainer = build_trainer(_config(tmp_path, modalities, epochs=2, lr=0.05), [recorder])
    trainer.fit(Scenario(tasks))
    added = {t: [gap for task, gap in recorder.steps if task == t] for t in range(4)}
    assert len(added[2]) == 8 and all(gap == 0 for gap in added[2])  # audio-vision: none
    assert max(added[3]) > 1e-6  # vision-text again: distilled once the student moves
    assert all(gap == 0 for gap in added[0] + added[1])  # no teacher / a new pair
    path = tmp_path / "rkd.pt"
    torch.save(recorder.state_dict(), path)
    assert recorder.state_dict() == {"trained_pairs": [["audio", "text"], ["audio", "vision"],
                                                       ["text", "vision"]]}
    fresh = RelationKD()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.trained == recorder.trained


# ----------------------------------------------------------------------------- kd
class KDRecorder(KD):
    """kd that records its term, the same term by hand, the term's gradient on the trained
    encoder and how often the student's encoder ran in the step."""

    def __init__(self, config: KDConfig) -> None:
        super().__init__(config)
        self.records: list[dict] = []
        self.calls = 0

    def before_forward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        self.calls_before = self.calls
        super().before_forward(strategy, **kwargs)

    def before_backward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        before = strategy.loss
        super().before_backward(strategy, **kwargs)
        teacher = strategy.teacher
        if teacher is None:
            return
        term = strategy.loss - before
        runs = self.calls - self.calls_before
        encoder = strategy.model.encoders["audio"]
        grads = torch.autograd.grad(term, list(encoder.parameters()), retain_graph=True)
        x = strategy.mbatch["audio"]
        with torch.no_grad():
            mse = F.mse_loss(encoder(x), teacher.encoders["audio"](x))
        alpha = math.log(1 + len(teacher.class_ids) / len(strategy.model.class_ids))
        self.records.append({"term": float(term.detach()), "by_hand": float(alpha * mse),
                             "runs": runs, "grad": sum(float(g.abs().sum()) for g in grads)})


def _classify_stream() -> Scenario:
    tasks = []
    for i in range(2):
        classes = list(range(4 * i, 4 * i + 4))
        tasks.append(Task(f"t{i}", ("audio",), _rows(i, 64, "audio", classes=classes),
                          _rows(10 + i, 32, "audio", classes=classes), kind="classify",
                          classes=classes))
    return Scenario(tasks)


def test_kd_distils_the_trained_encoders_pooled_output(tmp_path: Path) -> None:
    kd = KDRecorder(KDConfig(feature="batch", prediction="off", feature_layer="encoder"))
    trainer = build_trainer(_config(tmp_path, "audio", epochs=2, lr=0.1), [kd])
    encoder = nn.Sequential(nn.Linear(D, D), nn.Tanh())
    trainer.model.encoders["audio"] = encoder

    def count(module: nn.Module, *args: object) -> None:
        kd.calls += module is encoder  # the teacher, a deep copy, shares this hook

    encoder.register_forward_hook(count)
    trainer.fit(_classify_stream())
    assert len(kd.records) == 8  # the second task's steps
    for record in kd.records:
        assert record["term"] == pytest.approx(record["by_hand"], rel=1e-5, abs=1e-9)
        assert record["runs"] == 1  # the student's encoder ran once per step
    assert kd.records[-1]["term"] > 1e-6 and kd.records[-1]["grad"] > 0
    assert kd.results()["feature_layer"] == "encoder"


def test_kd_feature_layer_follows_the_backbone_and_refuses_a_frozen_encoder(
        tmp_path: Path) -> None:
    auto = KD(KDConfig(feature="batch", prediction="off"))
    build_trainer(_config(tmp_path, "audio"), [auto]).fit(_classify_stream())
    assert auto.results()["feature_layer"] == "joint"  # cached features: the head's output
    explicit = KD(KDConfig(feature="batch", prediction="off", feature_layer="encoder"))
    with pytest.raises(ConfigError, match="'audio' has a frozen backbone"):
        build_trainer(_config(tmp_path, "audio"), [explicit]).fit(_classify_stream())
    with pytest.raises(ConfigError, match="feature_layer: unknown value 'head'"):
        build_strategies(["er", "kd"], {"kd": {"feature_layer": "head"}})


def test_prediction_only_kd_runs_on_a_trained_encoder(tmp_path: Path) -> None:
    kd = KD(KDConfig(feature="off", prediction="batch"))  # auto resolves to the encoder
    finetune = Finetune()
    trained = {}
    for name, plugin in (("kd", kd), ("finetune", finetune)):
        trainer = build_trainer(_config(tmp_path, "audio", epochs=2, lr=0.1), [plugin])
        trainer.model.encoders["audio"] = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        trainer.fit(_classify_stream())
        trained[name] = trainer.model.heads["audio"].weight.detach().clone()
    assert kd.results()["feature_layer"] == "encoder"
    assert not torch.allclose(trained["kd"], trained["finetune"])  # the KL term acted


# ----------------------------------------------------------------------------- statistics passes
class BatchNormProbe(Finetune):
    """Records the batch-norm statistics and the model's mode when its hook runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def after_training_exp(self, strategy, **kwargs) -> None:  # noqa: ANN001
        bn = strategy.model.encoders["a"][1]
        self.seen.append((bn.running_mean.clone(), bn.running_var.clone(),
                          int(bn.num_batches_tracked), strategy.model.training))


@pytest.mark.parametrize("make", [
    EWC, DNS, GPM, lambda: ER(ERConfig(size=8, policy="experience", selection="mean")),
], ids=["ewc", "dns", "gpm", "er-mean"])
def test_statistics_after_a_task_leave_batch_norm_statistics_alone(tmp_path: Path,
                                                                   make) -> None:  # noqa: ANN001
    first, last = BatchNormProbe(), BatchNormProbe()
    strategy = make()
    trainer = build_trainer(_config(tmp_path, "a b", epochs=1), [first, strategy, last])
    trainer.model.encoders["a"] = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D))
    trainer.setup(Scenario([Task("t", ("a", "b"), _rows(0, 64, "a b"), _rows(1, 32, "a b"))]))
    trainer.train_experience(trainer.benchmark.train_stream[0])
    (mean0, var0, n0, mode0), (mean1, var1, n1, mode1) = first.seen[0], last.seen[0]
    assert n1 == n0 == 4 and torch.equal(mean1, mean0) and torch.equal(var1, var0)
    assert mode0 and mode1  # train mode again afterwards


# ----------------------------------------------------------------------------- DNS keep_norms
def _keep_norms_drift(tmp_path: Path) -> tuple[DNS, float]:
    """Old pair (a, b) with a's features 100x b's, then one SGD step on (a, c); DNS with
    keep_norms at a relative cut of 1e-2. Returns DNS and the relative change of the old
    pair's raw scores."""
    cut = {"input_rule": "relative", "input_threshold": 1e-2,
           "output_rule": "relative", "output_threshold": 1e-2}
    dns = DNS(DNSConfig(mode="grad", keep_norms=True, **cut))
    trainer = build_trainer(_config(tmp_path, "a b c", epochs=20, batch=32, lr=0.05), [dns])
    big = {"a": 100.0}
    trainer.setup(Scenario([
        Task("old", ("a", "b"), _rows(0, 256, "a b c", 3, big), _rows(1, 64, "a b c", 3, big)),
        Task("new", ("a", "c"), _rows(2, 32, "a b c"), _rows(3, 64, "a b c")),
    ]))
    first, second = trainer.benchmark.train_stream
    trainer.train_experience(first)
    old = trainer._gather_all(trainer.scenario.tasks[0].test)

    def scores() -> torch.Tensor:
        with torch.no_grad():
            za, zb = (trainer.model.encode(old, m, normalize=False) for m in ("a", "b"))
        return za @ zb.T

    before = scores()
    trainer.train_epochs = 1  # 32 rows, batch 32: one step
    trainer.train_experience(second)
    return dns, float((scores() - before).norm() / before.norm())


def test_keep_norms_keeps_partner_directions_of_a_smaller_scale(tmp_path: Path) -> None:
    """One cut of the summed moment keeps only a's own (100x larger) directions and drops
    b's; cut separately and joined, head a keeps both and the old scores stay put."""
    dns, drift = _keep_norms_drift(tmp_path)
    assert dns.ranks[-1]["kept"]["a"]["output"] == 6  # 3 partner + 3 own directions
    assert drift < 1e-5
    basis = dns.bases["a"].v
    assert torch.allclose(basis.T @ basis, torch.eye(6), atol=1e-5)


# ----------------------------------------------------------------------------- DNS as in the paper
def test_absolute_rule_keeps_eigenvalues_above_the_cut_and_the_round_off_floor() -> None:
    lam = torch.tensor([4.0, 0.5, 0.1, 0.05, 1e-3, 1e-10, 1e-18, 0.0], dtype=torch.float64)
    assert kept_rank(lam, "absolute", 0.1) == 2  # strictly above 0.1
    assert kept_rank(lam, "absolute", 0.0) == 6  # > 0, above eps * 4 * 8 = 7e-15
    assert kept_rank(lam.float(), "absolute", 0.0) == 5  # float32's floor is 3.8e-6
    assert kept_rank(lam * 1000, "absolute", 0.1) == 5  # not scale-aware, as in the paper


def test_paper_preset_and_absolute_thresholds_are_validated() -> None:
    paper = DNSConfig(preset="paper")
    assert (paper.mode, paper.partner_embeddings) == ("grad", "snapshot")
    assert (paper.input_rule, paper.input_threshold) == ("absolute", 0.1)
    assert (paper.output_rule, paper.output_threshold) == ("absolute", 0.0)
    tuned = DNSConfig(preset="paper", input_threshold=0.05, mode="update")
    assert (tuned.input_threshold, tuned.mode, tuned.output_threshold) == (0.05, "update", 0.0)
    plain = DNSConfig()
    assert (plain.mode, plain.input_rule, plain.output_threshold) == ("update", "relative", 1e-4)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="input_threshold: the absolute rule"):
            DNSConfig(input_rule="absolute", input_threshold=bad)
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\] for the relative rule"):
        DNSConfig(output_threshold=2.0)
    with pytest.raises(ConfigError, match="preset: unknown value 'cmcl'"):
        DNSConfig(preset="cmcl")


def _paper_projection(grad: torch.Tensor, inputs: torch.Tensor,
                      partners: torch.Tensor) -> torch.Tensor:
    """The paper's G' = G - P̃ G P: P from the eigenvectors of the input second moment with
    eigenvalue > 0.1, P̃ from those of the partner embeddings' second moment with eigenvalue
    > 0 (in float64 a rank-deficient moment's zero eigenvalues come out as round-off of
    about 1e-16 of the largest, either sign: below 1e-12 of the largest counts as 0)."""
    lam, vec = torch.linalg.eigh(inputs.T @ inputs / len(inputs))
    u = vec[:, lam > 0.1]
    lam, vec = torch.linalg.eigh(partners.T @ partners / len(partners))
    v = vec[:, lam > 1e-12 * lam.max()]
    return grad - (v @ v.T) @ grad @ (u @ u.T)


def test_paper_preset_is_the_papers_projection() -> None:
    g = torch.Generator().manual_seed(3)
    n = 200
    spectrum = torch.tensor([3.0, 2.0, 1.0, 0.6, 0.1, 0.05, 0.02, 0.01], dtype=torch.float64)
    xa = torch.randn(n, D, generator=g, dtype=torch.float64) * spectrum  # eigenvalues 9 .. 1e-4
    xb = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, D, generator=g, dtype=torch.float64)  # rank 3
    model = MultimodalEncoder({"a": D, "b": D}, joint_dim=D).double()
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.copy_(torch.randn(D, D, generator=g, dtype=torch.float64))
    dns = DNS(DNSConfig(preset="paper"))
    tasks = [SimpleNamespace(modalities=("a", "b"))]
    strategy = SimpleNamespace(model=model, experience_index=0, plugins=[dns],
                               scenario=SimpleNamespace(tasks=tasks),
                               statistics_pass=lambda index: iter([{"a": xa, "b": xb}]))
    dns.after_training_exp(strategy)
    strategy.experience_index = 1
    dns.before_training_exp(strategy)
    grad = torch.randn(D, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = _paper_projection(grad, xa, model.heads["b"](xb))
    projected = grad.clone()
    dns.subtract_(projected, projected, dns.bases["a"])
    kept = dns.ranks[-1]["kept"]["a"]
    assert (kept["input"], kept["output"]) == (4, 3)  # eigenvalues 9, 4, 1, 0.36 > 0.1
    assert torch.allclose(projected, expected, atol=1e-6, rtol=0)
    assert dns.results()["output_threshold"] == {"rule": "absolute", "value": 0.0}


# ----------------------------------------------------------------------------- finite options
FLOAT_OPTIONS = [
    (name, field.name) for name, cls in STRATEGIES.items()
    for field in dataclasses.fields(cls.Config)
    if float in (hint := typing.get_type_hints(cls.Config)[field.name], *typing.get_args(hint))
]


@pytest.mark.parametrize("name,field", FLOAT_OPTIONS)
def test_every_float_option_of_a_strategy_must_be_finite(name: str, field: str) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError, match=f"strategy_args.{name}.{field}: must be a finite"):
            build_strategies([name], {name: {field: bad}})
