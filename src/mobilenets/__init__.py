"""MobileNet v1 (Howard et al., 2017): any width alpha and resolution, with its exact cost."""

from .architecture import CONV_DEFS, body, depth
from .builders import load, mobilenet_v1, save
from .cost import cost, measure
from .model import MobileNetV1, MobileNetV1Config

__version__ = "0.1.0"

__all__ = ["CONV_DEFS", "MobileNetV1", "MobileNetV1Config", "body", "cost", "depth", "load", "measure",
           "mobilenet_v1", "save"]
