"""Signal vectors (encoding directions) from detectors, streamed (METHOD.md section 3).

    s_i = Cov_{p in P_i}[x_p, z_{p,i}] / Var_{p in P_i}[z_{p,i}],   P_i = {p : w_i . x_p > b_i}

One read of the activations through ``ops.masked_moments``; float64 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .stats import DEFAULT_CHUNK_SIZE, StreamingCovariance, StreamingMoments, iter_chunks

__all__ = ["signal_vectors", "streaming_mean"]


def streaming_mean(x, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(D,) float64 mean of a tensor or chunk stream (Chan merging; over all ranks under
    torch.distributed). Raises ValueError for NaN/Inf in x."""
    stats = None
    for chunk in iter_chunks(x, chunk_size):
        if stats is None:
            stats = StreamingCovariance(chunk.shape[1], device=chunk.device, with_covariance=False)
        stats.update(chunk)
    return stats.all_reduce().mean


def signal_vectors(
    x,
    decoding: torch.Tensor,
    bias: torch.Tensor,
    *,
    center: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """(K, D) float32 signal vectors of the detectors (``decoding`` (K, D), ``bias`` (K,)).

    ``x`` is a tensor (N, D) or a re-iterable of (n, D) chunks. ``center`` (D,) defaults to
    the data mean (one extra pass) and only affects numerical precision, not the result.
    Raises ``ValueError`` when a detector fires on fewer than two rows (its P_i is empty).
    """
    if not isinstance(decoding, torch.Tensor) or decoding.dim() != 2:
        raise ValueError("decoding must be a (K, D) tensor")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (decoding.shape[0],):
        raise ValueError(f"bias must be a ({decoding.shape[0]},) tensor")
    if center is None:
        center = streaming_mean(x, chunk_size)
    acc = StreamingMoments(decoding, bias, center.to(decoding.device))
    for chunk in iter_chunks(x, chunk_size, dim=decoding.shape[1]):
        acc.update(chunk)
    acc.all_reduce()
    out = acc.signal_vectors()
    bad = torch.isnan(out).any(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"detector(s) {torch.nonzero(bad).flatten().tolist()} fire on fewer than two rows "
            "(or z has no variance there): their signal vectors are undefined"
        )
    return out.to(torch.float32)
