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
]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

#: Consecutive centroids per group in ``return_group_max`` outputs.
ASSIGN_GROUP: int = _C.ASSIGN_GROUP


class CopyWarning(UserWarning):
    """An input had a layout the kernels cannot read in place and was copied."""


def cuda_available() -> bool:
    """True when the CUDA module was built and a CUDA device is visible."""
    return _C_cuda is not None and torch.cuda.is_available()


def simd_level() -> str:
    """The CPU code path the native module selected at run time (e.g. 'avx2+fma')."""
    return _C.simd_level()


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
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t.to(torch.float32).contiguous()


def _check_vector(t, name: str, n: int, device: torch.device) -> torch.Tensor:
    t = _check_tensor(t, name)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t.to(torch.float32).contiguous()


def _raise_bad(bad: torch.Tensor, name: str = "x") -> None:
    nonfinite, out_of_range = (int(v) for v in bad.tolist())
    if nonfinite:
        raise ValueError(f"{name} contains NaN or Inf in {nonfinite} row(s)")
    if out_of_range:
        raise ValueError(f"index has {out_of_range} value(s) outside [0, n_clusters)")


def _threads(num_threads: Optional[int]) -> int:
    if num_threads is None:
        return torch.get_num_threads()
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
    return num_threads


def _backend_args(x: torch.Tensor, num_threads: int):
    """The native module for x's device and its last argument (threads or stream)."""
    if x.device.type == "cuda":
        return _C_cuda, torch.cuda.current_stream(x.device).cuda_stream
    return _C, num_threads


def _matrix_args(x: torch.Tensor):
    return (x.data_ptr(), _DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], x.stride(0))


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
    n = x.shape[0] if rows is None else rows.shape[0]
    k = centroids.shape[0]
    index, best, second, group_max, bad = _assign_outputs(x, n, k, return_second, return_group_max)
    if n > 0:
        module, last = _backend_args(x, num_threads)
        extra = ()
        if return_group_max or rows is not None or center is not None:
            extra = (group_max.data_ptr() if return_group_max else 0,
                     rows.data_ptr() if rows is not None else 0, n,
                     center.data_ptr() if center is not None else 0)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            module.cosine_assign(
                *_matrix_args(x), centroids.data_ptr(), k, index.data_ptr(), best.data_ptr(),
                second.data_ptr() if return_second else 0, bad.data_ptr(), last, *extra,
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
    """
    x = _check_activations(x)
    centroids = _check_centroids(centroids, x)
    _check_group_max(return_group_max, x)
    if rows is not None:
        rows = _check_rows(rows, x)
        if x.is_cuda:
            x, rows = x.index_select(0, rows), None
    x, center = _apply_center(x, center)
    index, best, second, group_max, bad = torch.ops.pyconcepts.cosine_assign(
        x, centroids, bool(return_second), bool(return_group_max), _threads(num_threads), rows,
        center,
    )
    _raise_bad(bad)
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
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    counts = torch.zeros(n_clusters, dtype=torch.int64, device=x.device)
    bad = torch.zeros(2, dtype=torch.int64, device=x.device)
    if x.shape[0] > 0:
        module, last = _backend_args(x, num_threads)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            module.spherical_update(
                *_matrix_args(x), index.data_ptr(), n_clusters, sums.data_ptr(),
                counts.data_ptr(), bad.data_ptr(), last,
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
    k, d = decoding.shape
    f64 = dict(dtype=torch.float64, device=x.device)
    count = torch.zeros(k, dtype=torch.int64, device=x.device)
    sum_z, sum_z2 = torch.zeros(k, **f64), torch.zeros(k, **f64)
    sum_x, sum_xz = torch.zeros(k, d, **f64), torch.zeros(k, d, **f64)
    bad = torch.zeros(2, dtype=torch.int64, device=x.device)
    if x.shape[0] > 0:
        module, last = _backend_args(x, num_threads)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            module.masked_moments(
                *_matrix_args(x), decoding.data_ptr(), bias.data_ptr(),
                center.data_ptr() if center is not None else 0, k,
                count.data_ptr(), sum_z.data_ptr(), sum_z2.data_ptr(), sum_x.data_ptr(),
                sum_xz.data_ptr(), bad.data_ptr(), last,
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
    free of cancellation. Products are fp32 within blocks of rows, merged in float64.
    """
    x = _check_activations(x)
    decoding = _check_param_matrix(decoding, "decoding", x.shape[1], x.device)
    bias = _check_vector(bias, "bias", decoding.shape[0], x.device)
    if center is not None:
        center = _check_vector(center, "center", x.shape[1], x.device)
    *stats, bad = torch.ops.pyconcepts.masked_moments(
        x, decoding, bias, center, _threads(num_threads)
    )
    _raise_bad(bad)
    return Moments(*stats)


# ------------------------------------------------------------------------- assign_update
@torch.library.custom_op("pyconcepts::assign_update", mutates_args=())
def _assign_update_op(
    x: torch.Tensor, centroids: torch.Tensor, return_second: bool, return_group_max: bool,
    num_threads: int, normalize: bool = False, center: Optional[torch.Tensor] = None,
    return_moments: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = centroids.shape[0]
    index, best, second, group_max, bad = _assign_outputs(x, n, k, return_second, return_group_max)
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    counts = torch.zeros(k, dtype=torch.int64, device=x.device)
    m = k if return_moments else 0
    sum_xz = torch.zeros(m, d, dtype=torch.float64, device=x.device)
    sum_z = torch.zeros(m, 2, dtype=torch.float64, device=x.device)
    if n > 0:
        _C.assign_update(
            *_matrix_args(x), centroids.data_ptr(), k, index.data_ptr(), best.data_ptr(),
            second.data_ptr() if return_second else 0, sums.data_ptr(), counts.data_ptr(),
            bad.data_ptr(), num_threads, group_max.data_ptr() if return_group_max else 0,
            normalize, center.data_ptr() if center is not None else 0,
            sum_xz.data_ptr() if return_moments else 0, sum_z.data_ptr() if return_moments else 0,
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
    x, center = _apply_center(x, center)
    if x.is_cuda:
        assigned = cosine_assign(x, centroids, return_second=return_second)
        # unit rows in float32: a float16 norm overflows beyond 65504
        rows = F.normalize(x.float(), dim=1, eps=1e-12) if normalize else x
        k = centroids.shape[0]
        sums, counts = spherical_update(rows, assigned[0], k)
        if not return_moments:
            return (*assigned, sums, counts)
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
    _raise_bad(bad)
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
    k, d = centroids.shape
    sum_corr = torch.zeros(k, d, dtype=torch.float64)
    count_corr = torch.zeros(k, dtype=torch.int64)
    stats = torch.zeros(4, dtype=torch.int64)
    bad = torch.zeros(2, dtype=torch.int64)
    if x.shape[0] > 0:
        _C.pruned_pass(
            *_matrix_args(x), centroids.data_ptr(), k, strips_per_group, drift.data_ptr(), eps,
            labels.data_ptr(), theta_lo.data_ptr(), theta_up.data_ptr(), sum_corr.data_ptr(),
            count_corr.data_ptr(), stats.data_ptr(), bad.data_ptr(), num_threads, normalize,
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
            or strips_per_group < 1:
        raise ValueError(f"strips_per_group must be a positive int, got {strips_per_group!r}")
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

