"""The procedural world behind ``synth-pairs``: concepts, images, sound events and captions.

A concept is (category, colour, size, material) inside a domain. Each modality renders it with
its own noise: images draw the category's shape in the colour with a material texture; sounds
are impacts whose pitch follows size, timbre follows material, rhythm follows category and a
steady hum follows colour (a convention of this world); captions come from paraphrased
templates. Domains differ in nouns, palettes, backgrounds and noise, so tasks shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SAMPLE_RATE = 16000
CLIP_SECONDS = 0.5

COLOURS = {
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.25, 0.85),
    "yellow": (0.92, 0.85, 0.15), "orange": (0.95, 0.55, 0.10), "purple": (0.55, 0.20, 0.70),
    "pink": (0.95, 0.55, 0.70), "cyan": (0.15, 0.80, 0.85), "brown": (0.50, 0.30, 0.12),
    "black": (0.10, 0.10, 0.12), "white": (0.96, 0.96, 0.94), "grey": (0.55, 0.55, 0.55),
}
# The hum frequency (Hz) a thing of each colour makes in this world.
COLOUR_HUM = dict(zip(COLOURS, np.geomspace(260.0, 5200.0, len(COLOURS)).round(1), strict=True))
SIZES = {"small": 0.16, "medium": 0.25, "large": 0.35}  # radius as a fraction of the image
SIZE_PITCH = {"small": 880.0, "medium": 440.0, "large": 220.0}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
MATERIAL_WORDS = {
    "metal": ("metal", "metallic", "steel"),
    "wood": ("wooden", "wood"),
    "glass": ("glass", "glassy"),
    "rubber": ("rubber", "rubbery"),
    "plastic": ("plastic",),
}
# Impact timbre per material: partial ratios, partial amplitudes, decay (s), noise share.
TIMBRE = {
    "metal": ((1.0, 2.76, 5.40, 8.93), (1.0, 0.6, 0.4, 0.25), 0.25, 0.05),
    "wood": ((1.0, 2.0, 3.0), (1.0, 0.5, 0.2), 0.04, 0.30),
    "glass": ((2.0, 4.64, 8.5), (1.0, 0.8, 0.6), 0.12, 0.05),
    "rubber": ((0.5,), (1.0,), 0.02, 0.60),
    "plastic": ((1.0, 2.0, 3.0, 4.0), (1.0, 0.3, 0.2, 0.1), 0.07, 0.15),
}
# Onset times (s) of the impacts a thing of each shape makes.
RHYTHM = {
    "circle": (0.0,), "square": (0.0, 0.2), "triangle": (0.0, 0.1, 0.2),
    "star": (0.0, 0.06, 0.12, 0.18), "ring": (0.0, 0.3), "bar": (0.0, 0.1),
    "diamond": (0.0, 0.15, 0.3), "cross": (0.0, 0.05), "hexagon": (0.0, 0.25, 0.35),
    "crescent": (0.0, 0.12), "ellipse": (0.0, 0.08, 0.3), "arrow": (0.0, 0.2, 0.25),
}
TEMPLATES = (
    "a {size} {colour} {material} {noun}",
    "the {noun} is {colour}, {size} and made of {material}",
    "{size} {material} {noun} in {colour}",
    "a {colour} {noun} of {size} size, {material}",
    "there is a {size} {noun}; it is {colour} and {material}",
)


@dataclass(frozen=True)
class Domain:
    """One concept domain: nouns for shapes, a palette, materials and a rendering style."""

    name: str
    nouns: dict[str, str]  # shape -> noun
    colours: tuple[str, ...]
    materials: tuple[str, ...]
    background: tuple[float, float, float]
    image_noise: float
    audio_noise: float
    drone_hz: float

    @property
    def class_names(self) -> list[str]:
        return list(self.nouns.values())

    @property
    def class_texts(self) -> list[str]:
        return [f"a {noun}" for noun in self.nouns.values()]


DOMAINS = {
    d.name: d
    for d in (
        Domain("toys", {"circle": "ball", "square": "block", "triangle": "pyramid",
                        "star": "star", "ring": "ring", "bar": "stick"},
               ("red", "green", "blue", "yellow", "orange", "purple"),
               ("wood", "plastic", "rubber", "metal"), (0.80, 0.80, 0.76), 0.06, 0.05, 90.0),
        Domain("kitchen", {"circle": "plate", "square": "tray", "crescent": "bowl",
                           "hexagon": "pot", "bar": "knife", "ellipse": "spoon"},
               ("white", "red", "blue", "black", "green", "brown"),
               ("metal", "glass", "wood", "plastic"), (0.70, 0.62, 0.55), 0.07, 0.06, 120.0),
        Domain("signs", {"diamond": "warning sign", "cross": "cross sign", "hexagon": "stop sign",
                         "arrow": "arrow sign", "triangle": "yield sign", "circle": "round sign"},
               ("red", "yellow", "blue", "green", "white", "orange"),
               ("metal", "plastic", "wood", "rubber"), (0.45, 0.55, 0.65), 0.07, 0.06, 150.0),
        Domain("gems", {"diamond": "diamond", "hexagon": "hexagonal gem", "ellipse": "oval gem",
                        "star": "star charm", "crescent": "crescent charm", "ring": "ring"},
               ("purple", "pink", "cyan", "red", "green", "yellow"),
               ("glass", "metal", "plastic", "rubber"), (0.25, 0.25, 0.30), 0.06, 0.05, 60.0),
    )
}


@dataclass(frozen=True)
class Concept:
    shape: str
    colour: str
    size: str
    material: str


def sample_concept(domain: Domain, rng: np.random.Generator) -> Concept:
    shapes = list(domain.nouns)
    return Concept(
        shapes[rng.integers(len(shapes))],
        domain.colours[rng.integers(len(domain.colours))],
        list(SIZES)[rng.integers(len(SIZES))],
        domain.materials[rng.integers(len(domain.materials))],
    )


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` on offsets (dx, dy) from its centre."""
    dist = np.hypot(dx, dy)
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dist <= r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "diamond":
        return ax + ay <= r
    if shape == "triangle":
        return (dy <= 0.7 * r) & (ax <= (dy + r) * 0.6)
    if shape == "cross":
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    if shape == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if shape == "star":
        theta = np.arctan2(dy, dx)
        return dist <= r * (0.55 + 0.45 * np.abs(np.cos(2.5 * theta)))
    if shape == "hexagon":
        return np.maximum(ax * 0.866 + ay * 0.5, ay) <= 0.87 * r
    if shape == "crescent":
        return (dist <= r) & (np.hypot(dx - 0.45 * r, dy + 0.2 * r) > 0.8 * r)
    if shape == "bar":
        return (ax <= r) & (ay <= 0.3 * r)
    if shape == "ellipse":
        return (dx / r) ** 2 + (dy / (0.55 * r)) ** 2 <= 1
    if shape == "arrow":
        head = (dx >= 0.1 * r) & (ay <= (r - dx) * 0.9)
        return head | ((dx < 0.1 * r) & (dx >= -r) & (ay <= 0.25 * r))
    raise ValueError(f"unknown shape {shape!r}")


def render_image(concept: Concept, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """An RGB image ``[3, H, W]`` in [0, 1] of the concept on the domain's background."""
    n = IMAGE_SIZE
    r = SIZES[concept.size] * n * rng.uniform(0.9, 1.1)
    cx, cy = (n - 1) / 2 + rng.uniform(-3, 3, size=2)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    mask = _shape_mask(concept.shape, dx, dy, r)
    colour = np.clip(np.array(COLOURS[concept.colour]) + rng.normal(0, 0.04, 3), 0, 1)
    if concept.material == "metal":
        shade = 0.65 + 0.5 * (dx + dy + 2 * r) / (4 * r)
    elif concept.material == "wood":
        shade = 0.8 + 0.2 * np.sin(2 * np.pi * (dx + rng.uniform(0, 4)) / 4.0)
    elif concept.material == "rubber":
        shade = 0.6 + rng.normal(0, 0.05, mask.shape)
    else:
        shade = np.ones_like(dx)
    background = np.array(domain.background)[:, None, None] * np.ones((3, n, n))
    thing = np.clip(colour[:, None, None] * shade[None], 0, 1)
    alpha = 0.55 if concept.material == "glass" else 1.0
    image = np.where(mask[None], alpha * thing + (1 - alpha) * background, background)
    image = image + rng.normal(0, domain.image_noise, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def synth_audio(concept: Concept, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """A mono clip (``SAMPLE_RATE`` Hz) of the thing being struck, with its hum and room."""
    t = np.arange(int(SAMPLE_RATE * CLIP_SECONDS)) / SAMPLE_RATE
    ratios, amps, decay, noise_share = TIMBRE[concept.material]
    f0 = SIZE_PITCH[concept.size] * rng.uniform(0.97, 1.03)
    clip = np.zeros_like(t)
    for onset in RHYTHM[concept.shape]:
        onset = onset + rng.uniform(0, 0.01)
        tau = np.clip(t - onset, 0, None)
        envelope = (t >= onset) * np.exp(-tau / decay)
        tone = sum(a * np.sin(2 * np.pi * f0 * k * tau) for k, a in zip(ratios, amps, strict=True))
        clip += envelope * ((1 - noise_share) * tone + noise_share * rng.normal(0, 1, t.shape))
    hum = 0.12 * np.sin(2 * np.pi * COLOUR_HUM[concept.colour] * t + rng.uniform(0, 2 * np.pi))
    drone = 0.05 * np.sin(2 * np.pi * domain.drone_hz * t)
    clip = clip * rng.uniform(0.6, 1.0) + hum + drone + rng.normal(0, domain.audio_noise, t.shape)
    return (clip / max(1.0, np.abs(clip).max())).astype(np.float32)


def caption(concept: Concept, domain: Domain, rng: np.random.Generator) -> str:
    """A templated, paraphrased description of the concept."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    size_words, material_words = SIZE_WORDS[concept.size], MATERIAL_WORDS[concept.material]
    return template.format(
        size=size_words[rng.integers(len(size_words))],
        colour=concept.colour,
        material=material_words[rng.integers(len(material_words))],
        noun=domain.nouns[concept.shape],
    )
