"""Sequence-to-sequence SLU (``scenario.class_incremental.target: sequence``): targets from the
readers, the tokenizer kept with the run, metrics of decoded targets, the strategies on the
decoder (token-level ``kd``, ``seq_kd``, ``coconut``'s transcript side), resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import Kill, load_dict, sequence_stream, slurp_corpus

from comodal.config import from_dict
from comodal.errors import ConfigError
from comodal.platform import checkpoint
from comodal.platform.encoders import masked_mean
from comodal.platform.model import SequenceOutput
from comodal.platform.run import build_trainer, identity, run
from comodal.platform.sequences import PAD, SequenceTokenizer, parse_target
from comodal.platform.trainer import Trainer
from comodal.scenarios.registry import build_scenario
from comodal.scenarios.slu import read_fsc
from comodal.scenarios.slu_targets import fsc_target
from comodal.scenarios.synth_fsc import INTENTS
from comodal.strategies.base import Strategy
from comodal.strategies.coconut import COCONUT
from comodal.strategies.distill import KD, KDConfig
from comodal.strategies.registry import build_strategies
from comodal.strategies.seq_kd import SeqKD


@pytest.fixture()
def seq(corpus: Path, cache_dir: Path) -> dict:
    """Three sequence tasks (11, 10, 10 intents) of the small corpus, a tiny encoder-decoder."""
    return sequence_stream(corpus, {"cache_dir": str(cache_dir)})


def test_the_fsc_reader_writes_each_rows_target(corpus: Path) -> None:
    data = read_fsc(corpus, "train")
    for i in (0, 100, 371):
        intent = INTENTS[int(data.labels[i])]
        target = data.meta["target"][i]
        assert target == fsc_target(*intent, data.columns["text"][i])
        parsed = parse_target(target)
        assert parsed.intent == "_".join("_".join(p.lower().split()) for p in intent)
        assert parsed.text == data.columns["text"][i].lower().strip(".?!")


def _perfect(shift: int):  # noqa: ANN202
    """``Trainer.decode`` answering each row with the true tokens of the row ``shift`` after it."""
    def decode(self: Trainer, batch: dict, model: object = None, width: int = 0) -> torch.Tensor:
        return batch["tokens"].roll(-shift, 0)

    return decode


@pytest.mark.parametrize("shift", [0, 1])
def test_metrics_of_decoded_targets_equal_their_hand_computed_values(
        seq: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int) -> None:
    """With the decoder replaced by the true targets, intent accuracy is 1 and WER and CER 0;
    with each row answered by the next row's target they are what the strings say."""
    monkeypatch.setattr(Trainer, "decode", _perfect(shift))  # a task's test rows: one batch
    config = load_dict(seq, tmp_path)
    config.out = str(tmp_path / "run")
    result = run(config)
    scenario = build_scenario(config)
    for j, task in enumerate(scenario.tasks):
        intents = [parse_target(t).intent for t in task.test.meta["target"]]
        expected = sum(a == b for a, b in zip(intents, intents[shift:] + intents[:shift],
                                              strict=True)) / len(intents)
        assert 0 < expected < 1 if shift else expected == 1
        assert result.matrices["accuracy"][:, j].tolist() == pytest.approx([expected] * 4)
        for metric in ("wer", "cer"):
            errors = result.matrices[metric][:, j]
            assert (errors == 0).all() if shift == 0 else (errors > 0).all()
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"accuracy", "wer", "cer"} <= set(written["pooled_acc"])
    # the run directory keeps the tokenizer, the same as its checkpoints
    kept = (tmp_path / "run" / "tokenizer.json").read_text()
    saved = checkpoint.read(tmp_path / "run" / "checkpoints" / "after_task_3.pt")
    assert saved["tokenizer"] == kept
    tokenizer = SequenceTokenizer.from_json(kept)
    assert written["tokenizer"] == {"digest": tokenizer.digest(),
                                    "vocab_size": tokenizer.vocab_size}
    targets = list(scenario.tasks[0].train.meta["target"])
    assert tokenizer.decode(tokenizer.encode(targets, 40)) == targets


def test_slurp_targets_score_scenario_action_and_slots(cache_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURP by scenario (alarm + play, then weather), each test row answered with the next
    row's target: scenario, action and intent accuracy and slot F1 as counted by hand."""
    monkeypatch.setattr(Trainer, "decode", _perfect(1))
    config = sequence_stream(tmp_path, {"cache_dir": str(cache_dir),
                                        "slurp": {"root": str(slurp_corpus(tmp_path / "s"))}})
    config["scenario"]["class_incremental"] = {"dataset": "slurp", "modalities": ["audio"],
                                               "target": "sequence", "groups_per_task": 2}
    config["data"].pop("fsc")
    result = run(load_dict(config, tmp_path))
    # task 1 rows: alarm_set, alarm_query, play_music twice; answered by the next row's
    final = {m: result.matrices[m][-1].tolist() for m in result.matrices}
    assert final["accuracy"] == [0.0, 1.0]
    assert final["scenario_accuracy"] == pytest.approx([2 / 6, 1.0])
    assert final["action_accuracy"] == [0.0, 1.0]
    assert final["slot_f1"] == [1.0, 1.0]  # every target has the slot (word, sentence)
    assert result.summary["scenario_accuracy"]["acc"] == pytest.approx((2 + 2) / 8)


def test_the_encoder_decoder_learns_and_decodes(seq: dict, tmp_path: Path) -> None:
    """Joint training on the tiny corpus (two training speakers): the teacher-forced loss falls
    fourfold, and the decoded test targets get words right (WER below 1; before training, no
    intent is right)."""
    seq["strategies"] = ["joint"]
    seq["train"]["epochs"] = 12
    config = load_dict(seq, tmp_path)
    trainer = build_trainer(config)
    matrices = trainer.fit(build_scenario(config))
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < losses[0] / 4
    assert matrices["wer"][1].mean() < 0.95
    assert matrices["accuracy"][0].max() == 0  # before training


class Probe(Strategy):
    """Checks ``seq_kd`` from the stack: its pseudo-targets at each task's start are the
    teacher's decoding of the buffer rows and stay so through the task, while the student's
    decoding of the same rows drifts from them."""

    name = "probe"
    kinds = ("sequence",)

    def __init__(self) -> None:
        super().__init__()
        self.checked, self.drifted = 0, 0
        self.at_start: torch.Tensor | None = None

    def _decoded(self, strategy: Trainer, model: object) -> torch.Tensor:
        from comodal.strategies.replay import memory_batches

        owner = next(p for p in strategy.plugins if getattr(p, "owns_buffer", False))
        seq_kd = next(p for p in strategy.plugins if isinstance(p, SeqKD))
        out = torch.full_like(seq_kd.pseudo, PAD)
        slots = torch.arange(len(owner.buffer))
        was = model.training
        model.eval()
        for mine, batch in memory_batches(strategy, owner.buffer, slots):
            ids = strategy.decode(batch, model)
            out[mine, :ids.shape[1]] = ids
        model.train(was)
        return out

    def before_training_exp(self, strategy: Trainer, **kwargs: object) -> None:
        seq_kd = next(p for p in strategy.plugins if isinstance(p, SeqKD))
        if strategy.experience_index == 0:
            assert seq_kd.pseudo is None
            return
        assert torch.equal(seq_kd.pseudo, self._decoded(strategy, strategy.teacher))
        self.at_start = seq_kd.pseudo.clone()
        self.checked += 1

    def after_training_exp(self, strategy: Trainer, **kwargs: object) -> None:
        seq_kd = next(p for p in strategy.plugins if isinstance(p, SeqKD))
        if seq_kd.pseudo is not None:  # kept through the task, while the student moved on
            assert torch.equal(seq_kd.pseudo, self.at_start)
            student = self._decoded(strategy, strategy.model)
            self.drifted += int(not torch.equal(student, seq_kd.pseudo))

    def before_backward(self, strategy: Trainer, **kwargs: object) -> None:
        """The seq_kd term equals the decoder's cross-entropy on the pseudo-targets of the
        batch's rehearsal rows, which ``batch["slots"]`` names."""
        seq_kd = next(p for p in strategy.plugins if isinstance(p, SeqKD))
        batch = strategy.mbatch
        if seq_kd.pseudo is None or "slots" not in batch:
            return
        rows = batch["rehearsal"]
        assert int(rows.sum()) == len(batch["slots"]) > 0
        owner = next(p for p in strategy.plugins if getattr(p, "owns_buffer", False))
        assert torch.equal(batch["index"][rows], owner.buffer.index[batch["slots"]])


def test_seq_kd_trains_on_the_teachers_decoding_at_the_tasks_start(seq: dict,
                                                                   tmp_path: Path) -> None:
    seq["strategies"] = ["er", "seq_kd"]
    seq["strategy_args"] = {"er": {"size": 40}}
    seq["train"]["epochs"] = 3
    config = load_dict(seq, tmp_path)
    probe = Probe()
    plugins = build_strategies(config.strategies, config.strategy_args) + [probe]
    trainer = build_trainer(config, plugins)
    trainer.fit(build_scenario(config))
    assert probe.checked == 2 and probe.drifted >= 1


def test_token_level_kd_is_the_kl_of_the_decoders_token_distributions() -> None:
    """kd's prediction term on a sequence batch: τ²·KL(teacher || student) per target token
    that is not padding, on the rehearsal rows, weighted sqrt(rehearsal / rows)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0], [2, 8, 9, 10, 3], [2, 4, 3, 0, 0]])
    student = torch.randn(4, 4, 11, generator=g)
    teacher = torch.randn(4, 4, 11, generator=g)
    rehearsal = torch.tensor([False, True, False, True])
    kd = KD(from_dict(KDConfig, {"feature": "off", "temperature": 2.0}))
    batch = {"tokens": tokens, "rehearsal": rehearsal}
    holder = SimpleNamespace(
        teacher=SimpleNamespace(class_ids=torch.zeros(0)), loss=torch.zeros(()),
        mbatch=_Batch(batch, "sequence"),
        outputs=SequenceOutput(student, torch.zeros(4, 3), ()),
        teacher_output=lambda b: SequenceOutput(teacher, torch.zeros(4, 3), ()))
    kd.before_backward(holder)
    expected, count = 0.0, 0
    for i in (1, 3):
        for t in range(4):
            if tokens[i, t + 1] == PAD:
                continue
            p = F.softmax(teacher[i, t] / 2, dim=0)
            expected += float((p * (p.log() - F.log_softmax(student[i, t] / 2, dim=0))).sum())
            count += 1
    assert holder.loss.item() == pytest.approx((2 / 4) ** 0.5 * 4 * expected / count, rel=1e-5)


class _Batch(dict):
    def __init__(self, columns: dict, kind: str) -> None:
        super().__init__(columns)
        self.kind = kind


def test_coconut_on_sequences_pairs_audio_with_the_decoders_transcript_embeddings(
        seq: dict, tmp_path: Path) -> None:
    """coconut's MM text side on a sequence batch is transcript_head of the mean decoder token
    embedding over the transcription's tokens (after the last _SEP), and coconut+seq_kd runs."""
    seq["strategies"] = ["coconut", "seq_kd"]
    seq["strategy_args"] = {"coconut": {"size": 40, "nspt_weight": 0.0}}
    config = load_dict(seq, tmp_path)
    trainer = build_trainer(config)
    matrices = trainer.fit(build_scenario(config))
    assert all(torch.isfinite(m[1:]).all() for m in matrices.values())
    batch = trainer.as_batch(next(iter(trainer.ordered_loader(0, 8))))
    coconut = next(p for p in trainer.plugins if isinstance(p, COCONUT))
    trainer.mbatch, trainer.teacher = batch, None
    trainer.outputs = trainer.forward(batch)
    trainer.loss = torch.zeros(())
    coconut.before_backward(trainer)
    model, tokens = trainer.model, batch["tokens"]
    words = [trainer.tokenizer.decode([[2, *row[mask].tolist()]])[0]
             for row, mask in zip(tokens, trainer.tokenizer.transcript_mask(tokens), strict=True)]
    assert words == [parse_target(t).text for t in
                     trainer.scenario.tasks[0].train.meta["target"][:8]]
    text = model.scored(model.transcript_head(masked_mean(
        model.decoder.token_embeddings(tokens), trainer.tokenizer.transcript_mask(tokens))))
    assert trainer.loss.item() == pytest.approx(
        coconut.mm(trainer.outputs.features, text, model.scale).item(), rel=1e-6)


def test_resume_restores_the_tokenizer_and_gives_the_same_metrics(
        seq: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seq["strategies"] = ["er", "kd", "seq_kd"]
    seq["strategy_args"] = {"er": {"size": 40}}
    config = load_dict(seq, tmp_path)

    def fit(kill: int | None, checkpoints: Path | None) -> dict:
        plugins = build_strategies(config.strategies, config.strategy_args) + [Kill(kill)]
        trainer = build_trainer(config, plugins)
        return trainer.fit(build_scenario(config), checkpoints, identity(config))

    whole = fit(None, None)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        fit(2, checkpoints)

    def refuse(*args: object) -> None:
        raise AssertionError("a resumed run must read the checkpoint's tokenizer")

    monkeypatch.setattr(SequenceTokenizer, "train", classmethod(refuse))
    resumed = fit(None, checkpoints)
    for metric in whole:
        assert torch.equal(whole[metric].nan_to_num(-1), resumed[metric].nan_to_num(-1)), metric


@pytest.mark.parametrize(("change", "message"), [
    ({"scenario.class_incremental.target": "tokens"},
     "scenario.class_incremental.target: unknown value 'tokens'"),
    ({"scenario.class_incremental.modalities": ["audio", "text"]}, "name only [audio]"),
    ({"model.modalities.audio": {"encoder": "logmel-stats"}}, "needs a trained encoder"),
    ({"strategies": ["ewc"]}, "'ewc' works on pair tasks"),
    ({"strategies": ["seq_kd"]}, "seq_kd trains on the teacher's decoding"),
    ({"model.decoder.heads": 3}, "model.decoder.dim: 32 is not divisible"),
    ({"model.decoder.tokenizer_splits": ["valid"]}, "tokenizer_splits[0]: unknown value"),
])
def test_bad_sequence_configs_name_the_field(seq: dict, tmp_path: Path, change: dict,
                                             message: str) -> None:
    config = copy.deepcopy(seq)
    for key, value in change.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    if "model.modalities.audio" in change:
        config["model"]["modalities"]["text"] = {"encoder": "hf"}
    with pytest.raises(ConfigError) as err:
        load_dict(config, tmp_path)
    assert message in str(err.value)


def test_beam_widths_repeats_the_runs_final_row_at_its_width(seq: dict, tmp_path: Path) -> None:
    """``examples/beam_widths.py`` decodes a finished run's last checkpoint again: at the run's
    own width it gives the run's final pooled accuracy and WER; other widths run too."""
    import runpy

    config = load_dict(seq, tmp_path)
    config.out = str(tmp_path / "run")
    result = run(config)
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples"
                                / "beam_widths.py"))
    found = script["main"]([str(tmp_path / "run"), "--widths", "2", "1"])
    assert set(found) == {1, 2}
    for metric in ("accuracy", "wer"):
        assert found[2][metric] == pytest.approx(result.summary[metric]["acc"], abs=1e-9)


def test_the_summary_table_shows_pooled_wer_and_cer_lowest_best() -> None:
    """A comparison of sequence runs gets Last WER and CER (pooled) columns after the accuracy
    summaries, and the bold WER is the lowest."""
    from comodal.platform.report import summary_table

    def fake(acc: float, wer: float) -> dict:
        return {"summary": {"accuracy": {"acc": acc}, "wer": {"acc": wer}, "cer": {"acc": wer}},
                "pooled_acc": ["accuracy", "wer", "cer"]}

    runs = {"er": [fake(0.7, 0.10), fake(0.8, 0.12)], "coconut": [fake(0.8, 0.05),
                                                                  fake(0.9, 0.07)]}
    cols, table, best = summary_table(runs, 2, "default")
    assert cols[-2:] == [("Last WER (pooled)", "wer", "acc", False),
                         ("Last CER (pooled)", "cer", "acc", False)]
    assert table["er"]["Last WER (pooled)"][0] == pytest.approx(0.11)
    assert best["Last WER (pooled)"] == {"coconut"} == best["Last Acc (pooled)"]


def test_avalanche_accuracy_metrics_on_sequence_tasks_are_refused(seq: dict,
                                                                  tmp_path: Path) -> None:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    config = load_dict(seq, tmp_path)
    trainer = build_trainer(config, [EvaluationPlugin(accuracy_metrics(stream=True),
                                                      loggers=[])])
    with pytest.raises(ConfigError, match="and sequence tasks have none .*token logits"):
        trainer.setup(build_scenario(config))
