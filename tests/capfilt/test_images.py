"""`capfilt.images.open_image` on damaged files: an image is decoded to RGB or refused with an
ImageError (a reason the ledger records), never another exception that would stop a job."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from capfilt.images import ImageError, open_image


def _seed_images() -> dict[str, bytes]:
    """Small files of the web's formats, with EXIF (an orientation and a maker) where they take it."""
    base = Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype("uint8"))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"
    out = {}
    for name, fmt, options in (
        ("jpeg", "JPEG", {"exif": exif.tobytes()}),
        ("webp", "WEBP", {"exif": exif.tobytes()}),
        ("tiff", "TIFF", {"exif": exif.tobytes()}),
        ("tiff_lzw", "TIFF", {"compression": "tiff_lzw"}),
        ("png", "PNG", {"exif": exif.tobytes()}),
        ("gif", "GIF", {}),
        ("bmp", "BMP", {}),
    ):
        buf = io.BytesIO()
        (base.convert("P") if fmt == "GIF" else base).save(buf, fmt, **options)
        out[name] = buf.getvalue()
    return out


def test_damaged_files_decode_or_raise_image_error_only():
    """7,000 files with bytes flipped at random (a fixed seed; the first escape came at 4,892): Pillow's plugins raise struct.error, TypeError,
    IndexError... on such files, and broken EXIF fails the rotation; each must end as an RGB image
    or an ImageError (before, 9 kinds of exception got through and stopped the cleaning job)."""
    rng = random.Random(0)
    seeds = _seed_images()
    outcomes = {"decoded": 0, "refused": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(7000):
            name = rng.choice(sorted(seeds))
            data = bytearray(seeds[name])
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                img = open_image(bytes(data), name=f"mutated {name}")
            except ImageError as err:
                assert err.reason in ("image_undecodable", "image_too_large", "image_empty")
                assert str(err).startswith(f"mutated {name}: ")
                outcomes["refused"] += 1
            else:
                assert img.mode == "RGB"
                outcomes["decoded"] += 1
    assert outcomes["decoded"] > 100 and outcomes["refused"] > 100  # the mutations hit both ways


def test_broken_exif_keeps_the_pixels(monkeypatch):
    """An EXIF block the rotation cannot parse costs the rotation, not the image."""
    import struct

    from PIL import ImageOps

    def broken(img):
        raise struct.error("unpack requires a buffer of 2 bytes")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    img = open_image(_seed_images()["jpeg"], name="k.jpg")
    assert img.size == (32, 24) and img.mode == "RGB"  # not rotated, as the EXIF asked


@pytest.mark.parametrize(
    "failure", [TypeError("'str' object cannot be interpreted as an integer"), IndexError("x")]
)
def test_a_plugins_own_error_is_an_image_error_naming_the_file(monkeypatch, failure):
    from PIL import ImageFile

    png = _seed_images()["png"]

    def load(self):
        raise failure

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageError) as caught:
        open_image(png, name="shard/00001.png")
    assert caught.value.reason == "image_undecodable"
    assert str(caught.value) == f"shard/00001.png: not a readable image ({type(failure).__name__}: {failure})"


def test_an_image_path_that_is_no_readable_file_is_an_image_error(tmp_path, monkeypatch):
    """A FIFO used to be "not found" (and reading one may never end), a file without read
    permission ended in a PermissionError traceback, a huge file was read whole."""
    import os

    from capfilt import images
    from capfilt.images import ImageError, open_image

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="is not a regular file"):
        open_image(fifo)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(photo)

    def refused(self):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(type(photo), "read_bytes", refused)
        with pytest.raises(ImageError, match=r"photo.png: cannot be read \(Permission denied\)") as err:
            open_image(photo)
        assert err.value.reason == "image_missing"
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(ImageError, match="over the limit of 10") as err:
        open_image(photo)
    assert err.value.reason == "image_too_large"
