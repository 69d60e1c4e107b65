"""co2l and cila: the asymmetric contrastive loss and the relation distillation against hand
computations, what a step adds on a real stream, CILA's adaptive weight against its rule, and
resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import Kill, class_incremental, load_dict

from comodal.config import from_dict
from comodal.errors import ConfigError
from comodal.platform.losses import AsymmetricInfoNCE, InfoNCE, RelationDistill
from comodal.platform.run import build_trainer, identity
from comodal.scenarios.registry import build_scenario
from comodal.strategies.cila import CILA, CILAConfig
from comodal.strategies.co2l import Co2L, Co2LConfig

# four pairs (a_i, b_i), unit-norm; rows 1 and 3 come from the buffer
A = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6]]
B = [[0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [1.0, 0.0]]
REHEARSAL = [False, True, False, True]
SCALE = 3.0


def dot(x: list[float], y: list[float]) -> float:
    return sum(p * q for p, q in zip(x, y, strict=True))


def asymmetric_by_hand(a: list, b: list, scale: float, rehearsal: list[bool],
                       symmetric: bool) -> float:
    """Mean over current anchors i of -log(e^{s a_i.b_i} / sum_k e^{s a_i.b_k}), k over every
    row; the reverse direction likewise, averaged with it when symmetric."""
    def direction(x: list, y: list) -> float:
        terms = []
        for i in range(len(x)):
            if rehearsal[i]:
                continue
            logits = [scale * dot(x[i], y[k]) for k in range(len(y))]
            terms.append(math.log(sum(math.exp(v) for v in logits)) - logits[i])
        return sum(terms) / len(terms)

    forward = direction(a, b)
    return (forward + direction(b, a)) / 2 if symmetric else forward


def co2l_loss(rehearsal: list[bool] | None, symmetric: bool, a: list = A,
              b: list = B) -> torch.Tensor:
    """Co2L's ``pair_loss`` as the trainer calls it in a task, on the hand-built batch."""
    trainer = SimpleNamespace(criterion=InfoNCE(symmetric),
                              model=SimpleNamespace(scale=torch.tensor(SCALE)))
    batch = {} if rehearsal is None else {"rehearsal": torch.tensor(rehearsal)}
    co2l = Co2L()
    co2l.contrastive = AsymmetricInfoNCE(symmetric)  # what its before_training_exp builds
    return co2l.pair_loss(trainer, batch, (torch.tensor(a), torch.tensor(b)))


# ----------------------------------------------------------------------------- L_asym
@pytest.mark.parametrize("symmetric", [True, False])
def test_asymmetric_loss_equals_the_hand_computed_sum(symmetric: bool) -> None:
    got = co2l_loss(REHEARSAL, symmetric).item()
    assert got == pytest.approx(asymmetric_by_hand(A, B, SCALE, REHEARSAL, symmetric), rel=1e-6)
    # the buffer rows are candidates: dropping them changes the loss
    current = [i for i, r in enumerate(REHEARSAL) if not r]
    alone = asymmetric_by_hand([A[i] for i in current], [B[i] for i in current], SCALE,
                               [False] * len(current), symmetric)
    assert abs(got - alone) > 1e-3


@pytest.mark.parametrize("symmetric", [True, False])
def test_without_rehearsal_rows_it_is_the_trainers_infonce(symmetric: bool) -> None:
    a, b, scale = torch.tensor(A), torch.tensor(B), torch.tensor(SCALE)
    infonce = InfoNCE(symmetric)(a, b, scale)
    assert torch.equal(co2l_loss(None, symmetric), infonce)  # a batch without memory rows
    assert torch.equal(co2l_loss([False] * 4, symmetric), infonce)  # memory only on the side
    assert torch.equal(AsymmetricInfoNCE(symmetric)(a, b, scale), infonce)


def test_rehearsal_rows_are_never_anchors() -> None:
    """A buffer row r enters only the current anchors' denominators: one-directional, a_r
    does not enter at all, and moving b_r changes the loss by the change of the current
    anchors' log-sum-exps alone (its own positive a_r.b_r is in no term)."""
    r = 1
    moved_a = copy.deepcopy(A)
    moved_a[r] = [-1.0, 0.0]
    assert torch.equal(co2l_loss(REHEARSAL, False, a=moved_a), co2l_loss(REHEARSAL, False))
    moved_b = copy.deepcopy(B)
    moved_b[r] = [0.6, 0.8]  # now a_r.b_r = 1: r's own positive similarity is the largest
    change = (co2l_loss(REHEARSAL, False, b=moved_b) - co2l_loss(REHEARSAL, False)).item()
    current = [i for i, x in enumerate(REHEARSAL) if not x]

    def lse(i: int, b: list) -> float:
        return math.log(sum(math.exp(SCALE * dot(A[i], bk)) for bk in b))

    denominators = sum(lse(i, moved_b) - lse(i, B) for i in current) / len(current)
    assert change == pytest.approx(denominators, rel=1e-5) and abs(change) > 1e-3


# ----------------------------------------------------------------------------- L_IRD
def relation_by_hand(student: tuple, teacher: tuple, ks: float, kt: float) -> float:
    """Mean over rows of KL(softmax(T_i / kt) || softmax(S_i / ks)) with S = a_s b_sᵀ,
    T = a_t b_tᵀ, and the same over columns, averaged."""
    def kl(s_row: list[float], t_row: list[float]) -> float:
        ls = [v / ks for v in s_row]
        lt = [v / kt for v in t_row]
        zs, zt = math.log(sum(math.exp(v) for v in ls)), math.log(sum(math.exp(v) for v in lt))
        return sum(math.exp(t - zt) * ((t - zt) - (s - zs)) for s, t in zip(ls, lt, strict=True))

    (sa, sb), (ta, tb) = student, teacher
    n = len(sa)
    rows = sum(kl([dot(sa[i], sb[k]) for k in range(n)], [dot(ta[i], tb[k]) for k in range(n)])
               for i in range(n)) / n
    cols = sum(kl([dot(sb[j], sa[k]) for k in range(n)], [dot(tb[j], ta[k]) for k in range(n)])
               for j in range(n)) / n
    return (rows + cols) / 2


TEACHER = ([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], [[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
STUDENT = ([[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]], [[0.6, 0.8], [-0.6, 0.8], [0.8, 0.6]])


def test_relation_distillation_equals_the_hand_computed_kl() -> None:
    student, teacher = [tuple(torch.tensor(x) for x in p) for p in (STUDENT, TEACHER)]
    got = RelationDistill(0.2, 0.01)(student, teacher).item()
    assert got == pytest.approx(relation_by_hand(STUDENT, TEACHER, 0.2, 0.01), rel=1e-5)
    assert RelationDistill(0.5)(student, teacher).item() == pytest.approx(
        relation_by_hand(STUDENT, TEACHER, 0.5, 0.5), rel=1e-5)  # one temperature, as before


def test_ird_distils_batches_of_trained_pairs_weighted_by_rows() -> None:
    """The step's L_IRD: every batch whose pair an earlier task trained (side batches of the
    buffer, and the main batch when its pair is not new), averaged over their rows."""
    tasks = [SimpleNamespace(modalities=m) for m in (("a", "b"), ("c", "b"), ("a", "c"))]
    batches = [{"task_id": t, "index": torch.arange(n)} for t, n in ((0, 3), (1, 2), (2, 3))]
    outputs = [tuple(torch.tensor(x) for x in STUDENT),
               tuple(torch.tensor(x)[:2] for x in TEACHER),
               tuple(torch.tensor(x) for x in TEACHER)]
    teachers = {0: TEACHER, 1: tuple(x[:2] for x in STUDENT), 2: STUDENT}

    def strategy(index: int) -> SimpleNamespace:
        return SimpleNamespace(
            teacher=object(), experience_index=index, scenario=SimpleNamespace(tasks=tasks),
            mbatch=batches[2], outputs=outputs[2],
            side_outputs=list(zip(batches[:2], outputs[:2], strict=True)),
            pair=lambda batch: tasks[batch["task_id"]].modalities,
            teacher_output=lambda batch: tuple(torch.tensor(x)
                                               for x in teachers[batch["task_id"]]))

    def hand(task: int) -> float:
        student = STUDENT if task == 0 else (TEACHER if task == 2 else
                                             tuple(x[:2] for x in TEACHER))
        return relation_by_hand(student, teachers[task], 0.2, 0.01)

    co2l = Co2L()
    # task index 2 (pair a-c, new): the two side batches, 3 and 2 rows
    assert co2l.ird(strategy(2)).item() == pytest.approx((3 * hand(0) + 2 * hand(1)) / 5,
                                                         rel=1e-5)
    # had a-c been trained before (task index 3), the main batch joins
    tasks.append(SimpleNamespace(modalities=("a", "c")))
    assert co2l.ird(strategy(3)).item() == pytest.approx(
        (3 * hand(0) + 2 * hand(1) + 3 * hand(2)) / 8, rel=1e-5)
    assert co2l.ird(SimpleNamespace(teacher=None)) is None  # the first task: no teacher


# ----------------------------------------------------------------------------- runs
def three_tasks(tiny: dict, tmp_path: Path, strategy: str, **args: object) -> dict:
    """Two vision-text tasks (the second replays the first's rows in its batch), then an
    audio-text task (a new pair: vision-text memory as side batches); one epoch."""
    config = copy.deepcopy(tiny)
    config["scenario"]["tasks"] = [
        {"dataset": "synth-pairs/toys", "modalities": ["vision", "text"]},
        {"dataset": "synth-pairs/gems", "modalities": ["vision", "text"]},
        {"dataset": "synth-pairs/kitchen", "modalities": ["audio", "text"]},
    ]
    config["train"]["epochs"] = 1
    config["strategies"] = [strategy]
    config["strategy_args"] = {strategy: {"size": 40, **args}}
    config["out"] = str(tmp_path / strategy)
    return config


class Watch(Co2L):
    """co2l that checks each step: the loss before its hook is the pair loss (InfoNCE
    without memory rows), and the hook adds λ · L_IRD and nothing else; which batches it
    distilled."""

    def __init__(self, config: Co2LConfig) -> None:
        super().__init__(config)
        self.steps: list[dict] = []
        relation, self.seen = self.relation, []
        self.relation = lambda student, teacher: (self.seen.append(student),
                                                  relation(student, teacher))[1]

    def before_backward(self, strategy, **kwargs) -> None:  # noqa: ANN001
        batch, out = strategy.mbatch, strategy.outputs
        before = strategy.loss.detach().clone()
        self.seen = []
        super().before_backward(strategy, **kwargs)
        distilled = self.seen
        ird = self.ird(strategy)
        rehearsal = batch.get("rehearsal")
        self.steps.append({
            "task": strategy.experience_index,
            "rehearsal": 0 if rehearsal is None else int(rehearsal.sum()),
            "side": len(strategy.side_outputs),
            "infonce": torch.equal(before, strategy.criterion(*out, strategy.model.scale)),
            "added": (strategy.loss.detach() - before).item(),
            "ird": None if ird is None else self.weight * ird.item(),
            "main_distilled": any(s is out for s in distilled),
            "sides_distilled": sum(any(s is o for s in distilled)
                                   for _, o in strategy.side_outputs),
        })


def test_co2l_steps_add_the_asymmetric_loss_and_ird_only(tiny: dict, tmp_path: Path) -> None:
    config = load_dict(three_tasks(tiny, tmp_path, "co2l", ird_weight=0.5), tmp_path)
    watch = Watch(from_dict(Co2LConfig, {"size": 40, "ird_weight": 0.5}))
    result = build_trainer(config, [watch]).fit(build_scenario(config))
    assert torch.isfinite(result["recall@1"]).all()
    assert watch.results()["ird_weight"] == 0.5 and watch.results()["slots"] == 40
    steps = {t: [s for s in watch.steps if s["task"] == t] for t in range(3)}
    # task 1: no memory, no teacher: the trainer's InfoNCE and nothing added
    assert all(s["infonce"] and s["added"] == 0 and s["ird"] is None for s in steps[0])
    # task 2: toys rows in the batch, not anchors (not InfoNCE); the batch distilled
    assert all(s["rehearsal"] > 0 and not s["infonce"] and s["main_distilled"]
               for s in steps[1])
    # task 3: a new pair, vision-text memory as side batches (one per task): only they are
    # distilled, and only λ·L_IRD is added (er would add their InfoNCE too)
    assert all(s["rehearsal"] == 0 and s["side"] == 2 and s["infonce"] for s in steps[2])
    assert all(not s["main_distilled"] and s["sides_distilled"] == 2 for s in steps[2])
    for s in steps[1] + steps[2]:
        assert s["added"] == pytest.approx(s["ird"], rel=1e-5) and s["ird"] > 0


def test_classify_tasks_are_refused(tiny: dict, tmp_path: Path) -> None:
    for name in ("co2l", "cila"):
        config = class_incremental(tiny)
        config["strategies"] = [name]
        with pytest.raises(ConfigError, match=f"'{name}' works on pair tasks"):
            load_dict(config, tmp_path)


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="strategy_args.co2l: student_temperature"):
        from_dict(Co2LConfig, {"teacher_temperature": 0})
    with pytest.raises(ConfigError, match="strategy_args.cila: balance"):
        from_dict(CILAConfig, {"balance": 0})


def test_cila_weight_sums_the_earlier_tasks_ratios() -> None:
    """λ_t = max(λ_min, κ Σ avg L_IRD / Σ avg L_asym) over the tasks that distilled."""
    cila = CILA(from_dict(CILAConfig, {"ird_weight": 0.3, "balance": 2.0, "min_weight": 0.5}))
    assert cila.adaptive_weight() == 0.3  # no task distilled yet: the initial weight
    cila.records = [{"contrastive": 9.0, "distill": None},
                    {"contrastive": 4.0, "distill": 1.0}, {"contrastive": 2.0, "distill": 2.0}]
    assert cila.adaptive_weight() == pytest.approx(2.0 * 3.0 / 6.0)
    cila.records[2]["distill"] = 0.0
    assert cila.adaptive_weight() == 0.5  # the floor


class Ledger(CILA):
    """cila that notes every L_asym and L_IRD it computes and the weight of each step."""

    def __init__(self, config: CILAConfig) -> None:
        super().__init__(config)
        self.log: list[tuple[int, str, float]] = []

    def pair_loss(self, trainer, batch, output) -> torch.Tensor:  # noqa: ANN001
        loss = super().pair_loss(trainer, batch, output)
        self.log.append((trainer.experience_index, "contrastive", loss.item()))
        return loss

    def ird(self, strategy) -> torch.Tensor | None:  # noqa: ANN001
        loss = super().ird(strategy)
        if loss is not None:
            self.log.append((strategy.experience_index, "distill", loss.item()))
            self.log.append((strategy.experience_index, "weight", self.weight))
        return loss


CILA_ARGS = {"balance": 0.5, "min_weight": 0.0, "ird_weight": 2.0}


@pytest.fixture(scope="module")
def cila_run(tiny_template: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("cila")
    config = load_dict(three_tasks(tiny_template, tmp, "cila", **CILA_ARGS), tmp)
    ledger = Ledger(from_dict(CILAConfig, {"size": 40, **CILA_ARGS}))
    matrices = build_trainer(config, [ledger, Kill(None)]).fit(build_scenario(config))
    return config, ledger, matrices


def test_cila_weight_follows_the_rule_on_the_recorded_averages(cila_run: tuple) -> None:
    _, ledger, matrices = cila_run
    assert torch.isfinite(matrices["recall@1"]).all()
    records = ledger.records
    for t, record in enumerate(records):  # the averages are those of the task's steps
        for kind in ("contrastive", "distill"):
            values = [v for task, k, v in ledger.log if task == t and k == kind]
            assert record[kind] == (pytest.approx(sum(values) / len(values), rel=1e-9)
                                    if values else None), (t, kind)
    assert records[0]["weight"] is None and records[0]["distill"] is None  # no teacher
    assert records[1]["weight"] == CILA_ARGS["ird_weight"]  # no earlier distillation
    expected = CILA_ARGS["balance"] * records[1]["distill"] / records[1]["contrastive"]
    assert records[2]["weight"] == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(CILA_ARGS["ird_weight"], rel=1e-3)
    used = {v for task, k, v in ledger.log if task == 2 and k == "weight"}
    assert used == {records[2]["weight"]}  # every step of task 3 used it
    assert ledger.results()["weights"] == [None, 2.0, records[2]["weight"]]


def test_cila_killed_after_a_task_resumes_to_the_uninterrupted_run(
        cila_run: tuple, tmp_path: Path) -> None:
    config, whole, matrices = cila_run
    scenario = build_scenario(config)

    def trainer(kill_at: int | None) -> tuple:
        cila = CILA(from_dict(CILAConfig, {"size": 40, **CILA_ARGS}))
        return cila, build_trainer(config, [cila, Kill(kill_at)])

    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        trainer(2)[1].fit(scenario, checkpoints, identity(config))
    cila, resumed_trainer = trainer(None)
    resumed = resumed_trainer.fit(scenario, checkpoints, identity(config))
    assert cila.records == whole.records  # task 3's weight came from the restored averages
    for metric in matrices:
        assert torch.equal(matrices[metric].nan_to_num(-1), resumed[metric].nan_to_num(-1)), \
            metric


def test_one_strategy_of_a_stack_may_replace_the_pair_loss(tiny: dict, tmp_path: Path) -> None:
    trainer = build_trainer(load_dict(tiny, tmp_path))
    with pytest.raises(ConfigError, match="co2l and cila each replace the pair task loss"):
        trainer.attach(Co2L(), CILA())
