"""Signal vectors (encoding directions) from detectors, streamed (METHOD.md section 3).

    s_i = Cov_{p in P_i}[x_p, z_{p,i}] / Var_{p in P_i}[z_{p,i}],   P_i = {p : w_i . x_p > b_i}

One read of the activations through ``ops.masked_moments``; float64 accumulation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .stats import (DEFAULT_CHUNK_SIZE, StreamingCovariance, StreamingMoments, fail_together,
                    iter_chunks)

__all__ = ["signal_vectors", "streaming_mean", "streamed_signal_vectors", "masked_signal_vectors",
           "absent_levels", "AbsentSums"]


def streaming_mean(x, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(D,) float64 mean of a tensor or chunk stream (Chan merging; over all ranks under
    torch.distributed). Raises ValueError for NaN/Inf in x."""
    stats = None
    with fail_together("streaming_mean"):  # e.g. NaN rows in this rank's shard
        for chunk in iter_chunks(x, chunk_size):
            if stats is None:
                stats = StreamingCovariance(chunk.shape[1], device=chunk.device,
                                            with_covariance=False)
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
    out = streamed_signal_vectors(x, decoding, bias, center, chunk_size)
    bad = torch.isnan(out).any(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"detector(s) {torch.nonzero(bad).flatten().tolist()} fire on fewer than two rows "
            "(or z has no variance there): their signal vectors are undefined"
        )
    return out.to(torch.float32)


def streamed_signal_vectors(x, decoding: torch.Tensor, bias: torch.Tensor, center: torch.Tensor,
                            chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(K, D) float64 signal vectors from one read of ``x`` (over all ranks under
    torch.distributed); NaN rows for detectors with fewer than two rows or no variance of z
    (the caller raises or substitutes)."""
    acc = StreamingMoments(decoding, bias, center.to(decoding.device))
    with fail_together("the signal-vector moments"):
        for chunk in iter_chunks(x, chunk_size, dim=decoding.shape[1]):
            acc.update(chunk)
    return acc.all_reduce().signal_vectors()


def masked_signal_vectors(x: torch.Tensor, z: torch.Tensor,
                          mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Signal vectors on one batch held in memory, differentiable in ``x`` and ``z``.

    ``x`` (N, D) rows, ``z`` (N, K) their concept scores, ``mask`` (N, K) bool: concept i's
    rows (the mask carries no gradient). Returns ((K, D) Cov[x, z_i] / Var[z_i] over those
    rows, z centred by its mean there first; (K,) bool ``ok``: False where there are fewer
    than two rows or no variance of z, whose rows are meaningless)."""
    m = mask.detach().to(x.dtype)
    n = m.sum(0)
    safe = n.clamp_min(1)
    mean_z = (m * z).sum(0) / safe
    centred = (z - mean_z) * m
    cov = (centred.T @ x) / safe[:, None]  # sum over P of (z - mean z) x / n = Cov
    var = (centred * centred).sum(0) / safe
    ok = (n >= 2) & (var > 1e-12)
    return cov / var.clamp_min(1e-12)[:, None], ok


class AbsentSums:
    """Streams, per concept, the sum of ``w_i . (x - mean)`` and the count over the rows where
    detector i does not fire (``w_i . x <= b_i``), and the rows read: the statistics of
    ``absent_levels``, to be gathered in the same read as other statistics."""

    def __init__(self, decoding: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor):
        self.w = decoding.detach().to(torch.float32)
        self.b = bias.detach().to(torch.float32)
        self.offset = self.w @ mean.detach().to(device=self.w.device, dtype=torch.float32)
        k = self.w.shape[0]
        # on the chunks' device until the pass ends (no transfer per chunk)
        self.sums = torch.zeros(k, dtype=torch.float64, device=self.w.device)
        self.counts = torch.zeros(k, dtype=torch.float64, device=self.w.device)
        self.rows = 0

    def update(self, chunk: torch.Tensor) -> None:
        chunk = chunk.to(torch.float32)
        if self.sums.device != chunk.device:
            self.sums, self.counts = self.sums.to(chunk.device), self.counts.to(chunk.device)
        score = chunk @ self.w.to(chunk.device).T
        off = score <= self.b.to(chunk.device)
        # z relative to the mean from the same product: w.x - w.mean
        z = (score - self.offset.to(chunk.device)).to(torch.float64)
        self.sums += (z * off).sum(0)
        self.counts += off.sum(0).to(torch.float64)
        self.rows += chunk.shape[0]

    def levels(self, encoding: torch.Tensor) -> torch.Tensor:
        """(K,) float32 levels in latent units (divided by w_i . s_i), after ``all_reduce``."""
        sums, counts = self.sums.cpu(), self.counts.cpu()
        gain = (self.w.double() * encoding.detach().double().to(self.w.device)).sum(1).cpu()
        level = torch.where(counts > 0, sums / counts.clamp_min(1) / gain, torch.zeros_like(sums))
        return level.to(torch.float32)

    def all_reduce(self) -> "AbsentSums":
        from .stats import all_reduce_sum_

        all_reduce_sum_(self.sums, self.counts)
        return self


def absent_levels(x, decoding: torch.Tensor, bias: torch.Tensor, encoding: torch.Tensor,
                  mean: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(K,) float32: each concept's mean latent factor ``(w_i . (x - mean)) / (w_i . s_i)`` over
    the rows where its detector does not fire (``w_i . x <= b_i``), over all ranks under
    torch.distributed. This is the concept's level when absent, below 0 (the mean) for a
    concept that raises the rows it is detected on; removing a concept lowers it to this
    level. A detector that fires on every row gets 0."""
    acc = AbsentSums(decoding, bias, mean)
    with fail_together("the absent levels"):
        for chunk in iter_chunks(x, chunk_size, dim=decoding.shape[1]):
            acc.update(chunk)
    return acc.all_reduce().levels(encoding)
