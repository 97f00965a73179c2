"""Recovery of concept direction pairs on the synthetic model (METHOD.md section 6).

    python -m benchmarks.recovery [--patches 200000] [--seeds 0 1 2] [--quick] [--json PATH]

Runs the real ``pc.extract_directions`` on data from ``pyconcepts.synthetic`` and prints, per
configuration and seed: signed cosine of the encoding directions to the truth (Hungarian
matched; mean and min), decoding-direction cosine to the ideal filters, detector IoU with the
true presence (mean and min), and the wall time. Targets: mean cos >= 0.98,
min cos >= 0.95, every IoU >= 0.85.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import pyconcepts as pc
from pyconcepts.metrics import recovery_report
from pyconcepts.synthetic import SyntheticModel

CONFIGS = {
    "D64 I10 6dist": dict(dim=64, n_concepts=10, n_distractors=6),
    "D64 I10 6dist none0.1 noise0.05": dict(dim=64, n_concepts=10, n_distractors=6, none_fraction=0.1, noise=0.05),
    "D128 I20 10dist": dict(dim=128, n_concepts=20, n_distractors=10),
    "D64 I10 6dist overlap0.2": dict(dim=64, n_concepts=10, n_distractors=6, overlap=0.2),
    "D256 I32 16dist noise0.02": dict(dim=256, n_concepts=32, n_distractors=16, noise=0.02),
}
# Background sweep: a share of the patches carries no concept (real layers are mostly
# background), noise-free, distractors not orthogonal to the concepts (|cos| up to 0.5): the
# ideal filters (pseudo-inverse rows) detect perfectly there. Target: every IoU >= 0.95.
BACKGROUND = {
    f"D64 I10 6dist none{share:g}": dict(dim=64, n_concepts=10, n_distractors=6, none_fraction=share)
    for share in (0.1, 0.2, 0.3, 0.4, 0.5)
}
PAPER = dict(dim=16, n_concepts=3, n_distractors=2)


def run(name, kwargs, n, seed):
    model = SyntheticModel(seed=seed, **kwargs)
    data = model.sample(n)
    start = time.perf_counter()
    basis = pc.extract_directions(data.x, n_concepts=model.n_concepts, seed=seed)
    seconds = time.perf_counter() - start
    rep = recovery_report(basis, data)
    rep.update(config=name, seed=seed, patches=n, seconds=seconds,
               passes=(rep["encoding_cosine_mean"] >= 0.98 and rep["encoding_cosine_min"] >= 0.95
                       and rep["iou_min"] >= 0.85))
    return rep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=200_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help="names from CONFIGS")
    ap.add_argument("--background", action="store_true",
                    help="the background sweep instead (10-50%% of the patches carry no concept)")
    ap.add_argument("--quick", action="store_true", help="50k patches, seed 0, first two configs")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.patches, args.seeds, args.configs = 50_000, [0], list(CONFIGS)[:2]
    if args.background:
        return background(args)
    rows = []
    header = f"{'config':34s} {'seed':>4s} {'enc cos mean':>12s} {'enc min':>8s} {'dec cos':>8s} {'IoU mean':>9s} {'IoU min':>8s} {'s':>6s} ok"
    print(f"synthetic recovery, {args.patches} patches per run (torch threads: {torch.get_num_threads()})")
    print(header)
    for name in args.configs:
        for seed in args.seeds:
            r = run(name, CONFIGS[name], args.patches, seed)
            rows.append(r)
            print(f"{name:34s} {seed:4d} {r['encoding_cosine_mean']:12.4f} {r['encoding_cosine_min']:8.4f} "
                  f"{r['decoding_cosine_mean']:8.4f} {r['iou_mean']:9.4f} {r['iou_min']:8.4f} {r['seconds']:6.1f} "
                  f"{'yes' if r['passes'] else 'NO'}", flush=True)
    print("\npaper's tiny setup (D=16, I=3, 2 distractors, 6000 patches, one concept per patch; "
          "paper with URA: IoU 0.96/0.92/0.96)")
    paper = []
    for seed in args.seeds:
        r = run("paper D16 I3 2dist", PAPER, 6000, seed)
        paper.append(r)
        print(f"  seed {seed}: IoU {', '.join(f'{v:.3f}' for v in r['iou'])}; "
              f"encoding cos {', '.join(f'{v:.3f}' for v in r['encoding_cosine'])}")
    failed = [f"{r['config']} seed {r['seed']}" for r in rows if not r["passes"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} runs meet the targets" + (f"; misses: {failed}" if failed else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": rows, "paper_setup": paper}, fh, indent=1)


def background(args):
    """The background sweep: per share of concept-free patches, IoU and cosines per seed."""
    rows = []
    print(f"background sweep, {args.patches} patches per run; target: every detector IoU >= 0.95")
    print(f"{'config':28s} {'seed':>4s} {'IoU min':>8s} {'IoU mean':>9s} {'enc min':>8s} {'dec cos':>8s} {'s':>6s}")
    for name, kwargs in BACKGROUND.items():
        for seed in args.seeds:
            r = run(name, kwargs, args.patches, seed)
            r["passes"] = r["iou_min"] >= 0.95
            rows.append(r)
            print(f"{name:28s} {seed:4d} {r['iou_min']:8.4f} {r['iou_mean']:9.4f} {r['encoding_cosine_min']:8.4f} "
                  f"{r['decoding_cosine_mean']:8.4f} {r['seconds']:6.1f}", flush=True)
    failed = [f"{r['config']} seed {r['seed']}" for r in rows if not r["passes"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} runs reach IoU >= 0.95" + (f"; misses: {failed}" if failed else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"background": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
