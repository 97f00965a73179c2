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

from .stats import (DEFAULT_CHUNK_SIZE, KeyedRowSample, distributed, fail_together, iter_chunks,
                    shard_offset)

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
    "pairwise_jaccard",
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
    """Up to ``size`` rows of ``x`` drawn uniformly (reservoir over the stream), float32, CPU.

    Every row gets a random key from its global row number and the ``size`` largest keys win,
    so the sample is the same for any chunking (``stats.KeyedRowSample``). Under
    torch.distributed ``x`` is this rank's shard (every rank must hold rows; one more pass
    counts them) and every rank gets the sample a single process would draw from all ranks'
    rows, in rank order."""
    start = 0
    if distributed():
        with fail_together("the row count of sample_rows"):
            local = sum(chunk.shape[0] for chunk in iter_chunks(x, chunk_size))
        start = shard_offset(local)
    sample = KeyedRowSample(size, seed)
    with fail_together("sample_rows"):
        sample.update_stream(iter_chunks(x, chunk_size), start)
    return sample.all_reduce().rows()


def pairwise_jaccard(detected: torch.Tensor) -> torch.Tensor:
    """(K, K) Jaccard overlap |D_i & D_j| / |D_i | D_j| of the detections ``detected`` (N, K)
    bool (diagonal 0). Two detectors turning into duplicates show as an entry near 1; one
    detector shrinking inside another (its territory taken over) does not."""
    d = detected.to(torch.float32)
    inter = d.T @ d
    n = d.sum(0)
    out = inter / (n[:, None] + n[None, :] - inter).clamp_min(1)
    out.fill_diagonal_(0)
    return out


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
    rotation_lr: Optional[float] = None,
    tau: float = 1.0,
    gamma: float = 2.0,
    rho: float = 0.5,
    v: float = 4.0,
    seed: int = 0,
    center: Optional[torch.Tensor] = None,
    max_overlap: Optional[float] = 0.5,
    check_every: int = 10,
    stop_flips: Optional[float] = None,
    callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
    report: Optional[Dict[str, object]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Refine detectors (W (K, D), b (K,)) by the paper's losses over mini-batches of ``x``.

    ``x`` (N, D) raw rows (a sample held in memory; ``sample_rows`` draws one from a stream).

    Parameterisation (our choice; the paper only says direction and margin are separate): the
    rows are standardised by one scalar, x~ = (x - c) / sigma (c = ``center``, default the
    sample mean; sigma the RMS of the coordinates of x - c, so a unit direction's scores have
    a spread of order 1 in any dimension), so the steps mean the same whatever the
    activations' units and dimension. Detector i scores t_i = (u_i . x~ - beta_i) / m_i: u_i a unit
    direction, beta_i the hyperplane's offset in standardised units, m_i the margin.

    - beta and log m: Adam with learning rate ``lr``.
    - u: a rotation of at most about ``rotation_lr`` radians per step (default ``lr / 10``)
      along the tangent gradient, with Adam's moments but one second moment per detector. A
      plain Adam step on the D coordinates of a unit vector rotates it by ~lr sqrt(D) per step
      whatever the gradient says (measured: a 64-d direction turned completely in 100 steps),
      and moves every noise coordinate as far as the informative ones.
    - Merge guard: every ``check_every`` steps the detections on a fixed probe of the sample
      are compared; when a pair's Jaccard overlap (``pairwise_jaccard``) exceeds
      ``max_overlap`` (or its start, if higher), two detectors are duplicates at that
      check. The result is the last checked state that passed (the start if none did; None:
      no guard, the final state). Passing transients are allowed (measured on the demo layer:
      a background detector takes over a neighbour's territory, the pair's overlap peaks at
      ~0.5 around step 10 and falls as the neighbour shrinks), and so is one detector taking
      over another's territory while that one shrinks.

    - Early stop (``stop_flips``, None: off): at a check whose detections on the probe differ
      from the previous check's in at most that share of the probe's (row, detector) entries,
      the steps end: the detections no longer move.

    ``weights`` override ``DEFAULT_WEIGHTS`` (a weight of 0 drops a term). ``extra_loss``
    (see the module docstring) is added each step. ``callback(step, losses)`` sees the float
    values; ``report`` (a dict), when given, receives ``steps_run``, ``kept_step`` (the step
    of the returned state), ``failed_checks``, ``max_overlap`` (the largest pairwise Jaccard
    seen) and ``start_max_overlap``. Returns the refined (W, b) as float32 on ``decoding``'s
    device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != decoding.shape[1]:
        raise ValueError(f"x must be a (N, {decoding.shape[1]}) tensor")
    if x.shape[0] == 0:
        raise ValueError("x has no rows")
    if steps < 0 or batch_size < 1:
        raise ValueError("steps must be >= 0 and batch_size >= 1")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if stop_flips is not None and not stop_flips >= 0:
        raise ValueError(f"stop_flips must be >= 0 or None, got {stop_flips}")
    w_all = dict(DEFAULT_WEIGHTS)
    unknown = set(weights or {}) - set(w_all)
    if unknown:
        raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: {sorted(w_all)}")
    w_all.update(weights or {})
    rotation_lr = lr / 10 if rotation_lr is None else float(rotation_lr)
    device = decoding.device
    x = x.to(device=device, dtype=torch.float32)
    center = (x.mean(0) if center is None else center.to(device=device, dtype=torch.float32)).detach()
    sigma = float((x - center).pow(2).mean().sqrt().clamp_min(_EPS))
    w0 = decoding.detach().to(device, torch.float32)
    b0 = bias.detach().to(device, torch.float32)
    # in standardised units the score is (w sigma) . x~ - (b - w . c)
    ws = w0 * sigma
    norms = ws.norm(dim=1).clamp_min(_EPS)
    unit = (ws / norms[:, None]).clone()
    log_margin = torch.nn.Parameter(-torch.log(norms))
    start_log_margin = log_margin.detach().clone()
    offset = torch.nn.Parameter((b0 - w0 @ center) / norms)
    direction = unit.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([log_margin, offset], lr=lr)
    beta1, beta2, eps = 0.9, 0.999, 1e-12
    momentum = torch.zeros_like(unit)
    second = torch.zeros(unit.shape[0], device=device)
    g = torch.Generator().manual_seed(seed)

    def to_raw(u, log_m, beta):
        w = u * torch.exp(-log_m)[:, None] / sigma
        return w, beta * torch.exp(-log_m) + w @ center

    probe = x[torch.randperm(x.shape[0], generator=g)[: min(x.shape[0], 16384)].to(device)]
    with torch.no_grad():
        start_overlap = pairwise_jaccard(probe @ w0.T > b0)
    kept = (w0.clone(), b0.clone())
    worst_overlap, failed_checks, kept_step, steps_run = 0.0, 0, 0, 0
    with torch.no_grad():
        last_detected = probe @ w0.T > b0
    stopped_early = False
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=g).to(device)
        batch = x.index_select(0, idx)
        w, b = to_raw(direction, log_margin, offset)
        losses = detector_losses(batch, w, b, tau=tau, gamma=gamma, rho=rho, v=v)
        # L_mm relative to the start: mean_i ||w_i|| / ||w_i(0)||. The absolute ||w|| depends on
        # the activations' units (the paper's weight 0.6 is for its ResNet layer's); measured on
        # the paper's synthetic model with calibrated detectors, the absolute term was ~15x the
        # other losses and only shrank the detectors into soft ones (IoU 0.97 -> 0.93-0.95)
        losses["max_margin"] = torch.exp(start_log_margin - log_margin).mean()
        total = sum(w_all[k] * losses[k] for k in losses if w_all[k] != 0)
        if extra_loss is not None:
            extra = extra_loss(w, b, batch, step)
            losses["extra"] = extra
            total = total + extra
        optimiser.zero_grad()
        direction.grad = None
        total.backward()
        optimiser.step()
        with torch.no_grad():
            grad = direction.grad if direction.grad is not None else torch.zeros_like(unit)
            tangent = grad - (grad * direction).sum(1, keepdim=True) * direction
            momentum.mul_(beta1).add_(tangent, alpha=1 - beta1)
            second.mul_(beta2).add_(tangent.pow(2).sum(1), alpha=1 - beta2)
            m_hat = momentum / (1 - beta1 ** (step + 1))
            v_hat = second / (1 - beta2 ** (step + 1))
            moved = direction - rotation_lr * m_hat / (v_hat.sqrt()[:, None] + eps)
            direction.copy_(moved / moved.norm(dim=1, keepdim=True).clamp_min(_EPS))
        steps_run = step + 1
        if callback is not None:
            callback(step, {k: float(t.detach()) for k, t in losses.items()})
        checking = steps_run % check_every == 0 or steps_run == steps
        if checking and (max_overlap is not None or stop_flips is not None):
            with torch.no_grad():
                w, b = to_raw(direction, log_margin, offset)
                detected = probe @ w.T > b
            flips = int((detected != last_detected).sum())
            last_detected = detected
            if max_overlap is not None:
                overlap = pairwise_jaccard(detected)
                excess = float((overlap - torch.clamp(start_overlap, min=max_overlap)).max())
                worst_overlap = max(worst_overlap, float(overlap.max()))
                if excess > 0:
                    failed_checks += 1
                else:
                    kept, kept_step = (w.detach().clone(), b.detach().clone()), steps_run
            if stop_flips is not None and flips <= stop_flips * detected.numel():
                stopped_early = True
                break
    if max_overlap is None:
        with torch.no_grad():
            kept, kept_step = to_raw(direction, log_margin, offset), steps_run
    if report is not None:
        report.update(steps_run=steps_run, stopped_early=stopped_early, kept_step=kept_step,
                      failed_checks=failed_checks,
                      max_overlap=worst_overlap, start_max_overlap=float(start_overlap.max()))
    return kept[0].detach().to(torch.float32), kept[1].detach().to(torch.float32)
