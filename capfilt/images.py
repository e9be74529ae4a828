"""Reading and preprocessing images the way the checkpoint's config says.

Preprocessing follows BLIP: RGB, bicubic resize to a square of the model's image size,
scale to [0, 1], normalise with the checkpoint's mean and std. Beyond BLIP, EXIF rotation is
applied and transparent images are laid on white, so what the model sees is what a person sees.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CapfiltError

if TYPE_CHECKING:  # torch is imported where tensors are made: the job's decode tasks need none
    import torch

MAX_PIXELS = 64_000_000  # refuse larger images: decompression bombs
# Image files (tar members, files a table names) above this are not read: no web image is this large,
# and reading one would hold it whole in a worker's memory.
MAX_IMAGE_BYTES = 256 * 2**20


class ImageError(CapfiltError):
    """An image that cannot be decoded; `reason` is a short machine-readable code."""

    def __init__(self, message: str, reason: str = "image_undecodable") -> None:
        super().__init__(message)
        self.reason = reason


# The raster formats of the web that images are decoded from. Pillow would otherwise try every
# plugin it has, EPS among them, which runs Ghostscript on untrusted bytes where it is installed.
WEB_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


@functools.cache
def _web_formats() -> tuple[str, ...]:
    """WEB_FORMATS this Pillow can open (its build may lack AVIF, say)."""
    Image.init()
    return tuple(f for f in WEB_FORMATS if f in Image.OPEN)


def open_image(
    source: str | Path | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image, or raise ImageError naming it."""
    img = _open(source, name, max_pixels, decode=True)
    try:
        return to_rgb(img)
    except Exception as err:  # a plugin's own error on a mode or frame it half decoded
        raise ImageError(
            f"{_label(source, name)}: cannot be made RGB ({_why(err)})", "image_undecodable"
        ) from err


def check_image(source: str | Path | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS) -> None:
    """Raise the ImageError `open_image` would for a file that is empty, no image of the web's
    formats or too large, reading only its header (a truncated body is not found this way)."""
    _open(source, name, max_pixels, decode=False)


def _label(source: str | Path | bytes, name: str | None) -> str:
    return name or (str(source) if not isinstance(source, bytes) else "image bytes")


def _why(err: BaseException) -> str:
    """An exception as a message for a ledger: its type where it is no OSError-like message, and
    without the address of PIL's buffer (ledgers are reproducible)."""
    text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
    return (
        text
        if isinstance(err, (OSError, SyntaxError, ValueError, EOFError))
        else f"{type(err).__name__}: {text}"
    )


def _open(source: str | Path | bytes, name: str | None, max_pixels: int, decode: bool) -> Image.Image:
    label = _label(source, name)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"{path} is a directory, not an image file", "image_missing")
        if not path.exists():
            raise ImageError(f"image not found: {path}", "image_missing")
        if not path.is_file():  # a FIFO, a device: reading it may never end
            raise ImageError(f"{path} is not a regular file, not an image file", "image_missing")
        try:
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise ImageError(
                    f"{path}: {path.stat().st_size} bytes is over the limit of {MAX_IMAGE_BYTES} for an image",
                    "image_too_large",
                )
            data = path.read_bytes()
        except OSError as err:  # no permission, an I/O error
            raise ImageError(f"{path}: cannot be read ({err.strerror or err})", "image_missing") from err
    else:
        data = source
    if not data:
        raise ImageError(f"{label}: empty file", "image_empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_web_formats())
            if img.width * img.height > max_pixels:
                raise ImageError(
                    f"{label}: {img.width}x{img.height} pixels exceeds the limit of {max_pixels}",
                    "image_too_large",
                )
            if decode:
                img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{label}: refused as a decompression bomb ({err})", "image_too_large") from err
    except UnidentifiedImageError as err:
        why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))  # PIL names its buffer
        raise ImageError(
            f"{label}: not a readable image in any of {', '.join(_web_formats())} ({why})",
            "image_undecodable",
        ) from err
    except Exception as err:  # OSError mostly; a damaged file makes plugins raise struct.error, TypeError...
        raise ImageError(f"{label}: not a readable image ({_why(err)})", "image_undecodable") from err
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-rotate and convert any mode (palette, alpha, 16-bit, CMYK, grayscale) to RGB."""
    # Broken EXIF (struct.error, TypeError, ... from Pillow's parser): the pixels are still fine.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


ImageLike = Image.Image | np.ndarray  # an RGB PIL image, or (H, W, 3) uint8 pixels


def _pixels_of(img: ImageLike, size: int) -> np.ndarray:
    """(size, size, 3) uint8 pixels of one RGB image, resized bicubically when needed."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"pixel arrays must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
        if img.shape[:2] == (size, size):
            return img
        img = Image.fromarray(img, "RGB")
    if img.size != (size, size):  # PIL's resize to the size an image has is a copy: skipped
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img)


_FILL_THREADS = min(8, os.cpu_count() or 1)
_fill_pool: ThreadPoolExecutor | None = None


def stack_pixels(images: Sequence[ImageLike], size: int, pin: bool = False) -> torch.Tensor:
    """RGB images (PIL, or (H, W, 3) uint8 arrays) -> (B, size, size, 3) uint8, one copy each.

    Each image is written straight into one batch buffer (page-locked with `pin`, so that a copy
    to a GPU can run asynchronously); large batches fill it from a few threads, since converting a
    PIL image to pixels releases the GIL."""
    import torch

    global _fill_pool
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, pin_memory=pin)
    view = out.numpy()

    def fill(i: int) -> None:
        view[i] = _pixels_of(images[i], size)

    if len(images) >= 64 and _FILL_THREADS > 1:
        if _fill_pool is None:
            _fill_pool = ThreadPoolExecutor(_FILL_THREADS, thread_name_prefix="capfilt-pixels")
        list(_fill_pool.map(fill, range(len(images))))
    else:
        for i in range(len(images)):
            fill(i)
    return out


def normalize_pixels(
    pixels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) `dtype` (float32 by default) on `device`. The
    uint8 pixels travel (a quarter of the bytes of float32) and are normalised where the model runs."""
    import torch

    device = torch.device(device)
    x = pixels.to(device, non_blocking=pixels.is_pinned()).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype or torch.float32)


def preprocess(
    images: Sequence[ImageLike],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """RGB images (PIL or uint8 arrays) -> normalised pixels (B, 3, size, size), float32 on `device`."""
    import torch

    pin = torch.device(device).type == "cuda"
    return normalize_pixels(stack_pixels(images, size, pin=pin), mean, std, device)
