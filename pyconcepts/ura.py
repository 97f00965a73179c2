"""Uncertainty Region Alignment (METHOD.md section 4).

The detectors' uncertainty region is where every hyperplane w_i . x = b_i holds. URA moves
all patches of an image toward it,

    dx_p = (W^T)^+ (W^T x_p - b)               unconstrained
    dx_p = S (W^T S)^+ (W^T x_p - b)           constrained to span(S)
    x'_p = x_p - kappa dx_p,   kappa ~ U[kappa_range] per image,

runs the frozen rest of the network f+ on the moved activations and asks it to be maximally
uncertain there: ``L_ura = - E_images[ H(f+(X')) ]`` (entropy in bits). The gradient flows
through the frozen network into W, b (and S in the constrained form), so the network's own
weights steer the detectors toward directions that matter for its predictions.

In row form (rows of ``decoding`` are w_i, rows of ``encoding`` are s_i): the residual is
``r = x @ W.T - b`` (N, K) and ``dx = r @ pinv(W).T`` or ``dx = r @ pinv(W S^T).T @ S``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Sequence, Tuple

import torch

from .outputs import OutputSpec, check_output_spec, read_scores

__all__ = ["ura_shift", "entropy_bits", "URALoss", "FORMS"]

FORMS = ("unconstrained", "constrained", "both")


def ura_shift(
    rows: torch.Tensor,
    decoding: torch.Tensor,
    bias: torch.Tensor,
    encoding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dx (N, D) that moves rows (N, D) onto the detectors' hyperplanes: the minimum-norm
    move when ``encoding`` is None, the move within span(S) otherwise."""
    residual = rows @ decoding.T - bias                       # (N, K)
    if encoding is None:
        return residual @ torch.linalg.pinv(decoding).T       # pinv(W) is (D, K)
    gram = decoding @ encoding.T                              # W^T S, (K, K)
    return (residual @ torch.linalg.pinv(gram).T) @ encoding


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """(B,) entropy of softmax(logits) in bits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1) / math.log(2.0)


class RowEditingForward(Protocol):
    """What URA needs of the network: the forward pass with the layer's patch rows edited
    (``pyconcepts.taps.LayerTap`` is one; the model side sits a layer above this module)."""

    def forward_rows(self, batch: torch.Tensor,
                     edit_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


class URALoss:
    """L_ura on a pool of images through a ``LayerTap``'s f+ (any ``RowEditingForward``).

    ``images``: a small tensor (M, C, H, W) of images (the pool; each call uses a random
    batch of ``batch_size`` of them). ``form``: 'unconstrained', 'constrained' (needs the
    encoding) or 'both' (the mean of the two). ``outputs``: 'logits' or 'probs' (a model whose
    forward already ends in probabilities). Calls return a differentiable scalar.
    """

    def __init__(
        self,
        tap: RowEditingForward,
        images: torch.Tensor,
        *,
        form: str = "both",
        kappa_range: Tuple[float, float] = (0.5, 0.9),
        batch_size: int = 32,
        outputs: str = "logits",
        seed: int = 0,
        output: OutputSpec = None,
    ):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        lo, hi = kappa_range
        if not 0 <= lo <= hi:
            raise ValueError(f"kappa_range must be (lo, hi) with 0 <= lo <= hi, got {kappa_range!r}")
        if outputs not in ("logits", "probs", "auto"):
            raise ValueError(f"outputs must be 'logits', 'probs' or 'auto', got {outputs!r}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError("images must be a non-empty (M, C, H, W) tensor (the URA pool)")
        self.tap = tap
        self.images = images
        self.form = form
        self.kappa_range = (float(lo), float(hi))
        self.batch_size = int(batch_size)
        self.outputs = outputs
        self.output = check_output_spec(output)
        self.generator = torch.Generator().manual_seed(seed)

    def _batch(self) -> torch.Tensor:
        m = self.images.shape[0]
        if m <= self.batch_size:
            return self.images
        pick = torch.randperm(m, generator=self.generator)[: self.batch_size]
        return self.images[pick]

    def _entropy_after_move(self, batch, decoding, bias, encoding) -> torch.Tensor:
        lo, hi = self.kappa_range
        kappa = lo + (hi - lo) * torch.rand(batch.shape[0], generator=self.generator)

        def move(rows):
            w, b = decoding.to(rows), bias.to(rows)
            s = encoding.to(rows) if encoding is not None else None
            per_image = rows.shape[0] // batch.shape[0]
            k = kappa.to(rows).repeat_interleave(per_image)[:, None]
            return rows - k * ura_shift(rows, w, b, s)

        out = read_scores(self.tap.forward_rows(batch, move), self.output, self.outputs)
        return entropy_bits(out)

    def __call__(self, decoding: torch.Tensor, bias: torch.Tensor,
                 encoding: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = self._batch()
        forms = {"unconstrained": ["u"], "constrained": ["c"], "both": ["u", "c"]}[self.form]
        if "c" in forms and encoding is None:
            raise ValueError("the constrained URA form needs the encoding directions S")
        terms = []
        for f in forms:
            h = self._entropy_after_move(batch, decoding, bias, encoding if f == "c" else None)
            terms.append(-h.mean())
        return torch.stack(terms).mean()
