"""``device: auto`` and ``train.precision`` (32 | bf16 | 16-mixed): 32 changes nothing, bf16
and 16-mixed train to about the fp32 metrics on the CPU, 16-mixed's grad scaler skips a step
with inf gradients without advancing the schedule and comes back from a checkpoint, and
gradient projection keeps its invariant under autocast. Tests marked ``gpu`` run on CUDA and
are skipped without it (``benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import Kill, load_dict
from test_projection import KEEP_ALL, _score_drift

from comodal.config import RunConfig, from_dict
from comodal.errors import ConfigError
from comodal.platform.precision import Precision, resolve_device
from comodal.platform.run import RunResult, build_trainer, identity, run
from comodal.scenarios.registry import build_scenario
from comodal.strategies.base import Strategy
from comodal.strategies.dns import DNS, DNSConfig
from comodal.strategies.finetune import Finetune
from comodal.strategies.registry import build_strategies

CUDA = torch.cuda.is_available()
CHANCE = 1 / 120  # R@1 with a 120-item test pool


def _short(tiny: dict, tasks: int = 2, epochs: int = 3, **train: object) -> dict:
    """The tiny config cut to its first ``tasks`` tasks and ``epochs`` epochs."""
    config = copy.deepcopy(tiny)
    config["scenario"]["tasks"] = config["scenario"]["tasks"][:tasks]
    config["train"].update(epochs=epochs, **train)
    return config


def _run(tiny: dict, device: str = "cpu", **train: object) -> RunResult:
    config = _short(tiny, **train)
    config["device"] = device
    return run(from_dict(RunConfig, config))


@pytest.fixture(scope="module")
def cpu_runs(tiny_template: dict) -> dict[str, RunResult]:
    """The tiny config on the CPU without the key and at each precision."""
    out = {"default": _run(tiny_template)}
    for precision in ("32", "bf16", "16-mixed"):
        out[precision] = _run(tiny_template, precision=precision)
    return out


def _assert_trains_close_to(result: RunResult, reference: RunResult, tolerance: float) -> None:
    r1 = result.matrices["recall@1"]
    assert (r1[-1] > 5 * CHANCE).all(), r1[-1]  # every task learned
    assert torch.allclose(r1, reference.matrices["recall@1"], atol=tolerance, rtol=0), \
        (r1, reference.matrices["recall@1"])
    for metric in ("acc", "bwt", "plasticity"):
        assert abs(result.summary["recall@1"][metric]
                   - reference.summary["recall@1"][metric]) < tolerance, metric


# ------------------------------------------------------------------ CPU
def test_precision_32_is_exactly_a_run_without_the_key(cpu_runs: dict[str, RunResult]) -> None:
    a, b = cpu_runs["default"].matrices, cpu_runs["32"].matrices
    assert a.keys() == b.keys()
    for metric in a:
        assert torch.equal(a[metric].nan_to_num(-1), b[metric].nan_to_num(-1)), metric


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_half_precision_trains_to_about_the_fp32_metrics_on_cpu(
        cpu_runs: dict[str, RunResult], precision: str) -> None:
    _assert_trains_close_to(cpu_runs[precision], cpu_runs["32"], tolerance=0.05)


def test_autocast_runs_the_training_forward_and_nothing_else_at_32(tiny: dict) -> None:
    """Autocast is on in the forward pass at bf16 (embeddings in bfloat16, the loss and the
    evaluation outputs in float32) and never entered at 32; the loss falls either way."""
    for precision, dtype in (("32", torch.float32), ("bf16", torch.bfloat16)):
        config = from_dict(RunConfig, _short(tiny, tasks=1, epochs=2, precision=precision))
        seen: list[tuple] = []

        class Watch(Strategy):
            name = "watch"

            def after_forward(self, strategy, seen=seen, **kwargs) -> None:  # noqa: ANN001
                seen.append((strategy.outputs.raw[0].dtype, torch.is_autocast_enabled("cpu")))

            def after_eval_forward(self, strategy, seen=seen, **kwargs) -> None:  # noqa: ANN001
                seen.append((strategy.outputs[0].dtype, "eval"))

        trainer = build_trainer(config, [Finetune(), Watch()])
        trainer.fit(build_scenario(config))
        assert set(seen) == {(dtype, precision != "32"), (torch.float32, "eval")}
        assert trainer.loss.dtype == torch.float32
        first = [h["loss"] for h in trainer.history if h["task"] == 0]
        assert first[-1] < first[0]


def test_precision_is_checked_and_32_may_be_a_number(tiny: dict, tmp_path: Path) -> None:
    tiny["train"]["precision"] = 32  # YAML reads 32 as an int
    assert load_dict(tiny, tmp_path).train.precision == "32"
    for good in ("bf16", "16-mixed", "32"):
        tiny["train"]["precision"] = good
        assert load_dict(tiny, tmp_path).train.precision == good
    for bad in ("fp16", 16, "float32"):
        tiny["train"]["precision"] = bad
        with pytest.raises(ConfigError, match=r"train\.precision: unknown value .* \(valid: 32, "
                                              r"bf16, 16-mixed\)"):
            load_dict(tiny, tmp_path)
    tiny["train"]["precision"] = True
    with pytest.raises(ConfigError, match=r"train\.precision: expected str"):
        load_dict(tiny, tmp_path)


def test_precision_is_in_the_resume_identity_and_device_is_not(tiny: dict,
                                                                  tmp_path: Path) -> None:
    config = load_dict(tiny, tmp_path)
    other = copy.deepcopy(config)
    other.train.precision = "bf16"
    assert identity(other) != identity(config)
    other = copy.deepcopy(config)
    other.device = "auto"
    assert identity(other) == identity(config)


def test_device_auto_resolves_when_the_trainer_is_built(tiny: dict, tmp_path: Path) -> None:
    tiny["device"] = "auto"
    config = load_dict(tiny, tmp_path)
    assert config.device == "auto"  # the config keeps what was asked for
    expected = "cuda" if CUDA else "cpu"
    assert build_trainer(config).device.type == expected
    assert resolve_device("auto").type == expected and resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_named_error(tiny: dict, tmp_path: Path) -> None:
    tiny["device"] = "cuda"
    with pytest.raises(ConfigError, match=r"device: 'cuda' asked for, but no CUDA device is "
                                          r"available \(use cpu, or auto"):
        load_dict(tiny, tmp_path)


class Poison(Strategy):
    """Makes step ``at``'s gradients inf (the loss stays finite) and records, after every
    update, whether the weights moved, the schedule's step count and the loss scale."""

    name = "poison"

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.step, self.log = at, 0, []

    def before_training_iteration(self, strategy, **kwargs) -> None:  # noqa: ANN001
        self.before = [p.detach().clone() for p in strategy.model.parameters()]

    def after_forward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        if self.step == self.at:
            strategy.outputs.raw[0].register_hook(lambda g: torch.full_like(g, float("inf")))

    def after_update(self, strategy, **kwargs) -> None:  # noqa: ANN001
        moved = any(not torch.equal(a, p) for a, p in zip(self.before,
                                                          strategy.model.parameters(),
                                                          strict=True))
        self.log.append((moved, strategy.scheduler.last_epoch,
                         strategy.precision.scaler.get_scale()))
        self.step += 1


def test_16_mixed_skips_a_step_with_inf_gradients_and_the_schedule_waits(tiny: dict) -> None:
    config = from_dict(RunConfig, _short(tiny, tasks=1, epochs=1, precision="16-mixed",
                                         scheduler={"name": "cosine"}))
    poison = Poison(at=2)
    trainer = build_trainer(config, [Finetune(), poison])
    trainer.setup(build_scenario(config))
    trainer.train_experience(trainer.benchmark.train_stream[0])
    (m0, e0, s0), (m1, e1, s1), (m2, e2, s2), (m3, e3, s3) = poison.log[:4]
    assert m0 and m1 and not m2 and m3  # step 2 skipped, the others taken
    assert (e0, e1, e2, e3) == (1, 2, 2, 3)  # the schedule did not advance on the skipped step
    assert s0 == s1 and s2 == s1 / 2 and s3 == s2  # the scaler backed off once
    assert all(h["loss"] == h["loss"] for h in trainer.history)  # the loss stayed finite


def test_16_mixed_resumes_with_the_scalers_state(tiny: dict, tmp_path: Path) -> None:
    config = load_dict(_short(tiny, epochs=2, precision="16-mixed"), tmp_path)
    scenario = build_scenario(config)

    def trainer(kill_at: int | None):  # noqa: ANN202
        built = build_trainer(config, [*build_strategies(["finetune"], {}), Kill(kill_at)])
        # a small growth interval, so that the scale grows within the run and its growth
        # tracker matters: a resumed run that lost the scaler's state would end elsewhere
        built.precision.scaler._growth_interval = 3
        return built

    whole_trainer = trainer(None)
    whole = whole_trainer.fit(scenario)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        trainer(1).fit(scenario, checkpoints, identity(config))
    saved = torch.load(checkpoints / "after_task_1.pt", weights_only=True)["scaler"]
    assert saved["scale"] > 65536.0  # it grew
    resumed_trainer = trainer(None)
    resumed = resumed_trainer.fit(scenario, checkpoints, identity(config))
    assert resumed_trainer.precision.state_dict() == whole_trainer.precision.state_dict()
    for metric in whole:
        assert torch.equal(whole[metric].nan_to_num(-1), resumed[metric].nan_to_num(-1)), metric


def test_scaler_state_is_none_without_16_mixed() -> None:
    for precision in ("32", "bf16"):
        assert Precision(precision).state_dict() is None
    assert Precision("16-mixed").state_dict()["scale"] == 65536.0


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_dns_keeps_old_scores_under_autocast(tmp_path: Path, precision: str) -> None:
    """test_projection's invariant with the forward pass in half precision: the projection
    acts on the float32 (unscaled) gradients, so the old pair's scores stay put (and with
    16-mixed finetuning moves them: the step was not skipped)."""
    dns = DNS(DNSConfig(mode="grad", **KEEP_ALL))
    kept = _score_drift(tmp_path, dns, "sgd", lr=0.01, precision=precision)
    assert kept < 1e-4
    assert dns.projections > 0
    # the moments were taken outside autocast (after the task), in float32
    moments = [*dns.moment_in.values(), *dns.partner_inputs.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    if precision == "16-mixed":  # the step was taken, not skipped by the scaler
        moved = _score_drift(tmp_path, Finetune(), "sgd", lr=0.01, precision=precision)
        assert moved > 100 * max(kept, 1e-7)


# ------------------------------------------------------------------ CUDA
@pytest.mark.parametrize("precision", ["32", "bf16", "16-mixed"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_run_trains_at_each_precision(cpu_runs: dict[str, RunResult], tiny_template: dict,
                                           precision: str) -> None:
    result = _run(tiny_template, precision=precision, device="cuda")
    # fp32 on CUDA against the CPU: other kernels, other round-off; half precision: looser
    _assert_trains_close_to(result, cpu_runs["32"], tolerance=0.05 if precision == "32" else 0.08)


@pytest.mark.parametrize("precision", ["32", "bf16", "16-mixed"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_dns_keeps_old_scores_on_cuda(tmp_path: Path, precision: str) -> None:
    dns = DNS(DNSConfig(mode="grad", **KEEP_ALL))
    kept = _score_drift(tmp_path, dns, "sgd", lr=0.01, device="cuda", precision=precision)
    moved = _score_drift(tmp_path, Finetune(), "sgd", lr=0.01, device="cuda",
                         precision=precision)
    assert kept < 1e-4
    assert moved > 100 * max(kept, 1e-7)
    assert dns.projections > 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_device_auto_is_cuda_here(tiny: dict, tmp_path: Path) -> None:
    tiny["device"] = "auto"
    trainer = build_trainer(load_dict(tiny, tmp_path))
    assert trainer.device.type == "cuda"
    assert next(trainer.model.parameters()).is_cuda
