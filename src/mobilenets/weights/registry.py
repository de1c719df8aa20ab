"""The released ImageNet weights: one typed entry per alpha x resolution, the one place their facts live.

Each :class:`Weights` names the Keras file and its URL, the preprocessing the
weights were trained with (Inception normalisation x/127.5 - 1, resize by
1/0.875 and centre-crop, bilinear), the 1000 ImageNet labels and the
published ImageNet top-1 of the TF-slim 2018 release, float and 8-bit, and
its float top-5 (docs/published.md).  ``paper.py`` and the benchmark picker
read the accuracy from here; ``download.pretrained`` reads the file names;
``mobilenets.models.MobileNet_V1_Weights`` (torchvision's weights enum) is
built from these entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..images import CROP_FRACTION, INCEPTION, EvalTransform, Normalization
from ..metadata import Metadata
from .layout import WeightsError, imagenet_labels

ALPHAS = (1.0, 0.75, 0.5, 0.25)
RESOLUTIONS = (224, 192, 160, 128)
KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
# keras.applications.mobilenet names alpha 0.75 "7_5" and so on
KERAS_ALPHAS = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}

# TF-slim 2018 releases (research/slim/nets/mobilenet_v1.md), ImageNet (%):
# {(alpha, resolution): (float top-1, int8 top-1, float top-5)}; docs/published.md.
_PUBLISHED = {
    (1.0, 224): (70.9, 69.7, 89.9), (1.0, 192): (70.0, 69.0, 89.2), (1.0, 160): (68.0, 67.3, 87.7),
    (1.0, 128): (65.2, 64.0, 85.8),
    (0.75, 224): (68.4, 67.9, 88.2), (0.75, 192): (67.2, 66.2, 87.3), (0.75, 160): (65.3, 63.9, 86.0),
    (0.75, 128): (62.1, 59.8, 83.9),
    (0.5, 224): (63.3, 62.2, 84.9), (0.5, 192): (61.7, 60.4, 83.6), (0.5, 160): (59.1, 57.7, 81.9),
    (0.5, 128): (56.3, 54.9, 79.4),
    (0.25, 224): (49.8, 48.2, 74.2), (0.25, 192): (47.7, 45.8, 72.3), (0.25, 160): (45.5, 43.5, 70.3),
    (0.25, 128): (41.5, 39.9, 66.3),
}
# Where the recipe of these weights is written: TF-slim's MobileNet v1 page (training and 8-bit scripts).
RECIPE = "https://github.com/tensorflow/models/blob/master/research/slim/nets/mobilenet_v1.md"
# The name of the torchvision-style enum (mobilenets.models.MobileNet_V1_Weights) and its default member.
ENUM_NAME = "MobileNet_V1_Weights"
DEFAULT = (1.0, 224)


@dataclass(frozen=True)
class Weights:
    """One released set of ImageNet weights (Keras ``keras.applications.MobileNet``, converted once)."""

    alpha: float
    resolution: int
    top1: float  # published ImageNet top-1 (%), float model
    top1_int8: float  # published ImageNet top-1 (%), the 8-bit release
    top5: float  # published ImageNet top-5 (%), float model
    # Keras publishes no digests for these files (keras.applications downloads them unchecked), so
    # none is pinned: download.verify_sha256 records the first download's digest and checks it after
    # (trust on first use). Set a hex digest here to pin a file.
    sha256: str | None = None
    normalization: Normalization = INCEPTION
    crop_pct: float = CROP_FRACTION
    interpolation: str = "bilinear"
    num_classes: int = 1000

    @property
    def name(self) -> str:
        return f"mobilenet_v1_{self.alpha:g}_{self.resolution}"

    @property
    def enum_name(self) -> str:
        """The member's name in :data:`ENUM_NAME` (torchvision's upper-case style): IMAGENET1K_0_75_192."""
        return f"IMAGENET1K_{str(self.alpha).replace('.', '_')}_{self.resolution}"

    @property
    def keras_file(self) -> str:
        return f"mobilenet_{KERAS_ALPHAS[self.alpha]}_{self.resolution}_tf.h5"

    @property
    def url(self) -> str:
        return KERAS_BASE_URL + self.keras_file

    @property
    def labels(self) -> list[str]:
        return imagenet_labels()

    def transforms(self) -> EvalTransform:
        """The exact evaluation preprocessing as a module that scripts: resize the short side to
        resolution / 0.875 (bilinear), centre-crop resolution x resolution, normalise with mean = std = 0.5."""
        return EvalTransform(self.resolution, self.normalization)

    @property
    def meta(self) -> Metadata:
        """What a model loaded from these weights carries as ``model.meta``."""
        return Metadata(resolution=self.resolution, normalization=self.normalization, labels=self.labels,
                        source=f"keras:{self.keras_file}", crop_pct=self.crop_pct, interpolation=self.interpolation)

    @property
    def pretrained_cfg(self) -> dict:
        """The same preprocessing in timm's ``pretrained_cfg`` keys."""
        return self.meta.pretrained_cfg(self.num_classes)


WEIGHTS: dict[tuple[float, int], Weights] = {
    (alpha, resolution): Weights(alpha, resolution, *_PUBLISHED[(alpha, resolution)])
    for alpha in ALPHAS for resolution in RESOLUTIONS
}


def get(alpha: float, resolution: int) -> Weights:
    """The released weights for ``alpha`` x ``resolution``; a clear error for sizes that were never released."""
    try:
        return WEIGHTS[(float(alpha), int(resolution))]
    except (KeyError, TypeError, ValueError):
        raise WeightsError(
            f"ImageNet weights exist for alpha in {sorted(ALPHAS)} and resolution in {list(RESOLUTIONS)}; "
            f"got alpha={alpha!r}, resolution={resolution!r} (use weights=None for other sizes, or another "
            f"pretrained size and a different input size)") from None


def released(weights) -> Weights | None:
    """The entry named by a member of the torchvision-style enum or its name ("MobileNet_V1_Weights.NAME",
    NAME being an :attr:`Weights.enum_name` or DEFAULT), else None (a path, "imagenet", None).

    Read by name, so the builders need not import torchvision to accept one.
    """
    if isinstance(weights, Enum) and type(weights).__name__ == ENUM_NAME:
        name = weights.name
    elif isinstance(weights, str) and weights.startswith(ENUM_NAME + "."):
        name = weights[len(ENUM_NAME) + 1:]
    else:
        return None
    by_name = {w.enum_name: w for w in WEIGHTS.values()} | {"DEFAULT": WEIGHTS[DEFAULT]}
    if name not in by_name:
        raise WeightsError(f"{weights!r} names no released weights; choose one of "
                           f"{', '.join(ENUM_NAME + '.' + n for n in by_name)}")
    return by_name[name]


def published_top1() -> dict[tuple[float, int], tuple[float, float]]:
    """{(alpha, resolution): (float top-1, int8 top-1)} of the 16 released models, in percent."""
    return {key: (w.top1, w.top1_int8) for key, w in WEIGHTS.items()}
