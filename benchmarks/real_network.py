"""Concepts of a real pretrained network on real images: pyconcepts against PCA, NMF,
spherical k-means and a TopK sparse autoencoder on the same activations.

    python -m benchmarks.real_network [--layer prelu2] [-k 16] [--crops 200] [--seeds 0 1]
                                      [--methods pyconcepts pca nmf kmeans sae] [--json PATH]

Network: MTCNN's trained RNet face detector (24 x 24 inputs; face / non-face logits), weights
from the facenet-pytorch 2.6.0 wheel (MIT licence, (c) 2019 Timothy Esler), files
facenet_pytorch/data/rnet.pt, fetched once with ``pip download --no-deps`` into
~/.cache/pyconcepts-bench and loaded by ``benchmarks.facenet_models`` (its own module
definitions; the package itself is never installed). The model returns a tuple
(box regression, class logits): every pyconcepts call here passes ``output=1``.
Images: scikit-image's bundled data: ``lfw_subset`` (100 faces, 100 non-faces) and random
crops of its photos (unlabelled), grey, 24 x 24. Needs scikit-image, scikit-learn and scipy
(``pip install -e ".[bench]"``); not a test dependency.

Protocol. The images are split (seeded, stratified) into halves A and B. Each method is fitted
on A, on B, and on A + B with two seeds.
- stability: between the A and B fits and between the two seeds, Hungarian-matched
  (scipy.optimize.linear_sum_assignment) |cosine| of the decoding directions (what reads a
  concept) and of the encoding directions (what a concept adds), and the matched Jaccard of
  the detection sets on all patches of A + B;
- faithfulness (the A + B fit, first seed): each method ranks its concepts greedily by the
  drop of the class margin (e.g. face logit - non-face logit) on half A's images of the class
  when they are removed; the top-m (m = 1..5) are then removed from half B's images of the
  class, which rank nothing:
  the mean margin drop, and the drop per unit of activation energy moved (the mean squared
  change of the patch rows over their mean squared deviation from the mean);
- side effects: of the half-B images of the other class (for the face target: lfw non-faces
  and photo crops), how many the network puts in the target class after the same removal
  (flips), and how far their target-class margin moves toward it on average (other shift);
  the faithfulness and side-effect figures are given for both targets, face and non-face;
- selectivity: for the top-5 concepts, their detection rate on lfw face patches over their
  rate on lfw non-face patches;
- wall time of each fit.

Removal: the baselines mean-ablate (a concept's code is set to its mean at every patch:
x - (c_i(x) - mean c_i) d_i; for PCA also on one side only: ``pca:lower`` moves the codes above
the mean down to it, ``pca:raise`` those below it up); pyconcepts removes as ``pc.intervene(remove=...)`` does: its
default (``membership='all'``: each concept's latent factor lowered to its absent level at
every patch where it is above it), the detector-gated ``membership='soft'`` (``pc.correct``'s
default) and ``'hard'``, and, for comparison, the plain projection x - a_hat_i(x) s_i along
its encoding directions (``set={i: 0}``). ``pyconcepts+refine`` is ``pc.extract(refine=True)``
(the paper's refinement losses with URA).

Stability across halves is the mean over ``--splits`` seeded stratified splits (one split is
noisy: the matched cosine moved by +-0.05 between splits); the faithfulness figures are the
mean over the first ``--faith-splits`` of them (each ranks on its own half A and measures on its
half B; the per-split drops are printed beside the mean). pyconcepts' greedy order
for the face target is also computed by ``pc.rank_concepts(..., greedy=5)`` and printed
beside the benchmark's own loop (they must agree).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import pyconcepts as pc
from pyconcepts.interventions import edit_rows

from .common import print_table, save_results
from .facenet_models import (FACE, IMAGES_SOURCE, NON_FACE, UNLABELLED, WEIGHTS_SOURCE, FaceLogits,
                             face_accuracy, load_rnet, real_images)

OUTPUT = 1          # RNet returns (box regression, class logits)
FACE_CLASS = 1


# ------------------------------------------------------------------------------ methods
@dataclass
class Concepts:
    """A method's concepts on the layer: decoding (K, D) rows read a concept, encoding (K, D)
    rows are what it adds; ``detect(rows) -> (N, K) bool``; ``remove(rows, idx) -> rows``.
    ``removals`` holds extra removal modes (pyconcepts only)."""

    name: str
    decoding: torch.Tensor
    encoding: torch.Tensor
    detect: Callable[[torch.Tensor], torch.Tensor]
    remove: Callable[[torch.Tensor, Sequence[int]], torch.Tensor]
    seconds: float
    removals: Dict[str, Callable] = field(default_factory=dict)


def _mean_ablate(codes_fn, atoms: torch.Tensor, code_mean: torch.Tensor):
    def remove(rows, idx):
        if not idx:
            return rows
        idx = list(idx)
        c = codes_fn(rows)[:, idx]
        return rows - (c - code_mean[idx]) @ atoms[idx]
    return remove


def fit_pca(rows: torch.Tensor, k: int, seed: int) -> Concepts:
    t0 = time.perf_counter()
    mu = rows.mean(0)
    xc = (rows - mu).double()
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:k].float()
    z = (rows - mu) @ v.T
    # a component's sign is arbitrary: orient it so that its long tail is positive
    skew = ((z - z.mean(0)) ** 3).mean(0)
    v = v * torch.where(skew < 0, -1.0, 1.0)[:, None]
    std = ((rows - mu) @ v.T).std(0)
    seconds = time.perf_counter() - t0

    def codes(r):
        return (r - mu) @ v.T

    def one_sided(clamp):
        # mean ablation on one side only: "lower" moves codes above the mean down to it (what a
        # removal that never adds a concept does), "raise" moves the codes below it up
        def remove(rows, idx):
            if not idx:
                return rows
            idx = list(idx)
            return rows - clamp(codes(rows)[:, idx]) @ v[idx]
        return remove

    removals = {"lower": one_sided(lambda c: c.clamp_min(0)), "raise": one_sided(lambda c: c.clamp_max(0))}
    return Concepts("pca", v, v, lambda r: codes(r) > std, _mean_ablate(codes, v, torch.zeros(k)), seconds,
                    removals)


def fit_kmeans(rows: torch.Tensor, k: int, seed: int) -> Concepts:
    t0 = time.perf_counter()
    km = pc.DirectionalClustering(n_concepts=k, seed=seed, n_init=10).fit(rows)
    c = km.centroids_.float()
    mu = km.mean_.float()
    seconds = time.perf_counter() - t0

    def codes(r):
        return (r - mu) @ c.T

    def detect(r):
        lab = km.predict(r)
        return torch.nn.functional.one_hot(lab, k).bool()
    return Concepts("kmeans", c, c, detect, _mean_ablate(codes, c, torch.zeros(k)), seconds)


def fit_nmf(rows: torch.Tensor, k: int, seed: int) -> Concepts:
    import warnings
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # max_iter is the budget
    t0 = time.perf_counter()
    shift = rows.min(0).values
    x = (rows - shift).clamp_min(0).double().numpy()
    model = NMF(n_components=k, init="nndsvda", max_iter=400, random_state=seed)
    codes_fit = torch.from_numpy(model.fit_transform(x)).float()
    h = torch.from_numpy(model.components_).float()                 # (K, D) atoms
    decoding = torch.linalg.pinv(h).T.contiguous()                   # least-squares read-out
    mean = codes_fit.mean(0)
    cut = mean + codes_fit.std(0)
    seconds = time.perf_counter() - t0

    def codes(r):
        xr = (r - shift).clamp_min(0).double().numpy()
        return torch.from_numpy(model.transform(xr)).float()
    return Concepts("nmf", decoding, h, lambda r: codes(r) > cut, _mean_ablate(codes, h, mean), seconds)


def fit_sae(rows: torch.Tensor, k: int, seed: int, topk: int = 4, steps: int = 2000) -> Concepts:
    """TopK sparse autoencoder: z = TopK(ReLU(E (x - b) + c)), x ~ D z + b, unit atoms."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    d = rows.shape[1]
    b = rows.mean(0).clone()
    scale = (rows - b).norm(dim=1).mean()
    atoms = torch.randn(k, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    dec = atoms.clone().requires_grad_(True)
    enc = atoms.clone().requires_grad_(True)
    c = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([dec, enc, c], lr=2e-3)
    topk = min(topk, k)

    def encode(x, e=None, cc=None):
        e = enc if e is None else e
        cc = c if cc is None else cc
        pre = torch.relu((x - b) / scale @ e.T + cc)
        val, ind = pre.topk(topk, dim=1)
        return torch.zeros_like(pre).scatter(1, ind, val)

    n = rows.shape[0]
    for _ in range(steps):
        batch = rows[torch.randint(n, (1024,), generator=g)]
        z = encode(batch)
        unit = dec / dec.norm(dim=1, keepdim=True)
        loss = (((z @ unit) - (batch - b) / scale) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        atoms = (dec / dec.norm(dim=1, keepdim=True)).detach()
        e, cc = enc.detach(), c.detach()
        code_mean = torch.cat([encode(ch, e, cc) for ch in rows.split(65536)]).mean(0)
    seconds = time.perf_counter() - t0

    def codes(r):
        return encode(r, e, cc) * scale
    return Concepts("sae", e, atoms, lambda r: codes(r) > 0,
                    _mean_ablate(codes, atoms, code_mean * scale), seconds)


def fit_pyconcepts(model, layer, images, k, seed, options=None, refine=False, name="pyconcepts") -> Concepts:
    t0 = time.perf_counter()
    basis = pc.extract(model, layer, images, k, seed=seed, output=OUTPUT, options=options, refine=refine)
    seconds = time.perf_counter() - t0
    w, bias, s, mu = basis.decoding, basis.bias, basis.encoding, basis.mean

    def edit(**kw):
        def remove(rows, idx):
            if not idx:
                return rows
            return edit_rows(rows, w, bias, s, mu, remove=list(idx), absent_level=basis.absent_level, **kw)
        return remove

    def project(rows, idx):
        if not idx:
            return rows
        return edit_rows(rows, w, bias, s, mu, set={int(i): 0.0 for i in idx})

    removals = {"soft": edit(membership="soft"), "hard": edit(membership="hard"), "projection": project}
    con = Concepts(name, w, s, basis.detect, edit(), seconds, removals)
    con.basis = basis
    return con


# ---------------------------------------------------------------------------- measures
def hungarian(sim: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment
    r, c = linear_sum_assignment(-sim)
    return sim[r, c]


def matched_abs_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float(hungarian((an @ bn.T).abs().double().numpy()).mean())


def matched_jaccard(da: torch.Tensor, db: torch.Tensor, per_concept: bool = False):
    """Mean Hungarian-matched Jaccard of two detection sets; with ``per_concept``, the (K,)
    overlaps of da's concepts with their partners."""
    from scipy.optimize import linear_sum_assignment

    a, b = da.float(), db.float()
    inter = a.T @ b
    union = a.sum(0)[:, None] + b.sum(0)[None, :] - inter
    jac = (inter / union.clamp_min(1)).double().numpy()
    if per_concept:
        r, c = linear_sum_assignment(-jac)
        out = np.zeros(jac.shape[0])
        out[r] = jac[r, c]
        return out
    return float(hungarian(jac).mean())


class Evaluator:
    """Runs the network's rest (f+) on edited layer rows of fixed images."""

    def __init__(self, model, layer: str, images: torch.Tensor, cls: int):
        self.tap = pc.LayerTap(model, layer)
        self.images = images
        self.cls = cls
        with torch.no_grad():
            self.acts = self.tap.activations(images)
            self.rows = self.tap.to_rows(self.acts).float()
            self.base = self.margin_of(self.rows)

    def margin_of(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.tap.forward_with(self.images, lambda _: self.tap.from_rows(rows, self.acts))
        logits = out[OUTPUT]
        return logits[:, self.cls] - logits[:, 1 - self.cls]

    def after(self, remove, idx) -> Dict[str, object]:
        new = remove(self.rows, list(idx))
        margin = self.margin_of(new)
        moved = ((new - self.rows) ** 2).sum(1).mean()
        return {"margin": margin, "energy": float(moved)}


def greedy_ranking(remove, evaluator: Evaluator, k: int, m: int) -> List[int]:
    """Concepts chosen one at a time, each the one whose removal (with those already chosen)
    lowers the mean class margin the most."""
    chosen: List[int] = []
    for _ in range(m):
        best, best_drop = None, -float("inf")
        for c in range(k):
            if c in chosen:
                continue
            drop = float((evaluator.base - evaluator.after(remove, chosen + [c])["margin"]).mean())
            if drop > best_drop:
                best, best_drop = c, drop
        chosen.append(best)
    return chosen


def mean_of(rows: List[Dict[str, float]]) -> Dict[str, float]:
    """Field-wise mean of faithfulness rows (one per split)."""
    out = {key: statistics.mean(float(r[key]) for r in rows) for key in rows[0]}
    out["m"] = int(rows[0]["m"])
    return out


def faithfulness(remove, order: List[int], faces: Evaluator, others: Evaluator,
                 spread: float, max_m: int) -> List[Dict[str, float]]:
    """``faces``: images of the target class; ``others``: images of the other class (their
    margin is the target class's too, so a flip is a margin turning positive)."""
    out = []
    other_neg = others.base < 0   # images the network puts in the other class
    for m in range(1, max_m + 1):
        idx = order[:m]
        f = faces.after(remove, idx)
        drop = float((faces.base - f["margin"]).mean())
        energy = f["energy"] / spread
        o = others.after(remove, idx)
        flips = int(((o["margin"] > 0) & other_neg).sum())
        # how far the other class's images move toward the target class (a side effect even
        # where no prediction flips)
        shift = float((o["margin"] - others.base)[other_neg].mean()) if other_neg.any() else 0.0
        out.append({"m": m, "margin_drop": drop, "energy": energy,
                    "drop_per_energy": drop / max(energy, 1e-12),
                    "flips": flips, "flip_rate": flips / max(int(other_neg.sum()), 1),
                    "other_shift": shift})
    return out


# --------------------------------------------------------------------------------- main
def split_halves(labels: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(labels.numel(), dtype=torch.bool)
    for cls in (FACE, NON_FACE, UNLABELLED):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        a[idx[: idx.numel() // 2]] = True
    return a, ~a


def host_isa() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    have = [n for n in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f" {n}" in flags]
    return f"{platform.machine()} {' '.join(have)}".strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="prelu2", help="RNet layer (prelu1: 28 ch 22x22, prelu2: 48 ch 9x9)")
    ap.add_argument("-k", "--concepts", type=int, default=16)
    ap.add_argument("--crops", type=int, default=200, help="photo crops added to the 200 lfw images")
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--max-m", type=int, default=5)
    ap.add_argument("--methods", nargs="+",
                    default=["pyconcepts", "pyconcepts+refine", "pca", "nmf", "kmeans", "sae"])
    ap.add_argument("--splits", type=int, default=3, help="random halves the stability is averaged over")
    ap.add_argument("--faith-splits", type=int, default=3,
                    help="of those splits, how many the faithfulness is averaged over (each ranks on its "
                         "half A and measures on its half B)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (1 by default: on a shared, oversubscribed host "
                         "two threads ran these small fits 7-9x slower than one)")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    torch.manual_seed(0)
    k, seed0, seed1 = args.concepts, args.seeds[0], args.seeds[1]
    print(f"weights: {WEIGHTS_SOURCE}")
    print(f"images: {IMAGES_SOURCE}")
    print(f"host: {host_isa()}, torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    model = load_rnet()
    data = real_images(24, n_crops=args.crops, seed=seed0)
    acc = face_accuracy(model, data)
    print(f"RNet on lfw_subset: accuracy {acc['accuracy']:.3f} (faces {acc['face_recall']:.2f}, "
          f"non-faces {acc['non_face_recall']:.2f}); photo crops called faces {acc['crops_called_face']:.3f}")
    half_a, half_b = split_halves(data.labels, seed0)
    tap = pc.LayerTap(model, args.layer)
    with torch.no_grad():
        all_rows = tap.to_rows(tap.activations(data.images)).float()
    per_image = all_rows.shape[0] // data.images.shape[0]
    row_label = data.labels.repeat_interleave(per_image)
    print(f"layer {args.layer}: {per_image} patches x {all_rows.shape[1]} channels per image; "
          f"{data.images.shape[0]} images, halves of {int(half_a.sum())} / {int(half_b.sum())}; K = {k}")

    # the faithfulness halves are split seed0's; the stability is averaged over --splits splits
    splits = [split_halves(data.labels, seed0 + j) for j in range(max(1, args.splits))]

    def fit(method, part: str, seed: int, split: int = 0) -> Concepts:
        sel_a = splits[split][0]
        if method.startswith("pyconcepts"):
            imgs = {"a": data.images[sel_a], "b": data.images[~sel_a], "all": data.images}[part]
            return fit_pyconcepts(model, args.layer, imgs, k, seed, refine=method == "pyconcepts+refine",
                                  name=method)
        rows_sel = sel_a.repeat_interleave(per_image)
        rows = {"a": all_rows[rows_sel], "b": all_rows[~rows_sel], "all": all_rows}[part]
        return {"pca": fit_pca, "nmf": fit_nmf, "kmeans": fit_kmeans, "sae": fit_sae}[method](rows, k, seed)

    # faithfulness sets, per split and target class: rank on half A's images of the class,
    # measure the drop on half B's images of the class and the flips on half B's images of the
    # other class
    photo = data.labels == UNLABELLED
    n_faith = max(1, min(args.faith_splits, len(splits)))
    split_sets = []
    for half_a, half_b in splits[:n_faith]:
        targets = {
            "face": (half_a & (data.labels == FACE), half_b & (data.labels == FACE),
                     half_b & ((data.labels == NON_FACE) | photo), FACE_CLASS),
            "non-face": (half_a & (data.labels == NON_FACE), half_b & (data.labels == NON_FACE),
                         half_b & (data.labels == FACE), 1 - FACE_CLASS),
        }
        sets = {}
        for name, (sel_a, sel_b, sel_o, cls) in targets.items():
            ev_b = Evaluator(model, args.layer, data.images[sel_b], cls)
            sets[name] = (Evaluator(model, args.layer, data.images[sel_a], cls), ev_b,
                          Evaluator(model, args.layer, data.images[sel_o], cls),
                          float(((ev_b.rows - all_rows.mean(0)) ** 2).sum(1).mean()))
        split_sets.append(sets)
    sets = split_sets[0]
    face_rows = all_rows[row_label == FACE]
    nonface_rows = all_rows[row_label == NON_FACE]

    results = {"host": host_isa(), "weights": WEIGHTS_SOURCE, "images": IMAGES_SOURCE,
               "layer": args.layer, "k": k, "n_images": int(data.images.shape[0]),
               "rnet_accuracy": acc, "methods": {}}
    stab_rows, faith_rows, summary_rows = [], [], []
    for method in args.methods:
        print(f"\n[{method}] fitting on A and B ({len(splits)} splits), A+B (seeds {seed0}, {seed1}) ...",
              flush=True)
        halves = {"halves_decoding_cos": [], "halves_encoding_cos": [], "halves_jaccard": []}
        times, half_fits = [], []
        for j in range(len(splits)):
            fa, fb = fit(method, "a", seed0, j), fit(method, "b", seed0, j)
            half_fits += [fa, fb]
            times += [fa.seconds, fb.seconds]
            halves["halves_decoding_cos"].append(matched_abs_cosine(fa.decoding, fb.decoding))
            halves["halves_encoding_cos"].append(matched_abs_cosine(fa.encoding, fb.encoding))
            halves["halves_jaccard"].append(matched_jaccard(fa.detect(all_rows), fb.detect(all_rows)))
        f0 = fit(method, "all", seed0)
        f1 = fit(method, "all", seed1)
        times += [f0.seconds, f1.seconds]
        stab = {
            **{key: statistics.mean(v) for key, v in halves.items()},
            "halves_per_split": halves,
            "seeds_decoding_cos": matched_abs_cosine(f0.decoding, f1.decoding),
            "seeds_encoding_cos": matched_abs_cosine(f0.encoding, f1.encoding),
            "seeds_jaccard": matched_jaccard(f0.detect(all_rows), f1.detect(all_rows)),
            "fit_seconds_median": statistics.median(times), "fit_seconds": times,
        }
        stab_rows.append([method, stab["halves_decoding_cos"], stab["halves_encoding_cos"], stab["halves_jaccard"],
                          stab["seeds_decoding_cos"], stab["seeds_encoding_cos"], stab["seeds_jaccard"],
                          stab["fit_seconds_median"]])
        removals = {"default": f0.remove, **f0.removals}
        res_m = {"stability": stab, "removal": {}}
        rate_face = f0.detect(face_rows).float().mean(0)
        rate_nonface = f0.detect(nonface_rows).float().mean(0)
        for target in sets:
            own, other = (rate_face, rate_nonface) if target == "face" else (rate_nonface, rate_face)
            for mode, remove in removals.items():
                label = method if mode == "default" else f"{method}:{mode}"
                per_split = []
                for split_set in split_sets:
                    ev_a, ev_b, ev_o, spread = split_set[target]
                    order = greedy_ranking(remove, ev_a, k, args.max_m)
                    faith = faithfulness(remove, order, ev_b, ev_o, spread, args.max_m)
                    selectivity = float(own[order[:5]].sum() / other[order[:5]].sum().clamp_min(1e-6))
                    per_split.append({"order": order, "faithfulness": faith, "selectivity_top5": selectivity,
                                      "own_rate_top5": own[order[:5]].tolist(),
                                      "other_rate_top5": other[order[:5]].tolist()})
                faith = [mean_of([p["faithfulness"][i] for p in per_split]) for i in range(args.max_m)]
                selectivity = statistics.mean(p["selectivity_top5"] for p in per_split)
                res_m["removal"][f"{target}/{mode}"] = {
                    "order": per_split[0]["order"], "faithfulness": faith, "selectivity_top5": selectivity,
                    "per_split": per_split}
                for r in faith:
                    faith_rows.append([target, label, r["m"], r["margin_drop"], r["energy"], r["drop_per_energy"],
                                       r["flips"], f"{r['flip_rate']:.3f}", r["other_shift"]])
                last = faith[-1]
                drops = " ".join(f"{p['faithfulness'][-1]['margin_drop']:.2f}" for p in per_split)
                summary_rows.append([target, label, last["margin_drop"], drops, last["drop_per_energy"],
                                     last["flips"], f"{last['flip_rate']:.3f}", last["other_shift"], selectivity,
                                     " ".join(str(p["order"]) for p in per_split)])
        if method == "pyconcepts":
            ev_a = sets["face"][0]
            ranking = pc.rank_concepts(model, f0.basis, ev_a.images, output=OUTPUT,
                                       target=lambda l: l[:, FACE_CLASS] - l[:, 1 - FACE_CLASS],
                                       method="removal", greedy=args.max_m)
            res_m["rank_concepts_greedy_face"] = ranking.concepts
            # does the per-concept restart agreement (metadata) say which concepts another
            # seed gives back?
            agreement = f0.basis.metadata.get("concept_agreement")
            if agreement is not None:
                seed_jac = matched_jaccard(f0.detect(all_rows), f1.detect(all_rows), per_concept=True)
                agree = np.asarray(agreement)
                low = agree < 0.5
                corr = float(np.corrcoef(agree, seed_jac)[0, 1])
                res_m["concept_agreement_vs_seed_jaccard"] = {
                    "agreement": agree.tolist(), "seed_jaccard": seed_jac.tolist(), "correlation": corr}
                print(f"per concept: restart agreement vs Jaccard with the other seed's partner: r = {corr:.2f}; "
                      f"agreement < 0.5: {int(low.sum())} concepts, their Jaccard "
                      f"{np.round(seed_jac[low], 2).tolist()} (the others: mean {seed_jac[~low].mean():.2f}, "
                      f"min {seed_jac[~low].min():.2f})")
            # the split-half check a user runs (other random halves than the benchmark's): does
            # it say which concepts the benchmark's own halves give back?
            t0 = time.perf_counter()
            check = pc.concept_stability(model, f0.basis, data.images, splits=3, seed=seed0)
            check_seconds = time.perf_counter() - t0
            per_half = np.stack([pc.compare_bases(f0.basis, h.basis, all_rows).jaccard.numpy() for h in half_fits])
            reference = per_half.mean(0)
            from pyconcepts.stability import unstable_concepts
            reference_marked = unstable_concepts(reference, per_half.min(0))
            corr_check = float(np.corrcoef(check.jaccard.numpy(), reference)[0, 1])
            res_m["concept_stability"] = {
                "half_with_half": check.half_with_half, "per_concept": check.jaccard.tolist(),
                "benchmark_halves_per_concept": reference.tolist(), "correlation": corr_check,
                "marked": check.unstable(), "benchmark_marked": reference_marked,
                "seconds": check_seconds}
            line = (f"pc.concept_stability(splits=3): half with half {check.half_with_half:.3f} (the benchmark's "
                    f"halves: {statistics.mean(halves['halves_jaccard']):.3f}); per concept vs the Jaccard with "
                    f"partners in the benchmark's halves: r = {corr_check:.2f}")
            if agreement is not None:
                line += f" (restart agreement: r = {float(np.corrcoef(agree, reference)[0, 1]):.2f})"
            print(line + f"; marked (mean below 0.5 or a half below 0.2): {check.unstable()} (by the benchmark's "
                  f"halves: {reference_marked}); {check_seconds:.1f} s")
            print(f"pc.rank_concepts(method='removal', greedy={args.max_m}) on half-A faces: "
                  f"{ranking.concepts} (the benchmark's greedy loop: {res_m['removal']['face/default']['order']})")
        results["methods"][method] = res_m

    print_table("Stability (Hungarian-matched |cos| of directions; matched Jaccard of detections on all patches)",
                ["method", "halves dec cos", "halves enc cos", "halves Jaccard", "seeds dec cos",
                 "seeds enc cos", "seeds Jaccard", "fit s (median)"], stab_rows)
    sizes = ", ".join(f"{t}: {sets[t][1].images.shape[0]} images, {int((sets[t][2].base < 0).sum())} others"
                      for t in sets)
    print_table(f"Faithfulness: the top-m concepts of the target class (greedy on half A) removed from half B's "
                f"images of the class ({sizes}); flips: half-B images of the other class that move to the target class",
                ["target", "method", "m", "margin drop", "energy moved", "drop / energy", "flips", "flip rate",
                 "other shift"], faith_rows)
    print_table(f"Summary at m = {args.max_m}, mean over {n_faith} splits (flips: mean count per split; "
                "selectivity: detection rate of the top 5 on the target class's lfw patches over the other class's)",
                ["target", "method", "margin drop", "per split", "drop / energy", "flips", "flip rate",
                 "other shift", "selectivity", "top concepts per split"], summary_rows)
    save_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
