"""The host as the benchmarks report it: CPU model, the instruction sets the kernels look
at, the SIMD path in use, and this machine's fp32 and bf16 GEMM rates (torch.mm, measured in
the same run, so every other rate can be given as a ratio to them)."""
from __future__ import annotations

import platform
from typing import Dict, Tuple

import torch

import pyconcepts as pc

from .common import median_time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_isa() -> dict:
    features = pc.ops.cpu_features()
    return {
        "cpu": cpu_model(),
        "features": features,
        "isa": " ".join(name for name, present in features.items() if present) or "x86-64",
        "simd_path": pc.ops.simd_path(),
        "simd_paths": pc.ops.simd_paths(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def gemm_rates(shape: Tuple[int, int, int], repeat: int = 5) -> Dict[str, Dict[str, float]]:
    """torch.mm GFLOP/s per dtype: on (rows x d) @ (d x k), a row block whose output stays in
    cache, and on a square 2048^3 product; 'best' is the larger."""
    rows, d, k = shape
    gen = torch.Generator().manual_seed(123)
    out: Dict[str, Dict[str, float]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(rows, d, generator=gen).to(dtype)
        b = torch.randn(k, d, generator=gen).to(dtype)
        c = torch.empty(rows, k, dtype=dtype)
        t_shape = median_time(lambda: torch.mm(a, b.T, out=c), repeat=max(repeat, 7))
        sq = torch.randn(2048, 2048, generator=gen).to(dtype)
        sq_out = torch.empty(2048, 2048, dtype=dtype)
        t_sq = median_time(lambda: torch.mm(sq, sq, out=sq_out), repeat=max(repeat, 5))
        rates = {f"({rows}x{d}) @ ({d}x{k})": 2.0 * rows * d * k / t_shape / 1e9,
                 "2048^3": 2.0 * 2048**3 / t_sq / 1e9}
        rates["best"] = max(rates.values())
        rates["same_shape"] = rates[f"({rows}x{d}) @ ({d}x{k})"]
        out[name] = rates
    return out


def print_host(info: dict, rates: Dict[str, Dict[str, float]]) -> None:
    print(f"host: {info['cpu']}; {info['threads']} threads; ISA: {info['isa']}")
    print(f"SIMD path in use: {info['simd_path']} (this CPU runs {', '.join(info['simd_paths'])}); "
          f"torch CPU capability {info['torch_cpu_capability']}")
    for name, r in rates.items():
        shapes = ", ".join(f"{key}: {v:.1f}" for key, v in r.items() if key not in ("best", "same_shape"))
        print(f"torch.mm {name} GFLOP/s: {shapes}; best {r['best']:.1f}")
