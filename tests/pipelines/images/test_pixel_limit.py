"""The pixel limit: its default fits the memory a decode declares; JPEGs draft, others are refused."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.images import pixel_limit
from pipelines.images.pixel_limit import DECODE_MEMORY, DEFAULT_MAX_PIXELS, WORST_BYTES_PER_PIXEL
from pipelines.images.transforms import ImageDecodeError, load_resized, probe_image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
# Peak RSS from VmHWM: ru_maxrss would carry over the pytest parent's peak across fork and exec.
MEASURE = """
import sys
from pipelines.images.transforms import load_resized
def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
data = open(sys.argv[1], "rb").read()
before = peak()
load_resized(data, 800, 1333)
print((peak() - before) / int(sys.argv[2]))
"""


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["gray16", "rgba"])
def test_default_limit_worst_case_decode_fits_the_declared_memory(kind, tmp_path):
    """Peak memory of a decode per pixel, measured in a fresh process (VmHWM), for the costliest
    formats: at the default limit it stays within what a decode declares."""
    h, w = 2000, 2500
    rng = np.random.default_rng(0)
    data = png(rng.integers(0, 65535, (h, w), dtype=np.uint16)) if kind == "gray16" else \
        png(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA")
    (tmp_path / "img.png").write_bytes(data)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "img.png"), str(h * w)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    bytes_per_pixel = float(out.stdout.strip())
    assert 0 < bytes_per_pixel <= WORST_BYTES_PER_PIXEL, out.stderr
    assert DEFAULT_MAX_PIXELS * bytes_per_pixel <= DECODE_MEMORY


def test_jpeg_above_the_limit_drafts_png_is_refused_naming_its_size():
    pixels = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    resized, orig = load_resized(buf.getvalue(), 32, 64, max_pixels=5000)  # 120,000 px, drafted to 1/8
    assert orig == (300, 400) and resized.shape == (32, 43, 3)
    assert probe_image(buf.getvalue(), max_pixels=5000) == (400, 300)
    with pytest.raises(ImageDecodeError, match=r"^400x300 = 0.1 megapixels, above the pixel limit"):
        load_resized(png(pixels), 32, 64, max_pixels=5000)
    with pytest.raises(ImageDecodeError, match="400x300"):
        probe_image(png(pixels), max_pixels=5000)
    assert load_resized(png(pixels), 32, 64, max_pixels=None)[1] == (300, 400)


def test_draft_request_keeps_the_target_unless_the_limit_needs_less():
    assert pixel_limit.draft_request(10000, 10000, (64, 64), DEFAULT_MAX_PIXELS) == (64, 64)
    assert pixel_limit.draft_request(1000, 1000, (800, 800), None) is None  # no reduction reaches 800
    width, height = pixel_limit.draft_request(20000, 20000, (12000, 12000), 10_000_000)
    assert width * 2 * height * 2 <= 10_000_000  # whatever scale draft picks, the result fits


def test_prepare_skips_an_image_above_the_limit_naming_its_size(ray_local, tmp_path):
    from pipelines.formats.prepare import prepare

    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(2).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    (images / "a.png").write_bytes(png(pixels))
    Image.fromarray(np.repeat(np.repeat(pixels, 2, 0), 2, 1)).save(images / "b.jpg")  # 200x200, drafted 25x25
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100},
                       {"id": 2, "file_name": "b.jpg", "width": 200, "height": 200}],
            "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    manifest = prepare(str(images), str(tmp_path / "ann.json"), str(tmp_path / "shards"), max_pixels=5000,
                       progress=lambda _: None)
    assert manifest.num_images == 1 and manifest.issues == {"corrupt_image": 1}
    assert "100x100 = 0.0 megapixels, above the pixel limit" in manifest.issue_examples[0]["detail"]
