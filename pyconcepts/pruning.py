"""Exact pruned Lloyd passes for spherical k-means.

Every point keeps two bounds in angle space: a lower bound on the cosine to its own
centroid and an upper bound on the cosine to every other centroid. After an update each
centroid j has moved by the angle ``drift_j = arccos(c_j_old . c_j_new)``; by the triangle
inequality on the sphere the own angle grows by at most ``drift_own`` and every other angle
shrinks by at most the largest other drift. A point whose loosened bounds still separate by
more than ``margin`` (which covers fp32 rounding of the kernel's dot products) cannot change
its assignment and is not read at all. The rest are gathered and reassigned with the native
kernel, which also refreshes their bounds (best and second-best cosine), and the cluster
sums are corrected only for the points that moved. The labels are those of unpruned Lloyd
passes from the same start (tested in tests/test_pruning.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import ops


@dataclass
class _ChunkBounds:
    labels: torch.Tensor  # (n,) int64
    lower: torch.Tensor   # (n,) float32: cosine to own centroid >= lower
    upper: torch.Tensor   # (n,) float32: cosine to any other centroid <= upper


@dataclass
class PassStats:
    """What one Lloyd pass did: points read and reassigned versus skipped by the bounds."""

    n_points: int = 0
    n_recomputed: int = 0
    n_moved: int = 0

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.n_recomputed / self.n_points if self.n_points else 0.0


@dataclass
class BoundedLloyd:
    """State of pruned Lloyd passes over a fixed sequence of chunks.

    ``first_pass`` runs the fused native ``assign_update`` over every chunk and records labels
    and bounds; each ``next_pass`` then reads only the points its bounds cannot certify. The
    chunks must be the same rows in the same order on every pass (a tensor list or a
    re-iterable stream). Memory: 16 bytes per point.
    """

    n_clusters: int
    margin: float = 1e-4
    num_threads: Optional[int] = None
    _chunks: List[_ChunkBounds] = field(default_factory=list, repr=False)

    def first_pass(self, chunks, centroids: torch.Tensor):
        """Full pass. Returns (sums float64 (K, D), counts int64 (K,), PassStats)."""
        self._chunks = []
        sums = counts = None
        stats = PassStats()
        for x in chunks:
            index, best, second, s, c = ops.assign_update(
                x, centroids, return_second=True, num_threads=self.num_threads
            )
            self._chunks.append(_ChunkBounds(index, best, second))
            sums = s if sums is None else sums + s
            counts = c if counts is None else counts + c
            stats.n_points += x.shape[0]
            stats.n_recomputed += x.shape[0]
        if sums is None:
            raise ValueError("the stream of chunks is empty")
        return sums, counts, stats

    def next_pass(self, chunks, old_centroids: torch.Tensor, new_centroids: torch.Tensor,
                  sums: torch.Tensor, counts: torch.Tensor):
        """Pruned pass after the centroids moved from ``old_centroids`` to ``new_centroids``.

        ``sums``/``counts`` are those of the previous assignment; they are corrected in place
        for the points that change cluster and returned with a PassStats.
        """
        drift = _drift_angles(old_centroids, new_centroids)
        k = drift.shape[0]
        if k > 1:
            top = drift.topk(2)
            first_val, first_idx, second_val = top.values[0], top.indices[0], top.values[1]
        else:
            first_val, first_idx, second_val = drift[0], torch.tensor(0), torch.tensor(0.0)
        stats = PassStats()
        n_seen = 0
        for j, x in enumerate(chunks):
            if j >= len(self._chunks) or x.shape[0] != self._chunks[j].labels.shape[0]:
                raise ValueError(
                    "the chunks changed between passes (pruned passes need the same rows in "
                    "the same order every time)"
                )
            state = self._chunks[j]
            n_seen += 1
            labels = state.labels
            own = drift[labels]
            other = torch.where(labels == first_idx, second_val, first_val)
            lower_angle = torch.acos(state.lower.double().clamp(-1, 1)) + own
            upper_angle = (torch.acos(state.upper.double().clamp(-1, 1)) - other).clamp_min(0)
            lower = torch.cos(lower_angle.clamp_max(math.pi))
            upper = torch.cos(upper_angle)
            state.lower = lower.float()
            state.upper = upper.float()
            active = (lower <= upper + self.margin).nonzero().squeeze(1)
            stats.n_points += x.shape[0]
            stats.n_recomputed += int(active.numel())
            if active.numel() == 0:
                continue
            sub = x.index_select(0, active)
            new_labels, best, second = ops.cosine_assign(
                sub, new_centroids, return_second=True, num_threads=self.num_threads
            )
            old_labels = labels.index_select(0, active)
            moved = (new_labels != old_labels).nonzero().squeeze(1)
            if moved.numel():
                rows = sub.index_select(0, moved)
                add_s, add_c = ops.spherical_update(rows, new_labels[moved], k)
                sub_s, sub_c = ops.spherical_update(rows, old_labels[moved], k)
                sums += add_s - sub_s
                counts += add_c - sub_c
                stats.n_moved += int(moved.numel())
            labels[active] = new_labels
            state.lower[active] = best
            state.upper[active] = second
        if n_seen != len(self._chunks):
            raise ValueError("the chunks changed between passes (fewer chunks than before)")
        return sums, counts, stats

    def labels(self) -> torch.Tensor:
        """The current labels of all points, in chunk order."""
        return torch.cat([c.labels for c in self._chunks]) if self._chunks else torch.empty(0, dtype=torch.int64)


def _drift_angles(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Angle each unit centroid moved, in float64, rounded up so the bounds stay safe."""
    cos = (old.double() * new.double()).sum(dim=1).clamp(-1, 1)
    return torch.acos(cos) + 1e-7
