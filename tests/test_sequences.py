"""Seq2seq SLU targets, their parsing, the BPE tokenizer and the text metrics, against
hand-written cases and hand-computed values."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch

from comodal.errors import ConfigError, DataError
from comodal.platform.metrics import sequence_metrics
from comodal.platform.sequences import (
    EOS,
    PAD,
    SOS,
    SPECIALS,
    UNK,
    ParsedTarget,
    SequenceTokenizer,
    parse_target,
)
from comodal.scenarios.slu_targets import fsc_target, normalize, slurp_entities, slurp_target

FSC = [
    ("activate", "lights", "kitchen", "Turn on the kitchen lights."),
    ("activate", "lights", "washroom", "Lights on in the washroom, please"),
    ("deactivate", "lights", "bedroom", "Switch off the bedroom lights!"),
    ("increase", "volume", "none", "It's too quiet"),
    ("decrease", "volume", "none", "That's too loud"),
    ("increase", "heat", "kitchen", "Turn the heat up in the kitchen"),
    ("decrease", "heat", "none", "Make it cooler"),
    ("change language", "Chinese", "none", "Set my device to Chinese"),
    ("change language", "none", "none", "Language settings"),
    ("bring", "shoes", "none", "Bring me my shoes"),
    ("bring", "newspaper", "none", "Go get the newspaper"),
    ("activate", "music", "none", "Play the music"),
    ("deactivate", "lamp", "none", "Lamp off"),
    ("bring", "juice", "none", "I'd like some juice"),
    ("deactivate", "music", "none", "Pause music"),
]
SLURP = [
    ("alarm_set", "wake me up at [time : five am] [date : tomorrow]"),
    ("alarm_query", "what alarms do i have"),
    ("calendar_set", "remind me about the [event_name : meeting] at [time : 10:30]"),
    ("play_music", "play [artist_name : Guns N' Roses] from [date : 1987]"),
    ("weather_query", "will it rain in [place_name : St. Louis] on [date : friday]"),
    ("iot_hue_lightoff", "turn the lights off"),
    ("email_sendemail", "send an email to [person : john] about the [event_name : party]"),
    ("qa_factoid", "who's the president of [place_name : france]"),
    ("takeaway_order", "order [food_type : pizza] from [business_name : domino's]"),
    ("general_quirky", "tell me a joke"),
    ("transport_ticket", "book a train ticket to [place_name : london] for [time : 7 pm]"),
    ("lists_createoradd", "add [list_name : milk] to my [list_name : shopping] list"),
]


def sentence(annotation: str) -> str:
    """SLURP's plain sentence of an annotation: each "[type : value]" as its value."""
    return re.sub(r"\[[^:\]]*:\s*([^\]]*)\]", r"\1", annotation)


def slurp_rows() -> list[str]:
    return [slurp_target(intent, slurp_entities(ann), sentence(ann)) for intent, ann in SLURP]


def targets() -> list[str]:
    """Several dozen FSC-like and SLURP-like targets, digits and apostrophes included."""
    rows = [fsc_target(*row) for row in FSC] + slurp_rows()
    return rows + [slurp_target("datetime_query", [("time", f"{h} {m}")], f"is it {h} {m}")
                   for h in range(1, 13) for m in ("am", "pm")]


@pytest.fixture(scope="module")
def tokenizer() -> SequenceTokenizer:
    return SequenceTokenizer.train(targets(), vocab_size=200)


# --- targets -------------------------------------------------------------------------------

def test_normalize_lowercases_strips_punctuation_and_keeps_inner_apostrophes() -> None:
    assert normalize("  Turn ON the lights,   please! ") == "turn on the lights please"
    assert normalize("It\u2019s 5 o'clock.") == "it's 5 o'clock"
    assert normalize("'quoted' dogs' under_score -- x-ray") == "quoted dogs under score x ray"
    assert normalize("?!") == ""
    for text in ("Hello, World!", "Rock 'n' roll", "St. Louis 10:30"):
        assert normalize(normalize(text)) == normalize(text)


def test_fsc_target() -> None:
    assert (fsc_target("change language", "none", "none", "Change language.")
            == "change_language_none_none _SEP change language")
    assert (fsc_target("Increase", "volume", "none", "It's too QUIET!")
            == "increase_volume_none _SEP it's too quiet")
    with pytest.raises(DataError, match="location=' '"):
        fsc_target("bring", "shoes", " ", "bring shoes")


def test_slurp_entities() -> None:
    assert slurp_entities("wake me up at [time : five am] [date : tomorrow]") == [
        ("time", "five am"), ("date", "tomorrow")]
    assert slurp_entities("at [time : 10:30 P.M.] in [place_name : St. Louis]") == [
        ("time", "10 30 p m"), ("place_name", "st louis")]
    assert slurp_entities("tell me a joke") == []
    with pytest.raises(DataError, match=r"\[time five\]"):
        slurp_entities("at [time five]")


def test_slurp_target() -> None:
    annotation = "wake me up at [time : Five AM] [date : tomorrow]"
    assert sentence(annotation) == "wake me up at Five AM tomorrow"
    assert slurp_target("alarm_set", slurp_entities(annotation), sentence(annotation)) == (
        "alarm_set _SEP time _FILL five am _SEP date _FILL tomorrow _SEP "
        "wake me up at five am tomorrow")
    assert (slurp_target("Alarm_Query", [], "What alarms do I have?")
            == "alarm_query _SEP what alarms do i have")
    for bad in ("alarm set", "alarm", ""):
        with pytest.raises(DataError, match="scenario_action"):
            slurp_target(bad, [], "text")


def test_parse_target_inverts_both_builders() -> None:
    assert parse_target(fsc_target("bring", "shoes", "none", "Bring me my shoes")) == (
        ParsedTarget("bring_shoes_none", [], "bring me my shoes"))
    assert parse_target(slurp_target("alarm_set", [("time", "Five AM"), ("date", "today")],
                                     "set it")) == (
        ParsedTarget("alarm_set", [("time", "five am"), ("date", "today")], "set it"))
    for intent, ann in SLURP:
        parsed = parse_target(slurp_target(intent, slurp_entities(ann), sentence(ann)))
        assert parsed == ParsedTarget(intent, slurp_entities(ann), normalize(sentence(ann)))


@pytest.mark.parametrize(("text", "expected"), [
    ("", ParsedTarget("", [], "")),
    ("no separator at all", ParsedTarget("", [], "")),
    ("alarm_set _SEP", ParsedTarget("alarm_set", [], "")),
    ("_SEP _SEP just text", ParsedTarget("", [], "just text")),
    ("  a_b   _SEP junk _SEP time _FILL  five  am _SEP date _FILL _SEP c  d ",
     ParsedTarget("a_b", [("time", "five am"), ("date", "")], "c d")),
    ("x _SEP _FILL v _SEP t", ParsedTarget("x", [("", "v")], "t")),
])
def test_parse_target_on_malformed_decodes(text: str, expected: ParsedTarget) -> None:
    assert parse_target(text) == expected


# --- tokenizer -----------------------------------------------------------------------------

def test_specials_at_ids_0_to_3(tokenizer: SequenceTokenizer) -> None:
    assert [tokenizer.tokenizer.id_to_token(i) for i in (PAD, UNK, SOS, EOS)] == list(SPECIALS)
    assert (PAD, UNK, SOS, EOS) == (0, 1, 2, 3)
    assert len(SPECIALS) < tokenizer.vocab_size <= 200


def test_round_trip_on_training_and_unseen_targets(tokenizer: SequenceTokenizer) -> None:
    seen = targets()
    # words, digits and letters absent from the training targets still round-trip
    unseen = [fsc_target("juggle", "xylophones", "zoo", "Juggle 1,234 xylophones; q'z!"),
              slurp_target("quiz_jump", [("vex", "0 9")], "jq vow 98765")]
    assert tokenizer.decode(tokenizer.encode(seen + unseen, max_length=200)) == seen + unseen


def test_encode_frames_with_sos_eos_and_pads_to_the_longest(
        tokenizer: SequenceTokenizer) -> None:
    texts = ["alarm_query _SEP what alarms do i have", "a _SEP b", fsc_target(*FSC[0])]
    ids = tokenizer.encode(texts, max_length=200)
    assert ids.dtype == torch.long and ids.shape[0] == 3
    lengths = [len(tokenizer.tokenizer.encode(t, add_special_tokens=False).ids) + 2
               for t in texts]
    assert ids.shape[1] == max(lengths)
    for row, n in zip(ids.tolist(), lengths, strict=True):
        assert row[0] == SOS and row[n - 1] == EOS
        assert row[n:] == [PAD] * (ids.shape[1] - n)
        assert all(t > EOS for t in row[1:n - 1])
    assert tokenizer.encode([], max_length=10).shape == (0, 0)


def test_decode_stops_at_eos_or_pad_and_skips_specials(tokenizer: SequenceTokenizer) -> None:
    a, b = tokenizer.encode(["alarm_set _SEP hi", "bring_shoes_none _SEP go"], 50).tolist()
    core_a = a[1:a.index(EOS)]
    rows = [
        a,  # as encoded
        core_a + [EOS] + b[1:],  # no leading SOS; everything after the first EOS ignored
        [SOS] + core_a + [PAD] + b[1:],  # a PAD ends the row too
        [SOS, UNK] + core_a[:1] + [SOS] + core_a[1:] + [UNK, EOS],  # inner specials dropped
    ]
    assert tokenizer.decode(rows) == ["alarm_set _SEP hi"] * 4
    assert tokenizer.decode(torch.tensor([[SOS, EOS, 7], [EOS, 5, 6]])) == ["", ""]


def test_training_is_deterministic_and_json_round_trips(tokenizer: SequenceTokenizer) -> None:
    again = SequenceTokenizer.train(targets(), vocab_size=200)
    assert again.to_json() == tokenizer.to_json()
    assert again.digest() == tokenizer.digest() and len(tokenizer.digest()) == 16
    other = SequenceTokenizer.train(targets()[:-3], vocab_size=200)
    assert other.digest() != tokenizer.digest()
    loaded = SequenceTokenizer.from_json(tokenizer.to_json())
    assert loaded.to_json() == tokenizer.to_json() and loaded.vocab_size == tokenizer.vocab_size
    assert torch.equal(loaded.encode(targets(), 200), tokenizer.encode(targets(), 200))


def test_from_json_refuses_other_json(tokenizer: SequenceTokenizer) -> None:
    with pytest.raises(DataError, match="tokenizer's JSON"):
        SequenceTokenizer.from_json("{not json")
    data = json.loads(tokenizer.to_json())
    data["added_tokens"][SOS]["content"] = "<s>"
    data["model"]["vocab"]["<s>"] = data["model"]["vocab"].pop("[SOS]")
    with pytest.raises(DataError, match="specials"):
        SequenceTokenizer.from_json(json.dumps(data))


def test_a_target_over_max_length_is_refused(tokenizer: SequenceTokenizer) -> None:
    text = slurp_rows()[0]
    n = tokenizer.encode([text], 200).shape[1]
    assert tokenizer.encode([text], max_length=n).shape == (1, n)
    expected = rf"{re.escape(repr(text))} is {n} tokens .*model\.decoder\.max_length={n - 1}"
    with pytest.raises(DataError, match=expected):
        tokenizer.encode(["a _SEP b", text], max_length=n - 1)


def test_vocabulary_too_small_for_the_alphabet_is_refused() -> None:
    with pytest.raises(ConfigError, match="model.decoder.vocab_size: 16"):
        SequenceTokenizer.train(targets(), vocab_size=16)
    with pytest.raises(DataError):
        SequenceTokenizer.train([], vocab_size=100)


def test_training_on_thousands_of_targets_is_fast() -> None:
    texts = [slurp_target("alarm_set", [("time", f"{i % 60} am")], f"wake me {i} times {j}")
             for i in range(1000) for j in ("now", "later", "never")]
    start = time.perf_counter()
    trained = SequenceTokenizer.train(texts, vocab_size=1000)
    assert time.perf_counter() - start < 2.0
    assert trained.vocab_size <= 1000
    assert trained.decode(trained.encode(texts[:50], 64)) == texts[:50]


# --- metrics -------------------------------------------------------------------------------

def test_wer_and_cer_equal_hand_computed_values() -> None:
    m = sequence_metrics(["x _SEP turn off lights"], ["x _SEP turn on the lights"])
    assert m["wer"] == pytest.approx(2 / 4)  # on->off, "the" deleted
    assert sequence_metrics(["x _SEP ab"], ["x _SEP ab cd"])["cer"] == pytest.approx(3 / 5)
    assert sequence_metrics(["x _SEP abd"], ["x _SEP abc"])["cer"] == pytest.approx(1 / 3)
    # corpus level: 3 deleted words + 0 over 4 reference words (per-row mean would be 1/2);
    # a prediction without _SEP has empty text: every reference word is a deletion
    m = sequence_metrics(["a b c", "y _SEP x"], ["y _SEP a b c", "y _SEP x"])
    assert m["wer"] == pytest.approx(3 / 4)
    assert m["cer"] == pytest.approx(5 / 6)  # "a b c" is 5 characters, "x" one


def test_intent_scenario_action_accuracy_and_slot_f1() -> None:
    reference = ["alarm_set _SEP time _FILL five am _SEP date _FILL tomorrow _SEP wake me",
                 "email_send _SEP person _FILL bob _SEP mail bob",
                 "alarm_query _SEP any alarms"]
    predicted = ["alarm_set _SEP time _FILL five am _SEP date _FILL today _SEP wake me",
                 "email_query _SEP person _FILL bob _SEP person _FILL bob _SEP mail bob",
                 "music_query _SEP any alarms"]
    m = sequence_metrics(predicted, reference, slots=True)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["scenario_accuracy"] == pytest.approx(2 / 3)  # alarm, email right; music wrong
    assert m["action_accuracy"] == pytest.approx(2 / 3)  # set, query right; query != send
    # TP = 1 (time) + 1 (one bob): P = 2/4, R = 2/3, F1 = 4/7
    assert m["slot_f1"] == pytest.approx(4 / 7)
    assert m["wer"] == 0.0 and m["cer"] == 0.0
    assert all(isinstance(v, float) for v in m.values())
    assert sequence_metrics(["a_b _SEP x"], ["a_b _SEP x"], slots=True)["slot_f1"] == 1.0
    assert set(sequence_metrics(["a _SEP x"], ["a _SEP x"])) == {"accuracy", "wer", "cer"}


def test_sequence_metrics_refusals_and_empty_input() -> None:
    with pytest.raises(DataError, match="2 predicted targets for 1 references"):
        sequence_metrics(["a _SEP x", "b _SEP y"], ["a _SEP x"])
    with pytest.raises(DataError, match="reference target 1"):
        sequence_metrics(["a _SEP x", "b _SEP y"], ["a _SEP x", "b _SEP"])
    assert all(math.isnan(v) for v in sequence_metrics([], [], slots=True).values())
