"""The built-in demo: concepts of the shipped shapes CNN, scored against ground truth, and the
model-correction experiment.

1. **Concept discovery.** ``pc.extract`` at ``DEMO_LAYER`` on shapes images (some carrying the
   watermark). Each detector's map, upsampled to the image, is scored against every concept's
   pixel masks on separate evaluation images (Network-Dissection IoU: intersections and unions
   summed over the images); a detector's score is its best-matching concept. Baselines on the
   same activations, with the same scoring: plain k-means (a detector = membership of a
   cluster) and PCA (a detector = a principal direction, either sign, firing on its top 1/K
   of positions, the rate of a K-way split).
2. **Model correction.** The network was trained with a backdoor: the watermark marks most
   images of class 0 (circle) and some other images labelled circle. The detector that best
   matches the watermark masks is the "watermark concept"; suppressing it at the layer (a
   permanent correction hook) should restore accuracy on poisoned test images (every image
   marked) without hurting clean ones. The control suppresses along the decoding direction
   instead of the signal vector.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Optional

import torch

from ..datasets.shapes import CLASSES, CONCEPTS, make_shapes
from .model import DEMO_LAYER, ShapesNet

__all__ = ["load_model", "run_demo", "print_demo", "WEIGHTS_PATH", "nd_iou"]

# Lighter than extract's defaults so that the whole demo fits in minutes on 2 cores.
DEMO_OPTIONS: dict = {}

WEIGHTS_PATH = os.path.join(os.path.dirname(__file__), "shapesnet.safetensors")


def load_model(path: str = WEIGHTS_PATH) -> ShapesNet:
    """The shipped demo network in eval mode (no download: the weights are in the package)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"demo weights not found at {path!r}; retrain them with `python -m pyconcepts.demo.train`"
        )
    model = ShapesNet()
    model.load_state_dict(load_file(path))
    return model.eval()


def nd_iou(detections: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(K, C) Network-Dissection IoU: ``detections`` (N, K, H, W) bool, ``masks`` (N, C, H, W)
    bool; intersections and unions are summed over all images."""
    k, c = detections.shape[1], masks.shape[1]
    inter = torch.zeros(k, c, dtype=torch.float64)
    total_d = detections.flatten(2).sum((0, 2)).double()        # (K,)
    total_m = masks.flatten(2).sum((0, 2)).double()             # (C,)
    d = detections.flatten(2).float()
    m = masks.flatten(2).float()
    for start in range(0, d.shape[0], 256):
        inter += torch.einsum("nkp,ncp->kc", d[start:start + 256], m[start:start + 256]).double()
    union = total_d[:, None] + total_m[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def _upsampled(values: torch.Tensor, tap, n_images: int, size) -> torch.Tensor:
    maps = tap.rows_to_maps(values, n_images)
    return torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Plain (Euclidean) k-means with k-means++ seeding; returns the centroids (K, D)."""
    g = torch.Generator().manual_seed(seed)
    centroids = [x[torch.randint(0, x.shape[0], (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centroids)).min(1).values ** 2
        centroids.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c


def run_demo(
    *,
    seed: int = 0,
    n_concepts: int = 16,
    n_extract: int = 400,
    n_eval: int = 400,
    n_test: int = 1000,
    refine: bool = True,
    ura: bool = True,
    progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
) -> Dict[str, object]:
    """Run both experiments and return every figure (the command line prints them)."""
    from ..extraction import extract
    from ..interventions import correct
    from ..taps import LayerTap

    t0 = time.time()
    model = load_model()
    tap = LayerTap(model, DEMO_LAYER)

    # ---------------------------------------------------------------- 1. concept discovery
    fit = make_shapes(n_extract, seed=seed + 10, watermark="random", watermark_rate=0.3, with_masks=False)
    basis = extract(model, DEMO_LAYER, fit.images, n_concepts, seed=seed, refine=refine, ura=ura,
                    options=DEMO_OPTIONS, progress=progress, model_id="pyconcepts-demo-shapesnet")
    t_extract = time.time() - t0

    ev = make_shapes(n_eval, seed=seed + 20, watermark="random", watermark_rate=0.3)
    rows_fit = torch.cat(list(tap.rows(fit.images, 128)))
    acts = [tap.activations(b) for b in ev.images.split(128)]
    rows_ev = torch.cat([tap.to_rows(a) for a in acts])
    size = tuple(ev.images.shape[-2:])
    n_ev = ev.images.shape[0]

    ours = _upsampled(rows_ev @ basis.decoding.T - basis.bias, tap, n_ev, size) > 0

    centroids = _kmeans(rows_fit, n_concepts, seed)
    # a position belongs to the cluster of its nearest centroid; upsample the one-hot
    # membership margins (distance to the nearest other centroid minus distance to this one)
    dist = torch.cdist(rows_ev, centroids)
    nearest_other = torch.stack([
        torch.cat([dist[:, :j], dist[:, j + 1:]], 1).min(1).values for j in range(n_concepts)], 1)
    kmeans_det = _upsampled(nearest_other - dist, tap, n_ev, size) > 0

    mean = rows_fit.mean(0)
    _, _, v = torch.linalg.svd(rows_fit - mean, full_matrices=False)
    comps = torch.cat([v[: (n_concepts + 1) // 2], -v[: n_concepts // 2]])[:n_concepts]
    proj_fit = (rows_fit - mean) @ comps.T
    thresholds = torch.quantile(proj_fit, 1 - 1 / n_concepts, dim=0)
    pca_det = _upsampled((rows_ev - mean) @ comps.T - thresholds, tap, n_ev, size) > 0

    results = {}
    for name, det in (("pyconcepts", ours), ("kmeans", kmeans_det), ("pca", pca_det)):
        iou = nd_iou(det, ev.masks)
        best, which = iou.max(1)
        results[name] = {
            "mean_best_iou": float(best.mean()),
            "best_iou": [round(float(b), 4) for b in best],
            "best_concept": [CONCEPTS[int(j)] for j in which],
            "concepts_covered": sorted({CONCEPTS[int(j)] for j, b in zip(which, best) if b >= 0.2}),
        }
    ours_iou = nd_iou(ours, ev.masks)
    wm = CONCEPTS.index("watermark")
    watermark_concept = int(ours_iou[:, wm].argmax())

    # ---------------------------------------------------------------- 2. model correction
    t1 = time.time()
    clean = make_shapes(n_test, seed=seed + 30, watermark="none", with_masks=False)
    poisoned = make_shapes(n_test, seed=seed + 30, watermark="all", with_masks=False)

    def accuracy(data) -> float:
        with torch.no_grad():
            preds = torch.cat([model(b).argmax(1) for b in data.images.split(250)])
        return float((preds == data.labels).float().mean())

    table = {"before": {"clean": accuracy(clean), "poisoned": accuracy(poisoned)}}
    for direction in ("encoding", "decoding"):
        fix = correct(model, basis, [watermark_concept], direction=direction)
        try:
            table[f"suppress_{direction}"] = {"clean": accuracy(clean), "poisoned": accuracy(poisoned)}
        finally:
            fix.remove()
    t_correct = time.time() - t1
    return {
        "layer": DEMO_LAYER,
        "n_concepts": n_concepts,
        "concepts": list(CONCEPTS),
        "classes": list(CLASSES),
        "discovery": results,
        "watermark_concept": watermark_concept,
        "watermark_concept_iou": float(ours_iou[watermark_concept, wm]),
        "correction": table,
        "poisoned_gain": table["suppress_encoding"]["poisoned"] - table["before"]["poisoned"],
        "clean_change": table["suppress_encoding"]["clean"] - table["before"]["clean"],
        "seconds": {"extract": round(t_extract, 1), "correction": round(t_correct, 1),
                    "total": round(time.time() - t0, 1)},
        "basis_metadata": {k: basis.metadata.get(k) for k in ("method", "n_patches", "silent_detectors")},
    }


def print_demo(res: Dict[str, object], file=None) -> None:
    """The demo's tables, as plain text."""
    import sys

    out = file or sys.stdout
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\nConcept discovery at layer {res['layer']} ({res['n_concepts']} concepts), "
      "Network-Dissection IoU against the true concept masks (held-out images)")
    p(f"  {'method':<12} {'mean best-match IoU':>20}   concepts matched (IoU >= 0.2)")
    for name, label in (("pyconcepts", "pyconcepts"), ("kmeans", "k-means"), ("pca", "PCA")):
        r = res["discovery"][name]
        p(f"  {label:<12} {r['mean_best_iou']:>20.3f}   {', '.join(r['concepts_covered']) or '-'}")
    ours = res["discovery"]["pyconcepts"]
    p("  pyconcepts detectors: " + ", ".join(
        f"{i}:{c}({b:.2f})" for i, (c, b) in enumerate(zip(ours["best_concept"], ours["best_iou"]))))
    p(f"\nModel correction: suppress concept {res['watermark_concept']} "
      f"(watermark detector, IoU {res['watermark_concept_iou']:.2f}) at {res['layer']}")
    p(f"  {'':<34} {'clean acc':>10} {'poisoned acc':>13}")
    names = {"before": "before", "suppress_encoding": "suppressed along s (signal vector)",
             "suppress_decoding": "suppressed along w (filter, control)"}
    for key, label in names.items():
        row = res["correction"][key]
        p(f"  {label:<34} {row['clean']:>10.3f} {row['poisoned']:>13.3f}")
    p(f"  poisoned accuracy gain {res['poisoned_gain']:+.3f}, clean accuracy change {res['clean_change']:+.3f}")
    s = res["seconds"]
    p(f"\n  time: extraction {s['extract']} s, correction {s['correction']} s, total {s['total']} s")


def write_json(res: Dict[str, object], path: str) -> None:
    """Write the figures atomically."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(res, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
