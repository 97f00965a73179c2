"""Real pretrained networks and real images for the benchmarks (not a test dependency).

Weights: MTCNN's trained PNet and RNet face detectors as shipped by facenet-pytorch 2.6.0
(MIT licence, Copyright (c) 2019 Timothy Esler; https://github.com/timesler/facenet-pytorch),
files ``facenet_pytorch/data/pnet.pt`` and ``facenet_pytorch/data/rnet.pt`` inside its wheel.
That package pins an old torch and imports torchvision, so it is never installed: its wheel
is fetched once with ``pip download --no-deps`` into a cache folder and the two state dicts
are read straight from the wheel's zip with ``torch.load(weights_only=True)`` into module
definitions of our own whose parameter names match them.

Images: scikit-image's bundled data (``skimage.data``, no download): ``lfw_subset()`` gives
100 faces then 100 non-faces (25 x 25 grey); crops of its photos give unlabelled extra
images. Every image is an RGB float tensor in [0, 1]; the networks apply MTCNN's input
scaling ``(255 x - 127.5) / 128`` themselves, so images stay displayable.

Both networks return ``(box_regression, face_logits)`` like facenet-pytorch's modules,
except that the second element holds the two class logits (non-face, face) before the
softmax (``probabilities=True`` gives the softmax, as facenet-pytorch does).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

WHEEL_REQUIREMENT = "facenet-pytorch==2.6.0"
WHEEL_NAME = "facenet_pytorch-2.6.0-py3-none-any.whl"
WEIGHTS_SOURCE = (
    "MTCNN PNet/RNet weights from facenet-pytorch 2.6.0 (MIT licence, (c) 2019 Timothy Esler, "
    "github.com/timesler/facenet-pytorch), facenet_pytorch/data/{pnet,rnet}.pt in its wheel"
)
IMAGES_SOURCE = "scikit-image skimage.data: lfw_subset (100 faces, 100 non-faces, 25x25 grey) and crops of its photos"

FACE, NON_FACE, UNLABELLED = 1, 0, -1


def cache_dir() -> Path:
    """Folder holding the downloaded wheel: $PYCONCEPTS_BENCH_CACHE or ~/.cache/pyconcepts-bench."""
    return Path(os.environ.get("PYCONCEPTS_BENCH_CACHE", Path.home() / ".cache" / "pyconcepts-bench"))


def fetch_wheel(directory: Optional[Path] = None) -> Path:
    """Path of the facenet-pytorch wheel, downloaded (no dependencies) only when not cached."""
    directory = Path(directory) if directory is not None else cache_dir()
    wheel = directory / WHEEL_NAME
    if wheel.is_file():
        return wheel
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL_REQUIREMENT, "-d", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with {' '.join(cmd)}:\n{done.stderr[-2000:]}")
    return wheel


def load_state_dict(name: str, wheel: Optional[Path] = None) -> Dict[str, torch.Tensor]:
    """The state dict ``facenet_pytorch/data/<name>.pt`` read from the wheel without unpacking it."""
    if name not in ("pnet", "rnet", "onet"):
        raise ValueError(f"name must be 'pnet', 'rnet' or 'onet', got {name!r}")
    wheel = fetch_wheel() if wheel is None else Path(wheel)
    with zipfile.ZipFile(wheel) as z:
        blob = z.read(f"facenet_pytorch/data/{name}.pt")
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise RuntimeError(f"{name}.pt in {wheel} is not a plain state dict of tensors")
    return dict(state)


def _mtcnn_scale(x: torch.Tensor) -> torch.Tensor:
    # MTCNN's input scaling for 0..255 pixels; images here are 0..1.
    return (x * 255.0 - 127.5) * 0.0078125


class PNet(nn.Module):
    """MTCNN's proposal network: fully convolutional, a 12 x 12 receptive field, stride 2.

    Layers (hookable by name): conv1, prelu1 (10 ch), pool1, conv2, prelu2 (16 ch), conv3,
    prelu3 (32 ch), conv4_1 (face logits map), conv4_2 (box regression map).
    """

    def __init__(self, probabilities: bool = False):
        super().__init__()
        self.probabilities = probabilities
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(_mtcnn_scale(x))))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        logits = self.conv4_1(x)
        return self.conv4_2(x), (logits.softmax(1) if self.probabilities else logits)


class RNet(nn.Module):
    """MTCNN's refinement network: 24 x 24 inputs, face / non-face logits and box regression.

    Layers: conv1, prelu1 (28 ch, 22x22), pool1, conv2, prelu2 (48 ch, 9x9), pool2, conv3,
    prelu3 (64 ch, 3x3), dense4, prelu4 (128), dense5_1 (face logits), dense5_2 (boxes).
    """

    def __init__(self, probabilities: bool = False):
        super().__init__()
        self.probabilities = probabilities
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(_mtcnn_scale(x))))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The converted weights flatten in (W, H, C) order (the original models were Caffe's).
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        logits = self.dense5_1(x)
        return self.dense5_2(x), (logits.softmax(1) if self.probabilities else logits)


def load_pnet(probabilities: bool = False, wheel: Optional[Path] = None) -> PNet:
    net = PNet(probabilities)
    net.load_state_dict(load_state_dict("pnet", wheel), strict=True)
    return net.eval().requires_grad_(False)


def load_rnet(probabilities: bool = False, wheel: Optional[Path] = None) -> RNet:
    net = RNet(probabilities)
    net.load_state_dict(load_state_dict("rnet", wheel), strict=True)
    return net.eval().requires_grad_(False)


class FaceLogits(nn.Module):
    """A network's face / non-face logits as a (B, 2) tensor: the second output of the tuple,
    averaged over the map for PNet's fully convolutional output."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)[1]
        return logits.flatten(2).mean(2) if logits.dim() == 4 else logits


# ---------------------------------------------------------------------------------- images

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "page", "rocket", "text",
          "clock", "hubble_deep_field", "immunohistochemistry", "grass", "gravel", "brick", "cell")


def _skimage_data():
    try:
        import skimage.data
    except ImportError as exc:  # benchmark-only dependency: pip install -e ".[bench]"
        raise ImportError("the real-network benchmark needs scikit-image (pip install scikit-image)") from exc
    return skimage.data


def _to_rgb(picture) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from an skimage array (grey, RGB or RGBA; uint8, bool or float)."""
    t = torch.as_tensor(picture.copy() if hasattr(picture, "copy") else picture)
    if t.dtype == torch.bool:
        t = t.float()
    elif t.dtype == torch.uint8:
        t = t.float() / 255.0
    else:
        t = t.float()
    if t.dim() == 2:
        t = t.unsqueeze(0).expand(3, -1, -1)
    else:
        t = t[..., :3].permute(2, 0, 1)
    return t.clamp(0, 1).contiguous()


def _grey(rgb: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (rgb * w).sum(0, keepdim=True).expand(3, -1, -1).contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    # Area averaging when shrinking, as MTCNN's own resampling does; bilinear when growing.
    x = x.unsqueeze(0) if x.dim() == 3 else x
    mode = "area" if x.shape[-1] >= size and x.shape[-2] >= size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(size, size), mode=mode, **kw)


@dataclass
class RealImages:
    """Images (N, 3, size, size) in [0, 1], labels (N,) int64 (1 face, 0 non-face, -1 photo
    crop, no label) and one source string per image."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: List[str]

    def subset(self, mask: torch.Tensor) -> "RealImages":
        idx = torch.nonzero(mask).flatten().tolist()
        return RealImages(self.images[idx], self.labels[idx], [self.sources[i] for i in idx])


def lfw_images(size: int = 24) -> RealImages:
    """skimage's lfw_subset: 100 faces then 100 non-faces, grey, resized to ``size``."""
    data = _skimage_data()
    faces = torch.as_tensor(data.lfw_subset(), dtype=torch.float32)  # (200, 25, 25) in [0, 1]
    if faces.shape[0] != 200:
        raise RuntimeError(f"skimage lfw_subset has {faces.shape[0]} images, expected 200")
    x = faces.unsqueeze(1).expand(-1, 3, -1, -1)
    x = _resize(x, size) if size != x.shape[-1] else x.contiguous()
    labels = torch.cat([torch.full((100,), FACE), torch.full((100,), NON_FACE)]).long()
    sources = [f"lfw_subset[{i}]" for i in range(200)]
    return RealImages(x.clamp(0, 1).contiguous(), labels, sources)


def photo(name: str, grey: bool = True) -> torch.Tensor:
    """One skimage photo as (3, H, W) in [0, 1] (grey replicated to 3 channels when ``grey``)."""
    rgb = _to_rgb(getattr(_skimage_data(), name)())
    return _grey(rgb) if grey else rgb


def photo_crops(n: int, size: int = 24, seed: int = 0, grey: bool = True,
                names=PHOTOS, min_side: int = 24, max_side: int = 160) -> RealImages:
    """``n`` random square crops (side uniform in [min_side, max_side], clipped to the photo)
    of skimage's photos, resized to ``size``; labelled -1 (unlabelled)."""
    g = torch.Generator().manual_seed(seed)
    pictures = [photo(name, grey) for name in names]
    out, sources = [], []
    for j in range(n):
        p = int(torch.randint(len(pictures), (1,), generator=g))
        pic = pictures[p]
        h, w = pic.shape[-2:]
        side = int(torch.randint(min_side, max_side + 1, (1,), generator=g))
        side = min(side, h, w)
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        out.append(_resize(pic[:, top:top + side, left:left + side], size)[0])
        sources.append(f"{names[p]}[{top}:{top + side},{left}:{left + side}]")
    images = torch.stack(out).clamp(0, 1) if out else torch.empty(0, 3, size, size)
    return RealImages(images.contiguous(), torch.full((n,), UNLABELLED, dtype=torch.long), sources)


def real_images(size: int = 24, n_crops: int = 200, seed: int = 0, grey: bool = True) -> RealImages:
    """lfw faces and non-faces followed by ``n_crops`` photo crops, all ``size`` x ``size``."""
    lfw = lfw_images(size)
    crops = photo_crops(n_crops, size=size, seed=seed, grey=grey)
    return RealImages(torch.cat([lfw.images, crops.images]), torch.cat([lfw.labels, crops.labels]),
                      lfw.sources + crops.sources)


@torch.no_grad()
def face_accuracy(net: nn.Module, data: RealImages) -> Dict[str, float]:
    """Face / non-face accuracy of ``net`` (its face logits; PNet's map averaged) on the
    labelled images of ``data``, and the share of photo crops it calls faces."""
    logits = FaceLogits(net)(data.images)
    pred = logits.argmax(1)
    lab = data.labels
    out = {}
    for name, cls in (("face", FACE), ("non_face", NON_FACE)):
        m = lab == cls
        if m.any():
            out[f"{name}_recall"] = float((pred[m] == cls).float().mean())
    m = lab >= 0
    if m.any():
        out["accuracy"] = float((pred[m] == lab[m]).float().mean())
    m = lab == UNLABELLED
    if m.any():
        out["crops_called_face"] = float((pred[m] == FACE).float().mean())
    return out


if __name__ == "__main__":
    print(WEIGHTS_SOURCE)
    print(IMAGES_SOURCE)
    data = real_images(24, n_crops=200)
    rnet = load_rnet()
    print("RNet on 24x24:", face_accuracy(rnet, data))
    pnet = load_pnet()
    print("PNet (map mean) on 24x24:", face_accuracy(pnet, data))
    print("PNet (map mean) on 12x12:", face_accuracy(pnet, real_images(12, n_crops=200)))
