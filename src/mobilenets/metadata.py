"""What a set of weights needs beside its tensors: one typed record, read by every path.

``resolution`` and ``normalization`` are the evaluation preprocessing the
weights were trained with, ``labels`` name the classes, ``source`` says where
the weights came from, and ``int8`` holds the int8-ready data that
``mobilenets quantize`` adds (activation ranges, equalization scales; checked
against the model by ``quantize.from_model`` when used).  Every model carries
one as ``model.meta``; files, checkpoints, exports, timm's ``pretrained_cfg``
and the torchvision-style enum's ``meta`` are all written from it, and every
reader builds one with :meth:`Metadata.from_dict`, so a claim is checked in
one place.
"""

from dataclasses import dataclass, replace

from .architecture import MIN_RESOLUTION, RESOLUTION_RANGE, resolution_ok
from .checks import is_number
from .errors import MetadataError
from .images import CROP_FRACTION, INCEPTION, Normalization

DEFAULT_RESOLUTION = 224
# keys older files carry beside the fields: alpha (the config holds it), which weights a checkpoint kept
# (model or EMA), the tensors' digest (checked by the reader that recorded it)
_INFORMATIONAL = ("alpha", "weights", "sha256")
# A std this small turns a grey level into a value beyond float32's useful range for the first layer.
MIN_STD = 1e-3
MAX_MEAN = 1e3


def check_normalization(normalization, name: str = "<weights>") -> Normalization:
    """A :class:`Normalization` from itself or ``{"mean": [3 numbers], "std": [3 positive numbers]}``."""
    if isinstance(normalization, Normalization):
        d = normalization.to_dict()
    else:
        d = normalization
    ok = isinstance(d, dict) and all(
        isinstance(d.get(k), (list, tuple)) and len(d[k]) == 3
        and all(is_number(v) for v in d[k])
        for k in ("mean", "std"))
    if not ok or not all(MIN_STD <= v for v in d["std"]) or not all(abs(v) <= MAX_MEAN for v in d["mean"]):
        raise MetadataError(f"{name}: normalization must be {{'mean': [3 finite numbers], 'std': [3 numbers "
                            f">= {MIN_STD:g}]}} of x/255, got {str(d)[:80]}")
    return Normalization(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


@dataclass(frozen=True)
class Metadata:
    """The preprocessing, labels, provenance and int8 data of one set of weights."""

    resolution: int = DEFAULT_RESOLUTION
    normalization: Normalization = INCEPTION
    labels: tuple[str, ...] | None = None
    source: str = "initialised"
    int8: dict | None = None
    crop_pct: float = CROP_FRACTION
    interpolation: str = "bilinear"

    def __post_init__(self):
        if not resolution_ok(self.resolution):
            raise MetadataError(f"resolution must be {RESOLUTION_RANGE}, got {self.resolution!r}")
        object.__setattr__(self, "normalization", check_normalization(self.normalization, "metadata"))
        if self.labels is not None:
            if isinstance(self.labels, str) or not all(isinstance(x, str) for x in self.labels):
                raise MetadataError(f"labels must be None or a list of class names (strings), "
                                    f"got {str(self.labels)[:80]}")
            object.__setattr__(self, "labels", tuple(self.labels))
        if not isinstance(self.source, str):
            raise MetadataError(f"source must be a string, got {type(self.source).__name__}")
        if self.int8 is not None and not isinstance(self.int8, dict):
            raise MetadataError(f"int8 metadata must be an object (ranges and scales), got {type(self.int8).__name__}")
        if not (isinstance(self.crop_pct, float) and 0 < self.crop_pct <= 1):
            raise MetadataError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    def to_dict(self) -> dict:
        """JSON-ready: what files and checkpoints store."""
        d = {"resolution": self.resolution, "normalization": self.normalization.to_dict(),
             "labels": list(self.labels) if self.labels is not None else None, "source": self.source}
        if self.int8:
            d["int8"] = self.int8
        return d

    @classmethod
    def from_dict(cls, d, name: str = "<weights>", *, num_classes: int | None = None) -> "Metadata":
        """A stored record, every field checked; ``num_classes`` checks the labels against the head."""
        if not isinstance(d, dict):
            raise MetadataError(f"{name}: metadata must be an object, got {type(d).__name__}")
        known = ("resolution", "normalization", "labels", "source", "int8")
        unknown = [k for k in d if k not in known and k not in _INFORMATIONAL]
        if unknown:
            raise MetadataError(f"{name}: unknown metadata {sorted(unknown)[:5]}; known: {list(known)}")
        try:
            meta = cls(resolution=d.get("resolution") or DEFAULT_RESOLUTION,
                       normalization=d.get("normalization") or INCEPTION,
                       labels=d.get("labels"), source=d.get("source") or "", int8=d.get("int8") or None)
        except MetadataError as e:
            raise MetadataError(f"{name}: {e}") from None
        if num_classes is not None:
            meta.check_labels(num_classes, name)
        return meta

    def check_labels(self, num_classes: int, name: str = "<weights>") -> "Metadata":
        if self.labels is not None and len(self.labels) != num_classes:
            raise MetadataError(f"{name}: labels must be null or {num_classes} strings, one per class "
                                f"(got {len(self.labels)})")
        return self

    def for_head(self, num_classes: int) -> "Metadata":
        """The record after the classifier was replaced: labels only if they still name every class, and no
        int8 data (its ranges describe the old head)."""
        labels = self.labels if self.labels is not None and len(self.labels) == num_classes else None
        return replace(self, labels=labels, int8=None)

    def pretrained_cfg(self, num_classes: int, output_stride: int | None = None, in_chans: int = 3) -> dict:
        """timm's ``pretrained_cfg`` keys, so ``timm.data.resolve_data_config(model=m)`` sees this preprocessing."""
        pool = -(-self.resolution // (output_stride or 32))
        return {
            "input_size": (in_chans, self.resolution, self.resolution),
            "min_input_size": (in_chans, MIN_RESOLUTION, MIN_RESOLUTION),
            "interpolation": self.interpolation,
            "mean": tuple(self.normalization.mean),
            "std": tuple(self.normalization.std),
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "num_classes": num_classes,
            "pool_size": (pool, pool),
            "first_conv": "features.0.conv",
            "classifier": "classifier",
        }


def of(model) -> Metadata:
    """``model.meta``, or a fresh record for a module that has none (a user's subclass, an unpickled model)."""
    meta = getattr(model, "meta", None)
    return meta if isinstance(meta, Metadata) else Metadata()
