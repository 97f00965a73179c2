"""Spherical k-means: pc.DirectionalClustering against faiss, superkmeans and scikit-learn.

    python -m benchmarks.kmeans [--quick] [--iters 10] [--json PATH]
    python -m benchmarks.kmeans --memory [--rows 20000000]
    python -m benchmarks.kmeans_disk              # streams read from disk: where the bounds go

All methods get the same unit-normalised rows and the same number of Lloyd iterations, on
all points (no subsampling), with the same thread count, in one run. Reported: wall time
(median of --repeat runs), million point-iterations per second, the dense-assignment flops
per second as a ratio to the host's fp32 torch.mm rate (host ISA and fp32/bf16 GEMM rates
are printed before each shape), the ratio of each baseline's
time to ours (the defaults: k-means++ seeding, pruning="auto"; the other pyconcepts rows
force plain fused passes or exact pruned passes from the start, or seed like faiss and
scikit-learn's init="random", or run the defaults on one thread: its ratio is the thread
scaling), and the final
objective: the mean cosine of every row to its assigned
centroid, computed the same way for every method, and for pyconcepts the share of the N x K
cosines each pass skipped (negative: a pruned pass that recomputed the own cosine of the
rows it read computed more than an unpruned one). The mixtures use --noise (default 1.0: heavy overlap, nothing can
be pruned); the full run adds a well-separated mixture (noise 0.3) where pruning pays.
``--memory`` streams N rows generated
chunk by chunk through a fit and prints the peak RSS from the OS (getrusage), for two N, to
show that memory does not grow with N.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import pyconcepts as pc

from .common import median_time, print_table, save_results
from .host import gemm_rates, host_isa, print_host


# ---------------------------------------------------------------------------- data
def directional_mixture(n: int, d: int, n_true: int, noise: float, seed: int = 0) -> torch.Tensor:
    """Unit rows from a mixture of directional clusters plus isotropic noise (activation-like:
    a few dominant directions, heavy overlap)."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_true, d, generator=gen), dim=1)
    which = torch.randint(0, n_true, (n,), generator=gen)
    x = centres[which] + noise * torch.randn(n, d, generator=gen) / d ** 0.5 * 4
    return F.normalize(x.relu_() + 0.05 * torch.rand(n, d, generator=gen), dim=1)


def demo_activations(max_rows: int) -> torch.Tensor:
    """Unit rows of real conv activations: the demo network at its concept layer, on images of
    its procedural dataset (8 x 8 positions per image)."""
    from pyconcepts.datasets.shapes import make_shapes
    from pyconcepts.demo.model import DEMO_LAYER
    from pyconcepts.demo.run import load_model
    from pyconcepts.taps import LayerTap

    model = load_model()
    images = make_shapes(max(64, max_rows // 64), seed=0, watermark="random",
                         watermark_rate=0.3, with_masks=False).images
    rows = torch.cat(list(LayerTap(model, DEMO_LAYER).rows(images, batch_size=256)))[:max_rows]
    return F.normalize(rows.float(), dim=1)


def mean_cosine(x: torch.Tensor, centroids: torch.Tensor) -> float:
    c = F.normalize(torch.as_tensor(centroids, dtype=torch.float32), dim=1)
    _, best = pc.ops.cosine_assign(x, c)
    return float(best.double().mean())


# ----------------------------------------------------------------------- methods
def run_ours(x, k, iters, seed, pruning="auto", init="k-means++", num_threads=None):
    km = pc.DirectionalClustering(n_concepts=k, seed=seed, center=False, max_iter=iters, tol=0.0,
                                  pruning=pruning, init=init, num_threads=num_threads)
    km.fit(x)
    return km.centroids_, [s.distance_fraction for s in km.pass_stats_]


def run_ours_pruned(x, k, iters, seed):
    return run_ours(x, k, iters, seed, pruning=True)


def run_ours_unpruned(x, k, iters, seed):
    return run_ours(x, k, iters, seed, pruning=False)


def run_ours_random_init(x, k, iters, seed):
    return run_ours(x, k, iters, seed, init="random")


def run_ours_one_thread(x, k, iters, seed):
    """The defaults on one thread (native kernels and torch alike): its "time / ours" is the
    1 -> N thread scaling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_ours(x, k, iters, seed, num_threads=1)
    finally:
        torch.set_num_threads(threads)


def run_faiss(x, k, iters, seed):
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=iters, spherical=True, seed=seed,
                      max_points_per_centroid=x.shape[0] // k + 1, verbose=False)
    km.train(x.numpy())
    return km.centroids


def run_sklearn(x, k, iters, seed):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="random", n_init=1, max_iter=iters, tol=0.0,
                algorithm="lloyd", random_state=seed)
    km.fit(x.numpy())
    return km.cluster_centers_


def run_superkmeans(x, k, iters, seed):
    from superkmeans import SuperKMeans

    km = SuperKMeans(n_clusters=k, dimensionality=x.shape[1], hierarchical=False, iters=iters,
                     sampling_fraction=1.0, max_points_per_cluster=x.shape[0], seed=seed,
                     early_termination=False, angular=True, n_threads=torch.get_num_threads())
    return km.train(np.ascontiguousarray(x.numpy()))


METHODS = {
    "pyconcepts": run_ours,
    "pyconcepts (pruning=False)": run_ours_unpruned,
    "pyconcepts (pruning=True)": run_ours_pruned,
    "pyconcepts (random init)": run_ours_random_init,
    "pyconcepts (1 thread)": run_ours_one_thread,
    "faiss (spherical)": run_faiss,
    "superkmeans (angular)": run_superkmeans,
    "scikit-learn (lloyd)": run_sklearn,
}


def bench_shape(name, x, k, iters, repeat, seed=0, mm_gflops=None):
    """Every method on x; the 'GEMM-equivalent' rate counts 2 N D K flops per iteration (one
    dense assignment), whatever a method actually computes, so it can be set against the
    host's fp32 torch.mm rate (mm_gflops)."""
    n = x.shape[0]
    pass_flops = 2.0 * n * x.shape[1] * k * iters
    rows, out = [], {"data": name, "n": n, "d": x.shape[1], "k": k, "iters": iters}
    ours_time = None
    for method, fn in METHODS.items():
        try:
            centroids = fn(x, k, iters, seed)  # warm-up and the objective
            fractions = None
            if isinstance(centroids, tuple):  # pyconcepts: also the cosines computed per pass
                centroids, fractions = centroids
            t = median_time(lambda: fn(x, k, iters, seed), repeat=repeat, warmup=0)
        except ImportError:
            rows.append([method, "not installed", "-", "-", "-", "-", "-"])
            continue
        except Exception as exc:  # a baseline failing must not hide the others
            rows.append([method, f"failed: {type(exc).__name__}", "-", "-", "-", "-", "-"])
            continue
        obj = mean_cosine(x, centroids)
        if method == "pyconcepts":
            ours_time = t
        mpi = n * iters / t / 1e6
        ratio = t / ours_time if ours_time else float("nan")
        # share of the N x K cosines skipped, per pass (1 - computed / N K); baselines: none
        skipped = "-" if fractions is None else " ".join(f"{1 - f:.2f}" for f in fractions)
        gemm_eq = pass_flops / t / 1e9
        to_mm = f"{gemm_eq / mm_gflops:.2f}" if mm_gflops else "-"
        rows.append([method, t, mpi, ratio, to_mm, obj, skipped])
        out[method] = {"seconds": t, "million_point_iters_per_s": mpi,
                       "gemm_equivalent_gflops": gemm_eq,
                       "gemm_equivalent_ratio_to_fp32_mm": gemm_eq / mm_gflops if mm_gflops else None,
                       "time_ratio_vs_pyconcepts": ratio, "mean_cosine": obj,
                       "skipped_per_pass": None if fractions is None else [1 - f for f in fractions]}
    print_table(f"{name}: N={n} D={x.shape[1]} K={k}, {iters} iterations, "
                f"{torch.get_num_threads()} threads",
                ["method", "seconds", "M point-iter/s", "time / ours",
                 "2NDK*iters/s / fp32 mm", "mean cosine", "cosines skipped per pass"], rows)
    return out


# ------------------------------------------------------------------------ memory
def _memory_child(n_rows: int, d: int, k: int, chunk: int) -> None:
    """Fit on a stream of n_rows generated chunk by chunk; print peak RSS in MiB."""
    base = F.normalize(torch.randn(chunk, d, generator=torch.Generator().manual_seed(1)), dim=1)
    shifts = F.normalize(torch.randn(64, d, generator=torch.Generator().manual_seed(2)), dim=1)

    class Stream:
        def __iter__(self):
            for i in range(0, n_rows, chunk):
                m = min(chunk, n_rows - i)
                yield base[:m] + 0.3 * shifts[(i // chunk) % 64]

    t0 = time.perf_counter()
    pc.DirectionalClustering(n_concepts=k, seed=0, center=True, max_iter=2, tol=0.0).fit(Stream())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": n_rows, "peak_rss_mib": peak_mib,
                      "seconds": time.perf_counter() - t0}))


def run_memory(rows: int, d: int, k: int, chunk: int) -> dict:
    results = {}
    for n in (rows // 10, rows):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.kmeans", "--memory-child", str(n), "--d", str(d),
             "--k", str(k), "--chunk", str(chunk)],
            capture_output=True, text=True, check=True,
        )
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print_table(f"streaming fit memory: D={d} K={k}, chunks of {chunk} rows, 2 passes",
                ["rows", "peak RSS (MiB)", "seconds"],
                [[n, r["peak_rss_mib"], r["seconds"]] for n, r in results.items()])
    return {"memory": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes, one repeat")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--memory", action="store_true", help="streaming peak-RSS measurement")
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--shape", nargs=3, type=int, action="append", metavar=("N", "D", "K"),
                   help="run only these shapes (repeatable)")
    p.add_argument("--no-demo", action="store_true", help="skip the demo-activation run")
    p.add_argument("--noise", type=float, action="append",
                   help="noise of the directional mixtures (repeatable; default 1.0, and the "
                        "full run adds 300k x 256, K = 256 at 0.3)")
    p.add_argument("--methods", help="comma-separated subset of the methods to run "
                                     "(pyconcepts always runs: the ratios are to it)")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.methods:
        keep = {"pyconcepts"} | {m.strip() for m in args.methods.split(",")}
        unknown = keep - set(METHODS)
        if unknown:
            p.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
        for m in list(METHODS):
            if m not in keep:
                del METHODS[m]
    if args.memory_child is not None:
        _memory_child(args.memory_child, args.d, args.k, args.chunk)
        return 0
    if args.memory:
        results = run_memory(args.rows, args.d, args.k, args.chunk)
    else:
        if args.shape:
            shapes = [tuple(s) for s in args.shape]
        elif args.quick:
            shapes = [(100_000, 256, 256), (50_000, 64, 16)]
            args.repeat = 1
        else:
            shapes = [(500_000, 256, 256), (300_000, 256, 256), (2_000_000, 64, 16),
                      (200_000, 1024, 128), (200_000, 128, 1024)]
        host = host_isa()
        results = {"threads": torch.get_num_threads(), "simd_path": pc.ops.simd_level(),
                   "host": host, "runs": []}
        runs = [(n, d, k, noise) for n, d, k in shapes for noise in (args.noise or [1.0])]
        if not args.shape and not args.quick and not args.noise:
            runs.append((300_000, 256, 256, 0.3))
        for n, d, k, noise in runs:
            # the host's GEMM rates for this D x K, measured next to the run they scale
            rates = gemm_rates((8192, d, k))
            print()
            print_host(host, rates)
            x = directional_mixture(n, d, max(8, k // 2), noise=noise)
            run = bench_shape(f"directional mixture, noise {noise:g}", x, k, args.iters,
                              args.repeat, mm_gflops=rates["fp32"]["best"])
            run["torch_mm_gflops"] = rates
            results["runs"].append(run)
        real = None if args.no_demo else demo_activations(200_000 if not args.quick else 50_000)
        if real is not None:
            rates = gemm_rates((8192, real.shape[1], 64))
            print()
            print_host(host, rates)
            run = bench_shape("demo CNN activations", real, 64, args.iters, args.repeat,
                              mm_gflops=rates["fp32"]["best"])
            run["torch_mm_gflops"] = rates
            results["runs"].append(run)
    save_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
