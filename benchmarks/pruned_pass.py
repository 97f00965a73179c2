"""Pruned vs unpruned spherical k-means passes on the CPU, interleaved in one run.

Both runs start from the same k-means++-like seeds; at every iteration the unpruned pass
(``ops.assign_update``) and the pruned pass (``BoundedLloyd.next_pass``, one native
``ops.pruned_pass`` call per chunk) run back to back, so machine noise hits both alike, and
their labels are checked equal. Prints per-iteration times, the fraction of cosines the
pruned pass computed, and totals over the first 10 and 30 iterations.

    python -m benchmarks.pruned_pass --n 100000 --d 128 --k 256 --iters 30 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pyconcepts import ops
from pyconcepts.pruning import BoundedLloyd


def directional_mixture(n, d, k, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    which = torch.randint(0, k, (n,), generator=gen)
    scale = 1 + torch.rand(n, 1, generator=gen)
    return (centres[which] + noise * torch.randn(n, d, generator=gen)) * scale


def kmeanspp_seeds(x, k, seed, sample=20000):
    """k-means++ (D^2 = 1 - cos sampling) on a random subsample."""
    gen = torch.Generator().manual_seed(seed)
    xs = F.normalize(x[torch.randperm(x.shape[0], generator=gen)[:sample]], dim=1)
    chosen = [int(torch.randint(0, xs.shape[0], (1,), generator=gen))]
    dist = 1 - xs @ xs[chosen[0]]
    for _ in range(1, k):
        i = int(torch.multinomial(dist.clamp_min(0) + 1e-12, 1, generator=gen))
        chosen.append(i)
        dist = torch.minimum(dist, 1 - xs @ xs[i])
    return F.normalize(xs[chosen], dim=1)


def normalise(sums, counts, previous):
    return torch.where((counts > 0)[:, None], F.normalize(sums.float(), dim=1), previous)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--noise", type=float, default=None, help="default 1.2 / sqrt(d)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (0: one chunk)")
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    noise = a.noise if a.noise is not None else 1.2 / a.d ** 0.5
    x = directional_mixture(a.n, a.d, a.k, noise, a.seed)
    chunks = list(x.split(a.chunk)) if a.chunk else [x]
    init = kmeanspp_seeds(x, a.k, a.seed)
    print(f"N={a.n} D={a.d} K={a.k} noise={noise:.4f} threads={a.threads} groups={a.groups} "
          f"chunks={len(chunks)} simd={ops.simd_level()}")

    # warm-up (thread pool, page faults) outside the measurements
    ops.assign_update(x[:5000], init, num_threads=a.threads)
    c_plain = init.clone()
    c_pruned = init.clone()
    engine = BoundedLloyd(n_clusters=a.k, n_groups=a.groups, normalize=a.normalize,
                          num_threads=a.threads)
    t_plain, t_pruned, fractions, skipped = [], [], [], []
    cpu_plain, cpu_pruned = [], []
    sums = counts = None
    print(f"{'iter':>4} {'plain s':>8} {'pruned s':>9} {'ratio':>6} {'cpu ratio':>9} "
          f"{'cos frac':>9} {'skipped':>8} {'moved':>7}")
    for it in range(a.iters):
        t0, u0 = time.perf_counter(), time.process_time()
        index, _, psums, pcounts = ops.assign_update(x, c_plain, normalize=a.normalize,
                                                     num_threads=a.threads)
        t1, u1 = time.perf_counter(), time.process_time()
        if it == 0:
            sums, counts, stats = engine.first_pass(chunks, c_pruned)
            new_c = c_pruned
        else:
            new_c = normalise(sums, counts, c_pruned)
            sums, counts, stats = engine.next_pass(chunks, c_pruned, new_c, sums, counts)
        t2, u2 = time.perf_counter(), time.process_time()
        c_pruned = new_c
        if not torch.equal(engine.labels(), index):
            raise SystemExit(f"labels differ at iteration {it}")
        c_plain = normalise(psums, pcounts, c_plain)
        t_plain.append(t1 - t0)
        t_pruned.append(t2 - t1)
        cpu_plain.append(u1 - u0)
        cpu_pruned.append(u2 - u1)
        fractions.append(stats.distance_fraction)
        skipped.append(stats.skipped_fraction)
        print(f"{it:>4} {t_plain[-1]:>8.3f} {t_pruned[-1]:>9.3f} "
              f"{t_pruned[-1] / t_plain[-1]:>6.2f} {cpu_pruned[-1] / cpu_plain[-1]:>9.2f} "
              f"{fractions[-1]:>9.3f} {skipped[-1]:>8.3f} "
              f"{'-' if stats.n_moved is None else stats.n_moved:>7}")
    for n_it in (10, 30):
        if n_it > a.iters:
            continue
        tp, tq = sum(t_plain[:n_it]), sum(t_pruned[:n_it])
        cp, cq = sum(cpu_plain[:n_it]), sum(cpu_pruned[:n_it])
        print(f"first {n_it:>2} iterations: plain {tp:.2f} s (median pass "
              f"{statistics.median(t_plain[:n_it]):.3f}), pruned {tq:.2f} s (median pass "
              f"{statistics.median(t_pruned[:n_it]):.3f}), speed-up {tp / tq:.2f}x (CPU time "
              f"{cp / cq:.2f}x), mean "
              f"cosine fraction {statistics.mean(fractions[:n_it]):.3f}")


if __name__ == "__main__":
    main()
