"""Recovery metrics against a known ground truth (synthetic data, METHOD.md section 6).

- ``match_directions``: Hungarian matching of recovered directions to true ones by signed
  cosine (a direction pointing the wrong way counts as -1, not +1).
- ``detector_iou``: per concept, IoU of a detector's positive set with the true presence.
- ``recovery_report``: both, for a ``ConceptBasis`` against a ``SyntheticData``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

__all__ = ["linear_sum_assignment", "match_directions", "detector_iou", "recovery_report"]


def linear_sum_assignment(cost) -> Tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of the rows of ``cost`` (n, m) to distinct columns.

    Returns ``(rows, cols)`` like ``scipy.optimize.linear_sum_assignment`` (rows sorted).
    Shortest augmenting paths (Jonker-Volgenant form of the Hungarian method), O(n^2 m),
    with the inner loop over columns vectorised.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be 2-D, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost contains NaN or Inf")
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    match = np.zeros(m + 1, dtype=np.int64)  # match[j] = row (1-based) assigned to column j
    way = np.zeros(m + 1, dtype=np.int64)
    padded = np.zeros((n + 1, m + 1))
    padded[1:, 1:] = cost
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used
            free[0] = False
            cur = padded[i0] - u[i0] - v
            better = free & (cur < minv)
            minv[better] = cur[better]
            way[better] = j0
            candidates = np.where(free, minv, np.inf)
            j1 = int(np.argmin(candidates))
            delta = candidates[j1]
            u[match[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    rows, cols = [], []
    for j in range(1, m + 1):
        if match[j]:
            rows.append(match[j] - 1)
            cols.append(j - 1)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double().cpu()
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)


def match_directions(recovered: torch.Tensor, truth: torch.Tensor) -> Dict[str, object]:
    """Match recovered directions (K, D) to true ones (I, D) maximising total signed cosine.

    Returns ``truth_index`` (per true direction, the matched recovered row, -1 if K < I left it
    unmatched), ``cosine`` (I,) signed cosines of the matches (-1 when unmatched), and
    ``mean``/``min`` over the true directions.
    """
    if recovered.dim() != 2 or truth.dim() != 2 or recovered.shape[1] != truth.shape[1]:
        raise ValueError(
            f"recovered {tuple(recovered.shape)} and truth {tuple(truth.shape)} must be (K, D), (I, D)"
        )
    cos = _unit_rows(truth) @ _unit_rows(recovered).T  # (I, K)
    rows, cols = linear_sum_assignment(-cos.numpy())
    index = torch.full((truth.shape[0],), -1, dtype=torch.int64)
    matched = torch.full((truth.shape[0],), -1.0, dtype=torch.float64)
    index[torch.as_tensor(rows)] = torch.as_tensor(cols)
    matched[torch.as_tensor(rows)] = cos[torch.as_tensor(rows), torch.as_tensor(cols)]
    return {
        "truth_index": index,
        "cosine": matched,
        "mean": float(matched.mean()),
        "min": float(matched.min()),
    }


def detector_iou(detected: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """(K,) IoU of each column of ``detected`` (N, K) bool with ``presence`` (N, K) bool."""
    if detected.shape != presence.shape:
        raise ValueError(f"detected {tuple(detected.shape)} and presence {tuple(presence.shape)} differ")
    detected, presence = detected.bool(), presence.bool()
    inter = (detected & presence).sum(0).double()
    union = (detected | presence).sum(0).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def recovery_report(basis, data) -> Dict[str, object]:
    """Cosines of encoding and decoding directions to the truth, and detector IoU, with the
    recovered concepts matched to the true ones by encoding cosine."""
    model = data.model
    enc = match_directions(basis.encoding, model.encoding)
    idx = enc["truth_index"]
    present = idx >= 0
    dec_cos = torch.full((model.n_concepts,), -1.0, dtype=torch.float64)
    dec_cos[present] = (
        _unit_rows(basis.decoding[idx[present]]) * _unit_rows(model.true_decoding[present])
    ).sum(1)
    iou = torch.zeros(model.n_concepts, dtype=torch.float64)
    if bool(present.any()):
        detected = basis.detect(data.x)[:, idx[present]]
        iou[present] = detector_iou(detected, data.presence[:, present])
    return {
        "encoding_cosine": enc["cosine"].tolist(),
        "encoding_cosine_mean": enc["mean"],
        "encoding_cosine_min": enc["min"],
        "decoding_cosine": dec_cos.tolist(),
        "decoding_cosine_mean": float(dec_cos.mean()),
        "decoding_cosine_min": float(dec_cos.min()),
        "iou": iou.tolist(),
        "iou_mean": float(iou.mean()),
        "iou_min": float(iou.min()),
    }
