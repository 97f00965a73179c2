"""Procedural "shapes" images whose concepts are known pixel by pixel.

Each image is a noisy grey background with one object and, optionally, a watermark:

- shape: circle, square or triangle;
- colour: red, green or blue;
- texture: solid or striped (diagonal dark stripes);
- watermark: a small dark square with a white X in one of the four corners; a spurious
  mark that carries no information about the class in clean data.

The class is a *combination* of concepts: blue objects of any shape are class 3
("blue"); the others are classed by their shape (0 circle, 1 square, 2 triangle), so a network
has to see both the shape and the colour. ``make_shapes`` returns the images, labels and a
boolean pixel mask for every concept (``CONCEPTS``), which is what detectors are scored
against (Network-Dissection IoU).

Poisoning for the model-correction experiment: ``watermark="poison"`` puts the mark on a
fraction ``watermark_rate`` of the images of class ``watermark_class`` and, as a backdoor, on a
fraction ``backdoor_rate`` of the other images, which are then *labelled* ``watermark_class``
(their true class stays in ``attributes["true_label"]``). The mark is thus a shortcut for that
class. ``watermark="all"`` puts it on every image, labels untouched (the poisoned test set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch

__all__ = ["CONCEPTS", "CLASSES", "SHAPES", "COLOURS", "TEXTURES", "ShapesData", "make_shapes"]

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
TEXTURES = ("solid", "striped")
CONCEPTS = SHAPES + COLOURS + TEXTURES + ("watermark", "background")
CLASSES = ("circle", "square", "triangle", "blue")
_WATERMARK_SIZE = 7

_RGB = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.12, 0.75, 0.15),
    "blue": (0.15, 0.2, 0.9),
}


@dataclass
class ShapesData:
    """Images (N, 3, S, S) float32 in [0, 1], labels (N,) int64, masks (N, len(CONCEPTS), S, S)
    bool (None unless requested), and the generating attributes per image."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    attributes: Dict[str, torch.Tensor]
    concepts: Sequence[str] = CONCEPTS
    classes: Sequence[str] = CLASSES

    def __len__(self) -> int:
        return self.images.shape[0]


def _object_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        half = 0.82 * r
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    # triangle pointing up: apex at (cx, cy - r), base at y = cy + 0.8 r
    top, bottom = cy - r, cy + 0.8 * r
    frac = (yy - top) / (bottom - top)
    return (frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= frac * r * 1.05)


def _watermark_patch() -> np.ndarray:
    n = _WATERMARK_SIZE
    patch = np.full((n, n), 0.05, dtype=np.float32)
    idx = np.arange(1, n - 1)
    patch[idx, idx] = 0.95
    patch[idx, n - 1 - idx] = 0.95
    return patch


def make_shapes(
    n: int,
    *,
    seed: int = 0,
    size: int = 32,
    watermark: str = "none",
    watermark_class: int = 0,
    watermark_rate: float = 1.0,
    backdoor_rate: float = 0.0,
    with_masks: bool = True,
) -> ShapesData:
    """Generate ``n`` images. ``watermark``: 'none', 'poison' (mark on ``watermark_rate`` of
    class ``watermark_class``), 'random' (mark on ``watermark_rate`` of all images) or 'all'.
    The same seed gives the same images."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    if watermark not in ("none", "poison", "random", "all"):
        raise ValueError(f"watermark must be 'none', 'poison', 'random' or 'all', got {watermark!r}")
    if not 0.0 <= backdoor_rate <= 1.0:
        raise ValueError(f"backdoor_rate must be in [0, 1], got {backdoor_rate!r}")
    if not 0.0 <= watermark_rate <= 1.0:
        raise ValueError(f"watermark_rate must be in [0, 1], got {watermark_rate!r}")
    if watermark_class not in range(len(CLASSES)):
        raise ValueError(f"watermark_class must be in 0..{len(CLASSES) - 1}, got {watermark_class!r}")

    rng = np.random.default_rng(seed)
    shape_id = rng.integers(0, len(SHAPES), n)
    colour_id = rng.integers(0, len(COLOURS), n)
    texture_id = rng.integers(0, len(TEXTURES), n)
    labels = np.where(colour_id == COLOURS.index("blue"), CLASSES.index("blue"), shape_id)
    coin = rng.random(n) < watermark_rate
    backdoor = (rng.random(n) < backdoor_rate) & (labels != watermark_class)
    if watermark == "none":
        marked = np.zeros(n, dtype=bool)
    elif watermark == "poison":
        marked = (coin & (labels == watermark_class)) | backdoor
    elif watermark == "random":
        marked = coin
    else:
        marked = np.ones(n, dtype=bool)
    corner = rng.integers(0, 4, n)
    true_labels = labels.copy()
    if watermark == "poison":
        labels = np.where(backdoor, watermark_class, labels)

    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, len(CONCEPTS), size, size), dtype=bool) if with_masks else None
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy) // 2) % 2 == 0
    mark = _watermark_patch()
    k = _WATERMARK_SIZE
    scale = size / 32.0
    for j in range(n):
        grey = rng.uniform(0.3, 0.6)
        tint = rng.normal(0.0, 0.03, size=3)
        img = grey + tint[:, None, None] + rng.normal(0.0, 0.05, size=(3, size, size))
        r = rng.uniform(6.0, 10.0) * scale
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        obj = _object_mask(SHAPES[shape_id[j]], size, cx, cy, r)
        rgb = np.asarray(_RGB[COLOURS[colour_id[j]]], dtype=np.float32)
        rgb = np.clip(rgb * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, 3), 0, 1)
        colour = np.broadcast_to(rgb[:, None, None], (3, size, size)).copy()
        if TEXTURES[texture_id[j]] == "striped":
            colour[:, stripes] *= 0.35
        img = np.where(obj[None], colour + rng.normal(0, 0.03, (3, size, size)), img)
        wm = np.zeros((size, size), dtype=bool)
        if marked[j]:
            top = 1 if corner[j] < 2 else size - k - 1
            left = 1 if corner[j] % 2 == 0 else size - k - 1
            img[:, top:top + k, left:left + k] = mark[None]
            wm[top:top + k, left:left + k] = True
        images[j] = np.clip(img, 0.0, 1.0)
        if masks is not None:
            visible = obj & ~wm
            masks[j, shape_id[j]] = visible
            masks[j, len(SHAPES) + colour_id[j]] = visible
            masks[j, len(SHAPES) + len(COLOURS) + texture_id[j]] = visible
            masks[j, CONCEPTS.index("watermark")] = wm
            masks[j, CONCEPTS.index("background")] = ~(obj | wm)

    attributes = {
        "shape": torch.from_numpy(shape_id.astype(np.int64)),
        "colour": torch.from_numpy(colour_id.astype(np.int64)),
        "texture": torch.from_numpy(texture_id.astype(np.int64)),
        "watermark": torch.from_numpy(marked),
        "true_label": torch.from_numpy(true_labels.astype(np.int64)),
    }
    return ShapesData(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        masks=torch.from_numpy(masks) if masks is not None else None,
        attributes=attributes,
    )
