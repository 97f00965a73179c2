"""Exact pruned Lloyd passes for spherical k-means (Yinyang-style bounds on the sphere).

Every point keeps bounds as angles: ``theta_lo`` above the angle to its own centroid and,
per group of consecutive centroids, ``theta_up[g]`` below the angle to every other centroid
of the group. After an update centroid j has moved by the angle ``drift_j``; by the triangle
inequality on the sphere the own angle grows by at most ``drift_own`` and the angles to a
group's centroids shrink by at most the group's largest drift, so loosening is one add per
bound. One native call per chunk (``ops.pruned_pass``) then, per point:

1. global filter: if ``theta_lo`` is below every ``theta_up[g]`` the point keeps its label
   and is not read (the kernel's fp32 rounding is folded into the stored angles, so this
   proves its fp32 dot products order the same way);
2. otherwise the row is converted once, its own cosine tightens ``theta_lo``, and only the
   groups whose bound still reaches it (plus the own group) are evaluated with the GEMM tile
   of ``cosine_assign``, so the winner is picked among bit-identical dot products.

The cluster sums are corrected only for the points that changed cluster. The labels are
those of unpruned Lloyd passes from the same start (tests/test_pruning.py checks it).

The bounds live in RAM, or (``storage_dir``) in one scratch file per chunk, read before and
written after that chunk's native call: then only one chunk's bounds are in memory at a
time, for streams whose bounds do not fit in RAM.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import ops

# Added to (subtracted from) the angles made here in float32: covers torch's acos error (an
# ulp or two, <= 5e-7 for angles <= pi) and one rounding of the add.
_ANGLE_SLACK = 1.5e-6

# When the last pruned pass computed more than this share of the cosines, the next pass is a
# plain fused pass (about 20-40% cheaper than a pruned pass that evaluates nearly everything,
# and it refreshes every bound); the pass after it is pruned again.
_FULL_PASS_FRACTION = 0.8


@dataclass
class _ChunkBounds:
    labels: torch.Tensor    # (n,) int64
    theta_lo: torch.Tensor  # (n,) float32: upper bound on the (rounding-shifted) own angle
    theta_up: torch.Tensor  # (n, G) float32: lower bound on the angle to group g's others


class _RamBounds:
    """Every chunk's bounds held in memory."""

    def __init__(self):
        self._chunks: List[_ChunkBounds] = []

    def __len__(self) -> int:
        return len(self._chunks)

    def rows(self, j: int) -> int:
        return self._chunks[j].labels.shape[0]

    def put(self, j: int, bounds: _ChunkBounds) -> None:
        if j == len(self._chunks):
            self._chunks.append(bounds)
        else:
            self._chunks[j] = bounds

    def get(self, j: int) -> _ChunkBounds:
        return self._chunks[j]

    def labels(self, j: int) -> torch.Tensor:
        return self._chunks[j].labels

    def truncate(self, n: int) -> None:
        del self._chunks[n:]

    def close(self) -> None:
        self._chunks = []


class _DiskBounds:
    """Every chunk's bounds in its own file under a private scratch directory, created in
    ``parent`` and removed by ``close`` (or when the object is collected). ``get`` reads one
    chunk's bounds into fresh tensors, ``put`` writes them back: only the chunk being worked
    on is in memory. Scratch state, not user data: nothing to keep if the process dies."""

    def __init__(self, parent, n_groups: int):
        try:
            self.path = tempfile.mkdtemp(prefix="pyconcepts-bounds-", dir=os.fspath(parent))
        except OSError as exc:
            raise ValueError(f"storage_dir {os.fspath(parent)!r} is not a writable directory: "
                             f"{exc}") from exc
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)
        self._groups = n_groups
        self._rows: List[int] = []

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, j: int) -> int:
        return self._rows[j]

    def _file(self, j: int) -> str:
        return os.path.join(self.path, f"chunk{j:06d}.bounds")

    def put(self, j: int, bounds: _ChunkBounds) -> None:
        with open(self._file(j), "wb") as f:
            for t in (bounds.labels, bounds.theta_lo, bounds.theta_up):
                f.write(t.contiguous().numpy().data)
        if j == len(self._rows):
            self._rows.append(bounds.labels.shape[0])
        else:
            self._rows[j] = bounds.labels.shape[0]

    def get(self, j: int) -> _ChunkBounds:
        n = self._rows[j]
        out = _ChunkBounds(torch.empty(n, dtype=torch.int64),
                           torch.empty(n, dtype=torch.float32),
                           torch.empty(n, self._groups, dtype=torch.float32))
        self._read(j, (out.labels, out.theta_lo, out.theta_up))
        return out

    def labels(self, j: int) -> torch.Tensor:
        """Only the labels of chunk j (the first 8 bytes per point of its file)."""
        out = torch.empty(self._rows[j], dtype=torch.int64)
        self._read(j, (out,))
        return out

    def _read(self, j: int, tensors) -> None:
        with open(self._file(j), "rb") as f:
            for t in tensors:
                view = t.numpy().data.cast("B")
                if f.readinto(view) != len(view):
                    raise RuntimeError(f"pruning bounds file {self._file(j)} is truncated "
                                       "(was the scratch directory modified during the fit?)")

    def truncate(self, n: int) -> None:
        for j in range(n, len(self._rows)):
            os.remove(self._file(j))
        del self._rows[n:]

    def close(self) -> None:
        self._remove()
        self._rows = []


class ChunksChanged(ValueError):
    """The chunks of a pass are not those the bounds were built on."""


@dataclass
class PassStats:
    """What one Lloyd pass did. ``distance_fraction`` is the share of the N x K cosines an
    unpruned pass computes that this pass computed."""

    n_points: int = 0
    n_clusters: int = 0
    n_read: int = 0           # points not certified by the global filter
    n_full: int = 0           # points evaluated against every group
    # points that changed cluster; None when not tracked. DirectionalClustering's plain passes
    # under pruning="auto" count it on every 16th row only (the rows watched to decide when
    # to start pruning).
    n_moved: Optional[int] = 0
    n_cosines: int = 0        # point-centroid cosines computed

    @property
    def skipped_fraction(self) -> float:
        """Share of points the global filter certified without reading them."""
        return 1.0 - self.n_read / self.n_points if self.n_points else 0.0

    @property
    def distance_fraction(self) -> float:
        total = self.n_points * self.n_clusters
        return self.n_cosines / total if total else 1.0


@dataclass
class BoundedLloyd:
    """State of pruned Lloyd passes over a fixed sequence of chunks.

    ``first_pass`` runs the fused native ``assign_update`` over every chunk and records labels
    and bounds; each ``next_pass`` then reads only what its bounds cannot certify, in one
    native call per chunk. The chunks must be the same rows in the same order on every pass
    (a tensor list or a re-iterable stream). Centroids must be unit rows to
    ``ops.PRUNED_NORM_TOL``. Memory: 12 + 4 * n_groups bytes per point (``bytes_per_point``),
    or with ``storage_dir`` that much disk in a scratch directory created there (removed by
    ``close``) and in memory only the chunk being worked on; each pass then reads and writes
    every chunk's bounds once. The rounding margin is derived from D
    (``ops.pruned_pass_eps``) and folded into the stored angles.
    """

    n_clusters: int
    n_groups: int = 16
    normalize: bool = False  # sums of unit rows (see ops.assign_update)
    num_threads: Optional[int] = None
    storage_dir: Optional[str] = None
    _chunks: object = field(default=None, repr=False)
    _last_fraction: float = field(default=1.0, repr=False)
    _last_was_full: bool = field(default=True, repr=False)

    def __post_init__(self):
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {self.n_groups}")
        strip = ops.ASSIGN_GROUP  # groups are whole strips of the kernel's group maxima
        strips = -(-self.n_clusters // strip)
        self._strips_per_group = -(-strips // min(self.n_groups, strips))
        self._group_size = strip * self._strips_per_group
        self._groups = ops.pruned_pass_groups(self.n_clusters, self._strips_per_group)
        self._group_of = torch.arange(self.n_clusters) // self._group_size
        self._chunks = (_RamBounds() if self.storage_dir is None
                        else _DiskBounds(self.storage_dir, self._groups))

    def close(self) -> None:
        """Drop the bounds (and remove their scratch directory, if any)."""
        self._chunks.close()

    @property
    def bytes_per_point(self) -> int:
        """Memory of the per-point state: label, own-angle bound, one bound per group."""
        return 8 + 4 + 4 * self._groups

    # ------------------------------------------------------------------ bounds
    def _bounds_from_full(self, d, labels, best, second, strip_max):
        """Angle bounds from a full pass (see csrc/pruned_pass.h): the own angle shifted by
        the kernel's rounding, and per group the angle to its largest other cosine (in the
        own centroid's group the global second best bounds the other members). In float32:
        the rounding of the cosine arithmetic is inside eps (its 2^-22 term) and that of
        acos (about an ulp) inside _ANGLE_SLACK."""
        eps = ops.pruned_pass_eps(d)
        n = labels.shape[0]
        if self._strips_per_group == 1:
            upper_cos = strip_max
        else:
            pad = self._groups * self._strips_per_group - strip_max.shape[1]
            if pad:
                strip_max = torch.cat([strip_max, strip_max.new_full((n, pad), -1.0)], dim=1)
            upper_cos = strip_max.view(n, self._groups, self._strips_per_group).amax(dim=2)
        upper_cos.scatter_(1, self._group_of[labels][:, None], second[:, None])
        theta_up = upper_cos.add_(eps).clamp_(-1, 1).acos_().sub_(_ANGLE_SLACK).clamp_min_(0)
        theta_lo = (best - 3 * eps).clamp_(-1, 1).acos_().add_(_ANGLE_SLACK)
        return theta_lo, theta_up

    def first_pass(self, chunks, centroids: torch.Tensor, *, expected_rows=None):
        """Full pass. Returns (sums float64 (K, D), counts int64 (K,), PassStats).

        ``expected_rows``: the chunk lengths of an earlier pass, checked chunk by chunk (the
        stream is never held in memory); the points whose label differs from that pass's
        are counted in ``n_moved`` (else it is None)."""
        _check_unit(centroids)
        if expected_rows is None:
            self._chunks.truncate(0)
        sums = counts = None
        stats = PassStats(n_clusters=self.n_clusters)
        n_seen = 0
        for j, x in enumerate(chunks):
            n_seen += 1
            if expected_rows is not None and (j >= len(expected_rows) or x.shape[0] != expected_rows[j]):
                raise ChunksChanged(
                    "the chunks changed between passes (pruned passes need the same rows in "
                    "the same order every time)"
                )
            index, best, second, strip_max, s, c = ops.assign_update(
                x, centroids, return_second=True, return_group_max=True,
                normalize=self.normalize, num_threads=self.num_threads,
            )
            lo, up = self._bounds_from_full(x.shape[1], index, best, second, strip_max)
            if expected_rows is not None:
                stats.n_moved += int((self._chunks.labels(j) != index).sum())
            self._chunks.put(j, _ChunkBounds(index, lo, up))
            sums = s if sums is None else sums + s
            counts = c if counts is None else counts + c
            stats.n_points += x.shape[0]
            stats.n_read += x.shape[0]
            stats.n_full += x.shape[0]
            stats.n_cosines += x.shape[0] * self.n_clusters
        if sums is None:
            raise ValueError("the stream of chunks is empty")
        if expected_rows is not None and n_seen != len(expected_rows):
            raise ChunksChanged("the chunks changed between passes (fewer chunks than before)")
        self._last_was_full = True
        if expected_rows is None:
            stats.n_moved = None  # no earlier labels to compare with
        return sums, counts, stats

    def next_pass(self, chunks, old_centroids: torch.Tensor, new_centroids: torch.Tensor,
                  sums: torch.Tensor, counts: torch.Tensor):
        """Pruned pass after the centroids moved from ``old_centroids`` to ``new_centroids``.

        ``sums``/``counts`` are those of the previous assignment; they are corrected in place
        for the points that change cluster and returned with a PassStats.
        """
        drift = _drift_angles(old_centroids, new_centroids)
        if not self._last_was_full and self._last_fraction > _FULL_PASS_FRACTION:
            return self._full_pass_in_place(chunks, new_centroids, sums, counts)
        stats = PassStats(n_clusters=self.n_clusters)
        n_seen = 0
        for j, x in enumerate(chunks):
            if j >= len(self._chunks) or x.shape[0] != self._chunks.rows(j):
                raise ChunksChanged(
                    "the chunks changed between passes (pruned passes need the same rows in "
                    "the same order every time)"
                )
            n_seen += 1
            state = self._chunks.get(j)
            sum_corr, count_corr, pass_stats = ops.pruned_pass(
                x, new_centroids, state.labels, state.theta_lo, state.theta_up, drift,
                strips_per_group=self._strips_per_group, normalize=self.normalize,
                num_threads=self.num_threads,
            )
            self._chunks.put(j, state)  # bounds updated in place: written back if on disk
            sums += sum_corr
            counts += count_corr
            read, cosines, full, moved = (int(v) for v in pass_stats.tolist())
            stats.n_points += x.shape[0]
            stats.n_read += read
            stats.n_cosines += cosines
            stats.n_full += full
            stats.n_moved += moved
        if n_seen != len(self._chunks):
            raise ChunksChanged("the chunks changed between passes (fewer chunks than before)")
        self._last_fraction, self._last_was_full = stats.distance_fraction, False
        return sums, counts, stats

    def _full_pass_in_place(self, chunks, centroids, sums, counts):
        """An unpruned pass that also rebuilds every bound; sums/counts overwritten."""
        n_before = [self._chunks.rows(j) for j in range(len(self._chunks))]
        fresh_sums, fresh_counts, stats = self.first_pass(chunks, centroids, expected_rows=n_before)
        sums.copy_(fresh_sums)
        counts.copy_(fresh_counts)
        return sums, counts, stats

    def labels(self) -> torch.Tensor:
        """The current labels of all points, in chunk order."""
        if not len(self._chunks):
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([self._chunks.labels(j) for j in range(len(self._chunks))])


def _check_unit(centroids: torch.Tensor) -> None:
    if isinstance(centroids, torch.Tensor) and centroids.dim() == 2 and centroids.shape[0]:
        error = float((centroids.double().norm(dim=1) - 1).abs().max())
        if not error <= ops.PRUNED_NORM_TOL:
            raise ValueError(
                f"centroids must have unit-norm rows to {ops.PRUNED_NORM_TOL:g} for pruned "
                f"passes (largest norm error {error:.3g}); normalise them first"
            )


def _drift_angles(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Angle each centroid direction moved, in float64, rounded up so the bounds stay safe.
    2 asin(|a - b| / 2) stays accurate for tiny angles, where acos(a . b) loses half the
    digits."""
    if old.shape != new.shape:
        raise ValueError(f"old and new centroids differ in shape: {tuple(old.shape)} vs "
                         f"{tuple(new.shape)}")
    a = old.double() / old.double().norm(dim=1, keepdim=True)
    b = new.double() / new.double().norm(dim=1, keepdim=True)
    chord = (a - b).norm(dim=1)
    drift = 2 * torch.asin((chord / 2).clamp(max=1.0))
    return torch.where(chord > 0, drift * (1 + 1e-12) + 1e-15, drift.new_zeros(()))


__all__ = ["BoundedLloyd", "ChunksChanged", "PassStats"]
