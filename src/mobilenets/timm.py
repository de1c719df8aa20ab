"""mobilenets' MobileNet v1 in timm's model registry: ``timm.create_model("mobilenets_v1_100", ...)``.

Importing this module registers one timm architecture per released width
(``mobilenets_v1_100``, ``_075``, ``_050``, ``_025``: alpha x 100, as timm
names widths), each with one pretrained tag per released resolution,
``keras_in1k_r224`` (the default), ``_r192``, ``_r160`` and ``_r128``: the
Keras release of Google's ImageNet-1k weights (``mobilenets.weights.WEIGHTS``).
The prefix keeps them apart from timm's own ``mobilenetv1_*``, which are
different weights.

You rarely import it yourself: ``import mobilenets`` registers the family the
moment timm is imported (at once if timm is already loaded), without
importing timm itself, so ``import mobilenets`` stays as fast as before and
timm stays optional (see :func:`register_when_timm_is_imported`).

``timm.create_model(name, **kwargs)`` builds the model with
:func:`mobilenets.mobilenet_v1`, which takes every model argument
(``num_classes``, ``in_chans``, ``global_pool``, ``drop_rate``,
``features_only``, ``out_indices``, ``output_stride``, ``device``, ``dtype``;
anything else raises ``TypeError``).  ``pretrained=True`` loads
``weights="imagenet"`` at the tag's resolution through mobilenets' own
loader (downloaded and converted once into the mobilenets cache, see
``mobilenets.cache``), not through timm's.  Models use TensorFlow's SAME
padding, which the released weights need, with or without ``pretrained``.
timm's own arguments: ``pretrained_cfg`` (a tag, dict or PretrainedCfg: its
input size picks the resolution), ``pretrained_cfg_overlay`` (merged into
``model.pretrained_cfg``, except the keys the model derives from its
``meta`` and config: preprocessing, input size, head) and ``feature_cls`` (only "getter": the backbone
runs ``forward_intermediates``, as timm's FeatureGetterNet does).
``cache_dir`` is refused: mobilenets' weights live in its own cache.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg

from .builders import mobilenet_v1
from .errors import ParameterError
from .weights.registry import ALPHAS, RESOLUTIONS, WEIGHTS

PREFIX = "mobilenets_v1_"
TAG = "keras_in1k_r{resolution}"
# the first resolution is each architecture's default tag
_TAGS = {resolution: TAG.format(resolution=resolution) for resolution in RESOLUTIONS}


def model_name(alpha: float, resolution: int | None = None) -> str:
    """timm's name for ``alpha`` (and the tag for ``resolution``): ``mobilenets_v1_075.keras_in1k_r160``."""
    name = f"{PREFIX}{round(alpha * 100):03d}"
    return name if resolution is None else f"{name}.{_TAGS[resolution]}"


def _cfg(alpha: float, resolution: int) -> dict:
    weights = WEIGHTS[(alpha, resolution)]
    return {
        **weights.pretrained_cfg,
        "url": weights.url,  # for timm's listings (list_models(pretrained=True)); loading goes through mobilenets
        "license": "apache-2.0",
        "origin_url": "https://github.com/keras-team/keras-applications",
        "paper_ids": "arXiv:1704.04861",
        "paper_name": "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
    }


default_cfgs = generate_default_cfgs(
    {model_name(alpha, resolution): _cfg(alpha, resolution) for alpha in ALPHAS for resolution in RESOLUTIONS}
)


def _create(variant: str, alpha: float, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
            cache_dir=None, feature_cls: str | None = None, feature_cfg: dict | None = None, **kwargs):
    if cache_dir is not None:
        raise ParameterError("cache_dir: mobilenets keeps its weights in its own cache ($MOBILENETS_CACHE), "
                             "leave cache_dir out")
    feature_cfg = dict(feature_cfg or {})
    feature_cls = feature_cfg.pop("feature_cls", feature_cls)
    if "out_indices" in feature_cfg:
        kwargs.setdefault("out_indices", feature_cfg.pop("out_indices"))
    if feature_cfg:
        raise TypeError(f"{variant}: unsupported feature_cfg keys {sorted(feature_cfg)}; only out_indices and "
                        f"feature_cls='getter' are")
    if feature_cls not in (None, "getter"):
        raise ParameterError(f"{variant}: feature_cls={feature_cls!r} is not supported; the backbone always runs "
                             f"forward_intermediates (timm's 'getter'), leave feature_cls out")
    # the registry's cfg for the tag (timm resolves tags, dicts and overlays); its input size is the resolution
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    kwargs.setdefault("padding", "tf_same")
    model = mobilenet_v1(alpha, weights="imagenet" if pretrained else None, resolution=cfg.input_size[-1],
                         **kwargs)
    # timm's identity keys (architecture, tag, url, license, ...); the model derives the keys that describe
    # it (preprocessing, input size, head) from its meta and config, and those win
    model.pretrained_cfg = cfg.to_dict()
    return model


def _entrypoint(alpha: float):
    name = model_name(alpha)

    def create(pretrained: bool = False, **kwargs):
        return _create(name, alpha, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__doc__ = (f"MobileNet v1, alpha {alpha:g} (mobilenets); pretrained: ImageNet-1k weights of the Keras "
                      f"release at the tag's resolution ({', '.join(map(str, RESOLUTIONS))}).")
    return create


for _alpha in ALPHAS:
    globals()[model_name(_alpha)] = register_model(_entrypoint(_alpha))
