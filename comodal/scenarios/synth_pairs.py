"""``synth-pairs``: the embedded, seeded vision/audio/text corpus, one dataset per domain.

Generated on first use (all domains at once, well under a minute on 2 cores) and cached as one
file under ``<cache_dir>/synth-pairs/``, keyed by the generator version, seed and sizes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from comodal.config import DataConfig, SynthPairsConfig
from comodal.core.data import MultimodalDataset, concat
from comodal.core.files import atomic_torch_save, source_digest
from comodal.scenarios import synth_world as world
from comodal.scenarios.registry import DatasetSpec, Splits, register_dataset

VERSION = 1
MODALITIES = ("vision", "audio", "text")


def fingerprint(cfg: SynthPairsConfig) -> str:
    payload = json.dumps({"version": VERSION, "world": source_digest(world),
                          "generator": source_digest(generate_split), "seed": cfg.seed,
                          "train": cfg.train_size, "test": cfg.test_size}, sort_keys=True)
    return "synth-pairs-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def generate_split(domain: world.Domain, n: int, seed: int) -> dict:
    """``n`` items of one domain: uint8 images, int16 audio, captions, labels, concepts."""
    rng = np.random.default_rng(seed)
    shapes = list(domain.nouns)
    images = np.empty((n, 3, world.IMAGE_SIZE, world.IMAGE_SIZE), dtype=np.uint8)
    audio = np.empty((n, int(world.SAMPLE_RATE * world.CLIP_SECONDS)), dtype=np.int16)
    captions, labels, concepts = [], [], []
    for i in range(n):
        concept = world.sample_concept(domain, rng)
        images[i] = np.round(world.render_image(concept, domain, rng) * 255)
        audio[i] = np.round(world.synth_audio(concept, domain, rng) * 32767)
        captions.append(world.caption(concept, domain, rng))
        labels.append(shapes.index(concept.shape))
        concepts.append(f"{concept.size} {concept.colour} {concept.material} {concept.shape}")
    return {"images": torch.from_numpy(images), "audio": torch.from_numpy(audio),
            "captions": captions, "labels": torch.tensor(labels), "concepts": concepts}


def load_world(data: DataConfig, progress: bool = True) -> dict:
    """All domains and splits, generated once and then read from the cache."""
    cfg = data.synth_pairs
    path = Path(data.cache_dir) / "synth-pairs" / f"{fingerprint(cfg)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    jobs = [(d, s) for d in world.DOMAINS for s in ("train", "test")]
    generated: dict = {}
    for k, (domain, split) in enumerate(tqdm(jobs, desc="generating synth-pairs",
                                             disable=not progress)):
        size = cfg.train_size if split == "train" else cfg.test_size
        generated[f"{domain}/{split}"] = generate_split(world.DOMAINS[domain], size,
                                                        seed=cfg.seed * 1000 + k)
    atomic_torch_save(generated, path)
    return generated


def as_dataset(raw: dict, name: str, fp: str) -> MultimodalDataset:
    rate = world.SAMPLE_RATE
    return MultimodalDataset(
        name=name,
        fingerprint=fp,
        columns={
            "vision": raw["images"].float() / 255,
            "audio": [(wave.float() / 32767, rate) for wave in raw["audio"]],
            "text": list(raw["captions"]),
        },
        labels=raw["labels"],
        meta={"concept": list(raw["concepts"])},
    )


def _builder(domain: str):
    def build(data: DataConfig, progress: bool) -> Splits:
        raw = load_world(data, progress)
        fp = fingerprint(data.synth_pairs)
        spec, name = world.DOMAINS[domain], f"synth-pairs/{domain}"
        return Splits(
            train=as_dataset(raw[f"{domain}/train"], name, f"{fp}/{domain}/train"),
            test=as_dataset(raw[f"{domain}/test"], name, f"{fp}/{domain}/test"),
            class_names=spec.class_names,
            class_texts=spec.class_texts,
        )

    return build


def build_all(data: DataConfig, progress: bool) -> Splits:
    """Every domain in one labelled dataset: class = (domain, shape), so the classes of a
    class-incremental stream differ in domain as well as in shape."""
    per_domain = [_builder(d)(data, progress) for d in world.DOMAINS]
    names = [f"{d} {noun}" for d in world.DOMAINS for noun in world.DOMAINS[d].class_names]
    texts = [f"a {noun} ({d})" for d in world.DOMAINS for noun in world.DOMAINS[d].class_names]

    def merged(split: str) -> MultimodalDataset:
        parts = [getattr(s, split) for s in per_domain]
        offsets = torch.tensor([0, *itertools.accumulate(len(s.class_names) for s in per_domain)])
        labels = torch.cat([p.labels + offsets[i] for i, p in enumerate(parts)])
        return concat(parts, "synth-pairs/all", labels)

    return Splits(train=merged("train"), test=merged("test"), class_names=names,
                  class_texts=texts)


for _name in world.DOMAINS:
    register_dataset(DatasetSpec(f"synth-pairs/{_name}", MODALITIES, _builder(_name)))
register_dataset(DatasetSpec("synth-pairs/all", MODALITIES, build_all))
