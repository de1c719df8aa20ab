"""The models in torchvision's shape (``torchvision.models``' layout): weights enums and keyword-only builders.

Imported on demand (``import mobilenets.models``): it imports torchvision.
"""

from .mobilenetv1 import MobileNet_V1_Weights, mobilenet_v1

__all__ = ["MobileNet_V1_Weights", "mobilenet_v1"]
