"""MobileNet v1 in torchvision's shape: the weights enum and a keyword-only builder.

``MobileNet_V1_Weights`` is torchvision's ``WeightsEnum``, one member per
released model, ``IMAGENET1K_<alpha>_<resolution>`` (``IMAGENET1K_1_0_224``,
``IMAGENET1K_0_75_192``, ...; ``DEFAULT`` is 1.0-224), each built from its
entry in :mod:`mobilenets.weights.registry`: ``.url``, ``.transforms`` (an
:class:`~mobilenets.images.EvalTransform`, which scripts) and ``.meta`` with
the keys torchvision's schema asks of a classification model.  So
``torchvision.models.get_model_weights(mobilenet_v1)`` finds it, and the
members pickle and copy to themselves.  This module imports torchvision
(about a second), so the rest of the package does not import it.
"""

# no `from __future__ import annotations`: torchvision.models.get_model_weights reads the `weights`
# annotation as an object, to find the enum
from functools import partial
from typing import Any

from torchvision.models import Weights, WeightsEnum

from .. import architecture, builders
from ..cost import cost
from ..images import EvalTransform
from ..model import MobileNetV1
from ..weights import registry


def _weights(entry: registry.Weights) -> Weights:
    preprocessing = entry.meta  # the Metadata a model loaded from these weights carries
    counted = cost(entry.alpha, preprocessing.resolution, num_classes=entry.num_classes)
    meta: dict[str, Any] = {
        "categories": list(preprocessing.labels),
        "num_params": counted.trainable_params,
        "min_size": (architecture.MIN_RESOLUTION, architecture.MIN_RESOLUTION),
        "recipe": registry.RECIPE,
        "_metrics": {"ImageNet-1K": {"acc@1": entry.top1, "acc@5": entry.top5}},
        # torchvision's _ops: GFLOPs counted one per multiply-add, at the crop size its transforms give
        "_ops": round(counted.mult_adds / 1e9, 3),
        # no _file_size: Keras publishes neither sizes nor digests of these files (docs/weights.md)
        "_docs": (f"Google's MobileNet v1 {entry.alpha:g}-{preprocessing.resolution}, TF-slim's 2018 release as "
                  f"keras.applications.MobileNet publishes it, converted on first use. The 8-bit release "
                  f"of the same model has top-1 {entry.top1_int8:g}%."),
    }
    # a partial, as torchvision's own entries: its Weights.__eq__ compares partials by their arguments,
    # which is what lets a member be unpickled and deep-copied to itself
    return Weights(url=entry.url, meta=meta,
                   transforms=partial(EvalTransform, preprocessing.resolution, preprocessing.normalization))


_MEMBERS = {entry.enum_name: _weights(entry) for entry in registry.WEIGHTS.values()}
# DEFAULT has the value of the default entry, so Enum makes it an alias of that member, as torchvision's are
MobileNet_V1_Weights = WeightsEnum(
    registry.ENUM_NAME, [*_MEMBERS.items(), ("DEFAULT", _MEMBERS[registry.WEIGHTS[registry.DEFAULT].enum_name])],
    module=__name__, qualname=registry.ENUM_NAME)


def mobilenet_v1(*, weights: MobileNet_V1_Weights | None = None, progress: bool = True, **kwargs: Any) -> MobileNetV1:
    """MobileNet v1 (Howard et al., 2017, arXiv:1704.04861), torchvision's builder signature.

    ``weights``: a :class:`MobileNet_V1_Weights` member or its name
    ("MobileNet_V1_Weights.IMAGENET1K_0_5_160", "MobileNet_V1_Weights.DEFAULT"),
    or None for a fresh model.  ``kwargs`` are :func:`mobilenets.mobilenet_v1`'s
    (``alpha``, ``num_classes``, ``dropout``, ...); with weights, ``alpha``
    and the resolution come from them.
    """
    return builders.mobilenet_v1(weights=MobileNet_V1_Weights.verify(weights), progress=progress, **kwargs)
