"""The fuzz corpus: requests for both APIs, each with the status codes a correct server may answer.

A `Case` is one request (an mmkd.v1 `ClassifyRequest` or a KServe `ModelInferRequest`), the class it belongs to
and its oracle: the set of acceptable gRPC status names. Almost every class has an exact oracle (one code,
decided by construction, not by running the server's code); only `mutated_*` (random bit flips in a valid image,
which may or may not still decode) accept either OK or INVALID_ARGUMENT. Valid classes expect OK, and the
harness also checks their answers against a baseline.

`crafted(model)` is the fixed corpus (one or a few of every class); `generate(model, n, seed)` draws n cases
across the classes, deterministic from the seed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from benchmarks.robustness import images as im
from server._proto.kserve.v2 import grpc_service_pb2 as kpb
from server._proto.mmkd.v1 import inference_pb2 as pb

OK = frozenset({"OK"})
INVALID = frozenset({"INVALID_ARGUMENT"})
NOT_FOUND = frozenset({"NOT_FOUND"})
MAYBE = frozenset({"OK", "INVALID_ARGUMENT"})
GOOD_TEXT = "what color is the circle ?"
MAX_TEXT_CHARS = 1024  # the server defaults (--max-text-chars, --max-image-bytes, --max-message-bytes);
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # pass the served values to the builders
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
TOO_BIG = frozenset({"RESOURCE_EXHAUSTED"})  # gRPC's own answer to a message over the receive limit


@dataclass(frozen=True)
class Case:
    """One request and what a correct server may answer."""

    cls: str
    api: str  # "mmkd" | "kserve"
    request: object  # pb.ClassifyRequest | kpb.ModelInferRequest
    expect: frozenset[str]

    @property
    def valid(self) -> bool:
        return self.expect == OK

    @property
    def malformed(self) -> bool:
        return "OK" not in self.expect


# ---- request builders ----------------------------------------------------------------------------------------


def frame(*elements: bytes) -> bytes:
    """KServe BYTES tensor contents: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def classify(model: str, image: bytes, text: str, **extra) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, image=image, text=text, **extra)


def infer(model: str, images: list[bytes], texts: list[bytes], *, names=("image", "text"),
          dtypes=("BYTES", "BYTES"), shapes=None, raw: list[bytes] | None = None, contents: bool = False,
          outputs=(), version: str = "") -> kpb.ModelInferRequest:
    """A KServe request; every keyword lets one thing be broken."""
    request = kpb.ModelInferRequest(model_name=model, model_version=version)
    shapes = shapes or ([len(images), 1], [len(texts), 1])
    for name, dtype, shape, values in zip(names, dtypes, shapes, (images, texts)):
        tensor = request.inputs.add(name=name, datatype=dtype, shape=shape)
        if contents:
            tensor.contents.bytes_contents.extend(values)
    if not contents:
        request.raw_input_contents.extend(raw if raw is not None else [frame(*images), frame(*texts)][:len(names)])
    for name in outputs:
        request.outputs.add(name=name)
    return request


def both(cls: str, model: str, image: bytes, text: str, expect: frozenset[str]) -> list[Case]:
    """The same image/text content over both APIs."""
    return [Case(cls, "mmkd", classify(model, image, text), expect),
            Case(cls, "kserve", infer(model, [image], [text.encode("utf-8")]), expect)]


def text_expect(text: str, max_chars: int) -> frozenset[str]:
    """Empty (after stripping whitespace) or over the character limit is invalid; anything else is answered."""
    return INVALID if not text.strip() or len(text) > max_chars else OK


# ---- the crafted corpus --------------------------------------------------------------------------------------

CONTROL = "".join(chr(c) for c in range(0x00, 0x20) if chr(c) not in "\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")
ODD_TEXTS = {
    "text_control": f"what {CONTROL} color ?",
    "text_nul_only": "\x00",
    "text_combining": "e" + "\u0301\u0308\u0327" * 50 + " circle",
    "text_zero_width": "\u200b\u200c\u200d\ufeff",
    "text_bidi": "\u202ewhat color\u202c ?",
    "text_emoji": "what color is 🟥 ? 👨‍👩‍👧",
    "text_cjk": "圆是什么颜色？",
    "text_replacement_char": "\ufffd\ufffd",
}


def crafted(model: str, max_text_chars: int = MAX_TEXT_CHARS, max_image_bytes: int = MAX_IMAGE_BYTES,
            max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[Case]:
    """One or a few requests of every class, over both APIs where the class applies to both."""
    good = im.rgb(7)
    cases: list[Case] = []
    padded = good + b"\x00" * (max_image_bytes + 1 - len(good))  # a PNG with trailing junk, one byte too many
    cases += both("image_over_byte_limit", model, padded, GOOD_TEXT, INVALID)
    cases += both("message_over_size_limit", model, good + b"\x00" * (max_message_bytes + 1), GOOD_TEXT, TOO_BIG)
    cases += both("valid_png", model, good, GOOD_TEXT, OK)
    cases += both("valid_jpeg", model, im.rgb(7, fmt="JPEG"), GOOD_TEXT, OK)
    cases += both("valid_webp", model, im.rgb(7, fmt="WEBP"), GOOD_TEXT, OK)
    for mode in im.GOOD_MODES:
        cases += both(f"mode_{mode}", model, im.mode_image(mode), GOOD_TEXT, OK)
    for orientation in range(1, 9):
        cases += both(f"exif_orientation_{orientation}", model, im.exif_oriented(orientation), GOOD_TEXT, OK)
    cases += both("image_1x1", model, im.rgb(1, size=1), GOOD_TEXT, OK)
    cases += both("zero_bytes", model, b"", GOOD_TEXT, INVALID)
    for prefix in im.NON_IMAGE_PREFIXES:
        cases += both("non_image", model, prefix + b"\x00" * 40, GOOD_TEXT, INVALID)
    for fmt in ("GIF", "BMP", "TIFF", "ICO", "PPM"):
        cases += both(f"format_{fmt.lower()}", model, im.other_format(fmt), GOOD_TEXT, INVALID)
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = im.rgb(3, fmt=fmt)
        for cut in (1, 8, len(data) // 2, len(data) - im.truncation_limit(fmt)):
            cases += both(f"truncated_{fmt.lower()}", model, data[:cut], GOOD_TEXT, INVALID)
    cases += both("corrupt_png_crc", model, im.png_bad_ihdr_crc(), GOOD_TEXT, INVALID)
    cases += both("corrupt_png_zero_width", model, im.png_zero_width(), GOOD_TEXT, INVALID)
    for w, h in ((100_000, 100_000), (2**31 - 1, 1), (5000, 5000), (1, 20_000_000)):
        cases += both("bomb_png_header", model, im.png_header_bomb(w, h), GOOD_TEXT, INVALID)
    cases += both("bomb_jpeg_header", model, im.jpeg_header_bomb(), GOOD_TEXT, INVALID)
    cases += both("bomb_png_zip", model, im.png_zip_bomb(), GOOD_TEXT, INVALID)
    for text in ("", " ", "\t\n \u3000\u2028", "x" * (max_text_chars + 1), "\u0301" * (max_text_chars + 1)):
        cases += both("text_empty" if len(text) < 10 else "text_huge", model, good, text, INVALID)
    cases += both("text_at_limit", model, good, "a " * (max_text_chars // 2), OK)
    for cls, text in ODD_TEXTS.items():
        cases += both(cls, model, good, text, OK)
    cases += both("unknown_model", model + "-nope", good, GOOD_TEXT, NOT_FOUND)
    cases += both("empty_model", "", good, GOOD_TEXT, INVALID)
    cases += kserve_structure(model, good)
    return cases


def kserve_structure(model: str, image: bytes, max_batch: int = 16) -> list[Case]:
    """Tensors with wrong names, datatypes, shapes, element counts and BYTES framing."""
    t = GOOD_TEXT.encode()
    k = "kserve"
    bad = lambda cls, req: Case(cls, k, req, INVALID)  # noqa: E731
    return [
        bad("kserve_wrong_name", infer(model, [image], [t], names=("picture", "text"))),
        bad("kserve_wrong_name", infer(model, [image], [t], names=("image", "question"))),
        bad("kserve_duplicate_name", infer(model, [image], [t], names=("image", "image"))),
        bad("kserve_missing_input", infer(model, [image], [t], names=("image",))),
        bad("kserve_no_inputs", kpb.ModelInferRequest(model_name=model)),
        *[bad("kserve_wrong_datatype", infer(model, [image], [t], dtypes=d))
          for d in (("FP32", "BYTES"), ("BYTES", "INT64"), ("bytes", "BYTES"), ("", "BYTES"), ("STRING", "BYTES"))],
        *[bad("kserve_wrong_shape", infer(model, [image], [t], shapes=s))
          for s in (([], []), ([0], [0]), ([1, 2], [1, 2]), ([1, 1, 1], [1, 1]), ([-1], [-1]), ([1, 0], [1, 0]),
                    ([2, 1], [2, 1]), ([max_batch + 1], [max_batch + 1]), ([2**40], [2**40]))],
        bad("kserve_batch_mismatch", infer(model, [image, image], [t], shapes=([2], [1]))),
        bad("kserve_element_count", infer(model, [image], [t], raw=[frame(image, image), frame(t)])),
        bad("kserve_element_count", infer(model, [image], [t], raw=[b"", frame(t)])),
        bad("kserve_raw_count", infer(model, [image], [t], raw=[frame(image)])),
        bad("kserve_raw_count", infer(model, [image], [t], raw=[frame(image), frame(t), frame(t)])),
        bad("kserve_framing_short_prefix", infer(model, [image], [t], raw=[b"\x05\x00", frame(t)])),
        bad("kserve_framing_length_past_end", infer(model, [image], [t],
                                                   raw=[struct.pack("<I", len(image) + 1) + image, frame(t)])),
        bad("kserve_framing_length_huge", infer(model, [image], [t],
                                               raw=[struct.pack("<I", 0xFFFFFFFF) + image, frame(t)])),
        bad("kserve_framing_big_endian", infer(model, [image], [t],
                                              raw=[struct.pack(">I", len(image)) + image, frame(t)])),
        bad("kserve_framing_unframed", infer(model, [image], [t], raw=[image, t])),
        bad("kserve_text_not_utf8", infer(model, [image], [b"\xff\xfe what"])),
        bad("kserve_text_not_utf8", infer(model, [image], [b"\xed\xa0\x80"])),  # an encoded lone surrogate
        bad("kserve_unknown_output", infer(model, [image], [t], outputs=("probs",))),
        bad("kserve_bad_element_in_batch", infer(model, [image, b"junk"], [t, t], shapes=([2], [2]))),
        bad("kserve_empty_name", infer("", [image], [t])),
        Case("kserve_unknown_model", k, infer(model + "-nope", [image], [t]), NOT_FOUND),
        Case("kserve_valid_contents", k, infer(model, [image], [t], contents=True), OK),
        Case("kserve_valid_batch", k, infer(model, [image] * 3, [t] * 3, shapes=([3], [3])), OK),
    ]


# ---- generated cases -----------------------------------------------------------------------------------------


def _truncated(rng: random.Random, model: str) -> tuple[str, bytes, str, frozenset[str]]:
    fmt = rng.choice(("PNG", "JPEG", "WEBP"))
    data = im.rgb(rng.randrange(1 << 30), size=rng.randrange(4, 40), fmt=fmt)
    cut = rng.randrange(0, len(data) - im.truncation_limit(fmt) + 1)
    return f"truncated_{fmt.lower()}", data[:cut], GOOD_TEXT, INVALID


def _non_image(rng: random.Random, model: str) -> tuple[str, bytes, str, frozenset[str]]:
    prefix = rng.choice((b"",) + im.NON_IMAGE_PREFIXES)
    body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    data = prefix + body
    if not data:
        return "zero_bytes", data, GOOD_TEXT, INVALID
    return "non_image", data, GOOD_TEXT, INVALID


def _bomb(rng: random.Random, model: str) -> tuple[str, bytes, str, frozenset[str]]:
    if rng.random() < 0.2:
        return "bomb_jpeg_header", im.jpeg_header_bomb(rng.randrange(5000, 65535), rng.randrange(5000, 65535)), \
            GOOD_TEXT, INVALID
    side = rng.randrange(4097, 1 << 20)  # over the 4096x4096 default pixel limit even with one short side
    w, h = (side, side) if rng.random() < 0.5 else (side * side, 1)
    w = min(w, 2**31 - 1)
    return "bomb_png_header", im.png_header_bomb(w, h), GOOD_TEXT, INVALID


def _corrupt(rng: random.Random, model: str) -> tuple[str, bytes, str, frozenset[str]]:
    choice = rng.random()
    if choice < 0.3:
        return "corrupt_png_crc", im.png_bad_ihdr_crc(rng.randrange(1000)), GOOD_TEXT, INVALID
    if choice < 0.4:
        return f"format_{(fmt := rng.choice(('GIF', 'BMP', 'TIFF'))).lower()}", \
            im.other_format(fmt, rng.randrange(1000)), GOOD_TEXT, INVALID
    fmt = rng.choice(("PNG", "JPEG", "WEBP"))
    data = bytearray(im.rgb(rng.randrange(1000), size=rng.randrange(4, 32), fmt=fmt))
    for _ in range(rng.randrange(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return f"mutated_{fmt.lower()}", bytes(data), GOOD_TEXT, MAYBE


def _text(rng: random.Random, model: str, max_chars: int) -> tuple[str, bytes, str, frozenset[str]]:
    image = im.rgb(rng.randrange(100), size=16)
    kind = rng.random()
    if kind < 0.25:
        text = "".join(rng.choice(" \t\n\r\u3000\u2028\x1c\x85") for _ in range(rng.randrange(0, 20)))
        return "text_empty", image, text, INVALID
    if kind < 0.4:
        text = rng.choice(("x", "\u0301", "🙂", "a ")) * (max_chars + 1 + rng.randrange(2000))
        return "text_huge", image, text, INVALID
    alphabet = [chr(c) for c in range(1, 0x20)] + ["\u0301", "\u0308", "\u200b", "\u202e", "\ufeff", "é", "?",
                                                   "🙂", "圆", "what", " color", " circle"]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200)))
    return "text_control_combining", image, text, text_expect(text, max_chars)


def _kserve_structural(rng: random.Random, model: str) -> Case:
    image = im.rgb(rng.randrange(100), size=16)
    options = kserve_structure(model, image)
    malformed = [c for c in options if c.malformed]
    return rng.choice(malformed)


def generate(model: str, n: int, seed: int = 0, max_text_chars: int = MAX_TEXT_CHARS) -> Iterator[Case]:
    """n malformed-or-odd cases drawn across every class, alternating the two APIs."""
    rng = random.Random(seed)
    makers: list[Callable] = [_truncated, _non_image, _bomb, _corrupt,
                              lambda r, m: _text(r, m, max_text_chars)]
    for i in range(n):
        api = "mmkd" if i % 2 == 0 else "kserve"
        pick = rng.random()
        if api == "kserve" and pick < 0.3:
            yield _kserve_structural(rng, model)
            continue
        if pick < 0.35 and rng.random() < 0.1:
            name = rng.choice(("", model + "-x", model.upper() + "?", "../" + model))
            cls, image, text, expect = "unknown_model", im.rgb(1, 16), GOOD_TEXT, NOT_FOUND
            if not name:
                cls, expect = "empty_model", INVALID
        else:
            name = model
            cls, image, text, expect = rng.choice(makers)(rng, model)
        if api == "mmkd":
            yield Case(cls, api, classify(name, image, text), expect)
        else:
            yield Case(cls, api, infer(name, [image], [text.encode("utf-8")]), expect)


def valid_probe(model: str, i: int) -> Case:
    """A known-good request (one of a few fixed ones) to interleave with bad ones; answers must not change."""
    api = "mmkd" if i % 2 == 0 else "kserve"
    image, text = im.rgb(1000 + i % 4, size=24), ("what color is the circle ?", "is there a triangle ?")[i % 2]
    request = classify(model, image, text) if api == "mmkd" else infer(model, [image], [text.encode()])
    return Case(f"valid_interleaved_{i % 4}", api, request, OK)
