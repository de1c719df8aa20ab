"""The ImageNet-1k class names and WordNet IDs, in the order of the released weights' 1000 outputs.

Output i is ``imagenet_labels()[i]``, whose WordNet ID (the folder name in
ImageNet's own train/val layout, e.g. ``n01440764`` for tench) is
``imagenet_wnids()[i]``: the IDs sorted, as every ILSVRC-2012 model orders them.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def imagenet_labels() -> tuple[str, ...]:
    return tuple(resources.files(__package__).joinpath("data/imagenet_classes.txt").read_text().splitlines())


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    return tuple(resources.files(__package__).joinpath("data/imagenet_wnids.txt").read_text().split())
