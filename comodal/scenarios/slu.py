"""Spoken-language-understanding corpora: Fluent Speech Commands (and the synthesised corpus in
its layout) and SLURP, each as utterances with transcript, intent label and speaker, and the
sequence-to-sequence target of each (``meta["target"]``, ``comodal.scenarios.slu_targets``).

Every row is checked when the corpus is read: a missing field, an intent outside the known
set, or an audio file that is missing, unreadable, empty or shorter than ``MIN_SECONDS`` stops
with a message naming the file and the row; with ``on_error: skip`` such rows are dropped
instead, counted, and the count and the first reasons are printed. Audio is read lazily (once,
when the run prepares its data) and resampled to the model's rate there; a file holding NaN or
inf samples stops the run then, named.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from comodal.core.data import MultimodalDataset
from comodal.errors import DataError
from comodal.scenarios.slu_targets import fsc_target, slurp_entities, slurp_target
from comodal.scenarios.synth_fsc import INTENTS

FSC_COLUMNS = ("path", "speakerId", "transcription", "action", "object", "location")
FSC_INTENTS = {intent: i for i, intent in enumerate(INTENTS)}
ON_ERROR = ("raise", "skip")
# Shortest usable utterance. Below a few 10 ms log-mel hops the per-utterance statistics of the
# encoders are undefined (one frame has no spread: the loss becomes NaN), and wav2vec2's front
# end needs 25 ms for a single frame; 0.1 s (10 hops) clears both, and no spoken command is
# shorter.
MIN_SECONDS = 0.1


class AudioFiles(Sequence):
    """A column of audio files read on access as ``(waveform [C, T], sample_rate)``."""

    def __init__(self, paths: list[Path], where: list[str]) -> None:
        self.paths, self.where = paths, where

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            raise DataError(f"{self.where[index]}: cannot read {path} ({err})") from None
        if not np.isfinite(wave).all():
            raise DataError(f"{self.where[index]}: audio file {path} holds NaN or inf samples")
        return torch.from_numpy(wave.T.copy()), int(rate)


def check_audio(path: Path) -> str | None:
    """Why ``path`` cannot serve as an utterance, or None if it can."""
    if not path.is_file():
        return f"audio file {path} does not exist"
    try:
        info = soundfile.info(str(path))
    except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
        return f"audio file {path} is unreadable ({str(err).strip()})"
    if info.frames == 0:
        return f"audio file {path} is empty"
    if info.frames < MIN_SECONDS * info.samplerate:
        seconds = info.frames / info.samplerate
        return (f"audio file {path} lasts {info.frames} samples ({seconds:.4f} s); utterances "
                f"must last at least {MIN_SECONDS} s")
    return None


@dataclass
class Rows:
    """Checked rows of one split, and what was skipped."""

    paths: list[Path] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    speakers: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def problem(self, message: str, on_error: str) -> None:
        if on_error == "raise":
            raise DataError(message)
        self.skipped.append(message)

    def add(self, path: Path, where: str, text: str, label: int, speaker: str,
            target: str) -> None:
        self.paths.append(path)
        self.where.append(where)
        self.texts.append(text)
        self.labels.append(label)
        self.speakers.append(speaker)
        self.targets.append(target)

    def dataset(self, name: str, source: str, what: str) -> MultimodalDataset:
        """The checked rows; the fingerprint covers ``source`` and every kept file's path, size
        and modification time, so that a replaced file is not served from the feature cache.
        (Content digests would read the whole corpus, hundreds of MB for FSC's 30,000
        utterances, each time a run builds the dataset; a stat per file is cheap.)"""
        if self.skipped:
            print(f"comodal: {what}: skipped {len(self.skipped)} rows (on_error: skip); first: "
                  + "; ".join(self.skipped[:3]), file=sys.stderr)
        if not self.paths:
            raise DataError(f"{what}: no usable rows")
        files = (f"{p}\t{st.st_size}\t{st.st_mtime_ns}" for p, st in
                 ((p, p.stat()) for p in self.paths))
        kept = hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]
        return MultimodalDataset(
            name, f"{source}-{kept}",
            {"audio": AudioFiles(self.paths, self.where), "text": self.texts},
            torch.tensor(self.labels),
            {"speaker": self.speakers, "path": [str(p) for p in self.paths],
             "target": self.targets},
        )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def read_fsc(root: Path, split: str, on_error: str = "raise") -> MultimodalDataset:
    """One split of a Fluent Speech Commands directory (``data/<split>_data.csv``)."""
    root = Path(root)
    path = root / "data" / f"{split}_data.csv"
    if not path.is_file():
        raise DataError(f"FSC: {path} does not exist (expected FSC's layout: "
                        "<root>/data/{train,valid,test}_data.csv and <root>/wavs/...)")
    rows = Rows()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FSC_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"FSC: {path} has no column {missing[0]!r} (header: "
                            f"{','.join(reader.fieldnames or [])}; FSC's is "
                            f",{','.join(FSC_COLUMNS)})")
        for line, row in enumerate(reader, start=2):
            where = f"{path} row {line}"
            empty = [c for c in FSC_COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                rows.problem(f"{where}: field {empty[0]!r} is empty", on_error)
                continue
            intent = (row["action"], row["object"], row["location"])
            if intent not in FSC_INTENTS:
                rows.problem(f"{where}: intent {'/'.join(intent)!r} is not one of FSC's 31 "
                             "intents (action/object/location, e.g. 'activate/lights/kitchen')",
                             on_error)
                continue
            audio = root / row["path"]
            reason = check_audio(audio)
            if reason:
                rows.problem(f"{where}: {reason}", on_error)
                continue
            rows.add(audio, where, row["transcription"], FSC_INTENTS[intent], row["speakerId"],
                     fsc_target(*intent, row["transcription"]))
    return rows.dataset("fsc", f"fsc-{_digest(path)}", f"FSC {split}")


def fsc_class_names() -> list[str]:
    return ["/".join(part for part in intent if part != "none") for intent in INTENTS]


@dataclass
class SlurpIntents:
    """SLURP's intents (``scenario_action``) in sorted order, with each intent's scenario."""

    names: list[str]
    scenarios: list[str]

    @classmethod
    def from_jsonl(cls, path: Path) -> SlurpIntents:
        intents: dict[str, str] = {}
        for line, record in _jsonl(path):
            if "intent" not in record or "scenario" not in record:
                raise DataError(f"SLURP: {path} line {line}: needs 'intent' and 'scenario'")
            intents[record["intent"]] = record["scenario"]
        names = sorted(intents)
        return cls(names, [intents[n] for n in names])


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"SLURP: {path} does not exist (expected <root>/{{train,devel,test}}"
                        ".jsonl)")
    records = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            records.append((line, json.loads(text)))
        except json.JSONDecodeError as err:
            raise DataError(f"SLURP: {path} line {line}: not valid JSON ({err})") from None
    return records


def read_slurp(root: Path, split: str, intents: SlurpIntents, audio_dir: str = "slurp_real",
               on_error: str = "raise") -> MultimodalDataset:
    """One split of SLURP: a row per recording of each sentence in ``<split>.jsonl``."""
    root = Path(root)
    path = root / f"{split}.jsonl"
    index = {name: i for i, name in enumerate(intents.names)}
    rows = Rows()
    for line, record in _jsonl(path):
        where = f"{path} line {line}"
        missing = [k for k in ("sentence", "intent", "recordings") if not record.get(k)]
        if missing:
            rows.problem(f"{where}: field {missing[0]!r} is missing or empty", on_error)
            continue
        if record["intent"] not in index:
            rows.problem(f"{where}: intent {record['intent']!r} does not occur in train.jsonl "
                         f"({len(index)} known intents)", on_error)
            continue
        target = slurp_target(record["intent"],
                              slurp_entities(record.get("sentence_annotation", "")),
                              record["sentence"])
        for recording in record["recordings"]:
            audio = root / audio_dir / str(recording.get("file", ""))
            reason = check_audio(audio)
            if reason:
                rows.problem(f"{where}: {reason}", on_error)
                continue
            rows.add(audio, where, record["sentence"], index[record["intent"]],
                     str(recording.get("speaker", record.get("slurp_id", ""))), target)
    return rows.dataset("slurp", f"slurp-{_digest(path)}", f"SLURP {split}")
