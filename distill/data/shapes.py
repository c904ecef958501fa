"""The embedded default task: visual question answering over rendered shapes (in the spirit of Sort-of-CLEVR).

Each sample is one 64x64 RGB image (1-6 shapes of several colours and sizes at random, non-overlapping
positions, mild pixel noise) and one question about it. The answer is drawn first and the scene is built to
fit it, which keeps the answer classes balanced and makes both modalities necessary:

- colour     "What colour is the triangle?"            -> red/green/blue/yellow/purple/orange
- shape      "What shape is the blue object?"          -> circle/square/triangle/cross
- count      "How many circles are there?"             -> 0..4
- exist      "Is there a red square?"                  -> yes/no (near misses, a red cross or a blue square, either way)
- left_of    "Is the red circle left of the blue cross?" -> yes/no

The question alone leaves the answer uniform over its type's answers (about 30% for a text-only model); the
image alone does not say what is asked. "Which is closer" questions are left out on purpose: a compact model
does not learn them within the training budget.

Determinism: every sample draws from its own generator seeded by (seed, split, index), so the samples do not
depend on how the work is split across processes, and PNG encoding has no timestamps, so the same seed gives
the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_NAME = "mmkd-shapes-vqa"
GENERATOR_VERSION = 1
IMAGE_SIZE = 64
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "transfer": 3}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (155, 70, 205),
    "orange": (245, 140, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COUNTS = ("0", "1", "2", "3", "4")
LABELS: tuple[str, ...] = (*COLOURS, *SHAPES, *COUNTS, "yes", "no")

# Shares of question types, chosen so that no answer class exceeds ~12%: yes/no carry 24% between them.
QTYPE_WEIGHTS = {"colour": 0.28, "shape": 0.24, "count": 0.24, "exist": 0.12, "left_of": 0.12}
QTYPES = tuple(QTYPE_WEIGHTS)

BACKGROUND = (34, 34, 38)
NOISE_STD = 4.0
MIN_RADIUS, MAX_RADIUS = 5, 9  # half the bounding box, in pixels
MAX_OBJECTS = 6
LEFT_MARGIN = 6  # pixels between centres for a left-of question, so the answer is visible

TEMPLATES = {
    "colour": (
        "What colour is the {shape}?",
        "What color is the {shape}?",
        "Which colour is the {shape}?",
        "The {shape} is what colour?",
        "Tell me the colour of the {shape}.",
        "What is the color of the {shape}?",
        "Which color does the {shape} have?",
    ),
    "shape": (
        "What shape is the {colour} object?",
        "What is the shape of the {colour} thing?",
        "Which shape is {colour}?",
        "The {colour} object is what shape?",
        "What kind of shape is the {colour} one?",
        "Name the shape of the {colour} item.",
    ),
    "count_shape": (
        "How many {shapes} are there?",
        "How many {shapes} are in the picture?",
        "Count the {shapes}.",
        "What is the number of {shapes}?",
        "How many {shapes} can you see?",
    ),
    "count_colour": (
        "How many {colour} objects are there?",
        "How many {colour} things can you see?",
        "Count the {colour} shapes.",
        "What is the number of {colour} objects?",
    ),
    "exist": (
        "Is there a {colour} {shape}?",
        "Is there a {colour} {shape} in the image?",
        "Does the picture contain a {colour} {shape}?",
        "Can you see a {colour} {shape}?",
        "Are there any {colour} {shapes}?",
    ),
    "left_of": (
        "Is the {a} left of the {b}?",
        "Is the {a} to the left of the {b}?",
        "Is the {a} on the left side of the {b}?",
        "Is the {a} further left than the {b}?",
    ),
    "right_of": (
        "Is the {a} right of the {b}?",
        "Is the {a} to the right of the {b}?",
        "Is the {a} on the right side of the {b}?",
    ),
}


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; (x, y) is its centre, r half its bounding box."""

    colour: str
    shape: str
    x: int = 0
    y: int = 0
    r: int = 6


@dataclass(frozen=True)
class Sample:
    """One generated question about one rendered scene."""

    png: bytes
    text: str
    label: str
    qtype: str


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one sample: independent of process layout and of other samples."""
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


@dataclass(frozen=True)
class Scene:
    """A laid-out scene and its question before rendering; `query` is the question in structured form."""

    objects: tuple[Obj, ...]
    query: dict
    text: str
    label: str
    qtype: str


def generate_scene(seed: int, split: str, index: int) -> Scene:
    """The scene and question of sample `index` of `split` (what `generate_sample` renders)."""
    return _build(seed, split, index)[0]


def generate_sample(seed: int, split: str, index: int) -> Sample:
    """Build sample `index` of `split`: pick a question type and answer, a scene that fits, render it."""
    scene, rng = _build(seed, split, index)
    return Sample(png=render_png(scene.objects, rng), text=scene.text, label=scene.label, qtype=scene.qtype)


def _build(seed: int, split: str, index: int) -> tuple[Scene, np.random.Generator]:
    rng = sample_rng(seed, split, index)
    qtype = QTYPES[int(rng.choice(len(QTYPES), p=list(QTYPE_WEIGHTS.values())))]
    text, label, objects, pair, query = _QUESTION_BUILDERS[qtype](rng)
    placed = _place(rng, objects, pair)
    return Scene(tuple(placed), query, text, label, qtype), rng


def answer(objects: Sequence[Obj], query: dict) -> str:
    """Answer a structured question from the scene alone: an oracle independent of how the scene was built.

    Raises ValueError when the question's referent is absent or not unique in the scene.
    """
    kind = query["qtype"]
    if kind == "colour":
        return _unique(objects, shape=query["shape"]).colour
    if kind == "shape":
        return _unique(objects, colour=query["colour"]).shape
    if kind == "count":
        keys = {k: query[k] for k in ("colour", "shape") if k in query}
        return str(sum(all(getattr(o, k) == v for k, v in keys.items()) for o in objects))
    if kind == "exist":
        found = any(o.colour == query["colour"] and o.shape == query["shape"] for o in objects)
        return "yes" if found else "no"
    if kind == "left_of":
        a = _unique(objects, colour=query["a"][0], shape=query["a"][1])
        b = _unique(objects, colour=query["b"][0], shape=query["b"][1])
        a_left = a.x < b.x
        return "yes" if a_left == (query["ask"] == "left") else "no"
    raise ValueError(f"unknown question type {kind!r}; known: {QTYPES}")


def _unique(objects: Sequence[Obj], **attrs: str) -> Obj:
    hits = [o for o in objects if all(getattr(o, k) == v for k, v in attrs.items())]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} objects match {attrs}; a question must refer to exactly one")
    return hits[0]


# ----------------------------------------------------------------------------------------------------------------
# Questions: each builder returns (text, label, objects without positions, left-of constraint, query)
# ----------------------------------------------------------------------------------------------------------------

Pair = tuple[int, int, bool]  # (index of a, index of b, a must be left of b)
Built = tuple[str, str, list[Obj], "Pair | None", dict]


def _pick(rng: np.random.Generator, items: Sequence[str], exclude: Sequence[str] = ()) -> str:
    pool = [item for item in items if item not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _template(rng: np.random.Generator, key: str, **fields: str) -> str:
    options = TEMPLATES[key]
    return options[int(rng.integers(len(options)))].format(**fields)


def _n_distractors(rng: np.random.Generator, used: int, low: int = 1) -> int:
    return int(rng.integers(low, MAX_OBJECTS - used + 1))


def _colour_question(rng: np.random.Generator) -> Built:
    shape, label = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    others = [Obj(_pick(rng, list(COLOURS)), _pick(rng, SHAPES, [shape])) for _ in range(_n_distractors(rng, 1))]
    query = {"qtype": "colour", "shape": shape}
    return _template(rng, "colour", shape=shape), label, [Obj(label, shape), *others], None, query


def _shape_question(rng: np.random.Generator) -> Built:
    colour, label = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    others = [Obj(_pick(rng, list(COLOURS), [colour]), _pick(rng, SHAPES)) for _ in range(_n_distractors(rng, 1))]
    query = {"qtype": "shape", "colour": colour}
    return _template(rng, "shape", colour=colour), label, [Obj(colour, label), *others], None, query


def _count_question(rng: np.random.Generator) -> Built:
    count = int(rng.integers(len(COUNTS)))
    low = 2 if count == 0 else 0
    extra = int(rng.integers(low, max(low, min(3, MAX_OBJECTS - count)) + 1))
    if rng.random() < 0.5:
        shape = _pick(rng, SHAPES)
        hits = [Obj(_pick(rng, list(COLOURS)), shape) for _ in range(count)]
        misses = [Obj(_pick(rng, list(COLOURS)), _pick(rng, SHAPES, [shape])) for _ in range(extra)]
        text = _template(rng, "count_shape", shapes=PLURALS[shape])
        query = {"qtype": "count", "shape": shape}
    else:
        colour = _pick(rng, list(COLOURS))
        hits = [Obj(colour, _pick(rng, SHAPES)) for _ in range(count)]
        misses = [Obj(_pick(rng, list(COLOURS), [colour]), _pick(rng, SHAPES)) for _ in range(extra)]
        text = _template(rng, "count_colour", colour=colour)
        query = {"qtype": "count", "colour": colour}
    return text, COUNTS[count], [*hits, *misses], None, query


def _exist_question(rng: np.random.Generator) -> Built:
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    label = "yes" if rng.random() < 0.5 else "no"
    objects = [Obj(colour, shape)] if label == "yes" else []
    # Near misses (same colour, other shape; same shape, other colour) so that colour and shape must be bound.
    if rng.random() < 0.7:
        objects.append(Obj(colour, _pick(rng, SHAPES, [shape])))
    if rng.random() < 0.7:
        objects.append(Obj(_pick(rng, list(COLOURS), [colour]), shape))
    for _ in range(_n_distractors(rng, len(objects), low=0 if objects else 1)):
        c, s = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        if (c, s) != (colour, shape):
            objects.append(Obj(c, s))
    if not objects:
        objects.append(Obj(_pick(rng, list(COLOURS), [colour]), _pick(rng, SHAPES, [shape])))
    text = _template(rng, "exist", colour=colour, shape=shape, shapes=PLURALS[shape])
    return text, label, objects, None, {"qtype": "exist", "colour": colour, "shape": shape}


def _left_of_question(rng: np.random.Generator) -> Built:
    a = Obj(_pick(rng, list(COLOURS)), _pick(rng, SHAPES))
    b = Obj(_pick(rng, list(COLOURS), [a.colour]), _pick(rng, SHAPES))
    label = "yes" if rng.random() < 0.5 else "no"
    ask_left = rng.random() < 0.5
    a_left = (label == "yes") == ask_left
    others = []
    for _ in range(_n_distractors(rng, 2, low=0)):
        c, s = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        if (c, s) not in ((a.colour, a.shape), (b.colour, b.shape)):
            others.append(Obj(c, s))
    names = {"a": f"{a.colour} {a.shape}", "b": f"{b.colour} {b.shape}"}
    text = _template(rng, "left_of" if ask_left else "right_of", **names)
    query = {"qtype": "left_of", "a": [a.colour, a.shape], "b": [b.colour, b.shape], "ask": "left" if ask_left else "right"}
    return text, label, [a, b, *others], (0, 1, a_left), query


_QUESTION_BUILDERS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "exist": _exist_question,
    "left_of": _left_of_question,
}


# ----------------------------------------------------------------------------------------------------------------
# Layout and rendering
# ----------------------------------------------------------------------------------------------------------------


def _place(rng: np.random.Generator, objects: list[Obj], pair: Pair | None, tries: int = 200) -> list[Obj]:
    """Random sizes and non-overlapping positions; retries the whole layout until `pair` holds."""
    for _ in range(tries):
        placed = _try_place(rng, objects)
        if placed is None:
            continue
        if pair is not None:
            ia, ib, a_left = pair
            gap = placed[ib].x - placed[ia].x if a_left else placed[ia].x - placed[ib].x
            if gap < LEFT_MARGIN:
                continue
        return placed
    raise RuntimeError(f"could not lay out {len(objects)} objects in {tries} tries")  # pragma: no cover


def _try_place(rng: np.random.Generator, objects: list[Obj]) -> list[Obj] | None:
    placed: list[Obj] = []
    for obj in objects:
        r = int(rng.integers(MIN_RADIUS, MAX_RADIUS + 1))
        for x, y in rng.integers(r + 1, IMAGE_SIZE - r - 1, size=(30, 2)).tolist():
            if all(max(abs(x - o.x), abs(y - o.y)) > r + o.r + 1 for o in placed):
                placed.append(Obj(obj.colour, obj.shape, x, y, r))
                break
        else:
            return None
    return placed


def _draw(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    x, y, r, fill = obj.x, obj.y, obj.r, COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        s = round(r * 0.85)
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    elif obj.shape == "cross":
        t = max(1, round(r * 0.35))
        draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects: Sequence[Obj], rng: np.random.Generator) -> np.ndarray:
    """Draw the scene and add mild Gaussian pixel noise (from the sample's own generator): uint8 (H, W, 3)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    offset = int(rng.integers(_NOISE_BANK.size - _PIXELS))
    noise = _NOISE_BANK[offset : offset + _PIXELS].reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
    return np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def _noise_bank(std: float, size: int = 1 << 20) -> np.ndarray:
    """A fixed bank of rounded N(0, std) values; each image takes a window at a random offset.

    Why a bank: drawing 12k fresh normals per image was a quarter of the render time, and a random window into
    a million values is as good as fresh noise for "mild noise" while staying a pure function of the seed.
    """
    values = np.random.default_rng(20240611).standard_normal(size + _PIXELS) * std
    return np.rint(values).astype(np.int16)


_PIXELS = IMAGE_SIZE * IMAGE_SIZE * 3
_NOISE_BANK = _noise_bank(NOISE_STD)


def render_png(objects: Sequence[Obj], rng: np.random.Generator) -> bytes:
    return encode_png(render(objects, rng))


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes: 8-bit RGB, no filter, stored (uncompressed) deflate, no metadata chunks.

    Why not PIL, and why stored: encoding was the largest cost of generation. PIL took ~3x longer on these
    small noisy images than this writer; zlib, even Huffman-only (LZ77 finds nothing in noise), still cost
    ~110 us per image to save 35% of 12 KB, and decoding stored data is cheaper for the loader too. This is
    plain PNG that any decoder reads, and deterministic.
    """
    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # filter byte 0 (None) at the start of each row
    rows[:, 1:] = pixels.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows.tobytes(), 0)
    return b"".join((_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
