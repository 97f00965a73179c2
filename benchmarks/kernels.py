"""Native op benchmarks against baselines measured in the same run.

    python -m benchmarks.kernels [--n N --d D --k K] [--repeat R] [--json PATH]
    python -m benchmarks.kernels --device cuda [...]

CPU: the host's ISA and its fp32 and bf16 torch.mm rates are printed first; every op is
timed against plain torch on the same data, cosine_assign also against faiss IndexFlatIP
(when installed) and on every SIMD path this CPU runs (PYCONCEPTS_SIMD, one process each),
and every rate is divided by this machine's torch.mm rates, measured in this run. Times
are medians of --repeat runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import pyconcepts as pc

from .common import median_time, print_table, save_results
from .host import gemm_rates, host_isa, print_host


def torch_assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536):
    """Plain torch: normalise, chunked mm, max over centroids."""
    index = torch.empty(x.shape[0], dtype=torch.int64)
    best = torch.empty(x.shape[0])
    for s in range(0, x.shape[0], chunk):
        xs = F.normalize(x[s : s + chunk].float(), dim=1)
        best[s : s + chunk], index[s : s + chunk] = (xs @ c.T).max(dim=1)
    return index, best


def torch_update(x: torch.Tensor, index: torch.Tensor, k: int):
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, index, x.double())
    return sums, torch.bincount(index, minlength=k)


def torch_moments(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk: int = 65536):
    """Plain torch: chunked fp32 GEMMs for z and [M, M*Z]^T X, merged in float64."""
    k, d = w.shape
    sx = torch.zeros(k, d, dtype=torch.float64)
    sxz = torch.zeros(k, d, dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        z = xs @ w.T
        m = (z > b).float()
        mz = m * z
        sx += (m.T @ xs).double()
        sxz += (mz.T @ xs).double()
    return sx, sxz


def _assign_child(n: int, d: int, k: int, repeat: int) -> None:
    """Child process (PYCONCEPTS_SIMD set by the parent): cosine_assign GFLOP/s as JSON."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    c = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    t = median_time(lambda: pc.ops.cosine_assign(x, c), repeat=repeat)
    print(json.dumps({"path": pc.ops.simd_path(), "gflops": 2.0 * n * d * k / t / 1e9}))


def assign_by_path(n: int, d: int, k: int, repeat: int, rounds: int = 3) -> dict:
    """cosine_assign on every vector SIMD path this CPU runs, one fresh process per path and round,
    paths interleaved within each round (the machine's load drifts); median over rounds."""
    paths = [p for p in pc.ops.simd_paths() if p != "generic"]  # the no-AVX2 fallback
    if len(paths) < 2:
        return {}
    n = min(n, 262144)
    rates: dict = {p: [] for p in paths}
    for _ in range(rounds):
        for p in paths:
            env = dict(os.environ, PYCONCEPTS_SIMD=p)
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.kernels", "--assign-child", "--n", str(n),
                 "--d", str(d), "--k", str(k), "--repeat", str(repeat)],
                env=env, capture_output=True, text=True, check=True)
            rates[p].append(json.loads(out.stdout.strip().splitlines()[-1])["gflops"])
    return {p: {"gflops": statistics.median(v), "runs": v} for p, v in rates.items()}


def run_cpu(args) -> dict:
    n, d, k, rep = args.n, args.d, args.k, args.repeat
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    c = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    b = torch.full((k,), 0.5)
    flops = 2.0 * n * d * k
    results: dict = {
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "simd_path": pc.ops.simd_level(),
        "kernel_path": "native blocked GEMM tile + fused epilogue (no torch in the kernel)",
        "shape": {"n": n, "d": d, "k": k},
        "repeat": rep,
    }

    # The machine's GEMM rates, the strictest baselines we can measure with torch.mm: the
    # best of this problem's shape on a row block whose output stays in cache (a 65536-row
    # block writes 64 MiB and measures memory bandwidth instead) and a square 2048^3 product;
    # fp32 (the kernels' arithmetic) and bf16 (what low-precision hardware offers).
    host = host_isa()
    rates = gemm_rates((8192, d, k), repeat=rep)
    results["host"] = host
    results["torch_mm_gflops_by_dtype"] = rates
    mm_rate = rates["fp32"]["best"] * 1e9
    bf16_rate = rates["bf16"]["best"] * 1e9
    same_shape_rate = rates["fp32"]["same_shape"] * 1e9
    results["torch_mm_same_shape_gflops"] = same_shape_rate / 1e9
    results["torch_mm_gflops"] = mm_rate / 1e9
    results["torch_mm_bf16_gflops"] = bf16_rate / 1e9

    rows = []
    t_ours = median_time(lambda: pc.ops.cosine_assign(x, c), repeat=rep)
    t_torch = median_time(lambda: torch_assign(x, c), repeat=rep)
    assign = {
        "seconds": t_ours,
        "gflops": flops / t_ours / 1e9,
        "ratio_to_mm": flops / t_ours / mm_rate,
        "torch_seconds": t_torch,
        "torch_ratio_to_mm": flops / t_torch / mm_rate,
        "speedup_vs_torch": t_torch / t_ours,
    }
    rows.append(["cosine_assign (ours)", t_ours, flops / t_ours / 1e9, flops / t_ours / mm_rate, 1.0])
    rows.append(["  torch normalise+mm+max", t_torch, flops / t_torch / 1e9,
                 flops / t_torch / mm_rate, t_ours / t_torch])
    try:
        import faiss  # noqa: F401

        faiss.omp_set_num_threads(torch.get_num_threads())
        xn = F.normalize(x, dim=1).numpy()
        index = faiss.IndexFlatIP(d)
        index.add(c.numpy())
        t_faiss = median_time(lambda: index.search(xn, 1), repeat=rep)
        assign.update(faiss_seconds=t_faiss, faiss_ratio_to_mm=flops / t_faiss / mm_rate,
                      speedup_vs_faiss=t_faiss / t_ours)
        rows.append(["  faiss IndexFlatIP k=1 (x pre-normalised)", t_faiss, flops / t_faiss / 1e9,
                     flops / t_faiss / mm_rate, t_ours / t_faiss])
    except ImportError:
        assign["faiss_seconds"] = None
    t1 = median_time(lambda: pc.ops.cosine_assign(x, c, num_threads=1), repeat=max(1, rep // 2))
    assign["one_thread_seconds"] = t1
    assign["thread_scaling"] = t1 / t_ours
    assign["ratio_to_mm_same_shape"] = flops / t_ours / same_shape_rate
    assign["ratio_to_bf16_mm"] = flops / t_ours / bf16_rate
    results["cosine_assign"] = assign

    idx = torch.randint(0, k, (n,), generator=gen)
    bytes_read = x.numel() * 4 + idx.numel() * 8
    t_ours = median_time(lambda: pc.ops.spherical_update(x, idx, k), repeat=rep)
    t_torch = median_time(lambda: torch_update(x, idx, k), repeat=rep)
    results["spherical_update"] = {"seconds": t_ours, "gbytes_per_s": bytes_read / t_ours / 1e9,
                                   "torch_seconds": t_torch, "speedup_vs_torch": t_torch / t_ours}
    rows.append(["spherical_update (ours)", t_ours, f"{bytes_read / t_ours / 1e9:.2f} GB/s", "-", 1.0])
    rows.append(["  torch index_add_ (fp64)", t_torch, f"{bytes_read / t_torch / 1e9:.2f} GB/s", "-",
                 t_ours / t_torch])

    mflops = 3 * flops  # z = XW^T, then [M, M*Z]^T X (2K x D)
    t_ours = median_time(lambda: pc.ops.masked_moments(x, c, b, center=None), repeat=rep)
    t_torch = median_time(lambda: torch_moments(x, c, b), repeat=rep)
    results["masked_moments"] = {"seconds": t_ours, "gflops": mflops / t_ours / 1e9,
                                 "ratio_to_mm": mflops / t_ours / mm_rate,
                                 "ratio_to_mm_same_shape": mflops / t_ours / same_shape_rate,
                                 "torch_seconds": t_torch, "speedup_vs_torch": t_torch / t_ours}
    rows.append(["masked_moments (ours)", t_ours, mflops / t_ours / 1e9, mflops / t_ours / mm_rate, 1.0])
    rows.append(["  torch chunked GEMMs", t_torch, mflops / t_torch / 1e9, mflops / t_torch / mm_rate,
                 t_ours / t_torch])

    by_path = assign_by_path(n, d, k, rep)
    results["cosine_assign_by_path"] = by_path

    print(f"pyconcepts kernels, CPU: N={n} D={d} K={k}, {torch.get_num_threads()} threads, "
          f"SIMD path {results['simd_path']}, medians of {rep} runs")
    print_host(host, rates)
    print(f"ratios below are to the best fp32 torch.mm rate, {mm_rate / 1e9:.1f} GFLOP/s")
    print_table("op timings", ["op", "seconds", "GFLOP/s", "ratio to torch.mm", "speed vs ours"], rows)
    print(f"\nratio to torch.mm on the same shape: cosine_assign "
          f"{assign['ratio_to_mm_same_shape']:.2f}, masked_moments "
          f"{results['masked_moments']['ratio_to_mm_same_shape']:.2f}; cosine_assign to the "
          f"bf16 torch.mm rate: {assign['ratio_to_bf16_mm']:.2f}")
    print(f"\ncosine_assign thread scaling 1 -> {torch.get_num_threads()} threads: "
          f"{assign['thread_scaling']:.2f}x")
    if by_path:
        fastest = max(v["gflops"] for v in by_path.values())
        print_table("cosine_assign fp32 by SIMD path (each in a fresh process, rounds "
                    "interleaved; medians)",
                    ["path", "GFLOP/s", "ratio to fp32 torch.mm", "ratio to fastest path"],
                    [[p, v["gflops"], v["gflops"] * 1e9 / mm_rate, v["gflops"] / fastest]
                     for p, v in by_path.items()])
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    p.add_argument("--json", metavar="PATH", help="write the figures to PATH")
    p.add_argument("--assign-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.assign_child:
        _assign_child(args.n, args.d, args.k, args.repeat)
        return 0
    if args.quick:
        args.n, args.repeat = min(args.n, 100_000), min(args.repeat, 3)
    if args.device == "cuda":
        from .kernels_cuda import run_cuda_benchmarks

        results = run_cuda_benchmarks(args)
    else:
        results = run_cpu(args)
    save_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
