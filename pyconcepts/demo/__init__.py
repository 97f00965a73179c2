"""The built-in demo: a small CNN trained on the shapes images, shipped with the package."""
from .model import DEMO_LAYER, ShapesNet

__all__ = ["DEMO_LAYER", "ShapesNet"]
