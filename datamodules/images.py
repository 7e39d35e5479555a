"""Image loading for edit datasets: safe path resolution under a root, bomb guard, and RGB conversion.

Annotation files name images by paths relative to an image root given in the config. This module turns
such a path into an RGB `PIL.Image` and nothing else: every mode a benchmark (or a user's own data)
may hold comes out as 8-bit RGB with transparency composited over white, and every failure is an
`ImageLoadError` that names the file, so the dataset can add the record and field it came from.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

#: Default pixel limit (width * height). Benchmarks hold photos of a few megapixels; 64 MP leaves room
#: for large scans while refusing decompression bombs before they allocate gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


#: The raster formats images are opened as. Pillow would otherwise try every plugin it has, and some
#: run external programs (a PostScript file named `.png` reaches the EPS plugin, which calls
#: Ghostscript where it is installed); benchmark images are photographs and renderings.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


class ImageLoadError(ValueError):
    """An image path that cannot be resolved, opened, or decoded; the message names the file."""


class ImagePathError(ImageLoadError):
    """A record's image path is absolute or leaves the image root."""


def resolve_image_path(root: Path, rel_path: str) -> Path:
    """Join `rel_path` to `root`, refusing absolute paths and paths that climb out of the root.

    The check is lexical (normalise the relative path, look for a leading `..`) rather than
    `Path.resolve()`: image roots are often symlink farms pointing at a shared COCO copy, and following
    the links would reject those legitimate layouts.
    """
    if not isinstance(rel_path, str) or not rel_path.strip():
        raise ImagePathError(
            f"image path must be a non-empty string relative to the image root, got {rel_path!r}"
        )
    if (
        os.path.isabs(rel_path)
        or PurePosixPath(rel_path).is_absolute()
        or PureWindowsPath(rel_path).drive
        or rel_path.startswith(("/", "\\"))
    ):
        raise ImagePathError(
            f"image path {rel_path!r} is absolute; records must give paths relative to the image root {root}"
        )
    normalised = os.path.normpath(rel_path.replace("\\", "/"))
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        raise ImagePathError(f"image path {rel_path!r} leaves the image root {root}")
    return root / normalised


def _composite_over_white(img: Image.Image) -> Image.Image:
    # A plain .convert("RGB") drops alpha and keeps whatever colour sits under transparent pixels
    # (usually black), so a logo on a transparent canvas would turn into a black square.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    values = values.astype(np.float64)
    if full_scale is None:
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    else:
        values = values * (255.0 / full_scale)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Rescale 16-bit, 32-bit integer and float grey images to 8 bits.

    Pillow's own `convert("L")` clips instead of rescaling, so a 16-bit scan comes out nearly white.
    16-bit modes map 0..65535 onto 0..255. Mode `I` is what 16-bit PNGs decode to in older Pillow
    releases (8-bit sources decode to `L`, never `I`), so non-negative values up to 65535 get the
    16-bit scale; anything outside that range, and float images outside 0..1, are stretched min..max.
    """
    values = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = _to_uint8(values, 65535.0)
    elif img.mode == "I":
        in_16_bit_range = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        grey = _to_uint8(values, 65535.0 if in_16_bit_range else None)
    else:  # "F"
        in_unit_range = values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)
        grey = _to_uint8(values, 1.0 if in_unit_range else None)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB, compositing transparency over white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # P and L/RGB images carry transparency as a palette index or colour key in info.
        return _composite_over_white(img)
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_bit_depth_to_rgb(img)
    # CMYK (Pillow already undoes Adobe's inverted JPEG CMYK on decode), YCbCr, LAB, HSV, 1, L, P.
    return img.convert("RGB")


class ImageLoader:
    """Opens images under one root, guarded against decompression bombs, and returns RGB images.

    Nothing is decoded until `load` is called; `check` only stats the file, so a dataset can verify
    that every referenced image exists without paying for decoding at load time.
    """

    def __init__(
        self, root: str | os.PathLike[str], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> None:
        if max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
        self.root = Path(root)
        self.max_image_pixels = int(max_image_pixels)

    def path(self, rel_path: str) -> Path:
        return resolve_image_path(self.root, rel_path)

    def check(self, rel_path: str) -> Path:
        """Resolve and stat an image path; raise `ImageLoadError` if it is not a readable file."""
        path = self.path(rel_path)
        try:
            is_file = path.is_file()
        except OSError as exc:
            raise ImageLoadError(f"cannot stat image file {path}: {exc}") from exc
        if not is_file:
            raise ImageLoadError(f"image file {path} does not exist (image root {self.root})")
        return path

    def load(self, rel_path: str) -> Image.Image:
        """Open, fully decode and convert one image to RGB."""
        path = self.path(rel_path)
        try:
            # Pillow's own guard is a process-wide global; ours is per loader, so silence its warning
            # and let its hard error (at twice its limit) through as one of ours.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path, formats=IMAGE_FORMATS) as img:
                    pixels = img.width * img.height
                    if pixels > self.max_image_pixels:
                        raise ImageLoadError(
                            f"image file {path} has {img.width}x{img.height} = {pixels} pixels, more than "
                            f"max_image_pixels={self.max_image_pixels} (a decompression-bomb guard; raise it "
                            "if the image is genuine)"
                        )
                    img.load()
                    rgb = to_rgb(img)
                    # to_rgb may return the opened image itself; copy so it outlives the file handle.
                    return rgb.copy() if rgb is img else rgb
        except ImageLoadError:
            raise
        except FileNotFoundError as exc:
            raise ImageLoadError(f"image file {path} does not exist (image root {self.root})") from exc
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(
                f"image file {path} exceeds Pillow's decompression-bomb limit: {exc}; "
                f"max_image_pixels={self.max_image_pixels}"
            ) from exc
        except Image.UnidentifiedImageError as exc:
            raise ImageLoadError(
                f"cannot decode image file {path}: it is not an image in one of the formats this lab opens "
                f"({', '.join(IMAGE_FORMATS)})"
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            # Truncated files fail in load() with OSError; some corrupt headers raise SyntaxError.
            raise ImageLoadError(f"cannot decode image file {path}: {type(exc).__name__}: {exc}") from exc
