"""Pruned k-means on a stream read from disk: bounds in memory, bounds on disk, or no bounds.

    python -m benchmarks.kmeans_disk [--n 1000000 --d 256 --k 256] [--noise 0.3] [--repeat 3]

For streams too large for RAM: whether to keep the pruning bounds on disk
(``pruning_dir``) or fall back to plain passes? The rows are written as .npy chunk files
and every page of them is dropped from the OS page cache before it is read
(posix_fadvise DONTNEED), so each pass really reads the disk, as it would for data larger
than memory; the on-disk bounds are synced and dropped the same way before every pass.
In one run, same data, same start, 10 Lloyd passes:

- "read only": one pass that only loads the chunks (the I/O floor of a pass);
- plain passes (``pruning=False``): read + full GEMM every pass;
- bounds in memory (``pruning="auto"``);
- bounds on disk (``pruning="auto"``, ``pruning_memory=0``, ``pruning_dir``): the same
  passes plus one read and one write of every point's bounds per pruned pass.

Reported: wall time (median of --repeat), the median seconds of the Lloyd passes and of the
pruned ones, the share of cosines computed per pass and the final mean cosine (the three
fits reach the same centroids).
The default mixture is well separated (noise 0.3): on heavily overlapping data nothing is
pruned (benchmarks.kmeans) and the bounds can only cost.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import pyconcepts as pc
from pyconcepts.pruning import BoundedLloyd

from .common import print_table, save_results
from .kmeans import directional_mixture, mean_cosine


def _drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class ColdChunks:
    """Re-iterable stream of .npy chunk files, each read cold from disk on every pass.
    ``scratch``: a directory whose files (the on-disk bounds) are synced and dropped from the
    page cache at the start of every pass. ``pass_starts`` logs when each pass began."""

    def __init__(self, files, scratch=None):
        self.files, self.scratch, self.pass_starts = files, scratch, []

    def __iter__(self):
        if self.scratch is not None:
            os.sync()  # dirty bounds pages written back, so they can be dropped
            for path in glob.glob(os.path.join(self.scratch, "*", "*")):
                _drop_from_page_cache(path)
        self.pass_starts.append(time.perf_counter())
        for path in self.files:
            _drop_from_page_cache(path)
            yield torch.from_numpy(np.load(path))


def write_chunks(x: torch.Tensor, directory: str, rows: int):
    files = []
    for i, start in enumerate(range(0, x.shape[0], rows)):
        path = os.path.join(directory, f"rows{i:05d}.npy")
        with open(path, "wb") as f:
            np.save(f, x[start:start + rows].numpy())
            f.flush()
            os.fsync(f.fileno())
        files.append(path)
    return files


def run(args) -> dict:
    out = {"n": args.n, "d": args.d, "k": args.k, "noise": args.noise, "iters": args.iters,
           "threads": torch.get_num_threads(), "methods": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as data_dir, \
            tempfile.TemporaryDirectory(dir=args.dir) as bounds_dir:
        x = directional_mixture(args.n, args.d, max(8, args.k // 2), noise=args.noise)
        files = write_chunks(x, data_dir, args.chunk)
        data_bytes = sum(os.path.getsize(f) for f in files)

        def read_only():
            for _ in ColdChunks(files):
                pass

        configs = {
            "plain passes (pruning=False)": dict(pruning=False),
            "bounds in memory (auto)": dict(pruning="auto"),
            "bounds on disk (auto, pruning_dir)": dict(pruning="auto", pruning_memory=0,
                                                       pruning_dir=bounds_dir),
        }
        rows = []
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            read_only()
            times.append(time.perf_counter() - t0)
        read_s = statistics.median(times)
        rows.append(["read only (1 pass)", read_s, read_s, "-", "-", "-", "-"])
        out["read_only_seconds"] = read_s
        out["data_bytes"] = data_bytes
        reference = None
        for name, kwargs in configs.items():
            runs = []
            for _ in range(args.repeat):
                stream = ColdChunks(files, scratch=bounds_dir if "pruning_dir" in kwargs else None)
                km = pc.DirectionalClustering(args.k, seed=0, center=False, max_iter=args.iters,
                                              tol=0.0, **kwargs)
                t0 = time.perf_counter()
                km.fit(stream)
                total = time.perf_counter() - t0
                # the fit reads the stream once before the Lloyd passes (row count and seeding
                # sample together); per-pass times are those of the n_iter_ Lloyd passes
                starts = stream.pass_starts[-km.n_iter_:] + [t0 + total]
                per_pass = [b - a for a, b in zip(starts, starts[1:])]
                runs.append((total, per_pass, km))
            # the run of median time (the slower middle one for an even --repeat)
            total, per_pass, km = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            if reference is None:
                reference = km.centroids_
            same = torch.allclose(km.centroids_, reference, atol=1e-6)
            objective = mean_cosine(x, km.centroids_)
            computed = " ".join(f"{s.distance_fraction:.2f}" for s in km.pass_stats_)
            fractions = [s.distance_fraction for s in km.pass_stats_]
            pruned = [t for t, f in zip(per_pass, fractions) if f < 1.0]
            rows.append([name, total, statistics.median(per_pass),
                         statistics.median(pruned) if pruned else "-", computed,
                         f"{objective:.4f}", "yes" if same else "NO"])
            out["methods"][name] = {"seconds": total, "seconds_per_pass": per_pass,
                                    "cosines_computed_per_pass": [s.distance_fraction for s in km.pass_stats_],
                                    "mean_cosine": objective, "same_centroids": same}
        bounds_mib = args.n * BoundedLloyd(n_clusters=args.k).bytes_per_point / 2 ** 20
        print_table(
            f"k-means on a cold stream from disk: N={args.n} D={args.d} K={args.k} noise "
            f"{args.noise:g}, {args.iters} passes, {torch.get_num_threads()} threads; data "
            f"{data_bytes / 2 ** 20:.0f} MiB in chunks of {args.chunk} rows, bounds "
            f"{bounds_mib:.0f} MiB",
            ["method", "seconds", "median s / pass", "median s / pruned pass",
             "cosines computed per pass",
             "mean cosine", "same centroids"], rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the data and bounds files go (default: "
                                               "the system temporary directory)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    results = run(args)
    save_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
