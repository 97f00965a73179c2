"""The report's pictures (Pillow): receptive-field crops and detection maps over whole images."""
from __future__ import annotations

import io
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["crop_png", "overlay_png", "MAP_SIDE"]

# Detection maps are drawn at least this many pixels high, so small inputs stay legible.
MAP_SIDE = 160
# Crops larger than this are scaled down (the page shows them at about 96 px).
CROP_MAX = 128


def _pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise ImportError("the report needs Pillow: pip install Pillow") from None
    return Image, ImageDraw


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def crop_png(picture: np.ndarray, box: Tuple[int, int, int, int], cell: Tuple[int, int, int, int]) -> bytes:
    """PNG of ``picture[top:bottom, left:right]`` (H, W, 3 uint8) with the patch's own cell
    outlined. Small crops are enlarged by an integer factor (nearest neighbour) so their
    pixels stay sharp; large ones are shrunk to ``CROP_MAX``."""
    Image, ImageDraw = _pil()
    top, left, bottom, right = box
    crop = Image.fromarray(np.ascontiguousarray(picture[top:bottom, left:right]))
    side = max(bottom - top, right - left)
    if side < CROP_MAX // 2:
        factor = max(1, CROP_MAX // side)
        crop = crop.resize((crop.width * factor, crop.height * factor), Image.NEAREST)
    elif side > CROP_MAX:
        factor = CROP_MAX / side
        crop = crop.resize((max(1, round(crop.width * factor)), max(1, round(crop.height * factor))), Image.LANCZOS)
    else:
        factor = 1
    fy, fx = crop.height / (bottom - top), crop.width / (right - left)
    ct, cl, cb, cr = cell
    outline = [(cl - left) * fx, (ct - top) * fy, (cr - left) * fx - 1, (cb - top) * fy - 1]
    draw = ImageDraw.Draw(crop)
    # a dark and a light line so the outline shows on any colour
    draw.rectangle(outline, outline=(0, 0, 0), width=3)
    draw.rectangle(outline, outline=(255, 214, 10), width=1)
    return _png(crop)


def overlay_png(picture: np.ndarray, score_map: torch.Tensor) -> bytes:
    """PNG of ``picture`` (H, W, 3 uint8) lit where the detector fires: brightness scales
    with the detector's membership sigmoid(score) (bilinearly upsampled scores), and the
    boundary score = 0 is drawn in yellow."""
    Image, _ = _pil()
    h, w = picture.shape[:2]
    factor = max(1, -(-MAP_SIDE // h)) if h < MAP_SIDE else 1
    if h > 2 * MAP_SIDE:
        size = (2 * MAP_SIDE, max(1, round(w * 2 * MAP_SIDE / h)))
    else:
        size = (h * factor, w * factor)
    img = Image.fromarray(np.ascontiguousarray(picture))
    img = img.resize((size[1], size[0]), Image.NEAREST if factor > 1 else Image.LANCZOS)
    scores = F.interpolate(score_map.float()[None, None], size=(h, w), mode="bilinear", align_corners=False)
    scores = F.interpolate(scores, size=size, mode="nearest" if factor > 1 else "bilinear")[0, 0]
    member = torch.sigmoid(scores).numpy()
    rgb = np.asarray(img, dtype=np.float32)
    lit = rgb * (0.3 + 0.7 * member[..., None])
    inside = scores.numpy() > 0
    edge = np.zeros_like(inside)
    edge[1:, :] |= inside[1:, :] != inside[:-1, :]
    edge[:, 1:] |= inside[:, 1:] != inside[:, :-1]
    # thicken the boundary to two pixels, on the inside
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:, 1:] |= edge[:, :-1]
    lit[thick] = (255, 214, 10)
    return _png(Image.fromarray(lit.clip(0, 255).astype(np.uint8)))
