"""Encoded test images, good and broken, built with Pillow and by hand (for headers Pillow refuses to write).

Every builder is deterministic from its arguments. Sizes stay small: the fuzzer sends tens of thousands.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pixels(seed: int, width: int, height: int, channels: int = 3) -> np.ndarray:
    """Random uint8 pixels (H, W, C) or (H, W) for channels == 1."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def rgb(seed: int = 0, size: int = 24, fmt: str = "PNG") -> bytes:
    return encode(Image.fromarray(pixels(seed, size, size), "RGB"), fmt)


def mode_image(mode: str, seed: int = 0, size: int = 20) -> bytes:
    """A PNG (or JPEG for CMYK) in an unusual mode: L, LA, RGBA, P, P+transparency, I;16, 1, CMYK."""
    base = Image.fromarray(pixels(seed, size, size), "RGB")
    if mode == "I;16":
        wide = pixels(seed, size, size, 1).astype(np.uint16) * 257  # full 16-bit range
        return encode(Image.fromarray(wide), "PNG")  # uint16 (H, W) -> mode I;16
    if mode == "P+transparency":
        pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        return encode(pal, "PNG", transparency=0)
    if mode == "P":
        return encode(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")
    if mode == "CMYK":
        return encode(base.convert("CMYK"), "JPEG", quality=90)
    if mode == "L-JPEG":
        return encode(base.convert("L"), "JPEG", quality=90)
    if mode == "WEBP-lossless":
        return encode(base.convert("RGBA"), "WEBP", lossless=True)
    return encode(base.convert(mode), "PNG")


GOOD_MODES = ("L", "LA", "RGBA", "P", "P+transparency", "I;16", "1", "CMYK", "L-JPEG", "WEBP-lossless")


def exif_oriented(orientation: int, seed: int = 0, width: int = 24, height: int = 16) -> bytes:
    """A JPEG whose EXIF orientation tag says how to turn it upright."""
    image = Image.fromarray(pixels(seed, width, height), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header_bomb(width: int, height: int, *, real_rows: int = 1) -> bytes:
    """A valid-looking PNG declaring width x height RGB pixels; only `real_rows` rows of data are present.

    The declared size is what a decoder would allocate: a server must refuse it from the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = (b"\x00" + b"\x00" * (3 * min(width, 1 << 16))) * real_rows
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")


def png_zip_bomb(side: int = 5000) -> bytes:
    """A complete PNG of side x side black pixels: ~75 MB decoded from ~75 kB on the wire."""
    row = b"\x00" + b"\x00" * (3 * side)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def jpeg_header_bomb(width: int = 60000, height: int = 60000, seed: int = 0) -> bytes:
    """A small JPEG whose SOF marker is patched to declare a huge frame."""
    data = bytearray(rgb(seed, 16, "JPEG"))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        pos = data.find(marker)
        if pos >= 0:
            struct.pack_into(">HH", data, pos + 5, height, width)
            return bytes(data)
    raise ValueError("no SOF marker in the JPEG Pillow wrote")  # pragma: no cover


def png_bad_ihdr_crc(seed: int = 0) -> bytes:
    """A PNG whose IHDR checksum is wrong (a corrupted header)."""
    data = bytearray(rgb(seed, 16, "PNG"))
    data[29] ^= 0xFF  # IHDR CRC sits at 8 (signature) + 4 (len) + 4 (type) + 13 (body)
    return bytes(data)


def png_zero_width() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def other_format(fmt: str, seed: int = 0) -> bytes:
    """A real image in a format the server does not accept (GIF, BMP, TIFF, ICO, PPM)."""
    return rgb(seed, 16, fmt)


NON_IMAGE_PREFIXES = (b"%PDF-1.7\n", b"PK\x03\x04", b"{\"image\": ", b"GIF87a", b"<svg xmlns=", b"\x7fELF",
                      b"RIFF\x00\x00\x00\x00WAVE", b"\xff\xd8", b"\x89PNG\r\n\x1a\n")


def truncation_limit(fmt: str) -> int:
    """Bytes to drop at least so that a cut image of this format is certainly incomplete.

    PNG still decodes without its IEND chunk and the IDAT checksum (20 bytes); JPEG and WebP fail at any cut."""
    return 24 if fmt == "PNG" else 1
