"""Tensor ops: the only caller of the native modules.

Every op validates its arguments (type, dtype, shape, device, contiguity, emptiness) and
raises a ``TypeError``/``ValueError`` that names the argument, then dispatches to
``pyconcepts._C`` (CPU) or ``pyconcepts._C_cuda`` (CUDA). Non-finite input is detected by the
kernels themselves while they read the data (no extra pass) and raised here.

Each op is also registered with ``torch.library`` (``torch.ops.pyconcepts.*``) with a fake
implementation, so it can be used inside ``torch.compile``d code.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Optional, Tuple

# Idle OpenMP threads sleep instead of spinning (unless the user chose a policy). libgomp
# reads this once, when torch loads it: effective when pyconcepts is imported before torch
# (the `pyconcepts` command does). On a shared machine spinning workers keep the cores the
# thread that everyone waits for at the next barrier needs (benchmarks.extract --contention).
import os  # noqa: E402
import sys  # noqa: E402
# torch loaded first: libgomp has read its environment already, and its threads spin
_SPIN_SET_BEFORE = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F

from . import _C
from .reference import Moments

try:  # The CUDA module exists only when the package was built with a CUDA compiler.
    from . import _C_cuda  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _C_cuda = None

__all__ = [
    "cosine_assign",
    "spherical_update",
    "masked_moments",
    "assign_update",
    "pruned_pass",
    "pruned_pass_eps",
    "pruned_pass_groups",
    "PRUNED_NORM_TOL",
    "ASSIGN_GROUP",
    "Moments",
    "CopyWarning",
    "cuda_available",
    "simd_level",
    "simd_path",
    "simd_paths",
    "cpu_features",
]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Element and device codes of the tensor descriptions the native modules check
# (csrc/binding_args.h); the first three element codes are those of _DTYPE_CODES.
_ELEM_CODES = {**_DTYPE_CODES, torch.float64: 3, torch.int64: 4, torch.int32: 5}
_OTHER_ELEM = 6
_DEVICE_CODES = {"cpu": 0, "cuda": 1}
_OTHER_DEVICE = 2

#: Consecutive centroids per group in ``return_group_max`` outputs.
ASSIGN_GROUP: int = _C.ASSIGN_GROUP


class CopyWarning(UserWarning):
    """An input had a layout the kernels cannot read in place and was copied."""


def spinning_threads_note(torch_first: bool, threads: int, load: float, cores: int) -> Optional[str]:
    """The warning ``import pyconcepts`` gives when torch was imported first (its OpenMP
    threads then spin while they wait: the environment was read before pyconcepts could set
    ``OMP_WAIT_POLICY=PASSIVE``), it runs more than one thread and the machine is busy (1-minute
    load average ``load`` >= ``cores``); None otherwise."""
    if not torch_first or threads <= 1 or load < cores:
        return None
    return (f"torch was imported before pyconcepts, so its {threads} OpenMP threads spin while they wait, and "
            f"this machine is busy (load average {load:.1f} on {cores} cores): torch and pyconcepts calls can "
            "run several times slower (measured: a report 10x). Import pyconcepts before torch, or set "
            "OMP_WAIT_POLICY=PASSIVE in the environment before Python starts.")


def _warn_if_spinning() -> None:
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return
    note = spinning_threads_note(_SPIN_SET_BEFORE, torch.get_num_threads(), load, os.cpu_count() or 1)
    if note:
        warnings.warn(note, RuntimeWarning, stacklevel=3)


_warn_if_spinning()


def cuda_available() -> bool:
    """True when the CUDA module was built and a CUDA device is visible."""
    return _C_cuda is not None and torch.cuda.is_available()


def simd_level() -> str:
    """The CPU code path the native module selected at run time (e.g. 'avx2+fma')."""
    return _C.simd_level()


def simd_path() -> str:
    """The ``PYCONCEPTS_SIMD`` value of the CPU code path in use: 'generic', 'avx2' or
    'avx512'. Set ``PYCONCEPTS_SIMD`` before the import to force one; a path this CPU lacks
    makes the import fail with the reason."""
    return _C.simd_path()


def simd_paths() -> list:
    """The CPU code paths this machine can run (values for ``PYCONCEPTS_SIMD``)."""
    return list(_C.simd_paths())


def cpu_features() -> dict:
    """Which instruction-set extensions this CPU has, as the kernels see them."""
    return dict(_C.cpu_features())


# ----------------------------------------------------------------------------- validation
def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_activations(x, name: str = "x") -> torch.Tensor:
    """A 2-D float32/float16/bfloat16 matrix whose rows the kernels can read in place."""
    x = _check_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {x.dtype}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} has D = 0 columns")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on unsupported device {x.device}")
    if x.device.type == "cuda" and _C_cuda is None:
        raise ValueError(
            f"{name} is on {x.device} but pyconcepts was built without CUDA "
            "(no CUDA compiler at install time, or PYCONCEPTS_CUDA=OFF)"
        )
    if x.shape[0] > 0 and (x.stride(1) != 1 or x.stride(0) < x.shape[1]):
        warnings.warn(
            f"{name} with strides {x.stride()} is not row-contiguous; copying it",
            CopyWarning,
            stacklevel=3,
        )
        x = x.contiguous()
    return x


def _to_float32(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as contiguous float32, after checking it is finite there: a float64 value beyond
    the float32 range is finite before the cast and Inf after it."""
    t32 = t.to(torch.float32).contiguous()
    if not bool(torch.isfinite(t32).all()):
        if t.dtype != torch.float32 and bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{name} has values beyond the float32 range (|v| > 3.4e38), which the "
                "kernels compute in"
            )
        raise ValueError(f"{name} contains NaN or Inf")
    return t32


def _check_param_matrix(t, name: str, d: int, device: torch.device) -> torch.Tensor:
    """A small (K, D) parameter matrix, converted to contiguous float32 on x's device."""
    t = _check_tensor(t, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (K, D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has K = 0 rows; at least one is needed")
    if t.shape[1] != d:
        raise ValueError(f"{name} has D = {t.shape[1]} columns but x has D = {d}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return _to_float32(t, name)


def _check_vector(t, name: str, n: int, device: torch.device) -> torch.Tensor:
    t = _check_tensor(t, name)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return _to_float32(t, name)


def _raise_bad(bad: torch.Tensor, name: str = "x", centered: bool = False) -> None:
    nonfinite, out_of_range = (int(v) for v in bad.tolist())
    if nonfinite:
        also = f", or {name} - center leaves the float32 range there" if centered else ""
        raise ValueError(f"{name} contains NaN or Inf in {nonfinite} row(s){also}")
    if out_of_range:
        raise ValueError(f"index has {out_of_range} value(s) outside [0, n_clusters)")


def _threads(num_threads: Optional[int]) -> int:
    if num_threads is None:
        return min(torch.get_num_threads(), _C.MAX_THREADS)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) \
            or not 1 <= num_threads <= _C.MAX_THREADS:
        raise ValueError(
            f"num_threads must be an int in [1, {_C.MAX_THREADS}], got {num_threads!r}"
        )
    return num_threads


def _backend_args(x: torch.Tensor, num_threads: int):
    """The native module for x's device and its last argument (threads or stream)."""
    if x.device.type == "cuda":
        return _C_cuda, torch.cuda.current_stream(x.device).cuda_stream
    return _C, num_threads


def _desc(t: Optional[torch.Tensor]):
    """The description of a tensor that the native modules check before any kernel runs:
    (address, element code, device type, device index, shape, strides)."""
    if t is None:
        return None
    return (
        t.data_ptr(), _ELEM_CODES.get(t.dtype, _OTHER_ELEM),
        _DEVICE_CODES.get(t.device.type, _OTHER_DEVICE), t.device.index or 0,
        tuple(t.shape), tuple(t.stride()),
    )


def _require_dim(t, name: str, dim: int) -> None:
    """The registered ops size their outputs from their inputs: the rank must be right
    before anything is allocated (everything else is checked by the native module)."""
    if not isinstance(t, torch.Tensor) or t.dim() != dim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be {dim}-D, got {shape}")


def _require_finite_on_device(*named) -> None:
    """CUDA parameters: the native module cannot read device memory to check them."""
    for t, name in named:
        if t is not None and t.is_cuda and t.is_floating_point() \
                and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")


# --------------------------------------------------------------------- extreme magnitudes
# The kernels multiply in float32. Row magnitudes (largest |element|) within
# [2^-_SAFE_EXP, 2^_SAFE_EXP] keep every square, dot product and moment product of a row
# far from overflow and underflow; outside it, powers of two (exact) bring values back.
# The CPU assignment kernels do this per row themselves (csrc/cpu/assign_block.h).
_SAFE_EXP = 20


def _power_of_two_below(v: torch.Tensor) -> torch.Tensor:
    """2^e with v in [2^e, 2^(e+1)), elementwise for positive finite float64 v."""
    return torch.ldexp(torch.ones_like(v), torch.frexp(v).exponent - 1)


def _unsafe(magnitude: torch.Tensor) -> torch.Tensor:
    lo, hi = 2.0 ** -_SAFE_EXP, 2.0 ** _SAFE_EXP
    # a non-finite magnitude (x - center overflowed) is left for the kernel to report
    return (magnitude > 0) & torch.isfinite(magnitude) & ((magnitude < lo) | (magnitude > hi))


def _rescale_rows(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """CUDA kernels: x with each row of extreme magnitude scaled by a power of two to a
    largest element in [1, 2) (cosines are scale-free), and the float64 factors that undo
    it; (x, None) when every row is in range (one read of x, no copy)."""
    magnitude = torch.linalg.vector_norm(x, float("inf"), dim=1).double()
    unsafe = _unsafe(magnitude)
    if not bool(unsafe.any()):
        return x, None
    unscale = torch.where(unsafe, _power_of_two_below(magnitude), torch.ones_like(magnitude))
    return (x.double() / unscale[:, None]).float(), unscale


# ------------------------------------------------------------------------- cosine_assign
def _n_groups(k: int) -> int:
    return (k + ASSIGN_GROUP - 1) // ASSIGN_GROUP


def _assign_outputs(x, n: int, k: int, return_second: bool, return_group_max: bool):
    """Output buffers of the assignment kernels: index, best, second, group maxima, bad."""
    f32 = dict(dtype=torch.float32, device=x.device)
    return (
        torch.empty(n, dtype=torch.int64, device=x.device),
        torch.empty(n, **f32),
        torch.empty(n if return_second else 0, **f32),
        torch.empty(n if return_group_max else 0, _n_groups(k), **f32),
        torch.zeros(2, dtype=torch.int64, device=x.device),
    )


@torch.library.custom_op("pyconcepts::cosine_assign", mutates_args=())
def _cosine_assign_op(
    x: torch.Tensor, centroids: torch.Tensor, return_second: bool, return_group_max: bool,
    num_threads: int, rows: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_dim(x, "x", 2)
    _require_dim(centroids, "centroids", 2)
    if rows is not None:
        _require_dim(rows, "rows", 1)
    n = x.shape[0] if rows is None else rows.shape[0]
    k = centroids.shape[0]
    index, best, second, group_max, bad = _assign_outputs(x, n, k, return_second, return_group_max)
    if x.is_cuda:
        if rows is not None or center is not None or return_group_max:
            raise ValueError(
                "rows, center and return_group_max of the registered op are implemented for "
                "CPU tensors only (pyconcepts.ops.cosine_assign handles rows and center on CUDA)"
            )
        _require_finite_on_device((centroids, "centroids"))
    module, last = _backend_args(x, num_threads)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        if x.is_cuda:
            module.cosine_assign(
                _desc(x), _desc(centroids), _desc(index), _desc(best),
                _desc(second) if return_second else None, _desc(bad), last,
            )
        else:
            module.cosine_assign(
                _desc(x), _desc(centroids), _desc(index), _desc(best),
                _desc(second) if return_second else None, _desc(bad), last,
                _desc(group_max) if return_group_max else None, _desc(rows), _desc(center),
            )
    return index, best, second, group_max, bad


@_cosine_assign_op.register_fake
def _(x, centroids, return_second, return_group_max, num_threads, rows=None, center=None):
    n = x.shape[0] if rows is None else rows.shape[0]
    k = centroids.shape[0]
    return (
        x.new_empty(n, dtype=torch.int64),
        x.new_empty(n, dtype=torch.float32),
        x.new_empty(n if return_second else 0, dtype=torch.float32),
        x.new_empty(n if return_group_max else 0, _n_groups(k), dtype=torch.float32),
        x.new_empty(2, dtype=torch.int64),
    )


def _check_centroids(centroids, x: torch.Tensor) -> torch.Tensor:
    centroids = _check_param_matrix(centroids, "centroids", x.shape[1], x.device)
    norms = centroids.norm(dim=1)
    if not bool(((norms - 1).abs() < 1e-3).all()):
        raise ValueError("centroids must have unit-norm rows (normalise them first)")
    return centroids


def _check_rows(rows, x: torch.Tensor) -> torch.Tensor:
    rows = _check_tensor(rows, "rows")
    if rows.dim() != 1:
        raise ValueError(f"rows must be 1-D, got shape {tuple(rows.shape)}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows must be int64, got {rows.dtype}")
    if rows.device != x.device:
        raise ValueError(f"rows is on {rows.device} but x is on {x.device}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= x.shape[0]):
        raise ValueError(f"rows has values outside [0, {x.shape[0]})")
    return rows.contiguous()


def _apply_center(x: torch.Tensor, center):
    """Validated centre for the CPU kernels; on CUDA the centred copy is made here."""
    if center is None:
        return x, None
    center = _check_vector(center, "center", x.shape[1], x.device)
    if x.is_cuda:
        return x.float() - center, None
    return x, center


def _check_group_max(return_group_max: bool, x: torch.Tensor) -> None:
    if return_group_max and x.is_cuda:
        raise ValueError("return_group_max is implemented for CPU tensors only")


def cosine_assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    return_second: bool = False,
    return_group_max: bool = False,
    rows: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
) -> Tuple[torch.Tensor, ...]:
    """Assign every row of ``x`` (N, D) to the unit centroid (K, D) of largest cosine.

    Rows of ``x`` need not be normalised; ``centroids`` must hold unit rows (they are used as
    given). ``x`` may be float32, float16 or bfloat16; products accumulate in float32.
    Returns ``(index int64 (N,), cosine float32 (N,))``, then the second-best cosine when
    ``return_second`` (``-inf`` if K == 1), then, when ``return_group_max`` (CPU only), an
    (N, ceil(K / 16)) matrix of the largest cosine within each group of 16 consecutive
    centroids (the bounds of pruned k-means). Ties go to the lowest index. The N x K
    similarity matrix is never materialised.

    ``rows`` (int64 (M,), optional) assigns only ``x[rows]`` and returns M results; on CPU
    the kernel reads those rows in place, without a gathered copy of ``x``. ``center``
    (D,), optional, assigns ``x - center`` (on CPU subtracted as rows are read, no copy).
    Any finite row gets its cosine: rows whose float32 squared norm would overflow or
    underflow (beyond about 1e19 or below 1e-18) are scaled by a power of two first.
    """
    x = _check_activations(x)
    centroids = _check_centroids(centroids, x)
    _check_group_max(return_group_max, x)
    if rows is not None:
        rows = _check_rows(rows, x)
        if x.is_cuda:
            x, rows = x.index_select(0, rows), None
    centered = center is not None
    x, center = _apply_center(x, center)
    if x.is_cuda:
        x, _ = _rescale_rows(x)
    index, best, second, group_max, bad = torch.ops.pyconcepts.cosine_assign(
        x, centroids, bool(return_second), bool(return_group_max), _threads(num_threads), rows,
        center,
    )
    _raise_bad(bad, centered=centered)
    return _assigned(index, best, second, group_max, return_second, return_group_max)


def _assigned(index, best, second, group_max, return_second, return_group_max):
    """What the assignment ops return: (index, best[, second][, group_max])."""
    out = (index, best)
    if return_second:
        out += (second,)
    if return_group_max:
        out += (group_max,)
    return out


# ---------------------------------------------------------------------- spherical_update
@torch.library.custom_op("pyconcepts::spherical_update", mutates_args=())
def _spherical_update_op(
    x: torch.Tensor, index: torch.Tensor, n_clusters: int, num_threads: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_dim(x, "x", 2)
    if not 1 <= n_clusters < 2**31:
        raise ValueError(f"n_clusters must be in [1, 2^31), got {n_clusters}")
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    counts = torch.zeros(n_clusters, dtype=torch.int64, device=x.device)
    bad = torch.zeros(2, dtype=torch.int64, device=x.device)
    module, last = _backend_args(x, num_threads)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        module.spherical_update(
            _desc(x), _desc(index), n_clusters, _desc(sums), _desc(counts), _desc(bad), last
        )
    return sums, counts, bad


@_spherical_update_op.register_fake
def _(x, index, n_clusters, num_threads):
    return (
        x.new_empty(n_clusters, x.shape[1], dtype=torch.float64),
        x.new_empty(n_clusters, dtype=torch.int64),
        x.new_empty(2, dtype=torch.int64),
    )


def spherical_update(
    x: torch.Tensor,
    index: torch.Tensor,
    n_clusters: int,
    *,
    num_threads: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of the rows of ``x`` (float64, (K, D)) and member counts (int64, (K,)).

    ``index`` (N,) holds each row's cluster in ``[0, n_clusters)``. The spherical k-means
    centroid of a cluster is its normalised sum; empty clusters are left to the caller.
    The result is identical for any thread count.
    """
    x = _check_activations(x)
    index = _check_tensor(index, "index")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if index.dim() != 1 or index.shape[0] != x.shape[0]:
        raise ValueError(
            f"index must have shape ({x.shape[0]},) to match x, got {tuple(index.shape)}"
        )
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be int64 or int32, got {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    index = index.to(torch.int64).contiguous()
    sums, counts, bad = torch.ops.pyconcepts.spherical_update(
        x, index, n_clusters, _threads(num_threads)
    )
    _raise_bad(bad)
    return sums, counts


# ------------------------------------------------------------------------ masked_moments
@torch.library.custom_op("pyconcepts::masked_moments", mutates_args=())
def _masked_moments_op(
    x: torch.Tensor,
    decoding: torch.Tensor,
    bias: torch.Tensor,
    center: Optional[torch.Tensor],
    num_threads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_dim(x, "x", 2)
    _require_dim(decoding, "decoding", 2)
    k, d = decoding.shape
    f64 = dict(dtype=torch.float64, device=x.device)
    count = torch.zeros(k, dtype=torch.int64, device=x.device)
    sum_z, sum_z2 = torch.zeros(k, **f64), torch.zeros(k, **f64)
    sum_x, sum_xz = torch.zeros(k, d, **f64), torch.zeros(k, d, **f64)
    bad = torch.zeros(2, dtype=torch.int64, device=x.device)
    if x.is_cuda:
        _require_finite_on_device((decoding, "decoding"), (bias, "bias"), (center, "center"))
    module, last = _backend_args(x, num_threads)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        module.masked_moments(
            _desc(x), _desc(decoding), _desc(bias), _desc(center), _desc(count), _desc(sum_z),
            _desc(sum_z2), _desc(sum_x), _desc(sum_xz), _desc(bad), last,
        )
    return count, sum_z, sum_z2, sum_x, sum_xz, bad


@_masked_moments_op.register_fake
def _(x, decoding, bias, center, num_threads):
    k, d = decoding.shape
    return (
        x.new_empty(k, dtype=torch.int64),
        x.new_empty(k, dtype=torch.float64),
        x.new_empty(k, dtype=torch.float64),
        x.new_empty(k, d, dtype=torch.float64),
        x.new_empty(k, d, dtype=torch.float64),
        x.new_empty(2, dtype=torch.int64),
    )


def masked_moments(
    x: torch.Tensor,
    decoding: torch.Tensor,
    bias: torch.Tensor,
    *,
    center: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
) -> Moments:
    """Signal-vector statistics of all K concepts in one read of ``x`` (see ``Moments``).

    ``decoding`` (K, D) and ``bias`` (K,) define the detectors; a row counts for concept i
    when ``decoding[i] @ x > bias[i]`` on the raw row. Moments are of ``x - center`` (and
    ``z - decoding @ center``) when ``center`` (D,) is given, which keeps Cov = E[xz]-E[x]E[z]
    free of cancellation. Products are fp32 within blocks of rows, merged in float64. Any
    finite magnitude works: x, center and decoding far outside [2^-20, 2^20] are scaled by
    powers of two before the kernel and the sums scaled back in float64 (finding the
    magnitude costs one extra read of x; the copy is made only when needed).
    """
    x = _check_activations(x)
    decoding = _check_param_matrix(decoding, "decoding", x.shape[1], x.device)
    bias = _check_vector(bias, "bias", decoding.shape[0], x.device)
    if center is not None:
        center = _check_vector(center, "center", x.shape[1], x.device)
    scales = _moment_scales(x, decoding, center)
    if scales is None:
        *stats, bad = torch.ops.pyconcepts.masked_moments(
            x, decoding, bias, center, _threads(num_threads)
        )
        _raise_bad(bad, centered=center is not None)
        return Moments(*stats)
    # z and the masks are invariant under x -> beta x, w -> alpha w, b -> alpha beta b;
    # the sums scale by powers of alpha and beta, undone in float64
    alpha, beta = scales
    ab = alpha * beta
    bias_s = bias.double() * ab
    # the sign of a bias that underflows still decides z = 0 (a row equal to center)
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23
    bias_s = torch.where((bias_s.abs() < tiny) & (bias != 0), bias.sign().double() * tiny, bias_s)
    bias_s = bias_s.clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
    count, sum_z, sum_z2, sum_x, sum_xz, bad = torch.ops.pyconcepts.masked_moments(
        (x.double() * beta).float(), (decoding.double() * alpha).float(), bias_s.float(),
        None if center is None else (center.double() * beta).float(), _threads(num_threads),
    )
    _raise_bad(bad, centered=center is not None)
    return Moments(count, sum_z / ab, sum_z2 / (ab * ab), sum_x / beta, sum_xz / (ab * beta))


def _moment_scales(x: torch.Tensor, decoding: torch.Tensor, center: Optional[torch.Tensor]):
    """Powers of two (alpha for decoding, beta for x and center) that bring the float32
    products of masked_moments into range, or None when they already are (the usual case:
    one read of x, no copy). One scale for all of x: rows many orders of magnitude apart
    keep the precision of the largest."""
    x_mag = 0.0
    if x.numel():
        # aminmax is ~10x faster than an inf-norm reduction (one read of x at memory speed)
        lo, hi = torch.aminmax(x)
        x_mag = max(abs(float(lo)), abs(float(hi)))
    if center is not None:
        x_mag += float(center.abs().max())
    w_mag = float(decoding.double().norm(dim=1).max())
    mags = torch.tensor([x_mag, w_mag], dtype=torch.float64)
    if not bool(_unsafe(mags).any()):
        return None
    unscale = torch.where(mags > 0, _power_of_two_below(mags.clamp_min(1e-300)),
                          torch.ones_like(mags))
    beta, alpha = (1.0 / unscale).tolist()
    return alpha, beta


# ------------------------------------------------------------------------- assign_update
@torch.library.custom_op("pyconcepts::assign_update", mutates_args=())
def _assign_update_op(
    x: torch.Tensor, centroids: torch.Tensor, return_second: bool, return_group_max: bool,
    num_threads: int, normalize: bool = False, center: Optional[torch.Tensor] = None,
    return_moments: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_dim(x, "x", 2)
    _require_dim(centroids, "centroids", 2)
    n, d = x.shape
    k = centroids.shape[0]
    index, best, second, group_max, bad = _assign_outputs(x, n, k, return_second, return_group_max)
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    counts = torch.zeros(k, dtype=torch.int64, device=x.device)
    m = k if return_moments else 0
    sum_xz = torch.zeros(m, d, dtype=torch.float64, device=x.device)
    sum_z = torch.zeros(m, 2, dtype=torch.float64, device=x.device)
    _C.assign_update(
        _desc(x), _desc(centroids), _desc(index), _desc(best),
        _desc(second) if return_second else None, _desc(sums), _desc(counts), _desc(bad),
        num_threads, _desc(group_max) if return_group_max else None, normalize, _desc(center),
        _desc(sum_xz) if return_moments else None, _desc(sum_z) if return_moments else None,
    )
    return index, best, second, group_max, sums, counts, sum_xz, sum_z, bad


@_assign_update_op.register_fake
def _(x, centroids, return_second, return_group_max, num_threads, normalize=False,
      center=None, return_moments=False):
    n, d = x.shape
    k = centroids.shape[0]
    m = k if return_moments else 0
    return (
        x.new_empty(n, dtype=torch.int64),
        x.new_empty(n, dtype=torch.float32),
        x.new_empty(n if return_second else 0, dtype=torch.float32),
        x.new_empty(n if return_group_max else 0, _n_groups(k), dtype=torch.float32),
        x.new_empty(k, d, dtype=torch.float64),
        x.new_empty(k, dtype=torch.int64),
        x.new_empty(m, d, dtype=torch.float64),
        x.new_empty(m, 2, dtype=torch.float64),
        x.new_empty(2, dtype=torch.int64),
    )


def assign_update(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    return_second: bool = False,
    return_group_max: bool = False,
    normalize: bool = False,
    center: Optional[torch.Tensor] = None,
    return_moments: bool = False,
    num_threads: Optional[int] = None,
) -> Tuple[torch.Tensor, ...]:
    """One Lloyd pass in one read of ``x``: ``cosine_assign`` fused with ``spherical_update``.

    Returns what ``cosine_assign`` returns with the same flags, followed by
    ``sums float64 (K, D), counts int64 (K,)`` of the rows by their new assignment; with
    ``normalize`` the sums are of the unit rows ``x / ||x||`` (classic spherical k-means).
    ``return_moments`` appends the signal-vector moments of the clusters from the same read
    (METHOD.md section 3 with P_i = cluster i's members and z = c_i . v, v the row as
    summed): ``sum_xz float64 (K, D)`` = sum v z and ``sum_z float64 (K, 2)`` = (sum z,
    sum z^2) per cluster (``DirectionalClustering(signal=True)`` turns them into s_i).
    ``center`` (D,), optional: everything is of ``x - center`` (subtracted as rows are read). On CPU the
    fused kernel converts each block of rows once and adds it to its clusters while it is
    still in cache; the float64 sums are identical for any thread count. On CUDA it runs the
    two ops back to back.
    """
    x = _check_activations(x)
    centroids = _check_centroids(centroids, x)
    _check_group_max(return_group_max, x)
    centered = center is not None
    x, center = _apply_center(x, center)
    if x.is_cuda:
        scaled, _ = _rescale_rows(x)
        assigned = cosine_assign(scaled, centroids, return_second=return_second)
        # unit rows in float32 (a float16 norm overflows beyond 65504), from rows in range
        rows = F.normalize(scaled.float(), dim=1, eps=1e-12) if normalize else x
        k = centroids.shape[0]
        sums, counts = spherical_update(rows, assigned[0], k)
        if not return_moments:
            return (*assigned, sums, counts)
        if not normalize:
            magnitude = torch.linalg.vector_norm(x, float("inf"), dim=1).double()
            if bool(((magnitude > 0) & ((magnitude < 2.0**-50) | (magnitude > 2.0**40))).any()):
                raise ValueError(
                    "return_moments on CUDA needs rows whose largest |element| lies in "
                    "[2^-50, 2^40] (zero rows aside), or normalize=True: the moment "
                    "products are float32; rescale x"
                )
        # the same moments from the native ops: z from the kernel's cosine, as on the CPU
        # (fp32 products here, summed in float64 by spherical_update)
        z = assigned[1] * (1.0 if normalize else x.float().norm(dim=1))
        sum_xz, _ = spherical_update(rows.float() * z[:, None], assigned[0], k)
        sum_z, _ = spherical_update(torch.stack([z, z * z], dim=1), assigned[0], k)
        return (*assigned, sums, counts, sum_xz, sum_z)
    index, best, second, group_max, sums, counts, sum_xz, sum_z, bad = (
        torch.ops.pyconcepts.assign_update(
            x, centroids, bool(return_second), bool(return_group_max), _threads(num_threads),
            bool(normalize), center, bool(return_moments),
        )
    )
    _raise_bad(bad, centered=centered)
    out = (*_assigned(index, best, second, group_max, return_second, return_group_max), sums,
           counts)
    return (*out, sum_xz, sum_z) if return_moments else out


# --------------------------------------------------------------------------- pruned_pass
#: Largest deviation of a centroid's norm from 1 that ``pruned_pass`` accepts (its bounds
#: fold this error in, see ``pruned_pass_eps``). fp32 ``F.normalize`` stays near 1e-7.
PRUNED_NORM_TOL: float = 1e-5


def pruned_pass_groups(n_clusters: int, strips_per_group: int) -> int:
    """Number of bound groups of ``pruned_pass``: groups are ``strips_per_group`` strips of
    ``ASSIGN_GROUP`` consecutive centroids."""
    strips = -(-n_clusters // ASSIGN_GROUP)
    return -(-strips // strips_per_group)


def pruned_pass_eps(d: int) -> float:
    """Bound on |kernel cosine - true cosine| for rows of D elements, used by the bounds of
    ``pruned_pass``: worst-case fp32 rounding of a D-term dot product plus the row norm
    (``2 (D + 16) 2^-24``), the centroid norm error ``PRUNED_NORM_TOL``, and ``2^-22`` for
    rounding in the bound arithmetic. Worst case, not typical: it only costs an angle of
    about eps / sin(angle) of pruning power."""
    return 2.0 * (d + 16) * 2.0**-24 + PRUNED_NORM_TOL + 2.0**-22


@torch.library.custom_op(
    "pyconcepts::pruned_pass", mutates_args=("labels", "theta_lo", "theta_up")
)
def _pruned_pass_op(
    x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, theta_lo: torch.Tensor,
    theta_up: torch.Tensor, drift: torch.Tensor, strips_per_group: int, eps: float,
    normalize: bool, num_threads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_dim(x, "x", 2)
    _require_dim(centroids, "centroids", 2)
    k, d = centroids.shape
    sum_corr = torch.zeros(k, d, dtype=torch.float64)
    count_corr = torch.zeros(k, dtype=torch.int64)
    stats = torch.zeros(4, dtype=torch.int64)
    bad = torch.zeros(2, dtype=torch.int64)
    _C.pruned_pass(
        _desc(x), _desc(centroids), strips_per_group, _desc(drift), eps, _desc(labels),
        _desc(theta_lo), _desc(theta_up), _desc(sum_corr), _desc(count_corr), _desc(stats),
        _desc(bad), num_threads, normalize,
    )
    return sum_corr, count_corr, stats, bad


@_pruned_pass_op.register_fake
def _(x, centroids, labels, theta_lo, theta_up, drift, strips_per_group, eps, normalize,
      num_threads):
    k, d = centroids.shape
    return (
        x.new_empty(k, d, dtype=torch.float64),
        x.new_empty(k, dtype=torch.int64),
        x.new_empty(4, dtype=torch.int64),
        x.new_empty(2, dtype=torch.int64),
    )


def _check_state(t, name: str, dtype: torch.dtype, shape: Tuple[int, ...]) -> torch.Tensor:
    """A per-row state tensor that the kernel updates in place: exact dtype, shape, CPU,
    contiguous (a converted copy would silently lose the update)."""
    t = _check_tensor(t, name)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return t


def pruned_pass(
    x: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    theta_lo: torch.Tensor,
    theta_up: torch.Tensor,
    drift: torch.Tensor,
    *,
    strips_per_group: int = 1,
    normalize: bool = False,
    num_threads: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exact Lloyd assignment pass that reads only the rows its bounds cannot certify
    (CPU only; semantics and the bound invariants in csrc/pruned_pass.h).

    ``labels`` (N,) int64, ``theta_lo`` (N,) float32 and ``theta_up`` (N, G) float32
    (``G = pruned_pass_groups(K, strips_per_group)``) are the per-row state, updated in
    place: afterwards ``labels`` equals ``cosine_assign(x, centroids)[0]`` exactly.
    ``theta_lo`` bounds the own angle from above (with the kernel's rounding, eps =
    ``pruned_pass_eps(D)``, folded in: ``cos(theta_lo) <= true cosine - 2 eps``),
    ``theta_up[:, g]`` bounds the angles to group g's other centroids from below. ``drift``
    (K,) float64 is, per centroid, an upper bound on the angle it moved since the bounds
    were made (zeros when they were made for these centroids). ``centroids`` must be unit
    rows to ``PRUNED_NORM_TOL``.

    Returns ``(sum_corr float64 (K, D), count_corr int64 (K,), stats int64 (4,))``: add the
    corrections to the sums/counts of the previous labels to get those of the new ones
    (unit rows when ``normalize``, as ``assign_update``); stats = rows read, cosines
    computed, rows with every group evaluated, rows that moved. Rows the bounds certify are
    not read, so NaN/Inf in them is only detected when they are read; when it is, the op
    raises and the state must be rebuilt from a full pass.
    """
    x = _check_activations(x)
    if x.is_cuda:
        raise ValueError("pruned_pass is implemented for CPU tensors only (x is on CUDA)")
    centroids = _check_param_matrix(centroids, "centroids", x.shape[1], x.device)
    norm_error = float((centroids.double().norm(dim=1) - 1).abs().max())
    if norm_error > PRUNED_NORM_TOL:
        raise ValueError(
            f"centroids must have unit-norm rows to {PRUNED_NORM_TOL:g} for pruned_pass "
            f"(largest norm error {norm_error:.3g}); normalise them first"
        )
    if isinstance(strips_per_group, bool) or not isinstance(strips_per_group, int) \
            or not 1 <= strips_per_group < 2**63:
        raise ValueError(
            f"strips_per_group must be a positive int below 2^63, got {strips_per_group!r}"
        )
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    n, d = x.shape
    k = centroids.shape[0]
    groups = pruned_pass_groups(k, strips_per_group)
    labels = _check_state(labels, "labels", torch.int64, (n,))
    theta_lo = _check_state(theta_lo, "theta_lo", torch.float32, (n,))
    theta_up = _check_state(theta_up, "theta_up", torch.float32, (n, groups))
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels has values outside [0, {k})")
    drift = _check_tensor(drift, "drift")
    if drift.dtype != torch.float64:
        raise TypeError(f"drift must be float64, got {drift.dtype}")
    if tuple(drift.shape) != (k,):
        raise ValueError(f"drift must have shape ({k},), got {tuple(drift.shape)}")
    if drift.device.type != "cpu":
        raise ValueError(f"drift must be a CPU tensor, got {drift.device}")
    if not bool((torch.isfinite(drift) & (drift >= 0)).all()):
        raise ValueError("drift must hold finite angles >= 0")
    drift = drift.contiguous()
    sum_corr, count_corr, stats, bad = torch.ops.pyconcepts.pruned_pass(
        x, centroids, labels, theta_lo, theta_up, drift, strips_per_group,
        pruned_pass_eps(d), normalize, _threads(num_threads),
    )
    _raise_bad(bad)
    return sum_corr, count_corr, stats

