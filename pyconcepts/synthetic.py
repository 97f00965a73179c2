"""The paper's synthetic generative model (METHOD.md sections 1 and 6).

    x_p = S a_p + B c_p + offset + noise

- S (I concepts) and B (distractors): random unit vectors in R^D whose pairwise |cosines|
  are at most ``max_cosine`` (the paper: "not orthogonal, cosines up to ~0.5").
- Each patch carries one concept (uniformly chosen) or, with probability ``none_fraction``,
  none; with probability ``overlap`` a second, different concept is present too.
- a_i ~ U(present_range) when concept i is present, U(absent_range) otherwise
  (paper: U(2.5, 5) and U(0, 2.5)); c ~ U(distractor_range) (paper: U(0, 5)).
- ``offset`` is added to every coordinate (paper: +10); ``noise`` is the standard deviation
  of isotropic Gaussian noise (our addition; 0 reproduces the paper's model).

The ground truth returned with the data: encoding directions S, presence (N, I), latent
factors a, and the ideal detectors (rows of the pseudo-inverse of [S B] for the concepts,
bias at the present/absent boundary).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

__all__ = ["SyntheticModel", "SyntheticData", "make_synthetic", "paper_setup"]


@dataclass
class SyntheticData:
    x: torch.Tensor         # (N, D) float32 activations
    presence: torch.Tensor  # (N, I) bool, concept i present at patch p
    latent: torch.Tensor    # (N, I) float32 latent factors a
    model: "SyntheticModel"


def _random_unit_vectors(
    n: int, d: int, max_cosine: float, generator: torch.Generator, tries: int = 10000
) -> torch.Tensor:
    """n random unit vectors with pairwise |cos| <= max_cosine (rejection sampling per row)."""
    rows = []
    for _ in range(tries):
        if len(rows) == n:
            break
        v = torch.randn(d, generator=generator, dtype=torch.float64)
        v = v / v.norm()
        if rows and float((torch.stack(rows) @ v).abs().max()) > max_cosine:
            continue
        rows.append(v)
    if len(rows) < n:
        raise ValueError(
            f"could not draw {n} unit vectors in D = {d} with pairwise |cos| <= {max_cosine}; "
            "raise max_cosine or D"
        )
    return torch.stack(rows)


class SyntheticModel:
    """A fixed draw of S, B and the offset; ``sample`` draws patches from it."""

    def __init__(
        self,
        dim: int = 64,
        n_concepts: int = 10,
        n_distractors: int = 6,
        *,
        noise: float = 0.0,
        offset: float = 10.0,
        none_fraction: float = 0.0,
        overlap: float = 0.0,
        max_cosine: float = 0.5,
        present_range: Tuple[float, float] = (2.5, 5.0),
        absent_range: Tuple[float, float] = (0.0, 2.5),
        distractor_range: Tuple[float, float] = (0.0, 5.0),
        seed: int = 0,
    ):
        if dim < 1 or n_concepts < 1 or n_distractors < 0:
            raise ValueError("dim and n_concepts must be >= 1 and n_distractors >= 0")
        if n_concepts + n_distractors > dim:
            raise ValueError(
                f"n_concepts + n_distractors = {n_concepts + n_distractors} exceeds dim = {dim}"
            )
        if not 0.0 <= none_fraction <= 1.0 or not 0.0 <= overlap <= 1.0:
            raise ValueError("none_fraction and overlap must lie in [0, 1]")
        if overlap > 0 and n_concepts < 2:
            raise ValueError("overlap needs at least two concepts")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.dim, self.n_concepts, self.n_distractors = dim, n_concepts, n_distractors
        self.noise, self.none_fraction, self.overlap = float(noise), float(none_fraction), float(overlap)
        self.present_range, self.absent_range = present_range, absent_range
        self.distractor_range = distractor_range
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        both = _random_unit_vectors(n_concepts + n_distractors, dim, max_cosine, g)
        self.encoding = both[:n_concepts].float()          # S as rows (I, D)
        self.distractors = both[n_concepts:].float()       # B as rows (n_distractors, D)
        self.offset = torch.full((dim,), float(offset))
        # ideal detectors: W [S B] = [I 0], threshold at the present/absent boundary
        pinv = torch.linalg.pinv(both.T)                   # (I + nd, D)
        self.true_decoding = pinv[:n_concepts].float()
        self.true_bias = (
            self.true_decoding.double() @ self.offset.double() + present_range[0]
        ).float()
        self._stream_generator = g

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> SyntheticData:
        g = generator if generator is not None else self._stream_generator
        i, nd = self.n_concepts, self.n_distractors
        chosen = torch.randint(0, i, (n,), generator=g)
        presence = torch.zeros(n, i, dtype=torch.bool)
        has_concept = torch.rand(n, generator=g) >= self.none_fraction
        presence[torch.arange(n), chosen] = has_concept
        if self.overlap > 0:
            second = (chosen + torch.randint(1, i, (n,), generator=g)) % i
            two = has_concept & (torch.rand(n, generator=g) < self.overlap)
            presence[torch.arange(n)[two], second[two]] = True
        lo_p, hi_p = self.present_range
        lo_a, hi_a = self.absent_range
        u = torch.rand(n, i, generator=g)
        latent = torch.where(presence, lo_p + (hi_p - lo_p) * u, lo_a + (hi_a - lo_a) * u)
        lo_c, hi_c = self.distractor_range
        c = lo_c + (hi_c - lo_c) * torch.rand(n, nd, generator=g)
        x = latent @ self.encoding + c @ self.distractors + self.offset
        if self.noise > 0:
            x = x + self.noise * torch.randn(n, self.dim, generator=g)
        return SyntheticData(x=x.float().contiguous(), presence=presence, latent=latent.float(), model=self)

    def stream(
        self, n: int, chunk_size: int = 65536, seed: int = 0
    ) -> Iterator[SyntheticData]:
        """``n`` patches in chunks; the same seed gives the same stream."""
        g = torch.Generator().manual_seed(seed)
        done = 0
        while done < n:
            m = min(chunk_size, n - done)
            yield self.sample(m, g)
            done += m


def make_synthetic(n_patches: int = 200_000, *, seed: int = 0, **model_kwargs) -> SyntheticData:
    """Draw a model (S, B, offset) with ``seed`` and ``n_patches`` patches from it."""
    model = SyntheticModel(seed=seed, **model_kwargs)
    return model.sample(n_patches)


def paper_setup(n_patches: int = 6000, *, seed: int = 0, **overrides) -> SyntheticData:
    """The paper's tiny setup: D = 16, I = 3, 2 distractors, one concept per patch
    (2-pixel images x 1000 per class x 3 classes = 6000 patches)."""
    kwargs = dict(dim=16, n_concepts=3, n_distractors=2, none_fraction=0.0)
    kwargs.update(overrides)
    return make_synthetic(n_patches, seed=seed, **kwargs)
