"""Image folders, the built-in data set, and the transforms per resolution.

A data set here yields ``(image tensor, class index)`` for an integer key, or
for an ``(index, seed)`` key during training: the seed drives that sample's
augmentation, so the crop and flip of every image depend only on the run's
seed, the epoch and the image, not on worker count, rank or where a run was
resumed.  A file that cannot be decoded yields a :class:`Skipped` record
instead of failing the epoch; :func:`collate` drops it and passes its path on,
so the trainer can warn once per file and count them.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import images
from .cores import MAX_WORKERS  # noqa: F401  (data.MAX_WORKERS: the bound, named where loaders use it)
from .errors import MobilenetsError, ParameterError
from .images import INCEPTION, ImageError, Normalization



class DataError(MobilenetsError):
    """An image folder that cannot be used as a data set; the message says which folder and what would work."""



BUILTIN = "digits"  # the name the built-in set goes by in checkpoints and metrics
BUILTIN_VAL_FRACTION = 0.2
BUILTIN_SPLIT_SEED = 0  # fixed: the held-out digits are the same for every run


@dataclass(frozen=True)
class Skipped:
    """A sample whose file could not be decoded."""

    path: str
    error: str


# ---------------------------------------------------------------- transforms


def default_min_scale(alpha: float) -> float:
    """Smallest crop area for training, as a fraction of the image.

    Inception's crop takes 8% to 100% of the image; the paper trains small
    MobileNets with "less regularization and data augmentation techniques
    because small models have less trouble with overfitting", so the range
    narrows linearly as alpha falls: 0.08 at alpha >= 1, 0.35 at alpha 0.25.
    """
    return round(min(0.35, 0.08 + max(0.0, 1.0 - alpha) * 0.36), 4)


@dataclass(frozen=True)
class TrainTransform:
    """Inception-style training crop: random area in [min_scale, 1] and aspect in [3/4, 4/3], resized to
    resolution x resolution, then a horizontal flip with probability ``hflip``, then normalisation."""

    resolution: int
    min_scale: float = 0.08
    hflip: float = 0.5
    normalization: Normalization = INCEPTION

    def __post_init__(self):
        if not 0 < self.min_scale <= 1:
            raise ParameterError(f"min_scale must be in (0, 1], e.g. 0.08 (Inception) or 0.35 (mild); got {self.min_scale}")
        if not 0 <= self.hflip <= 1:
            raise ParameterError(f"hflip must be a probability in [0, 1], got {self.hflip}")

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height); after 10 failed draws, the centre crop of the clamped aspect."""
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * rng.uniform(self.min_scale, 1.0)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, width - w), rng.randint(0, height - h), w, h
        aspect = width / height
        if aspect < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif aspect > 4 / 3:
            w, h = int(round(height * (4 / 3))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def min_side(self, width: int, height: int) -> int:
        """The shorter side a JPEG may be decoded at: its smallest possible crop (area min_scale, aspect 3:4)
        still covers resolution pixels, so reduced-scale decoding never lowers the detail of what is kept."""
        smallest_crop_side = math.sqrt(self.min_scale * width * height * 3 / 4)
        return math.ceil(min(width, height) * self.resolution / max(smallest_crop_side, 1))

    def crop_min_side(self, box: tuple[int, int, int, int], width: int, height: int) -> int:
        """The shorter side the image may be decoded at for this one crop: the crop still covers resolution
        pixels.  Most crops are far larger than the smallest one, so this allows more than :meth:`min_side`."""
        return math.ceil(min(width, height) * self.resolution / max(min(box[2], box[3]), 1))

    def resized_crop(self, image: Image.Image | torch.Tensor, box: tuple[int, int, int, int],
                     size: tuple[int, int], rng: random.Random) -> torch.Tensor:
        """Crop ``box`` (drawn on an image of ``size``; ``image``, an RGB image or its uint8 (3, H, W) pixels,
        may be a reduced-scale decoding of it), resize to resolution, flip, normalise."""
        px = image if isinstance(image, torch.Tensor) else images.pixels(image)
        height, width = px.shape[-2:]
        left, top, w, h = box
        sx, sy = width / size[0], height / size[1]
        x0, y0 = min(round(left * sx), width - 1), min(round(top * sy), height - 1)
        x1, y1 = max(x0 + 1, round((left + w) * sx)), max(y0 + 1, round((top + h) * sy))
        # PyTorch's antialiased bilinear resize of uint8 channels-last pixels: the filter PIL's BILINEAR
        # applies (torchvision's RandomResizedCrop), about twice as fast (benchmarks/train_input.py)
        crop = px[None, :, y0:y1, x0:x1]
        x = F.interpolate(crop, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                          align_corners=False)[0]
        if rng.random() < self.hflip:
            x = x.flip(-1)
        return images.to_tensor(x, self.normalization)

    def __call__(self, image: Image.Image | torch.Tensor, rng: random.Random) -> torch.Tensor:
        size = (image.shape[-1], image.shape[-2]) if isinstance(image, torch.Tensor) else image.size
        return self.resized_crop(image, self.crop_box(*size, rng), size, rng)


@dataclass(frozen=True)
class EvalTransform:
    """images.eval_transform as a callable: resize to resolution / 0.875, centre crop, normalise."""

    resolution: int
    normalization: Normalization = INCEPTION

    def min_side(self, width: int, height: int) -> None:
        # evaluation decodes exactly: it scores the weights with the preprocessing timm and torchvision
        # users run (to within a grey level); predict's reduced scale moves a few answers of the 195 photos
        # in benchmarks/results/decode_agreement.md, and an accuracy should not move with the photo size
        return None

    def __call__(self, image: Image.Image | torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        return images.eval_transform(image, self.resolution, self.normalization)


# ---------------------------------------------------------------- data sets


class _Samples(list):
    """The samples of one batch and the CPU seconds their loading took (for :func:`collate`)."""

    seconds: float = 0.0


class _Dataset(torch.utils.data.Dataset):
    classes: list[str]
    transform: TrainTransform | EvalTransform
    in_memory: bool = False  # True when the pixels are already decoded: loading costs no decoding

    def __getitems__(self, keys) -> _Samples:
        # the DataLoader fetches a batch through here; thread CPU time, so a busy machine does not inflate it
        start = time.thread_time()
        samples = _Samples(self[k] for k in keys)
        samples.seconds = time.thread_time() - start
        return samples

    def __len__(self) -> int:
        return len(self.targets)

    def _load(self, index: int) -> Image.Image | torch.Tensor:
        raise NotImplementedError

    def _sample(self, index: int, rng: random.Random) -> torch.Tensor:
        return self.transform(self._load(index), rng)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = random.Random(seed) if seed is not None else random.Random(index)
        try:
            x = self._sample(index, rng)
        except ImageError as e:
            return Skipped(str(self.paths[index]), str(e))
        return x, self.targets[index]


class ImageFolder(_Dataset):
    """``root/<class>/<image>``: one folder per class, classes in sorted order (torchvision's layout).

    ``classes`` fixes the class list and its order (a validation folder must
    use its training folder's); a folder with no images is an error, so a typo
    in a class name cannot silently shift every label.
    """

    def __init__(self, root: str | Path, transform, classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory; expected one folder per class, {root}/<class>/*.jpg")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DataError(f"{root} has no class folders; expected one folder per class, {root}/<class>/*.jpg")
        if classes is not None and found != sorted(classes):
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            differences = [f"missing {missing}"] * bool(missing) + [f"not in training {extra}"] * bool(extra)
            raise DataError(f"the classes in {root} differ from the training classes: {'; '.join(differences)}; "
                             f"every split needs the same class folders")
        self.root = root
        self.classes = list(classes) if classes is not None else found
        self.transform = transform
        self.paths: list[Path] = []
        self.targets: list[int] = []
        for target, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).rglob("*")
                           if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in images.IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"class folder {root / name} has no images ({', '.join(images.IMAGE_EXTENSIONS)}); "
                                 f"add images or remove the folder")
            self.paths += files
            self.targets += [target] * len(files)

    def _load(self, index: int) -> torch.Tensor:
        return images.load_pixels(self.paths[index], min_side=self.transform.min_side)

    def _sample(self, index: int, rng: random.Random) -> torch.Tensor:
        if not isinstance(self.transform, TrainTransform):
            return super()._sample(index, rng)
        # the crop is drawn from the header's size first, so the JPEG is decoded at the smallest scale this
        # crop allows (a 4000x3000 photo mostly at 1/4 or 1/8); the same crop as from the full decoding
        drawn: dict = {}

        def crop_min_side(width: int, height: int) -> int:
            drawn["size"] = (width, height)
            drawn["box"] = self.transform.crop_box(width, height, rng)
            return self.transform.crop_min_side(drawn["box"], width, height)

        image = images.load_pixels(self.paths[index], min_side=crop_min_side)
        if not drawn:  # not a JPEG: decoded whole, the crop drawn from its size, as above
            return self.transform(image, rng)
        return self.transform.resized_crop(image, drawn["box"], drawn["size"], rng)


def _digits_images(resolution: int) -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 8x8 scans with 17 grey levels, shipped inside scikit-learn: no download
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    scaled = [Image.fromarray(p, "L").resize((resolution, resolution), Image.BICUBIC).convert("RGB") for p in pixels]
    return scaled, digits.target


def _digits_split(targets: np.ndarray) -> dict[str, np.ndarray]:
    """A stratified split with a fixed seed: 20% of every digit is held out, the same for every run."""
    rng = np.random.default_rng(BUILTIN_SPLIT_SEED)
    val = []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        val += list(rng.permutation(idx)[: int(round(len(idx) * BUILTIN_VAL_FRACTION))])
    is_val = np.zeros(len(targets), bool)
    is_val[val] = True
    return {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}


class Digits(_Dataset):
    """The built-in data set: scikit-learn's handwritten digits (real scans, 10 classes), scaled to ``resolution``.

    ``split`` is "train" (1,438 images) or "val" (359 held out: 20% of each digit, rounded).
    """

    in_memory = True

    def __init__(self, split: str, resolution: int, transform):
        if split not in ("train", "val"):
            raise ParameterError(f"split must be 'train' or 'val', got {split!r}")
        pictures, targets = _digits_images(resolution)
        keep = _digits_split(targets)[split]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform
        self.images = [pictures[i] for i in keep]
        self.targets = [int(targets[i]) for i in keep]
        self.paths = [f"<digits {split} #{i}>" for i in keep]

    def _load(self, index: int) -> Image.Image:
        return self.images[index]


def splits(data: str | Path | None, resolution: int, *, train_transform, eval_transform):
    """(train, val) data sets: ``data/train`` and ``data/val`` image folders, or the built-in digits for None.

    Every layout problem (missing folder, empty class, different classes) is
    raised here, before any training starts.
    """
    if data is None:
        return Digits("train", resolution, train_transform), Digits("val", resolution, eval_transform)
    check_layout(data)
    train = ImageFolder(Path(data) / "train", train_transform)
    val = ImageFolder(Path(data) / "val", eval_transform, classes=train.classes)
    return train, val


def check_layout(data: str | Path) -> None:
    """Refuse a ``data`` path without train/ and val/ folders: a cheap check that can run before a run starts."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data} is not a directory; expected {data}/train/<class>/* and {data}/val/<class>/*")
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise FileNotFoundError(
                f"{data} has no {split}/ folder; expected {data}/train/<class>/* and {data}/val/<class>/* "
                f"(the ImageFolder layout)")


# ---------------------------------------------------------------- sampling and batching


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch (a fixed mix, so it is the same on every machine)."""
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index


class EpochSampler(torch.utils.data.Sampler):
    """The shuffled order of one epoch, this rank's share of it, from ``start`` on; yields (index, seed) keys.

    The order depends only on (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one.  With ``world_size`` ranks each takes
    every world_size-th index, padded by wrapping so all ranks take the same
    number of steps (DistributedSampler's rule).
    """

    def __init__(self, size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.size, self.seed, self.epoch = size, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        total = math.ceil(self.size / self.world_size) * self.world_size
        # wrapped as often as it takes: with fewer images than ranks one pass does not fill every rank's share,
        # and a rank with fewer steps than the others leaves them waiting for it at every all-reduce
        order = (order * math.ceil(total / max(1, len(order))))[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        for i in self.indices()[self.start:]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, math.ceil(self.size / self.world_size) - self.start)


class ShardSampler(torch.utils.data.Sampler):
    """Every world_size-th index in order, no padding: evaluation counts each image exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class Batch(tuple):
    """``(images, targets, skipped)``, and ``seconds``: the CPU time that loading, augmenting and stacking its
    images took in the process that loaded it (what the loader's images/s per core is computed from)."""

    def __new__(cls, x, y, skipped, seconds: float = 0.0):
        batch = super().__new__(cls, (x, y, skipped))
        batch.seconds = seconds
        return batch

    def __reduce__(self):  # crosses from a worker process to the trainer
        return Batch, (*self, self.seconds)


def collate(batch) -> Batch:
    """Stack the decodable samples; returns (images, targets, skipped) where skipped lists :class:`Skipped`."""
    start = time.thread_time()
    good = [b for b in batch if not isinstance(b, Skipped)]
    skipped = [b for b in batch if isinstance(b, Skipped)]
    if not good:
        x, y = None, None
    else:
        x, y = torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good])
    return Batch(x, y, skipped, getattr(batch, "seconds", 0.0) + time.thread_time() - start)


def loader(dataset, sampler, batch_size: int, num_workers: int, *, pin_memory: bool = False,
           drop_last: bool = False):
    """A DataLoader over (index, seed) keys that never draws from the global torch RNG.

    A DataLoader draws its workers' base seed when an iterator starts; with
    its own generator that draw leaves the global RNG (dropout's) untouched,
    so stopping and resuming mid-epoch replays the same dropout masks.  The
    augmentation does not depend on the worker seeds at all.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, drop_last=drop_last, generator=torch.Generator().manual_seed(0))
