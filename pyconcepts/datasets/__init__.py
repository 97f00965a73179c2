"""Built-in data sets. ``shapes``: procedural images made of known concepts, with masks."""
from .shapes import CLASSES, CONCEPTS, ShapesData, make_shapes

__all__ = ["CLASSES", "CONCEPTS", "ShapesData", "make_shapes"]
