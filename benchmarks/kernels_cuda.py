"""CUDA kernel benchmarks against plain torch on the same data, in the same run.

    python -m benchmarks.kernels --device cuda [--quick] [--json PATH]

Figures per op: median time over --repeat runs (CUDA events, after warm-up), achieved HBM
bandwidth (bytes the op must read / time), achieved TFLOP/s, and their ratios to this GPU's
device-to-device copy bandwidth and torch.mm rate, both measured in this run. Copy bandwidth
counts read + write bytes (as CUDA's bandwidthTest does for device-to-device copies).
Default shapes are the issue's targets (cosine_assign bf16 at N = 64M, D = 512, K = 256),
shrunk to fit the free GPU memory; the N actually used is reported.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import pyconcepts as pc

from .common import print_table

GiB = 1024**3


def cuda_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------- machine baselines
def copy_bandwidth(repeat: int) -> float:
    """Device-to-device copy rate in bytes/s, read + write counted (4 GiB buffers)."""
    nbytes = 4 * GiB
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), repeat, warmup=2)
    del src, dst
    return 2 * nbytes / t


def mm_rate(dtype: torch.dtype, m: int, n: int, k: int, repeat: int) -> float:
    """torch.mm FLOP/s for (m x k) @ (k x n) in ``dtype``."""
    a = torch.randn(m, k, device="cuda").to(dtype)
    b = torch.randn(k, n, device="cuda").to(dtype)
    t = cuda_time(lambda: torch.mm(a, b), repeat, warmup=3)
    return 2 * m * n * k / t


# ------------------------------------------------------------------------- torch baselines
def torch_assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 1 << 20):
    """Plain torch on the GPU: mm in x's type, arg-max, divided by the row norms."""
    ct = c.to(x.dtype).T.contiguous()
    index = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    best = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        vals, index[s : s + chunk] = torch.mm(xs, ct).max(dim=1)
        norms = torch.linalg.vector_norm(xs, dim=1, dtype=torch.float32).clamp_min(1e-12)
        best[s : s + chunk] = vals.float() / norms
    return index, best


def torch_update(x: torch.Tensor, index: torch.Tensor, k: int, chunk: int = 1 << 20):
    """Plain torch: index_add_ (fp32 atomics) per chunk, merged in float64, and bincount."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    part = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        part.zero_()
        part.index_add_(0, index[s : s + chunk], x[s : s + chunk].float())
        sums += part
    return sums, torch.bincount(index, minlength=k)


def torch_moments(x, w, b, center, chunk: int = 1 << 18):
    """Plain torch: fp32 GEMMs for z and [M, M*Z]^T Xc per chunk, merged in float64."""
    k, d = w.shape
    f64 = dict(dtype=torch.float64, device=x.device)
    count, sz, sz2 = torch.zeros(k, **f64), torch.zeros(k, **f64), torch.zeros(k, **f64)
    sx, sxz = torch.zeros(k, d, **f64), torch.zeros(k, d, **f64)
    thr = b - w @ center
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk].float() - center
        z = xs @ w.T
        m = (z > thr).float()
        mz = m * z
        count += m.sum(0)
        sz += mz.sum(0)
        sz2 += (mz * z).sum(0)
        sx += (m.T @ xs).double()
        sxz += (mz.T @ xs).double()
    return count, sz, sz2, sx, sxz


# ------------------------------------------------------------------------------ the runs
def _rows_that_fit(target: int, bytes_per_row: int, share: float) -> int:
    free, _ = torch.cuda.mem_get_info()
    return max(1 << 16, min(target, int(free * share) // bytes_per_row))


def _entry(name, t_ours, t_torch, bytes_read, flops, copy_bw, mm_peak, extra=None) -> Dict:
    e = {
        "op": name,
        "seconds": t_ours,
        "torch_seconds": t_torch,
        "speedup_vs_torch": t_torch / t_ours,
        "GBps_read": bytes_read / t_ours / 1e9,
        "TFLOPs": flops / t_ours / 1e12,
        "ratio_to_copy_bandwidth": bytes_read / t_ours / copy_bw,
        "ratio_to_mm_rate": flops / t_ours / mm_peak,
        "torch_GBps_read": bytes_read / t_torch / 1e9,
    }
    e.update(extra or {})
    return e


def run_cuda_benchmarks(args) -> dict:
    if not pc.ops.cuda_available():
        raise SystemExit("CUDA benchmarks need a GPU and pyconcepts built with CUDA")
    rep = max(3, getattr(args, "repeat", 5))
    quick = bool(getattr(args, "quick", False))
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baselines stay fp32, like our kernels
    dev = torch.cuda.get_device_properties(0)
    results: Dict = {"device": dev.name, "sm_count": dev.multi_processor_count,
                     "memory_GiB": dev.total_memory / GiB, "repeat": rep, "quick": quick}

    copy_bw = copy_bandwidth(rep)
    mm_bf16 = mm_rate(torch.bfloat16, 8192, 8192, 8192, rep)
    mm_fp32 = mm_rate(torch.float32, 8192, 8192, 8192, rep)
    results["copy_bandwidth_GBps"] = copy_bw / 1e9
    results["mm_bf16_TFLOPs"] = mm_bf16 / 1e12
    results["mm_fp32_TFLOPs"] = mm_fp32 / 1e12
    rows: List[List[object]] = []
    ops: List[Dict] = []

    # --- cosine_assign, bf16, the target shape; then spherical_update on the same X.
    d, k = 512, 256
    n = _rows_that_fit((1 << 22) if quick else (1 << 26), d * 2, 0.7)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    c = F.normalize(torch.randn(k, d, device="cuda", generator=gen), dim=1)
    bytes_x = x.numel() * x.element_size()

    t_ours = cuda_time(lambda: pc.ops.cosine_assign(x, c), rep)
    t_torch = cuda_time(lambda: torch_assign(x, c), rep)
    ours_i, _ = pc.ops.cosine_assign(x, c)
    ref_i, _ = torch_assign(x, c)
    agree = (ours_i == ref_i).float().mean().item()
    e = _entry("cosine_assign bf16", t_ours, t_torch, bytes_x, 2 * n * k * d, copy_bw, mm_bf16,
               {"n": n, "d": d, "k": k, "index_agreement_with_torch": agree})
    ops.append(e)

    index = ours_i
    del ours_i, ref_i
    t_ours = cuda_time(lambda: pc.ops.spherical_update(x, index, k), rep)
    t_torch = cuda_time(lambda: torch_update(x, index, k), rep)
    s_ours, _ = pc.ops.spherical_update(x, index, k)
    s_ref, _ = torch_update(x, index, k)
    rel = ((s_ours - s_ref).abs().max() / s_ref.abs().max()).item()
    ops.append(_entry("spherical_update bf16", t_ours, t_torch, bytes_x + index.numel() * 8,
                      n * d, copy_bw, mm_fp32, {"n": n, "d": d, "k": k,
                                                "max_rel_diff_vs_torch": rel}))
    del x, index, s_ours, s_ref
    torch.cuda.empty_cache()

    # --- cosine_assign fp32 (CUDA-core path) and masked_moments, at smaller N.
    n2 = _rows_that_fit((1 << 20) if quick else (1 << 23), d * 4, 0.3)
    x = torch.randn(n2, d, device="cuda", generator=gen)
    t_ours = cuda_time(lambda: pc.ops.cosine_assign(x, c), rep)
    t_torch = cuda_time(lambda: torch_assign(x, c), rep)
    ops.append(_entry("cosine_assign fp32", t_ours, t_torch, x.numel() * 4, 2 * n2 * k * d,
                      copy_bw, mm_fp32, {"n": n2, "d": d, "k": k}))

    n3 = (1 << 20) if quick else (1 << 22)
    xm = x[:n3].to(torch.bfloat16)
    w = torch.randn(k, d, device="cuda", generator=gen) / d**0.5
    b = torch.full((k,), 0.5, device="cuda")
    center = xm[: 1 << 16].float().mean(0)
    t_ours = cuda_time(lambda: pc.ops.masked_moments(xm, w, b, center=center), rep)
    t_torch = cuda_time(lambda: torch_moments(xm, w, b, center), rep)
    got = pc.ops.masked_moments(xm, w, b, center=center)
    ref = torch_moments(xm, w, b, center)
    rel = ((got.sum_xz - ref[4]).abs().max() / ref[4].abs().max()).item()
    ops.append(_entry("masked_moments bf16", t_ours, t_torch, xm.numel() * 2, 6 * n3 * k * d,
                      copy_bw, mm_fp32, {"n": n3, "d": d, "k": k,
                                         "count_equal_to_torch": bool(torch.equal(got.count.double(), ref[0])),
                                         "sum_xz_max_rel_diff_vs_torch": rel}))
    del x, xm

    results["ops"] = ops
    for e in ops:
        rows.append([e["op"], e["n"], e["seconds"] * 1e3, e["torch_seconds"] * 1e3,
                     e["speedup_vs_torch"], e["GBps_read"], e["ratio_to_copy_bandwidth"],
                     e["TFLOPs"], e["ratio_to_mm_rate"]])
    print(f"pyconcepts CUDA kernels on {dev.name}: medians of {rep} runs")
    print(f"copy bandwidth (read + write) {copy_bw / 1e9:.0f} GB/s; torch.mm 8192^3 "
          f"bf16 {mm_bf16 / 1e12:.0f} TFLOP/s, fp32 {mm_fp32 / 1e12:.1f} TFLOP/s")
    print_table("ops (ratio to mm: bf16 rate for cosine_assign bf16, fp32 rate otherwise)",
                ["op", "N", "ms", "torch ms", "speed-up", "GB/s read", "/copy bw", "TFLOP/s",
                 "/mm rate"], rows)
    for e in ops:
        extra = {k_: v for k_, v in e.items() if "agreement" in k_ or "diff" in k_ or "equal" in k_}
        if extra:
            print(f"  {e['op']}: {extra}")
    return results
