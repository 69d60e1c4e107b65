"""The sequence-to-sequence targets of SLU corpora as COCONUT and sequence-level KD write them:
``"<intent> _SEP <transcription>"`` (FSC) or ``"<scenario>_<action> _SEP" + "<type> _FILL <value>
_SEP" per entity + "<transcription>"`` (SLURP), words separated by single spaces, text normalized
by ``normalize``. The readers store each row's target; ``comodal.platform.sequences`` parses and
tokenises them.
"""

from __future__ import annotations

import re

from comodal.errors import DataError

SEP, FILL = "_SEP", "_FILL"

_NOT_KEPT = re.compile(r"[^\w']|_")  # everything but letters, digits and apostrophes
_LOOSE_APOSTROPHE = re.compile(r"(?<![^\W_])'|'(?![^\W_])")  # not between two letters/digits
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'"})
_SLURP_ENTITY = re.compile(r"\[([^\[\]]*)\]")
# every character a normalized ASCII target can hold, so that any such target round-trips
# whatever the training targets were; "\u2581" is Metaspace's word-start marker

def normalize(text: str) -> str:
    """Lower-cased words of letters and digits, as the papers' targets hold them: apostrophes
    stay inside a word ("it's", "o'clock"), every other character (punctuation, "_", a loose
    quote) splits words, and whitespace collapses to single spaces."""
    text = _NOT_KEPT.sub(" ", text.lower().translate(_QUOTES))
    return " ".join(_LOOSE_APOSTROPHE.sub(" ", text).split())


def _label(value: str) -> str:
    """A label as one word: lower-cased, inner whitespace as "_"."""
    return "_".join(value.lower().split())


def _join(pieces: list[str]) -> str:
    return " ".join(p for p in pieces if p)


def fsc_target(action: str, obj: str, location: str, transcription: str) -> str:
    """FSC's target: ``"<action>_<object>_<location> _SEP <normalized transcription>"``, each
    intent part lower-cased with inner spaces as "_" ("change language" -> "change_language")."""
    parts = [_label(p) for p in (action, obj, location)]
    if not all(parts):
        raise DataError(f"FSC intent (action={action!r}, object={obj!r}, "
                        f"location={location!r}): every part must be non-empty")
    return _join(["_".join(parts), SEP, normalize(transcription)])


def slurp_target(intent: str, entities: list[tuple[str, str]], sentence: str) -> str:
    """SLURP's target: ``"<scenario>_<action> _SEP"``, then ``"<type> _FILL <value> _SEP"`` per
    entity (value normalized), then the normalized sentence."""
    label = intent.strip().lower()
    if "_" not in label or len(label.split()) != 1:
        raise DataError(f"SLURP intent {intent!r} is not one scenario_action word "
                        "(e.g. 'alarm_set')")
    pieces = [label, SEP]
    for kind, value in entities:
        if not _label(kind):
            raise DataError(f"SLURP entity ({kind!r}, {value!r}) of {sentence!r} has no type")
        pieces += [_label(kind), FILL, normalize(value), SEP]
    return _join([*pieces, normalize(sentence)])


def slurp_entities(annotation: str) -> list[tuple[str, str]]:
    """The ``(type, value)`` pairs of SLURP's ``sentence_annotation``, in order: "wake me up
    at [time : five am]" -> [("time", "five am")]; the value normalized, the type as a label."""
    out = []
    for inner in _SLURP_ENTITY.findall(annotation):
        kind, colon, value = inner.partition(":")
        if not colon or not _label(kind):
            raise DataError(f"SLURP annotation {annotation!r}: entity [{inner}] is not "
                            "[type : value]")
        out.append((_label(kind), normalize(value)))
    return out
