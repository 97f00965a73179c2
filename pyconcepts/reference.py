"""Plain-torch implementations of every native op.

These are the oracles the tests compare the native kernels against. Nothing in the package
calls them as a fallback: a missing or failing native op is an error, not a slow path.
They take the same arguments as the ops in ``pyconcepts.ops`` and return the same types,
computed in float64 so that they are the more accurate side of every comparison.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


def _row_norms(x64: torch.Tensor) -> torch.Tensor:
    """(N, 1) float64 row norms, 1 for zero rows (which stay zero when divided): any
    non-zero row, however small, becomes a unit row."""
    norms = x64.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, norms, torch.ones_like(norms))


class Moments(NamedTuple):
    """Per-concept sufficient statistics of the signal vectors (METHOD.md section 3).

    With z = W x and the mask m_i = [z_i > b_i], on shifted values xc = x - center and
    zc_i = w_i . xc: ``count`` = sum m_i, ``sum_z`` = sum m_i zc_i, ``sum_z2`` = sum m_i zc_i^2,
    ``sum_x`` = sum m_i xc (K, D), ``sum_xz`` = sum m_i zc_i xc (K, D).
    """

    count: torch.Tensor   # (K,) int64
    sum_z: torch.Tensor   # (K,) float64
    sum_z2: torch.Tensor  # (K,) float64
    sum_x: torch.Tensor   # (K, D) float64
    sum_xz: torch.Tensor  # (K, D) float64


def cosine_similarities(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 cosines of the rows of x to unit centroids; zero rows give 0."""
    x64 = x.double()
    norms = _row_norms(x64)
    return (x64 / norms) @ centroids.double().T


def cosine_assign(
    x: torch.Tensor, centroids: torch.Tensor, *, return_second: bool = False,
    center: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Best centroid by cosine per row of x (or x - center; ties to the lowest index), its
    cosine, optionally the second best cosine (-inf when K == 1)."""
    if center is not None:
        x = x.double() - center.double()
    n, k = x.shape[0], centroids.shape[0]
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32)
        out = (torch.empty(0, dtype=torch.int64), empty)
        return out + (empty.clone(),) if return_second else out
    sims = cosine_similarities(x, centroids)
    best, index = sims.max(dim=1)
    out = (index, best.float())
    if return_second:
        if k == 1:
            second = torch.full((n,), float("-inf"))
        else:
            second = sims.topk(2, dim=1).values[:, 1].float()
        out = out + (second,)
    return out


def spherical_update(
    x: torch.Tensor, index: torch.Tensor, n_clusters: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster float64 sums of member rows (K, D) and int64 counts (K,)."""
    d = x.shape[1]
    sums = torch.zeros(n_clusters, d, dtype=torch.float64)
    sums.index_add_(0, index.long(), x.double())
    counts = torch.bincount(index.long(), minlength=n_clusters)[:n_clusters]
    return sums, counts.long()


def masked_moments(
    x: torch.Tensor,
    decoding: torch.Tensor,
    bias: torch.Tensor,
    *,
    center: Optional[torch.Tensor] = None,
) -> Moments:
    """Signal-vector statistics for all K concepts, in float64."""
    x64 = x.double()
    w64 = decoding.double()
    z = x64 @ w64.T
    mask = (z > bias.double()).double()
    if center is not None:
        x64 = x64 - center.double()
        z = x64 @ w64.T
    mz = mask * z
    return Moments(
        count=mask.sum(0).round().long(),
        sum_z=mz.sum(0),
        sum_z2=(mz * z).sum(0),
        sum_x=mask.T @ x64,
        sum_xz=mz.T @ x64,
    )


def assign_update(
    x: torch.Tensor, centroids: torch.Tensor, *, return_second: bool = False,
    normalize: bool = False, return_moments: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """cosine_assign, then spherical_update of x (or of its unit rows) by the new assignment;
    with ``return_moments`` also sum v z (K, D) and (sum z, sum z^2) (K, 2) per cluster, v
    the summed row and z = c_label . v."""
    assigned = cosine_assign(x, centroids, return_second=return_second)
    rows = x.double()
    if normalize:
        rows = rows / _row_norms(rows)
    k = centroids.shape[0]
    sums, counts = spherical_update(rows, assigned[0], k)
    if not return_moments:
        return (*assigned, sums, counts)
    c_unit = centroids.double() / centroids.double().norm(dim=1, keepdim=True)
    z = (rows * c_unit[assigned[0]]).sum(dim=1)
    sum_xz, _ = spherical_update(rows * z[:, None], assigned[0], k)
    sum_z, _ = spherical_update(torch.stack([z, z * z], dim=1), assigned[0], k)
    return (*assigned, sums, counts, sum_xz, sum_z)



def pruned_pass(
    x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, *,
    strips_per_group: int = 1, normalize: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Dense oracle of ``ops.pruned_pass``: what a pruned pass must produce, without bounds.

    Returns ``(new_labels, own_angle (N,), group_angle (N, G), sum_corr, count_corr)``: the
    full assignment, float64 true angles from each row to its new centroid and, per group of
    ``16 * strips_per_group`` consecutive centroids, to the nearest other member (``pi``
    when there is none), and the float64 sum/count corrections for the rows whose label
    changed (+row at the new, -row at the old cluster; unit rows when ``normalize``). Valid
    bounds satisfy theta_lo >= own_angle and theta_up <= group_angle.
    """
    n, k = x.shape[0], centroids.shape[0]
    width = 16 * strips_per_group
    groups = -(-k // width)
    c_unit = centroids.double() / centroids.double().norm(dim=1, keepdim=True)
    if n == 0:
        new_labels = torch.empty(0, dtype=torch.int64)
        angles = torch.empty(0, k, dtype=torch.float64)
    else:
        new_labels = cosine_assign(x, centroids)[0]
        angles = torch.acos(cosine_similarities(x, c_unit).clamp(-1, 1))
    own = angles.gather(1, new_labels[:, None]).squeeze(1)
    others = angles.clone()
    others.scatter_(1, new_labels[:, None], torch.pi)
    pad = groups * width - k
    others = torch.cat([others, others.new_full((n, pad), torch.pi)], dim=1)
    group_angle = others.view(n, groups, width).amin(dim=2)
    rows = x.double()
    if normalize:
        rows = rows / _row_norms(rows)
    moved = new_labels != labels
    add, add_c = spherical_update(rows[moved], new_labels[moved], k)
    sub, sub_c = spherical_update(rows[moved], labels[moved], k)
    return new_labels, own, group_angle, add - sub, add_c - sub_c
