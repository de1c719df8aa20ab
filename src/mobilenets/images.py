"""Decoding any image file to RGB, and the evaluation preprocessing that belongs to a set of weights.

Every path that reads pixels (training data, evaluation, ``predict``, int8
calibration) goes through :func:`load_rgb` (or :func:`load_pixels`, the same
pixels as a tensor) and :func:`eval_transform`, so an image is seen the same
way everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MobilenetsError
from .terminal import printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

EXIF_ORIENTATION = 0x0112  # the tag ImageOps.exif_transpose follows

# What PIL names a JPEG: "MPO" is a multi-picture JPEG (CIPA DC-007), what iPhones, GoPros and many cameras
# write (a photo plus a preview or depth map), whose first image is an ordinary JPEG that libjpeg decodes,
# at any DCT scale, stopping at its end.  Read as anything else, 24 of 60 12-megapixel camera photos
# decoded every pixel by PIL, at three times the CPU (benchmarks/results/decode_floor.md).
JPEG_FORMATS = ("JPEG", "MPO")

# The crop fraction of the Inception/TF-slim evaluation: resize to resolution / 0.875, centre-crop.
CROP_FRACTION = 0.875


# what PIL (and a file system) raise for a file that is not a decodable image
UNDECODABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageError(MobilenetsError):
    """A file that is not a decodable image."""


class ImageSizeError(ImageError):
    """An image larger than mobilenets decodes; its message names the file."""


# The most pixels an image is decoded to: 2^25, about 33.5 megapixels (5792 x 5792), some 100 MB of RGB. The
# largest input the model takes (2048 pixels, resized from 2340) needs a sixth of it; a JPEG above it is decoded
# at 1/2, 1/4 or 1/8 scale (in the DCT domain, so the big one never exists), any other file is refused. PIL's
# own bomb limit only warns below 179 megapixels (2.4 GB for one PNG).
MAX_DECODED_PIXELS = 1 << 25
# Slack for what a file holds beyond its pixels (EXIF, ICC profiles, thumbnails, XMP); with 8 bytes a pixel
# (16-bit RGBA, uncompressed) no real file is larger, and a small image followed by gigabytes is refused unread.
MAX_METADATA_BYTES = 16 << 20
MAX_BYTES_PER_PIXEL = 8


def _check_size(path, im: Image.Image, size: int | None = None) -> tuple[int, int] | None:
    """Refuse, from the header, an image larger than decoding may make; a JPEG's reduced decode size, if needed.

    ``size``: the file's bytes when they are in memory (else the file is asked).
    Returns the size to ``draft`` a JPEG to so that it fits, or None when it fits as it is.
    """
    w, h = im.size
    size = path.stat().st_size if size is None else size
    if size > w * h * MAX_BYTES_PER_PIXEL + MAX_METADATA_BYTES:
        raise ImageSizeError(f"{path} is {size:,} bytes, far more than a {w}x{h} image takes (at most "
                         f"{w * h * MAX_BYTES_PER_PIXEL + MAX_METADATA_BYTES:,}); it hides other data: re-save the "
                         f"image alone")
    if w * h <= MAX_DECODED_PIXELS:
        return None
    if im.format in JPEG_FORMATS:
        for scale in (2, 4, 8):  # what libjpeg's DCT scaling offers
            if math.ceil(w / scale) * math.ceil(h / scale) <= MAX_DECODED_PIXELS:
                return math.ceil(w / scale), math.ceil(h / scale)
    raise ImageSizeError(f"{path} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the {MAX_DECODED_PIXELS / 1e6:.1f} "
                     f"megapixels mobilenets decodes (the model needs at most 2340 pixels a side); resize it first "
                     f"(a JPEG is decoded at reduced scale up to 1/8 a side)")


@contextlib.contextmanager
def _opened(source):
    """``Image.open`` (of a path or a file object) without PIL's decompression-bomb warning: :func:`_check_size`
    holds a lower limit, as an error (PIL's error, above 179 megapixels, still comes first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as im:
            yield im


@dataclass(frozen=True)
class Normalization:
    """Per-channel (x/255 - mean) / std.  The official weights use x/127.5 - 1, i.e. mean = std = 0.5."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


INCEPTION = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # TF-slim, Keras and timm's mobilenetv1_100
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def load_rgb(path: str | Path, *, min_side: int | Callable[[int, int], int] | None = None) -> Image.Image:
    """Open an image of any mode (grayscale, palette, RGBA, CMYK, 16-bit) as 8-bit RGB, EXIF rotation applied.

    ``min_side``: the caller needs only a shorter side of at least this many
    pixels, so a JPEG may be decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain (PIL's ``draft``): a 12-megapixel photo decodes about 6x faster.
    A callable gets the (width, height) the image will have (EXIF rotation
    applied, full scale), read from the header, and returns that side; it is
    called once, for JPEGs only.
    Raises :class:`ImageError` naming the file when it cannot be decoded
    (empty, truncated, not an image) or is too large: over
    :data:`MAX_DECODED_PIXELS` (a JPEG is decoded at reduced scale instead),
    or a file far larger than its pixels need.
    """
    path = Path(path)
    try:
        with _opened(path) as im:
            bound = _check_size(path, im)
            draft = _smaller(_draft_size(im, min_side), bound)
            if draft:
                im.draft(None, draft)
            return _decode(im)
    except ImageSizeError:
        raise
    except UNDECODABLE as e:
        raise ImageError(f"cannot decode image {path}: {e}") from None


def load_pixels(path: str | Path | bytes, *, min_side: int | Callable[[int, int], int] | None = None) -> torch.Tensor:
    """:func:`load_rgb` as uint8 (3, H, W) pixels (:func:`pixels`' layout), with the same arguments and errors.

    ``path`` may also be the file's bytes (read from object storage, a Ray
    dataset), decoded exactly as the file would be.

    A colour or grayscale JPEG decoded at full scale goes from the file
    straight into an array through simplejpeg: libjpeg-turbo with its SIMD
    code, the same pixels as PIL's bit for bit, without PIL's copy out of its
    image (a 12-megapixel photo: 19 ms against PIL's 38 and torchvision's 29;
    500x375: 0.48 against 0.66 and 0.50).  PIL still reads the header first,
    so its size limits hold before anything is decoded; PIL decodes the rest
    (CMYK, draft scales, other formats, files simplejpeg refuses).
    """
    data = path if isinstance(path, (bytes, bytearray, memoryview)) else None
    path = f"({len(data)} bytes)" if data is not None else Path(path)
    try:
        with _opened(io.BytesIO(data) if data is not None else path) as im:
            bound = _check_size(path, im, len(data) if data is not None else None)
            draft = _smaller(_draft_size(im, min_side), bound)
            jpeg = _simplejpeg() if im.format in JPEG_FORMATS and im.mode in ("RGB", "L") and not draft else None
            if jpeg is not None:
                try:
                    hwc = jpeg.decode_jpeg(bytes(data) if data is not None else path.read_bytes(),
                                           colorspace="RGB")  # strict: damage raises
                except ValueError:
                    pass  # truncated, corrupt or unusual: PIL below decodes it or says why
                else:
                    return _oriented(torch.from_numpy(hwc), im.getexif().get(EXIF_ORIENTATION))
            elif draft:
                im.draft(None, draft)
            return pixels(_decode(im))
    except ImageSizeError:
        raise
    except UNDECODABLE as e:
        raise ImageError(f"cannot decode image {path}: {e}") from None


@functools.lru_cache(maxsize=1)
def _simplejpeg():
    """The simplejpeg module, or None where it is not installed (PIL then decodes everything, only slower)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _oriented(hwc: torch.Tensor, orientation) -> torch.Tensor:
    """(H, W, 3) pixels turned upright as EXIF ``orientation`` says (ImageOps.exif_transpose's operations),
    as a (3, H, W) view of channels-last memory."""
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        flips = {2: (1,), 3: (0, 1), 4: (0,), 5: (), 6: (0,), 7: (0, 1), 8: (1,)}[orientation]
        if flips:
            hwc = hwc.flip(flips)
        if orientation in (5, 6, 7, 8):
            hwc = hwc.transpose(0, 1)
    return hwc.permute(2, 0, 1)


def _smaller(draft: tuple[int, int] | None, bound: tuple[int, int] | None) -> tuple[int, int] | None:
    """The smaller of two draft sizes (None: full size)."""
    if draft is None or bound is None:
        return draft or bound
    return min(draft, bound, key=lambda s: s[0] * s[1])


def _draft_size(im: Image.Image, min_side) -> tuple[int, int] | None:
    """The size to ask PIL's ``draft`` for (a JPEG whose needed shorter side is below its own), else None."""
    if not min_side or im.format not in JPEG_FORMATS:
        return None
    w, h = im.size
    if callable(min_side):
        swapped = im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
        needed = min_side(h, w) if swapped else min_side(w, h)
    else:
        needed = min_side
    scale = dct_scale(w, h, needed) if needed else 1
    # draft divides by the largest of 8, 4, 2 that both w // asked_w and h // asked_h reach: asking for the
    # sizes rounded down gets exactly ``scale`` (rounded up, a side not divisible by it would get half)
    return (w // scale, h // scale) if scale > 1 else None


def dct_scale(width: int, height: int, side: int) -> int:
    """The coarsest DCT scale (1, 2, 4 or 8; libjpeg decodes at 1/scale, each side rounded up) whose
    decoded shorter side is still at least ``side`` pixels."""
    shorter = min(width, height)
    return next((s for s in (8, 4, 2) if -(-shorter // s) >= side), 1)


def _decode(im: Image.Image) -> Image.Image:
    im.load()  # decode now: a truncated file must fail here, not later in a worker
    # in place: a 12-megapixel photo would otherwise be copied twice (here and by convert) for nothing
    ImageOps.exif_transpose(im, in_place=True)
    return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grayscale: scale the real range to 8 bits rather than clipping at 255
        a = np.asarray(im, dtype=np.float64)
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            # one infinity would scale every other pixel to 0: a black image classified without a word
            raise ImageError(f"{bad} of its {a.size} pixels are not finite (NaN or infinity); "
                             f"a float image needs finite values")
        hi = a.max() if a.size and a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        # transparent pixels over white, as a viewer shows them
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im if im.mode == "RGB" else im.convert("RGB")


def resize_size(resolution: int) -> int:
    """The shorter side an image is resized to before the centre crop: resolution / 0.875, rounded down
    (256 for 224, 182 for 160).  Down, as timm computes it from ``pretrained_cfg``'s crop_pct, so a timm
    user's pipeline and ours resize to the same size (rounding to nearest gave 183 at 160)."""
    return math.floor(resolution / CROP_FRACTION)


def draft_side(resolution: int) -> int:
    """The shorter side predict lets a JPEG decode at, at least (its default; ``exact=True`` decodes whole):
    the resize size, the least that still covers the crop after the 0.875 centre crop, so the resize is
    always a reduction.  libjpeg's DCT scaling averages each 8, 4 or 2 pixel block first, a low-pass filter.
    On 195 camera photos of 5 to 26 megapixels it kept 96.41% of the exact answers (KL 0.014); twice the resize
    size, predict's earlier rule, 99.49% (KL 0.0020); TF-slim's evaluation preprocessing of these weights 60.00%
    (KL 0.91) and Keras's 37.95% (KL 1.67).  Issue 24's rule admits the coarser: it moves answers less than the
    accepted pipelines do, and a 12-megapixel photo decodes at 1/8 rather than 1/4, a fifth less CPU
    (benchmarks/results/decode_agreement.md, decode_floor.md)."""
    return resize_size(resolution)


# Above this many pixels, the resized image is not made whole (see eval_transform); 64 x the 256 x 256 of a
# 224 crop leaves every real photo on the exact path.
MAX_RESIZED_PIXELS = 1 << 22


def eval_transform(image: Image.Image | torch.Tensor, resolution: int,
                   normalization: Normalization = INCEPTION) -> torch.Tensor:
    """Resize the shorter side to resolution / 0.875, centre-crop resolution x resolution, normalise: (3, R, R)."""
    return to_tensor(eval_pixels(image, resolution), normalization)


def eval_pixels(image: Image.Image | torch.Tensor, resolution: int) -> torch.Tensor:
    """:func:`eval_transform` before normalising: the uint8 (3, R, R) crop, a quarter of the bytes to pass
    between processes.  ``image``: an RGB image or its uint8 (3, H, W) pixels (:func:`load_pixels`).

    The resize is PyTorch's antialiased bilinear kernel for uint8 pixels: the
    filter of PIL's BILINEAR (torchvision's Resize) to within one grey level,
    about three times faster (0.34 against 1.0 ms for a 500x375 photo).  When
    the resized image would be huge (a 1 x 100000 strip would ask for
    gigabytes), only the crop's source box is resized, by PIL: the same scale
    and offsets, so the same pixels to within two grey levels (one on most sizes).
    """
    w, h = (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size
    new_w, new_h, left, top = _resized_box(w, h, resolution, resize_size(resolution))
    if new_w * new_h <= MAX_RESIZED_PIXELS:
        return resize_crop(image if isinstance(image, torch.Tensor) else pixels(image), resolution,
                           resize_size(resolution))
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).numpy())
    sx, sy = new_w / w, new_h / h  # the scale actually applied on each axis, after rounding
    box = (left / sx, top / sy, (left + resolution) / sx, (top + resolution) / sy)
    return pixels(image.resize((resolution, resolution), Image.BILINEAR, box=box)).contiguous()


def _resized_box(w: int, h: int, resolution: int, resize: int) -> tuple[int, int, int, int]:
    """(width, height) after resizing the shorter side to ``resize``, and the crop's (left, top)."""
    # torchvision's (and so timm's) sizes and offsets to the pixel: the long side truncated, the crop's
    # offset rounded half to even; rounding either otherwise shifts the sampling grid by up to a pixel
    new_long = int(resize * max(w, h) / min(w, h))
    new_w, new_h = (new_long, resize) if w >= h else (resize, new_long)
    return new_w, new_h, int(round((new_w - resolution) / 2.0)), int(round((new_h - resolution) / 2.0))


def resize_crop(image: torch.Tensor, resolution: int, resize: int) -> torch.Tensor:
    """:func:`eval_pixels`' resize (shorter side to ``resize``, :func:`resize_size`) and centre crop of a
    (3, H, W) or (N, 3, H, W) tensor, any dtype; scriptable.

    uint8 pixels take PyTorch's antialiased bilinear uint8 kernel; float
    ones the same filter in float.  The result keeps the input's dtype.
    """
    w, h = image.shape[-1], image.shape[-2]
    new_w, new_h, left, top = _resized_box(w, h, resolution, resize)
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    resized = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    cropped = resized[:, :, top:top + resolution, left:left + resolution]
    return (cropped if image.dim() == 4 else cropped[0]).contiguous()


class EvalTransform(torch.nn.Module):
    """:func:`eval_transform` as a module that scripts (``torch.jit.script``), as torchvision's
    ``ImageClassification`` is: the transforms of a set of weights.

    Takes an RGB PIL image (eager only), uint8 pixels (3, H, W) or (N, 3, H, W)
    (0..255), or a float tensor of that shape in [0, 1] (what
    ``ToTensor`` / ``convert_image_dtype`` give); returns the normalised
    float (…, 3, R, R) crop.  PIL images and uint8 pixels give exactly
    :func:`eval_transform`'s values.
    """

    def __init__(self, resolution: int, normalization: Normalization = INCEPTION):
        super().__init__()
        self.resolution, self.resize = int(resolution), resize_size(resolution)
        self.mean, self.std = list(normalization.mean), list(normalization.std)
        scale, shift = affine(normalization)
        # (x / 255 - mean) / std = x * scale - shift: eval_transform's constants, so its exact values
        self.register_buffer("scale", scale.clone(), persistent=False)
        self.register_buffer("shift", shift.clone(), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not isinstance(img, torch.Tensor) or (img.dtype == torch.uint8 and img.dim() == 3):
                return self._eager(img)  # eval_transform itself, with its path for huge images
        if img.dtype == torch.uint8:
            return resize_crop(img, self.resolution, self.resize).to(torch.float32).mul_(self.scale).sub_(self.shift)
        if not img.is_floating_point():
            raise TypeError(f"expected uint8 pixels or a float image in [0, 1], got {img.dtype}")
        # float in [0, 1]: 255 x the uint8 scale, computed in float64 then rounded like the uint8 constants
        scale = (self.scale.double() * 255.0).to(img.dtype)
        return resize_crop(img, self.resolution, self.resize) * scale - self.shift.to(img.dtype)

    @torch.jit.unused
    def _eager(self, img) -> torch.Tensor:
        return eval_transform(img, self.resolution, Normalization(tuple(self.mean), tuple(self.std)))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.resolution}, resize_size={self.resize}, "
                f"mean={self.mean}, std={self.std}, interpolation=bilinear, antialias=True)")

    def describe(self) -> str:
        """A line for documentation, in the words of torchvision's ``ImageClassification.describe``."""
        return (f"Accepts PIL.Image, batched (B, C, H, W) and single (C, H, W) image torch.Tensor objects. "
                f"The images are resized to resize_size={[self.resize]} using "
                f"interpolation=bilinear (antialiased), followed by a central crop of crop_size={[self.resolution]}. "
                f"uint8 values are rescaled to [0.0, 1.0], then normalized using mean={self.mean} and std={self.std}.")


def pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image's uint8 pixels as (3, H, W): a view of one (H, W, 3) copy, so channels-last in memory
    (what PyTorch's uint8 resize kernel is fastest on)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def to_tensor(image: Image.Image | torch.Tensor, normalization: Normalization = INCEPTION) -> torch.Tensor:
    """(x / 255 - mean) / std as a float tensor, from an RGB image or uint8 (3, H, W) / (N, 3, H, W) pixels."""
    if isinstance(image, Image.Image):
        image = pixels(image)
    scale, shift = affine(normalization)
    # uint8 made contiguous first (a quarter of the bytes to move), then one multiply and one subtract in place
    return image.contiguous().to(torch.float32).mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=8)
def affine(normalization: Normalization) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std = x * scale - shift, per channel."""
    std = np.asarray(normalization.std, dtype=np.float64)
    scale = torch.from_numpy((1.0 / (255.0 * std)).astype(np.float32)).view(3, 1, 1)
    shift = torch.from_numpy((np.asarray(normalization.mean, dtype=np.float64) / std).astype(np.float32)).view(3, 1, 1)
    return scale, shift


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly under (and below) ``directory``, sorted; a clear error when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {directory}")
    return files


def warn_skipped(path: Path, error: Exception) -> None:
    warnings.warn(printable(f"skipping {path}: {error}"), stacklevel=2)
