"""Half-space concept detectors and the paper's refinement losses (METHOD.md section 2).

A detector i is y_i(x) = sigmoid(w_i . x - b_i) with w_i = u_i / m_i: a unit direction u_i and
a margin m_i = 1 / ||w_i|| as separate parameters. The losses are plain functions of the
memberships y (B, K) (and W), logs base 2, q_p = y_p / ||y_p||_1:

- ``sparsity_loss``            L_s  = E_p[ H(q_p) ]
- ``sparsity_bound_loss``      soft maximum over p of H(q_p)
- ``max_activation_loss``      L_ma = E_p[ -sum_i q_pi log y_pi ]
- ``max_margin_loss``          L_mm = mean_i ||w_i||
- ``inactive_loss``            L_ic = mean_i (1/nu) ReLU(nu - E_p[y_i^gamma]), nu = tau / I
- ``excessive_activation_loss`` soft maximum over i of ReLU(E_p[y_i^gamma] - rho) / (1 - rho)
- ``soft_maximum``             R({L_k}) = sum L_k^(v+1) / sum L_k^v, v = 4

``refine_detectors`` minimises their weighted sum with Adam over mini-batches of patches.
Extra terms (URA, ``pyconcepts.ura``) plug in through ``extra_loss``::

    refine_detectors(x, decoding, bias, extra_loss=fn, weights={...}, steps=..., ...)
    fn(decoding (K, D) tensor with grad, bias (K,) tensor with grad, batch (B, D) raw rows,
       step int) -> scalar tensor, added to the loss as is (weight it inside fn).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .stats import DEFAULT_CHUNK_SIZE, iter_chunks

__all__ = [
    "DEFAULT_WEIGHTS",
    "memberships",
    "entropy_bits",
    "soft_maximum",
    "sparsity_loss",
    "sparsity_bound_loss",
    "max_activation_loss",
    "max_margin_loss",
    "inactive_loss",
    "excessive_activation_loss",
    "detector_losses",
    "refine_detectors",
    "sample_rows",
]

# paper weights for a ResNet18 last conv layer (URA excluded: it is an extra term)
DEFAULT_WEIGHTS: Dict[str, float] = {
    "sparsity": 0.85, "sparsity_bound": 2.6, "max_activation": 2.8,
    "max_margin": 0.6, "inactive": 15.0, "excessive_activation": 15.0,
}
_EPS = 1e-12


def memberships(x: torch.Tensor, decoding: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, K) y = sigmoid(x W^T - b)."""
    return torch.sigmoid(x @ decoding.T - bias)


def entropy_bits(q: torch.Tensor) -> torch.Tensor:
    """Row-wise entropy (base 2) of distributions q (B, K)."""
    return -(q * torch.log2(q.clamp_min(_EPS))).sum(-1)


def _normalised(y: torch.Tensor) -> torch.Tensor:
    return y / y.sum(-1, keepdim=True).clamp_min(_EPS)


def soft_maximum(values: torch.Tensor, v: float = 4.0) -> torch.Tensor:
    """R({L_k}) = sum L_k^(v+1) / sum L_k^v (values >= 0); tends to max as v grows."""
    values = values.clamp_min(0)
    return (values ** (v + 1)).sum() / (values**v).sum().clamp_min(_EPS)


def sparsity_loss(y: torch.Tensor) -> torch.Tensor:
    return entropy_bits(_normalised(y)).mean()


def sparsity_bound_loss(y: torch.Tensor, v: float = 4.0) -> torch.Tensor:
    return soft_maximum(entropy_bits(_normalised(y)), v)


def max_activation_loss(y: torch.Tensor) -> torch.Tensor:
    q = _normalised(y)
    return -(q * torch.log2(y.clamp_min(_EPS))).sum(-1).mean()


def max_margin_loss(decoding: torch.Tensor) -> torch.Tensor:
    return decoding.norm(dim=1).mean()


def inactive_loss(y: torch.Tensor, tau: float = 1.0, gamma: float = 2.0) -> torch.Tensor:
    nu = tau / y.shape[1]
    return (torch.relu(nu - (y**gamma).mean(0)) / nu).mean()


def excessive_activation_loss(
    y: torch.Tensor, rho: float = 0.5, gamma: float = 2.0, v: float = 4.0
) -> torch.Tensor:
    return soft_maximum(torch.relu((y**gamma).mean(0) - rho) / (1 - rho), v)


def detector_losses(
    x: torch.Tensor, decoding: torch.Tensor, bias: torch.Tensor, *,
    tau: float = 1.0, gamma: float = 2.0, rho: float = 0.5, v: float = 4.0,
) -> Dict[str, torch.Tensor]:
    """Every paper loss (except URA) on a batch of raw rows ``x`` (B, D)."""
    y = memberships(x, decoding, bias)
    return {
        "sparsity": sparsity_loss(y),
        "sparsity_bound": sparsity_bound_loss(y, v),
        "max_activation": max_activation_loss(y),
        "max_margin": max_margin_loss(decoding),
        "inactive": inactive_loss(y, tau, gamma),
        "excessive_activation": excessive_activation_loss(y, rho, gamma, v),
    }


def sample_rows(x, size: int, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Up to ``size`` rows of ``x`` drawn uniformly (reservoir over the stream), float32."""
    g = torch.Generator().manual_seed(seed)
    kept: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    for chunk in iter_chunks(x, chunk_size):
        chunk_keys = torch.rand(chunk.shape[0], generator=g)
        rows = chunk.to(torch.float32).cpu()
        if kept is None:
            kept, keys = rows, chunk_keys
        else:
            kept, keys = torch.cat([kept, rows]), torch.cat([keys, chunk_keys])
        if kept.shape[0] > size:
            top = torch.topk(keys, size).indices  # the `size` largest keys: a uniform sample
            kept, keys = kept[top], keys[top]
    return kept


def refine_detectors(
    x: torch.Tensor,
    decoding: torch.Tensor,
    bias: torch.Tensor,
    *,
    weights: Optional[Dict[str, float]] = None,
    extra_loss: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]] = None,
    steps: int = 500,
    batch_size: int = 4096,
    lr: float = 1e-2,
    tau: float = 1.0,
    gamma: float = 2.0,
    rho: float = 0.5,
    v: float = 4.0,
    seed: int = 0,
    center: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Refine detectors (W (K, D), b (K,)) by the paper's losses over mini-batches of ``x``.

    ``x`` (N, D) raw rows (a sample held in memory; ``sample_rows`` draws one from a stream).
    Parameters: unit directions u_i, log-margins log m_i, and biases relative to ``center``
    (default: the sample mean) so that the optimisation is well scaled; W = u / m.
    ``weights`` override ``DEFAULT_WEIGHTS`` (a weight of 0 drops a term). ``extra_loss``
    (see the module docstring) is added each step. ``callback(step, losses)`` sees the float
    values. Returns the refined (W, b) as float32 on ``decoding``'s device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != decoding.shape[1]:
        raise ValueError(f"x must be a (N, {decoding.shape[1]}) tensor")
    if x.shape[0] == 0:
        raise ValueError("x has no rows")
    if steps < 0 or batch_size < 1:
        raise ValueError("steps must be >= 0 and batch_size >= 1")
    w_all = dict(DEFAULT_WEIGHTS)
    unknown = set(weights or {}) - set(w_all)
    if unknown:
        raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: {sorted(w_all)}")
    w_all.update(weights or {})
    device = decoding.device
    x = x.to(device=device, dtype=torch.float32)
    center = (x.mean(0) if center is None else center.to(device=device, dtype=torch.float32)).detach()
    w0 = decoding.detach().to(torch.float32)
    norms = w0.norm(dim=1, keepdim=True).clamp_min(_EPS)
    direction = torch.nn.Parameter(w0 / norms)
    log_margin = torch.nn.Parameter(-torch.log(norms.squeeze(1)))
    rel_bias = torch.nn.Parameter((bias.detach().to(device, torch.float32) - w0 @ center))
    optimiser = torch.optim.Adam([direction, log_margin, rel_bias], lr=lr)
    g = torch.Generator().manual_seed(seed)

    def current():
        unit = direction / direction.norm(dim=1, keepdim=True).clamp_min(_EPS)
        w = unit * torch.exp(-log_margin)[:, None]
        return w, rel_bias + w @ center

    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=g).to(device)
        batch = x.index_select(0, idx)
        w, b = current()
        losses = detector_losses(batch, w, b, tau=tau, gamma=gamma, rho=rho, v=v)
        total = sum(w_all[k] * losses[k] for k in losses if w_all[k] != 0)
        if extra_loss is not None:
            extra = extra_loss(w, b, batch, step)
            losses["extra"] = extra
            total = total + extra
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        if callback is not None:
            callback(step, {k: float(t.detach()) for k, t in losses.items()})
    with torch.no_grad():
        w, b = current()
    return w.detach().to(torch.float32), b.detach().to(torch.float32)
