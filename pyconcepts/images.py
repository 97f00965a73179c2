"""Image sources: what ``pc.extract``, the report and the command line read images from.

An image source is a sized, re-iterable collection of images that knows, for each image, a
name to show a person (a file name), optionally its class, and how to render it for display.
``TensorImages`` wraps tensors already in memory; a folder of image files is read in batches
by the folder source of this module, so a large folder never sits in memory at once.

The protocol (duck-typed; ``ImageSource`` documents it):

- ``len(source)``: the number of images;
- ``source.names``: one display name per image (``list[str]``);
- ``source.labels``: ``(N,) int64`` class index per image, or ``None``;
- ``source.class_names``: ``list[str]`` naming the label values, or ``None``;
- ``source.batches(batch_size)``: yields the preprocessed model inputs ``(B, C, H, W)`` float32,
  in index order, every time it is called (re-iterable);
- ``source.display(indices)``: ``(n, H, W, 3) uint8`` pictures of those images in the model
  input's geometry (so a patch position maps onto them), for reports;
- ``source.concept_masks``: ``None``, or ``(masks(indices) -> (n, M, H, W) bool, names: list[str])``
  ground-truth concept masks when the data set has them (the demo does).
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

__all__ = ["ImageSource", "TensorImages"]


@runtime_checkable
class ImageSource(Protocol):
    names: List[str]
    labels: Optional[torch.Tensor]
    class_names: Optional[List[str]]
    concept_masks: Optional[Tuple[Callable[[Sequence[int]], torch.Tensor], List[str]]]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]: ...

    def display(self, indices: Sequence[int]) -> torch.Tensor: ...


def _to_uint8_pictures(images: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) float -> (n, H, W, 3) uint8, each image min-max scaled to [0, 255]."""
    x = images.detach().to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3] if x.shape[1] > 3 else torch.cat([x, x[:, -1:].expand(-1, 3 - x.shape[1], -1, -1)], 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class TensorImages:
    """An image source over a tensor ``(N, C, H, W)`` already in memory.

    ``pixels``: optional ``(N, 3, H, W)`` float in [0, 1] (or uint8) to show instead of the model
    inputs (e.g. the images before normalisation); without it each model input is min-max
    scaled for display. ``masks``/``mask_names``: optional ground-truth concept masks
    ``(N, M, H, W)`` bool.
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        names: Optional[Sequence[str]] = None,
        labels: Optional[torch.Tensor] = None,
        class_names: Optional[Sequence[str]] = None,
        pixels: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
        mask_names: Optional[Sequence[str]] = None,
    ):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (N, C, H, W) tensor, got {shape}")
        n = images.shape[0]
        if n == 0:
            raise ValueError("images is empty")
        self.images = images
        self.names = list(names) if names is not None else [f"image {i}" for i in range(n)]
        if len(self.names) != n:
            raise ValueError(f"names has {len(self.names)} entries for {n} images")
        if labels is not None:
            labels = torch.as_tensor(labels).to(torch.int64).flatten()
            if labels.numel() != n:
                raise ValueError(f"labels has {labels.numel()} entries for {n} images")
        self.labels = labels
        self.class_names = list(class_names) if class_names is not None else None
        if pixels is not None and (pixels.shape[0] != n or pixels.shape[-2:] != images.shape[-2:]):
            raise ValueError(f"pixels must be (N, 3, H, W) matching images {tuple(images.shape)}, "
                             f"got {tuple(pixels.shape)}")
        self.pixels = pixels
        self.concept_masks = None
        if masks is not None:
            if masks.dim() != 4 or masks.shape[0] != n:
                raise ValueError(f"masks must be (N, M, H, W) with N = {n}, got {tuple(masks.shape)}")
            names_ = list(mask_names) if mask_names is not None else [f"mask {j}" for j in range(masks.shape[1])]
            if len(names_) != masks.shape[1]:
                raise ValueError(f"mask_names has {len(names_)} entries for {masks.shape[1]} masks")
            self.concept_masks = (lambda idx: masks[torch.as_tensor(list(idx), dtype=torch.long)].bool(), names_)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, batch_size: int = 64) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size].to(torch.float32)

    def display(self, indices: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.pixels is None:
            return _to_uint8_pictures(self.images[idx])
        p = self.pixels[idx]
        if p.dtype != torch.uint8:
            p = (p.to(torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
        if p.shape[1] == 1:
            p = p.expand(-1, 3, -1, -1)
        return p.permute(0, 2, 3, 1).contiguous()
