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

Both sources here also have ``subset(start, stop)`` (the images ``start:stop``, for ``--limit``
and for sharding a folder across ``torchrun`` ranks). ``open_images`` opens what a user points
the command line at: a folder of image files or a tensor file (.pt/.pth, .npy, .safetensors).
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

__all__ = ["ImageSource", "TensorImages", "FolderImages", "Preprocess", "BatchStream", "open_images",
           "load_tensor_images", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Size = Union[int, Tuple[int, int], None]


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

    def select(self, indices: Sequence[int]) -> "TensorImages":
        """The images at ``indices`` in that order (names, labels, pixels and masks alike)."""
        idx = _check_indices(indices, len(self))
        pick = torch.as_tensor(idx, dtype=torch.long)
        out = TensorImages(self.images[pick], names=[self.names[i] for i in idx],
                           labels=None if self.labels is None else self.labels[pick],
                           class_names=self.class_names,
                           pixels=None if self.pixels is None else self.pixels[pick])
        if self.concept_masks is not None:
            masks, names = self.concept_masks
            out.concept_masks = (lambda rows: masks([idx[int(i)] for i in rows]), names)
        return out

    def subset(self, start: int, stop: int) -> "TensorImages":
        """The images ``start:stop`` (names, labels, pixels and masks cut alike)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        if stop <= start:
            raise ValueError(f"subset {start}:{stop} of {len(self)} images is empty")
        cut = slice(start, stop)
        out = TensorImages(self.images[cut], names=self.names[cut],
                           labels=None if self.labels is None else self.labels[cut],
                           class_names=self.class_names,
                           pixels=None if self.pixels is None else self.pixels[cut])
        if self.concept_masks is not None:
            masks, names = self.concept_masks
            out.concept_masks = (lambda idx: masks([start + int(i) for i in idx]), names)
        return out

    def batches(self, batch_size: int = 64) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size].to(torch.float32)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The images in batches of 64 (``batches(n)`` for another size)."""
        return self.batches(64)

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


class BatchStream:
    """A re-iterable of ``(B, C, H, W)`` batches over an image source, with ``len`` = the
    number of batches: what ``pc.extract`` and the other functions taking "an iterable of
    batches" read, without ever holding more than one batch of a source."""

    def __init__(self, source, batch_size: int = 64):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.source, self.batch_size = source, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.source) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.source.batches(self.batch_size))


# ------------------------------------------------------------------------- preprocessing
def _pair(size: Size, name: str) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _channel_stats(values, name: str) -> Optional[torch.Tensor]:
    if values is None:
        return None
    if isinstance(values, str):
        if values.lower() != "imagenet":
            raise ValueError(f"{name} must be numbers or 'imagenet', got {values!r}")
        values = IMAGENET_MEAN if name == "mean" else IMAGENET_STD
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, 3) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must hold 1 or 3 finite numbers, got {values!r}")
    return t


# the largest model input Preprocess makes: a resize far beyond it would exhaust the memory
# before any model runs (a 100000-pixel side is 10^10 pixels)
MAX_INPUT_PIXELS = 8192 * 8192
# and the largest batch of decoded pictures (float32) read at once
MAX_BATCH_BYTES = 8 * 2 ** 30


class Preprocess:
    """The usual model-input preparation of a picture.

    ``resize``: an int resizes the shorter side to it (aspect kept), ``(h, w)`` resizes to
    exactly that; ``crop``: a centre crop, an int (square) or ``(h, w)``; then the pixels go to
    [0, 1] and ``(x - mean) / std`` per channel when ``mean``/``std`` are given. ``channels``
    1 makes grey-level inputs, 3 RGB. ``transform``: a callable taking a PIL image and returning
    a ``(C, H, W)`` tensor or array, used instead of all the above (a torchvision transform
    is one)."""

    def __init__(self, resize: Size = None, crop: Size = None, mean=None, std=None,
                 channels: int = 3, transform: Optional[Callable] = None):
        if isinstance(resize, int) and not isinstance(resize, bool):
            if resize < 1:
                raise ValueError(f"resize must be positive, got {resize}")
            self.resize: Union[int, Tuple[int, int], None] = int(resize)
        else:
            self.resize = _pair(resize, "resize")
        self.crop = _pair(crop, "crop")
        for name, size in (("resize", self.resize), ("crop", self.crop)):
            h, w = (size, size) if isinstance(size, int) else size or (1, 1)
            if h * w > MAX_INPUT_PIXELS:
                raise ValueError(f"{name} {size!r} makes pictures of {'at least ' if isinstance(size, int) else ''}"
                                 f"{h} x {w} pixels, more than the {MAX_INPUT_PIXELS:,} (8192 x 8192) a model "
                                 "input may have")
        self.mean = _channel_stats(mean, "mean")
        std_t = _channel_stats(std, "std")
        if std_t is not None and bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std!r}")
        self.std = std_t
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.channels = channels
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform

    @property
    def fixed_geometry(self) -> bool:
        """True when every output has the same height and width whatever the input size."""
        return self.crop is not None or isinstance(self.resize, tuple)

    def resized_size(self, width: int, height: int) -> Tuple[int, int]:
        """(height, width) of a ``width`` x ``height`` picture after the resize, before the
        crop."""
        h, w = height, width
        if isinstance(self.resize, int):
            scale = self.resize / min(h, w)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
        elif self.resize is not None:
            h, w = self.resize
        return h, w

    def output_size(self, width: int, height: int) -> Tuple[int, int]:
        """(height, width) of the model input made from a ``width`` x ``height`` picture
        (without a custom transform): the crop, or else the resized size."""
        return self.crop if self.crop is not None else self.resized_size(width, height)

    def geometry(self, picture):
        """The PIL picture resized and cropped (still a picture: for display, and the first
        half of ``__call__``)."""
        from PIL import Image

        picture = picture.convert("L" if self.channels == 1 else "RGB")
        w, h = picture.size
        if self.resize is not None:
            th, tw = self.resized_size(w, h)
            if (tw, th) != (w, h):
                picture = picture.resize((tw, th), Image.Resampling.BILINEAR)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = picture.size
            if ch > h or cw > w:
                raise ValueError(f"the picture is {w}x{h} after resizing, smaller than the crop {cw}x{ch}; "
                                 "resize it first with Preprocess(resize=...) (command line: --resize)")
            left, top = (w - cw) // 2, (h - ch) // 2
            picture = picture.crop((left, top, left + cw, top + ch))
        return picture

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) float in [0, 1] -> ``(x - mean) / std`` when they are given."""
        if self.mean is not None:
            x = x - self.mean.to(x.dtype).reshape(-1, 1, 1)
        if self.std is not None:
            x = x / self.std.to(x.dtype).reshape(-1, 1, 1)
        return x

    def __call__(self, picture) -> torch.Tensor:
        if self.transform is not None:
            try:
                out = self.transform(picture)
            except Exception as exc:  # the user's function: say which one failed, and how
                name = getattr(self.transform, "__name__", type(self.transform).__name__)
                raise ValueError(f"the image transform {name!r} failed on a picture: "
                                 f"{type(exc).__name__}: {exc}") from exc
            out = torch.as_tensor(out)
            if out.dim() != 3:
                raise ValueError(f"the transform returned shape {tuple(out.shape)}; expected (C, H, W)")
            return out.to(torch.float32)
        return self.normalise(_picture_tensor(self.geometry(picture)))

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """The same steps on a tensor batch (N, C, H, W) already in [0, 1] (no ``transform``)."""
        import torch.nn.functional as F

        x = images
        if self.resize is not None:
            h, w = self.resized_size(x.shape[-1], x.shape[-2])
            if (h, w) != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                raise ValueError(f"the images are {w}x{h}, smaller than the crop {cw}x{ch}; resize them first "
                                 "with Preprocess(resize=...) (command line: --resize)")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return self.normalise(x)


def _picture_tensor(picture) -> torch.Tensor:
    """PIL picture (L or RGB) -> (C, H, W) float32 in [0, 1]."""
    import numpy as np

    arr = np.asarray(picture, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


# ------------------------------------------------------------------------ folder source
class FolderImages:
    """An image source over a folder of image files, read with Pillow in batches (a folder of
    any size never sits in memory at once).

    Files with the extensions in ``IMAGE_EXTENSIONS`` are taken, recursively, in sorted path
    order; hidden files and folders are ignored. When every image lies in a first-level
    subfolder, the subfolders are the classes (sorted names, as torchvision's ImageFolder
    orders them): ``labels`` and ``class_names`` are set. ``names`` are the paths relative to
    ``root``.

    Each file's header is read when the folder is opened: files Pillow cannot identify are
    skipped and listed in ``skipped`` (``(relative path, reason)``); a file that passes the header
    but fails to decode later raises a ``ValueError`` naming it. Without a fixed output size
    (``crop``, or ``resize=(h, w)``, or a ``transform``) every picture must have the same size,
    which is checked from the headers. ``workers`` threads decode a batch (Pillow releases the
    GIL while decoding).
    """

    def __init__(self, root: Union[str, os.PathLike], *, preprocess: Optional[Preprocess] = None,
                 workers: Optional[int] = None, _entries=None, _class_names=None, _skipped=None):
        try:
            import PIL  # noqa: F401  (a clear error before any file is read)
        except ImportError:  # pragma: no cover - Pillow is a dependency
            raise ImportError("reading a folder of images needs Pillow (pip install pillow)") from None
        self.root = os.fspath(root)
        self.preprocess = preprocess or Preprocess()
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        if _entries is None:
            _entries, _class_names, _skipped = _scan_folder(self.root, self.preprocess)
        self._entries = _entries                  # [(relative path, label or -1, (w, h))]
        self.class_names = _class_names
        self.skipped = list(_skipped or [])
        self.names = [e[0] for e in _entries]
        self.labels = (torch.tensor([e[1] for e in _entries], dtype=torch.int64)
                       if _class_names is not None else None)
        self.concept_masks = None

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return f"FolderImages({self.root!r}, {len(self)} images{classes})"

    def select(self, indices: Sequence[int]) -> "FolderImages":
        """The images at ``indices`` of the sorted list, in that order (no rescan)."""
        idx = _check_indices(indices, len(self))
        return FolderImages(self.root, preprocess=self.preprocess, workers=self.workers,
                            _entries=[self._entries[i] for i in idx], _class_names=self.class_names,
                            _skipped=self.skipped)

    def subset(self, start: int, stop: int) -> "FolderImages":
        """The images ``start:stop`` of the sorted list (no rescan)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        if stop <= start:
            raise ValueError(f"subset {start}:{stop} of {len(self)} images is empty")
        return FolderImages(self.root, preprocess=self.preprocess, workers=self.workers,
                            _entries=self._entries[start:stop], _class_names=self.class_names,
                            _skipped=self.skipped)

    def _open(self, name: str):
        from PIL import Image, ImageOps

        path = os.path.join(self.root, name)
        try:
            with Image.open(path) as picture:
                if self.preprocess.resize is not None and picture.format == "JPEG":
                    # decode at a reduced scale when that is still larger than the resized picture
                    w, h = picture.size
                    oh, ow = self.preprocess.resized_size(w, h)
                    picture.draft("RGB", (ow, oh))
                picture = ImageOps.exif_transpose(picture)
                picture.load()
                return _to_8bit(picture)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's decode errors
            raise ValueError(f"cannot decode image {path!r}: {exc} (its header read, so the scan kept it; "
                             "remove or replace the file)") from None

    def _load(self, name: str) -> torch.Tensor:
        return self.preprocess(self._open(name))

    def _read(self, names: Sequence[str], fn) -> List:
        if self.workers > 1 and len(names) > 1:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                return list(pool.map(fn, names))
        return [fn(n) for n in names]

    def batches(self, batch_size: int = 64) -> Iterator[torch.Tensor]:
        names = self.names
        if self.preprocess.transform is None and self._entries:
            # the pictures of one batch are decoded together: refuse a batch that would not fit
            # before decoding any (the size comes from the first picture's header)
            _, _, (w, h) = self._entries[0]
            oh, ow = self.preprocess.output_size(w, h)
            held = min(batch_size, len(names)) * self.preprocess.channels * oh * ow * 4
            if held > MAX_BATCH_BYTES:
                raise ValueError(f"a batch of {min(batch_size, len(names))} pictures at {oh}x{ow} holds "
                                 f"{held / 2 ** 30:.1f} GiB of input alone (more than {MAX_BATCH_BYTES // 2 ** 30} "
                                 "GiB): give a smaller batch_size (command line: --batch-size) or a smaller resize")
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            items = self._read(chunk, self._load)
            shape = items[0].shape
            for name, item in zip(chunk, items):
                if item.shape != shape:
                    raise ValueError(
                        f"images differ in size ({chunk[0]!r} gives {tuple(shape)}, {name!r} gives "
                        f"{tuple(item.shape)}): give them one size with Preprocess(resize=..., crop=...) "
                        "or a transform returning one size (command line: --resize, --crop)")
            yield torch.stack(items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The images in batches of 64, preprocessed (``batches(n)`` for another size)."""
        return self.batches(64)

    def display(self, indices: Sequence[int]) -> torch.Tensor:
        names = [self.names[int(i)] for i in indices]
        if self.preprocess.transform is not None:
            return _to_uint8_pictures(torch.stack(self._read(names, self._load)))

        def picture(name):
            p = self.preprocess.geometry(self._open(name)).convert("RGB")
            return _picture_tensor(p)

        x = torch.stack(self._read(names, picture))
        return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _scan_folder(root: str, preprocess: Preprocess):
    if not os.path.exists(root):
        raise FileNotFoundError(f"no such folder: {root!r}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root!r} is not a folder")
    paths: List[str] = []
    # links to folders are followed, each real folder once: a link back up (a loop) or a
    # second link to a folder already read would read its images again, or without end
    seen = {os.path.realpath(root)}
    repeated = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen:
                repeated.append(os.path.relpath(os.path.join(dirpath, d), root))
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            # (entries that are no regular file are skipped, and counted, by _scan_files)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.relpath(os.path.join(dirpath, f), root))
    if repeated:
        warnings.warn(f"{len(repeated)} folder link(s) in {root!r} lead to a folder already read and were not "
                      f"followed again (first: {repeated[0]!r})", stacklevel=3)
    paths.sort(key=lambda p: p.split(os.sep))
    if not paths:
        raise ValueError(f"no image files in {root!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                         "also in subfolders)")
    return _scan_files(root, paths, preprocess)


def _scan_files(root: str, paths: List[str], preprocess: Preprocess):
    """Headers of the files ``paths`` (relative to ``root``): entries, class names, skipped."""
    from PIL import Image, UnidentifiedImageError

    entries, skipped = [], []
    for rel in paths:
        full = os.path.join(root, rel)
        if not os.path.isfile(full):  # regular files only: a named pipe or a device would block the read
            skipped.append((rel, "a link to nothing" if os.path.islink(full) and not os.path.exists(full)
                            else "not a regular file"))
            continue
        try:
            with Image.open(full) as picture:
                size = picture.size
        except Image.DecompressionBombError:
            skipped.append((rel, f"more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
                                 "(PIL.Image.MAX_IMAGE_PIXELS), refused as a possible decompression bomb"))
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            skipped.append((rel, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        entries.append((rel, size))
    if not entries:
        raise ValueError(f"none of the {len(paths)} image file(s) in {root!r} could be read "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    classes = None
    if all(os.sep in rel for rel, _ in entries):
        classes = sorted({rel.split(os.sep, 1)[0] for rel, _ in entries})
    index = {c: i for i, c in enumerate(classes or [])}
    out = [(rel, index[rel.split(os.sep, 1)[0]] if classes else -1, size) for rel, size in entries]
    if preprocess.transform is None:
        _check_sizes(root, out, preprocess)
    return out, classes, skipped


def _check_sizes(root: str, entries, preprocess: Preprocess) -> None:
    """Without a fixed output size, all pictures must come out the same size; and none may be
    smaller than the crop after resizing (EXIF rotation aside, the header says)."""
    # sizes are written height x width, as Preprocess and --resize / --crop take them
    first_name, _, (w0, h0) = entries[0]
    first = preprocess.output_size(w0, h0)
    for name, _, (w, h) in entries:
        out = preprocess.output_size(w, h)
        before = preprocess.resized_size(w, h)
        made = before if preprocess.resize is not None else out  # a resize is held whole before the crop
        if made[0] * made[1] > MAX_INPUT_PIXELS:
            raise ValueError(
                f"{name!r} in {root!r} ({h}x{w}, height x width) would be resized to {made[0]}x{made[1]}, more "
                f"than the {MAX_INPUT_PIXELS:,} pixels a model input may have; give a smaller resize (command "
                "line: --resize)")
        if preprocess.crop is not None:
            if before[0] < preprocess.crop[0] or before[1] < preprocess.crop[1]:
                raise ValueError(
                    f"{name!r} in {root!r} is {before[0]}x{before[1]} (height x width, after resizing), smaller "
                    f"than the crop {preprocess.crop[0]}x{preprocess.crop[1]}; resize it first with "
                    "Preprocess(resize=...) (command line: --resize)")
        elif out != first:
            if isinstance(preprocess.resize, int):
                fix = ("resizing the shorter side keeps each picture's shape: crop them to one size with "
                       "Preprocess(crop=...) (command line: --crop), or resize to HxW exactly")
            else:
                fix = ("give the model one input size with Preprocess(resize=..., crop=...) (command line: "
                       "--resize, --crop)")
            raise ValueError(
                f"the images in {root!r} come out in different sizes ({first_name!r}: {first[0]}x{first[1]}, "
                f"{name!r}: {out[0]}x{out[1]}, height x width); {fix}")


# ------------------------------------------------------------------------- tensor files
def load_tensor_images(path: Union[str, os.PathLike], *, allow_pickle: bool = False):
    """Read images saved as a tensor: ``.pt``/``.pth`` (``torch.save``; read with
    ``weights_only=True`` unless ``allow_pickle``), ``.npy``/``.npz`` or ``.safetensors``.

    The file holds a tensor ``(N, C, H, W)``, ``(N, H, W, C)`` (channels last, C in 1/3/4, as
    numpy arrays usually are) or ``(N, H, W)``, or a mapping with the key ``images`` (and
    optionally ``labels`` and ``class_names``; a .safetensors file with a single tensor also
    works). uint8 pixels are scaled to [0, 1]. Returns ``(images float32 (N, C, H, W), labels
    or None, class_names or None)``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    labels, class_names = None, None
    if ext in (".npy", ".npz"):
        import numpy as np

        try:
            data = np.load(path, allow_pickle=allow_pickle)
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise ValueError(f"{path!r} holds pickled objects; pass allow_pickle=True (command line: "
                                 "--allow-pickle) only if you trust the file (unpickling runs code)") from None
            raise ValueError(f"cannot read {path!r}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot read {path!r}: {exc}") from None
        if ext == ".npz":
            keys = list(data.keys())
            if "images" not in keys and len(keys) != 1:
                raise ValueError(f"{path!r} holds arrays {keys}; expected one called 'images'")
            obj = {k: data[k] for k in keys}
            obj = obj if "images" in obj else {"images": obj[keys[0]]}
        else:
            obj = data
    elif ext == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception as exc:  # safetensors raises its own error types for bad bytes
            raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from None
        if "images" not in tensors and len(tensors) != 1:
            raise ValueError(f"{path!r} holds tensors {sorted(tensors)}; expected one called 'images'")
        obj = tensors if "images" in tensors else {"images": next(iter(tensors.values()))}
    else:
        import pickle

        try:
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as exc:
            if allow_pickle:
                raise ValueError(f"cannot read {path!r}: {exc}") from None
            raise ValueError(f"{path!r} holds more than tensors (a pickle); pass allow_pickle=True (command "
                             "line: --allow-pickle) only if you trust the file (unpickling runs code)") from None
        except Exception as exc:  # torch.load raises many types on foreign bytes (struct.error, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot read {path!r} as a torch.save file: {first}") from None
    if isinstance(obj, dict):
        if "images" not in obj:
            raise ValueError(f"{path!r} holds a mapping with keys {sorted(map(str, obj))}; expected 'images'")
        labels, class_names = obj.get("labels"), obj.get("class_names")
        obj = obj["images"]
    images = _as_image_tensor(obj, path)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dim() != 1 or labels.numel() != images.shape[0]:
            raise ValueError(f"{path!r}: 'labels' must hold one integer per image ({images.shape[0]}), "
                             f"got shape {tuple(labels.shape)} {labels.dtype}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
    return images, labels, class_names


def _as_image_tensor(obj, path: str) -> torch.Tensor:
    try:
        x = torch.as_tensor(obj)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not an image tensor") from None
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{path!r}: expected images (N, C, H, W), (N, H, W, C) or (N, H, W), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)            # channels last (numpy, PIL)
    if x.shape[0] == 0:
        raise ValueError(f"{path!r} holds no images (shape {tuple(x.shape)})")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.dtype == torch.bool or not x.is_floating_point():
        raise ValueError(f"{path!r}: images must be uint8 pixels or floats, got {x.dtype}")
    x = x.to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{path!r}: the images contain NaN or Inf")
    top = float(x.abs().max())
    if top > _FLOAT_PIXEL_LIMIT:
        import warnings

        warnings.warn(f"{path!r}: float images are read as they are, and these reach {top:g}: pixels in "
                      "0..255 should be stored as uint8 (scaled to [0, 1] on reading) or divided by 255",
                      stacklevel=2)
    return x


# Float images beyond this magnitude are most likely 0..255 pixels stored as floats (images in
# [0, 1], or normalised by mean/std, stay within a few units).
_FLOAT_PIXEL_LIMIT = 8.0


def open_images(path: Union[str, os.PathLike], *, preprocess: Optional[Preprocess] = None,
                allow_pickle: bool = False, workers: Optional[int] = None):
    """An image source for what a user names: a folder of image files (``FolderImages``) or a
    tensor file (``load_tensor_images``; ``preprocess``'s resize, crop, mean and std applied)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return FolderImages(path, preprocess=preprocess, workers=workers)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path!r}")
    if path.lower().endswith(IMAGE_EXTENSIONS):  # one picture
        folder, name = os.path.split(os.path.abspath(path))
        preprocess = preprocess or Preprocess()
        entries, _, skipped = _scan_files(folder, [name], preprocess)
        return FolderImages(folder, preprocess=preprocess, workers=workers, _entries=entries, _class_names=None,
                            _skipped=skipped)
    if preprocess is not None and preprocess.transform is not None:
        raise ValueError("a transform applies to image files; the tensor file's images are used as they are")
    images, labels, class_names = load_tensor_images(path, allow_pickle=allow_pickle)
    if preprocess is not None:
        images = preprocess.tensor(images)
    names = [f"{os.path.basename(path)}[{i}]" for i in range(images.shape[0])]
    return TensorImages(images, names=names, labels=labels, class_names=class_names)


def spread_indices(total: int, n: int) -> List[int]:
    """``n`` indices spread evenly over ``range(total)`` (the middle of each of n equal parts):
    a sorted folder's first n files may all be one class, these cover every part of it."""
    if n >= total:
        return list(range(total))
    return [int((j + 0.5) * total / n) for j in range(n)]


def _check_indices(indices: Sequence[int], total: int) -> List[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("select: no indices given")
    bad = [i for i in idx if not 0 <= i < total]
    if bad:
        raise IndexError(f"select: index {bad[0]} is out of range for {total} images")
    return idx


def _to_8bit(picture):
    """A 16-bit or 32-bit (integer or float) grey picture as 8-bit grey, scaled by its bit depth
    (Pillow's own conversion to RGB clips such values to 255: a 16-bit PNG turns white)."""
    from PIL import Image

    if picture.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return picture
    import numpy as np

    values = np.asarray(picture, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if picture.mode.startswith("I;16") or (picture.mode == "I" and 255 < top <= 65535):
        scale = 255.0 / 65535.0
    elif picture.mode == "F" and top <= 1.0:
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    else:
        scale = 255.0 / top
    return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))  # 2-D uint8: "L"
