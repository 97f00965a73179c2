"""Cost of ``pc.extract`` per stage, as multiples of two baselines measured in the same run.

    python -m benchmarks.extract [--nets demo rnet resnet18] [--repeat 3] [--json PATH]
    python -m benchmarks.extract --contention      # OpenMP waiting with a competing process

For each network: the patch rows of its layer are collected once; then, medians of
``--repeat`` runs each:

- (a) one inference pass of the whole network over the same images (no grad, eval mode);
- (b) scikit-learn ``KMeans(n_clusters=K, n_init=10)`` on the same patch rows;
- ``pc.extract(model, layer, images, K)`` with its defaults (no refinement), timed per stage
  through its ``progress`` callback (patches, clustering, refinement, joint step, signal
  vectors), and the same with ``refine=True`` (the paper's refinement losses with URA).

Networks: ``demo`` is the shipped shapes CNN at ``features.relu5`` (400 images of 32 x 32,
25,600 patch rows x 64 channels, K = 16); ``rnet`` is the pretrained MTCNN RNet of
``benchmarks.real_network`` at ``prelu2`` (400 images of 24 x 24, 32,400 rows x 48 channels,
K = 16; its weights are fetched once into a cache); ``resnet18`` is a ResNet-18 of our own
definition (random weights: only the cost matters) at ``layer3`` (64 images of 224 x 224,
12,544 rows x 256 channels, K = 16).

``--contention`` runs the demo extraction in fresh processes while another process keeps one
core busy, with ``OMP_WAIT_POLICY`` ACTIVE (spinning workers) and PASSIVE (what pyconcepts
sets when it is imported before torch), and prints wall and CPU seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import pyconcepts as pc  # before torch: OpenMP's wait policy is read when torch loads it
import torch
from torch import nn

from .common import print_table, save_results

STAGES = ("patches", "clustering", "refinement", "joint step", "signal vectors")


# ----------------------------------------------------------------------------- networks
class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """The ResNet-18 layout (He et al. 2016): 7x7 stem, four stages of two basic blocks
    (64, 128, 256, 512 channels), global average pooling, a linear head."""

    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        widths, cin = (64, 128, 256, 512), 64
        for j, w in enumerate(widths):
            stride = 1 if j == 0 else 2
            setattr(self, f"layer{j + 1}", nn.Sequential(_Basic(cin, w, stride), _Basic(w, w, 1)))
            cin = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x):
        x = self.stem(x)
        for j in range(4):
            x = getattr(self, f"layer{j + 1}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _setup(name: str):
    """(model, layer, images, K, extra pc.extract arguments)."""
    if name == "demo":
        from pyconcepts.datasets.shapes import make_shapes
        from pyconcepts.demo.model import DEMO_LAYER
        from pyconcepts.demo.run import load_model

        images = make_shapes(400, seed=10, watermark="random", watermark_rate=0.3, with_masks=False).images
        return load_model(), DEMO_LAYER, images, 16, {}
    if name == "resnet18":
        torch.manual_seed(0)
        model = ResNet18().eval()
        images = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return model, "layer3", images, 16, {}
    if name == "rnet":  # the pretrained MTCNN RNet of benchmarks.real_network (fetched once)
        from .facenet_models import load_rnet, real_images

        return load_rnet(), "prelu2", real_images(24, n_crops=200, seed=0).images, 16, {"output": 1}
    raise ValueError(f"unknown network {name!r}")


# ----------------------------------------------------------------------------- timing
def _staged_extract(model, layer, images, k, **kwargs):
    """(total seconds, {stage: seconds}) of one pc.extract."""
    marks = []

    def progress(stage, done, total):
        if not marks or marks[-1][0] != stage:
            marks.append((stage, time.perf_counter()))

    start = time.perf_counter()
    pc.extract(model, layer, images, k, seed=0, progress=progress, **kwargs)
    end = time.perf_counter()
    stages = {}
    for j, (stage, t) in enumerate(marks):
        t_next = marks[j + 1][1] if j + 1 < len(marks) else end
        stages[stage] = stages.get(stage, 0.0) + t_next - (start if j == 0 else t)
    return end - start, stages


def _median(values):
    return statistics.median(values)


def bench_network(name: str, repeat: int):
    model, layer, images, k, extra = _setup(name)
    with torch.no_grad():
        rows = torch.cat(list(pc.LayerTap(model, layer).rows(images, 64))).float()
    inference = []
    for _ in range(repeat):
        t = time.perf_counter()
        with torch.no_grad():
            for start in range(0, images.shape[0], 64):
                model(images[start:start + 64])
        inference.append(time.perf_counter() - t)
    kmeans = []
    try:
        from sklearn.cluster import KMeans

        data = rows.numpy()
        for j in range(repeat):
            t = time.perf_counter()
            KMeans(n_clusters=k, n_init=10, random_state=j).fit(data)
            kmeans.append(time.perf_counter() - t)
    except ImportError:
        print("scikit-learn not installed: no k-means baseline (pip install scikit-learn)")
    pc.extract(model, layer, images[:8], 2, seed=0, refine=False)  # warm-up
    runs = {"defaults": [], "refine=True (URA)": []}
    for _ in range(repeat):
        runs["defaults"].append(_staged_extract(model, layer, images, k, **extra))
        runs["refine=True (URA)"].append(_staged_extract(model, layer, images, k, refine=True, **extra))
    t_inf = _median(inference)
    t_km = _median(kmeans) if kmeans else float("nan")
    table, out = [], {"network": name, "layer": layer, "rows": list(rows.shape), "k": k,
                      "inference_s": t_inf, "sklearn_kmeans_s": t_km, "extract": {}}
    for label, results in runs.items():
        total = _median([r[0] for r in results])
        stages = {s: _median([r[1].get(s, 0.0) for r in results]) for s in STAGES}
        out["extract"][label] = {"total_s": total, "stages_s": stages}
        for stage in STAGES:
            if stages[stage] > 0:
                table.append([label, stage, stages[stage], stages[stage] / t_inf, stages[stage] / t_km])
        table.append([label, "total", total, total / t_inf, total / t_km])
    print_table(
        f"{name}: {layer}, {rows.shape[0]} rows x {rows.shape[1]} channels, K = {k}; "
        f"inference {t_inf:.3f} s, scikit-learn KMeans(n_init=10) {t_km:.3f} s (medians of {repeat})",
        ["pc.extract", "stage", "seconds", "x inference", "x KMeans"], table)
    return out


# ----------------------------------------------------------------------------- contention
_ONE_RUN = """
import time, pyconcepts as pc, torch
from benchmarks.extract import _setup
model, layer, images, k, _ = _setup("demo")
pc.extract(model, layer, images[:8], 2, seed=0, refine=False)
t, c = time.perf_counter(), time.process_time()
pc.extract(model, layer, images, k, seed=0)
print(f"{time.perf_counter() - t:.3f} {time.process_time() - c:.3f}")
"""


def contention(repeat: int):
    rows = []
    for busy in (False, True):
        for policy in ("ACTIVE", "PASSIVE"):
            env = dict(os.environ, OMP_WAIT_POLICY=policy)
            walls, cpus = [], []
            for _ in range(repeat):
                rival = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                try:
                    out = subprocess.run([sys.executable, "-c", _ONE_RUN], env=env, check=True,
                                         capture_output=True, text=True,
                                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                finally:
                    if rival is not None:
                        rival.kill()
                        rival.wait()
                wall, cpu = map(float, out.stdout.split()[-2:])
                walls.append(wall)
                cpus.append(cpu)
            rows.append(["one busy process" if busy else "none", policy, _median(walls), _median(cpus)])
    print_table(f"demo pc.extract (defaults) in a fresh process, medians of {repeat}",
                ["competing", "OMP_WAIT_POLICY", "wall s", "CPU s"], rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=["demo", "rnet", "resnet18"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--contention", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f}, ISA {pc.ops.simd_level()}")
    payload = {}
    if args.contention:
        payload["contention"] = contention(args.repeat)
    else:
        payload["networks"] = [bench_network(name, args.repeat) for name in args.nets]
    save_results(args.json, payload)


if __name__ == "__main__":
    main()
