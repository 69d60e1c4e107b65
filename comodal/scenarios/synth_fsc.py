"""``synth-fsc``: a spoken-commands corpus in Fluent Speech Commands' exact layout, synthesised
offline with eSpeak NG (the library and voices shipped in ``espeakng-loader``, driven through
ctypes in synchronous mode).

Every speaker says every phrasing of every one of FSC's 31 intents once. A speaker is an eSpeak
voice (accent x voice variant) with its own pitch, pitch range, speaking rate and word gap, and
optionally a level of additive noise; speakers are disjoint across train, valid and test.
Output: ``data/{train,valid,test}_data.csv`` with FSC's header and
``wavs/speakers/<speaker>/<id>.wav`` (16 kHz mono, 16-bit), plus ``synth_fsc.json`` with the
seed and every speaker's settings. Deterministic for a seed.
"""

from __future__ import annotations

import concurrent.futures
import csv
import ctypes
import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from tqdm.auto import tqdm

from comodal.config import SynthFSCConfig
from comodal.errors import DataError

SAMPLE_RATE = 16000
HEADER = ["", "path", "speakerId", "transcription", "action", "object", "location"]

# (action, object, location) of FSC's 31 intents, by the ids of DESIGN.md
INTENTS: list[tuple[str, str, str]] = [
    ("change language", "none", "none"), ("activate", "music", "none"),
    ("activate", "lights", "none"), ("deactivate", "lights", "none"),
    ("increase", "volume", "none"), ("decrease", "volume", "none"),
    ("increase", "heat", "none"), ("decrease", "heat", "none"),
    ("deactivate", "music", "none"), ("activate", "lamp", "none"),
    ("deactivate", "lamp", "none"),
    *[("activate", "lights", room) for room in ("kitchen", "bedroom", "washroom")],
    *[("deactivate", "lights", room) for room in ("kitchen", "bedroom", "washroom")],
    *[("increase", "heat", room) for room in ("kitchen", "bedroom", "washroom")],
    *[("decrease", "heat", room) for room in ("kitchen", "bedroom", "washroom")],
    ("bring", "newspaper", "none"), ("bring", "juice", "none"), ("bring", "socks", "none"),
    *[("change language", lang, "none") for lang in ("Chinese", "Korean", "English", "German")],
    ("bring", "shoes", "none"),
]

# Phrasings per (action, object); {where} is " in the <room>" or nothing, {what} the object
PHRASINGS: dict[tuple[str, str], list[str]] = {
    ("activate", "lights"): ["turn on the lights{where}", "switch on the lights{where}",
                             "lights on{where}", "turn the lights on{where}",
                             "switch the lights on{where}", "please turn on the lights{where}"],
    ("deactivate", "lights"): ["turn off the lights{where}", "switch off the lights{where}",
                               "lights off{where}", "turn the lights off{where}",
                               "switch the lights off{where}", "please turn off the lights{where}"],
    ("increase", "heat"): ["turn up the heat{where}", "increase the temperature{where}",
                           "make it warmer{where}", "heat up{where}",
                           "turn the heating up{where}", "raise the temperature{where}"],
    ("decrease", "heat"): ["turn down the heat{where}", "decrease the temperature{where}",
                           "make it cooler{where}", "lower the heating{where}",
                           "turn the heating down{where}", "reduce the temperature{where}"],
    ("activate", "music"): ["play music", "start the music", "put on some music",
                            "turn on the music", "play a song", "music on"],
    ("deactivate", "music"): ["stop the music", "pause the music", "turn off the music",
                              "music off", "stop playing music", "pause the song"],
    ("increase", "volume"): ["turn up the volume", "increase the volume", "louder please",
                             "make it louder", "volume up", "turn the sound up"],
    ("decrease", "volume"): ["turn down the volume", "decrease the volume", "make it quieter",
                             "volume down", "lower the volume", "turn the sound down"],
    ("activate", "lamp"): ["turn on the lamp", "switch on the lamp", "lamp on",
                           "turn the lamp on", "switch the lamp on", "light the lamp"],
    ("deactivate", "lamp"): ["turn off the lamp", "switch off the lamp", "lamp off",
                             "turn the lamp off", "switch the lamp off", "put the lamp out"],
    ("bring", "*"): ["bring me the {what}", "get me the {what}", "fetch the {what}",
                     "go get the {what}", "I need the {what}", "bring the {what} please"],
    ("change language", "none"): ["change the language", "switch the language",
                                  "change language", "use a different language",
                                  "switch to another language", "open the language settings"],
    ("change language", "*"): ["change the language to {what}", "switch to {what}",
                               "set the language to {what}", "use {what}", "speak {what}",
                               "language {what} please"],
}

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt",
            "klatt2", "klatt3", "david", "edward", "linda", "Andy", "Annie", "iven", "john")


def phrasings(intent: int) -> list[str]:
    """The transcripts of intent ``intent`` (at least 6 each)."""
    action, obj, location = INTENTS[intent]
    templates = PHRASINGS.get((action, obj)) or PHRASINGS[(action, "*")]
    where = "" if location == "none" else f" in the {location}"
    texts = [t.format(where=where, what=obj) for t in templates]
    return [t[0].upper() + t[1:] for t in texts]


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str  # eSpeak voice: accent+variant
    pitch: int  # 0..99 (eSpeak's default 50)
    pitch_range: int  # 0..99
    rate: int  # words per minute
    word_gap: int  # extra pause between words, in units of 10 ms
    snr_db: float | None  # additive white noise level, None for clean speech


def make_speakers(n: int, seed: int, noise: bool) -> list[Speaker]:
    """``n`` distinct speakers drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    voices = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]
    if n > len(voices):
        raise DataError(f"synth-fsc: at most {len(voices)} speakers (eSpeak accents x voice "
                        f"variants), asked for {n}")
    chosen = rng.choice(len(voices), size=n, replace=False)
    return [Speaker(id=f"synth{k:02d}{VARIANTS[i % len(VARIANTS)].lower()}",
                    voice=voices[i], pitch=int(rng.integers(25, 76)),
                    pitch_range=int(rng.integers(20, 81)), rate=int(rng.integers(135, 196)),
                    word_gap=int(rng.integers(0, 3)),
                    snr_db=float(rng.uniform(15, 35)) if noise else None)
            for k, i in enumerate(chosen.tolist())]


class ESpeak:
    """eSpeak NG in synchronous mode: ``say(text, speaker)`` -> float waveform at its rate."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        self.rate = self.lib.espeak_Initialize(2, 0, data, 0)  # AUDIO_OUTPUT_SYNCHRONOUS
        if self.rate <= 0:
            raise DataError(f"eSpeak NG failed to initialise with data at {data.decode()!r}")
        self._chunks: list[bytes] = []
        callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                    ctypes.c_void_p)
        self._callback = callback(self._collect)  # kept alive for the library
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wave: ctypes.POINTER(ctypes.c_short), samples: int, events: int) -> int:
        if samples > 0:
            self._chunks.append(ctypes.string_at(wave, samples * 2))
        return 0

    def say(self, text: str, speaker: Speaker) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(speaker.voice.encode()) != 0:
            raise DataError(f"eSpeak NG has no voice {speaker.voice!r}")
        for parameter, value in ((1, speaker.rate), (3, speaker.pitch),
                                 (4, speaker.pitch_range), (7, speaker.word_gap)):
            self.lib.espeak_SetParameter(parameter, value, 0)
        self._chunks.clear()
        encoded = text.encode()
        self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, 1, 0, 0, None, None)
        wave = np.frombuffer(b"".join(self._chunks), dtype=np.int16).astype(np.float32) / 32768
        if wave.size == 0:
            raise DataError(f"eSpeak NG produced no audio for {text!r} ({speaker.voice})")
        return wave


def generate(out: Path, spec: SynthFSCConfig | None = None, progress: bool = True) -> Path:
    """Write the corpus under ``out`` (FSC layout); returns ``out``. The synthesis runs in a
    fresh process: eSpeak's Klatt voices draw noise from a generator the library seeds once
    per process, so only a fresh process makes the same files for the same seed."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_generate, Path(out), spec or SynthFSCConfig(), progress).result()


def _generate(out: Path, spec: SynthFSCConfig, progress: bool) -> Path:
    counts = {"train": spec.train_speakers, "valid": spec.valid_speakers,
              "test": spec.test_speakers}
    speakers = make_speakers(sum(counts.values()), spec.seed, spec.noise)
    splits, start = {}, 0
    for split, n in counts.items():
        splits[split] = speakers[start:start + n]
        start += n
    engine = ESpeak()
    rng = np.random.default_rng(spec.seed + 1)
    items = [(i, p) for i in range(len(INTENTS)) for p in phrasings(i)]
    total = len(items) * len(speakers)
    bar = tqdm(total=total, desc="synthesising synth-fsc", disable=not progress)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, members in splits.items():
        rows = []
        for speaker in members:
            folder = out / "wavs" / "speakers" / speaker.id
            folder.mkdir(parents=True, exist_ok=True)
            for k, (intent, text) in enumerate(items):
                wave = engine.say(text, speaker)
                wave = torchaudio.functional.resample(torch.from_numpy(wave), engine.rate,
                                                      SAMPLE_RATE).numpy()
                if speaker.snr_db is not None:
                    power = float(np.mean(wave**2)) / 10 ** (speaker.snr_db / 10)
                    wave = wave + rng.normal(0, np.sqrt(power), wave.shape).astype(np.float32)
                path = folder / f"{speaker.id}-{k:03d}.wav"
                soundfile.write(path, np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16")
                action, obj, location = INTENTS[intent]
                rows.append([str(path.relative_to(out)), speaker.id, text, action, obj,
                             location])
                bar.update()
        with (out / "data" / f"{split}_data.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADER)
            writer.writerows([i, *row] for i, row in enumerate(rows))
    bar.close()
    meta = {"spec": asdict(spec), "sample_rate": SAMPLE_RATE, "intents": INTENTS,
            "speakers": {s: [asdict(p) for p in m] for s, m in splits.items()}}
    (out / "synth_fsc.json").write_text(json.dumps(meta, indent=1))
    return out
