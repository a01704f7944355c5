"""One pixel limit for every decode (prepare, train, infer), sized to the memory a decode declares.

A 300-megapixel PNG decodes to ~0.9 GB of RGB, and a 16-bit one passes through 32-bit and
float64 copies on its way to 8-bit RGB (`transforms._to_rgb`): ~20 bytes per pixel at the
peak. A task that declares 1 GiB and decodes that is killed by Ray, and every rerun dies on
the same file. So each decode checks the size first: JPEGs decode at a reduced DCT scale
(draft mode: 1/2, 1/4 or 1/8 per side) until they fit, other formats above the limit are
refused as an undecodable image naming their size, before any pixel is allocated.

`DEFAULT_MAX_PIXELS` follows from `DECODE_MEMORY` (what one decode may hold) divided by the
worst case bytes per pixel measured for the formats PIL reads here (tests/pipelines/images/test_pixel_limit.py).
"""
from __future__ import annotations

DECODE_MEMORY = 1024**3  # what one decode may hold: the memory a decode task / thread declares
WORST_BYTES_PER_PIXEL = 24  # 16-bit gray PNG: I (4 B) + float64 (8 B) + uint8 gray + RGB + resize (measured ~20)
DEFAULT_MAX_PIXELS = DECODE_MEMORY // WORST_BYTES_PER_PIXEL  # ~44.7 megapixels


def describe(width: int, height: int, limit: int) -> str:
    """Why an image is refused, naming its size (the `error` of its row)."""
    return (f"{width}x{height} = {width * height / 1e6:.1f} megapixels, above the pixel limit of "
            f"{limit / 1e6:.1f} megapixels (--max-pixels)")


def exceeds(width: int, height: int, limit: int | None) -> bool:
    return bool(limit) and width * height > limit


def draft_request(width: int, height: int, target: tuple[int, int], limit: int | None) -> tuple[int, int] | None:
    """The (width, height) to ask JPEG draft mode for: the resize goal `target`, or less when a
    decode at that reduction would still exceed `limit`; None when no reduction applies.

    Draft mode picks the largest reduction whose result is still at least the request, so the
    result is under twice the request per side: asking for half the limit's side keeps it under.
    """
    want_w, want_h = target
    if limit and width * height > limit:
        side = (limit / (width * height)) ** 0.5 / 2
        want_w, want_h = min(want_w, max(1, int(width * side))), min(want_h, max(1, int(height * side)))
    if want_w * 2 > width or want_h * 2 > height:
        return None
    return want_w, want_h


def replace_pil_guard() -> None:
    """Turn PIL's own bomb guard (89 MP) off in this process: the limit checked here replaces it,
    so that a huge JPEG can still be opened and drafted. Every thread sets the same value."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
