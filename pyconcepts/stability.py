"""Which concepts other images would give back: comparing bases, and a split-half check.

- ``compare_bases(a, b, x)``: pairs the concepts of two bases of the same layer by the
  overlap of what they detect on the rows ``x`` (Hungarian matching of the Jaccard index of
  the detection sets) and gives, per concept of ``a``, its partner in ``b``, their Jaccard and
  the |cosine| of their decoding and encoding directions.
- ``concept_stability(model, basis, images)``: splits the images into two random halves,
  extracts on each with the settings the basis records, and compares the basis with both
  halves and the halves with each other on the layer rows of all the images. A concept whose
  partners in the halves detect other patches (mean Jaccard below ``LOW_HALVES_JACCARD``), or
  that some half does not give back at all (below ``VANISHED_JACCARD`` there: merged into
  another concept or drawn elsewhere), is one that a different set of images would change:
  trust it less.

The restart agreement that every extraction records (``basis.metadata["concept_agreement"]``)
is free but sees only what another k-means seed would change; this check measures what
other data would change, at the cost of two extractions on half of the images per split and
one more pass over all of them.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from .basis import ConceptBasis
from .directions import MIN_ROWS_PER_CONCEPT
from .metrics import linear_sum_assignment
from .stats import DEFAULT_CHUNK_SIZE, iter_chunks

__all__ = ["compare_bases", "concept_stability", "BasisComparison", "ConceptStability", "LOW_HALVES_JACCARD",
           "VANISHED_JACCARD", "STABLE_HALF_WITH_HALF"]

# a concept whose partners in the halves overlap it less than this on average (Jaccard of the
# detection sets), or less than VANISHED_JACCARD in any one half, is marked as one that other
# images would not give back (an average over halves hides a concept that one half merges
# into another)
LOW_HALVES_JACCARD = 0.5
VANISHED_JACCARD = 0.2
# two halves' bases whose concepts overlap at this mean matched Jaccard or more give most
# concepts back (the level benchmarks.real_network aims at); extract -k with several values
# points to the largest K that reaches it
STABLE_HALF_WITH_HALF = 0.7


@dataclass
class BasisComparison:
    """Concepts of basis ``a`` paired with those of ``b`` on the same rows.

    Per concept of ``a`` (K_a,): ``partner`` (int64, the index in ``b``, -1 where ``b`` has
    fewer concepts and none was left), ``jaccard`` (float64, of the two detection sets; NaN
    where ``a``'s concept fires on none of the rows: nothing to compare there),
    ``decoding_cosine`` / ``encoding_cosine`` (|cos| with the partner's directions, NaN
    without a partner), ``rate_a`` / ``rate_b`` (share of the rows each detector fires on).
    """

    partner: torch.Tensor
    jaccard: torch.Tensor
    decoding_cosine: torch.Tensor
    encoding_cosine: torch.Tensor
    rate_a: torch.Tensor
    rate_b: torch.Tensor
    n_rows: int

    @property
    def mean_jaccard(self) -> float:
        """Mean Jaccard over the concepts of ``a`` that fire on the rows (0 for one without a
        partner; NaN when none fires)."""
        return float(self.jaccard.nanmean())

    def __repr__(self) -> str:
        return (f"BasisComparison({self.partner.numel()} concepts on {self.n_rows} rows: mean Jaccard "
                f"{self.mean_jaccard:.3f}, mean decoding |cos| {float(self.decoding_cosine.nan_to_num(0).mean()):.3f})")


def _check_basis(basis, name: str) -> None:
    if not isinstance(basis, ConceptBasis):
        raise TypeError(f"{name} must be a ConceptBasis, got {type(basis).__name__}")


def _overlaps(x, bases: List[ConceptBasis], pairs: List[Tuple[int, int]], chunk_size: int):
    """Detection counts per basis and intersection counts per pair, from one pass over x."""
    d = bases[0].decoding.shape[1]
    counts = [torch.zeros(b.n_concepts, dtype=torch.float64) for b in bases]
    inter = {p: torch.zeros(bases[p[0]].n_concepts, bases[p[1]].n_concepts, dtype=torch.float64) for p in pairs}
    rows = 0
    for chunk in iter_chunks(x, chunk_size, dim=d):
        chunk = chunk.to(torch.float32)
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError("x contains NaN or Inf rows")
        fired = [b.detect(chunk.to(b.decoding.device)).cpu().to(torch.float32) for b in bases]
        for j, f in enumerate(fired):
            counts[j] += f.sum(0).double()
        for (i, j) in pairs:
            inter[i, j] += (fired[i].T @ fired[j]).double()
        rows += chunk.shape[0]
    if rows == 0:
        raise ValueError("x is empty: no rows to compare the detections on")
    return counts, inter, rows


def _pair(a: ConceptBasis, b: ConceptBasis, count_a, count_b, inter, rows: int) -> BasisComparison:
    union = count_a[:, None] + count_b[None, :] - inter
    jac = (inter / union.clamp_min(1)).numpy()
    r, c = linear_sum_assignment(-jac)
    k = a.n_concepts
    partner = torch.full((k,), -1, dtype=torch.int64)
    partner[torch.as_tensor(r)] = torch.as_tensor(c)
    has = partner >= 0
    jaccard = torch.zeros(k, dtype=torch.float64)
    jaccard[has] = torch.as_tensor(jac)[has.nonzero().flatten(), partner[has]]
    jaccard[count_a == 0] = math.nan  # a concept absent from these rows: no evidence either way

    def cosines(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u = u.detach().double().cpu()
        v = v.detach().double().cpu()
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        out = torch.full((k,), math.nan, dtype=torch.float64)
        out[has] = (u[has] * v[partner[has]]).sum(1).abs()
        return out

    rate_b = torch.full((k,), math.nan, dtype=torch.float64)
    rate_b[has] = count_b[partner[has]] / rows
    return BasisComparison(partner, jaccard, cosines(a.decoding, b.decoding), cosines(a.encoding, b.encoding),
                           count_a / rows, rate_b, rows)


def compare_bases(a: ConceptBasis, b: ConceptBasis, x, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BasisComparison:
    """Pair the concepts of ``a`` with those of ``b`` by what they detect on the rows ``x``.

    ``x``: layer rows (N, D) of the layer both bases were extracted from (a tensor or a
    re-iterable of (n, D) chunks, e.g. ``LayerTap.to_rows`` of some images). The pairing
    maximises the summed Jaccard index of the detection sets (Hungarian method); see
    ``BasisComparison`` for what is returned.
    """
    _check_basis(a, "a")
    _check_basis(b, "b")
    if a.decoding.shape[1] != b.decoding.shape[1]:
        raise ValueError(f"a and b read different layers: {a.decoding.shape[1]} vs {b.decoding.shape[1]} channels")
    if a.layer is not None and b.layer is not None and a.layer != b.layer:
        warnings.warn(f"a was extracted at layer {a.layer!r} and b at {b.layer!r}: the rows x are read by both "
                      "as if they were one layer's", stacklevel=2)
    if isinstance(x, torch.Tensor) and (x.dim() != 2 or x.shape[1] != a.decoding.shape[1]):
        raise ValueError(f"x must be (N, {a.decoding.shape[1]}) layer rows, got shape {tuple(x.shape)}")
    counts, inter, rows = _overlaps(x, [a, b], [(0, 1)], chunk_size)
    return _pair(a, b, counts[0], counts[1], inter[0, 1], rows)


@dataclass
class ConceptStability:
    """The split-half check of a basis (``concept_stability``).

    ``jaccard`` (K,): per concept of the basis, the mean Jaccard of its detection set with
    those of its partners in the halves' extractions (both halves of every split), on the
    rows of all the images (NaN for a concept that fires on none of them); ``lowest`` (K,): the
    smallest of those Jaccards, the half that gave the concept back worst; ``to_halves``: the
    ``BasisComparison`` of the basis with each half (two per split); ``between_halves``: per
    split, its half A's concepts against its half B's; ``halves``: the half bases, in the order
    of ``to_halves``; ``n_images``: images in the halves of the first split.
    """

    jaccard: torch.Tensor
    lowest: torch.Tensor
    to_halves: Tuple[BasisComparison, ...]
    between_halves: Tuple[BasisComparison, ...]
    halves: Tuple[ConceptBasis, ...] = field(repr=False)
    n_images: Tuple[int, int]

    @property
    def half_with_half(self) -> float:
        """How far two halves' concepts agree: the mean matched Jaccard between the halves of a
        split, averaged over the splits (what ``benchmarks.real_network`` reports as the
        halves' Jaccard)."""
        return float(sum(c.mean_jaccard for c in self.between_halves) / len(self.between_halves))

    def unstable(self, threshold: float = LOW_HALVES_JACCARD, vanished: float = VANISHED_JACCARD) -> List[int]:
        """Concepts whose partners in the halves overlap them less than ``threshold`` on
        average, or less than ``vanished`` in some half."""
        return unstable_concepts(self.jaccard, self.lowest, threshold, vanished)

    def record(self, basis: ConceptBasis) -> ConceptBasis:
        """Store the per-concept figures in ``basis.metadata["halves_jaccard"]`` and
        ``["halves_lowest"]`` (None where NaN; the report and ``pyconcepts report BASIS`` show
        them), ``half_with_half`` in ``["halves_mean_jaccard"]``, the number of splits in
        ``["halves_splits"]`` and the halves' sizes in ``["halves_images"]``; returns the basis."""
        if basis.n_concepts != self.jaccard.numel():
            raise ValueError(f"basis has {basis.n_concepts} concepts, this check {self.jaccard.numel()}")

        def listed(t: torch.Tensor):
            return [None if math.isnan(v) else round(float(v), 4) for v in t.tolist()]

        basis.metadata["halves_jaccard"] = listed(self.jaccard)
        basis.metadata["halves_lowest"] = listed(self.lowest)
        basis.metadata["halves_mean_jaccard"] = round(self.half_with_half, 4)
        basis.metadata["halves_images"] = list(self.n_images)
        basis.metadata["halves_splits"] = len(self.between_halves)
        return basis

    def __repr__(self) -> str:
        low = self.unstable()
        return (f"ConceptStability({self.jaccard.numel()} concepts, {_count(len(self.between_halves), 'split')} "
                f"into {self.n_images[0]} / {self.n_images[1]} images: mean Jaccard with the halves' partners "
                f"{float(self.jaccard.nanmean()):.3f}, half with half {self.half_with_half:.3f}; unstable: {low})")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def unstable_concepts(mean, lowest, threshold: float = LOW_HALVES_JACCARD,
                      vanished: float = VANISHED_JACCARD) -> List[int]:
    """Indices whose ``mean`` Jaccard with the halves' partners is below ``threshold`` or whose
    ``lowest`` is below ``vanished`` (sequences or tensors; None / NaN entries are never
    marked: those concepts fire on none of the rows)."""
    out = []
    for i, (m, low) in enumerate(zip(mean, lowest if lowest is not None else [None] * len(mean))):
        m = None if m is None or math.isnan(float(m)) else float(m)
        low = None if low is None or math.isnan(float(low)) else float(low)
        if (m is not None and m < threshold) or (low is not None and low < vanished):
            out.append(i)
    return out


class _HalfImages:
    """The images of one half, as a re-iterable stream of batches: image number g (counted
    over the whole stream) belongs to it where ``member[g]``."""

    def __init__(self, images, member: torch.Tensor):
        self.images, self.member = images, member

    def __iter__(self):
        from .taps import iter_batches

        seen = 0
        for batch in iter_batches(self.images):
            keep = self.member[seen:seen + batch.shape[0]]
            seen += batch.shape[0]
            if bool(keep.any()):
                yield batch[keep.to(batch.device)]


def _group_ids(groups, n: int) -> Optional[torch.Tensor]:
    """``groups`` (one hashable label per image) as (n,) int64 group numbers; None for None."""
    if groups is None:
        return None
    labels = groups.tolist() if hasattr(groups, "tolist") else list(groups)
    if len(labels) != n:
        raise ValueError(f"groups has {len(labels)} labels but images has {n} images: give one label per image")
    numbers: dict = {}
    try:
        ids = [numbers.setdefault(label, len(numbers)) for label in labels]
    except TypeError:
        raise TypeError("groups: each label must be hashable (an int or a str, say)") from None
    if len(numbers) < 2:
        raise ValueError("groups puts every image in one group: two halves need at least two groups")
    return torch.tensor(ids, dtype=torch.long)


def _random_half(n: int, group_of: Optional[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: a random half of the images (of whole groups, when ``group_of`` is given:
    groups in random order, the first ones up to the count nearest n / 2)."""
    member = torch.zeros(n, dtype=torch.bool)
    if group_of is None:
        member[torch.randperm(n, generator=generator)[: n // 2]] = True
        return member
    n_groups = int(group_of.max()) + 1
    order = torch.randperm(n_groups, generator=generator)
    filled = torch.bincount(group_of, minlength=n_groups)[order].cumsum(0)
    # at least one group in each half
    take = int((filled[:-1] - n / 2).abs().argmin()) + 1
    chosen = torch.zeros(n_groups, dtype=torch.bool)
    chosen[order[:take]] = True
    return chosen[group_of]


def concept_stability(
    model: torch.nn.Module,
    basis: ConceptBasis,
    images,
    *,
    splits: int = 3,
    seed: int = 0,
    options: Optional[dict] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
    groups=None,
) -> ConceptStability:
    """Split-half check: would other images give the basis's concepts back?

    The images (the ones the basis was extracted from, or others of the same kind: a tensor
    (B, C, H, W) or a re-iterable of batches) are split at random (``seed``) into two halves
    of whole images, ``splits`` times; each half is extracted with ``pc.extract`` and the
    settings the basis records (its layer, K, seed, options, refinement, URA, skip_tokens,
    output; ``options`` overrides some); the basis and all halves are then compared on the
    layer rows of all the images (``compare_bases``), in one more pass over them. Costs
    ``2 * splits`` extractions on half of the images each. The per-concept figures of a single
    split are noisy (one halving can miss a low one or add one); the splits average that out.
    ``groups``: one hashable label per image (a sequence, array or tensor); images with the same
    label always fall in the same half (crops or augmentations of one photo, frames of one
    video, one subject's images), so a half never sees a near-copy of the other's images,
    which would make the check optimistic. The halves are then as near to equal as whole
    groups allow. ``progress(stage, done, total)`` as in ``pc.extract``.
    """
    from .extraction import _count_batches, _count_images, extract
    from .taps import LayerTap, is_one_shot, iter_batches

    _check_basis(basis, "basis")
    if basis.layer is None:
        raise ValueError("basis records no layer: extract it with pc.extract (or set basis.layer)")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive int, got {splits!r}")
    if is_one_shot(images):
        raise TypeError("images must be a tensor or a re-iterable of batches (not a one-shot iterator): "
                        "the check reads them several times")
    if isinstance(getattr(images, "sampler", None), torch.utils.data.RandomSampler):
        raise ValueError("images is a DataLoader that shuffles: every pass would split other images into the "
                         "halves; pass one with shuffle=False")
    meta = basis.metadata or {}
    n = _count_images(images)
    if n < 2:
        raise ValueError(f"images has {n} image(s): a split-half check needs at least 2")
    group_of = _group_ids(groups, n)
    if group_of is not None and int(group_of.max()) + 1 < 4:
        warnings.warn(f"groups makes {int(group_of.max()) + 1} groups: with so few, the splits can only repeat "
                      "the same halves", stacklevel=2)
    settings = dict(meta.get("extract_settings") or {})
    settings.update(options or {})
    skip = int(meta.get("skip_tokens") or 0)
    tap = LayerTap(model, basis.layer, skip_tokens=skip)
    # the layer must be the basis's before any extraction runs
    with torch.no_grad():
        first_rows = tap.to_rows(tap.activations(next(iter_batches(images, 1))[:1]))
    positions, width = first_rows.shape
    problems = basis.compatibility_problems(width=width)
    if problems:
        raise ValueError(f"basis does not fit layer {basis.layer!r} of this model: {'; '.join(problems)}")
    if (n // 2) * positions < MIN_ROWS_PER_CONCEPT * basis.n_concepts:
        warnings.warn(f"a half holds {n // 2} image(s), {(n // 2) * positions} patches for {basis.n_concepts} "
                      "concepts: so few that the halves will redraw most concepts; use more images",
                      stacklevel=2)
    kwargs = dict(seed=int(meta.get("seed", 0) or 0), refine=bool(meta.get("refine", False)),
                  ura=bool(meta.get("ura", True)), skip_tokens=skip, options=settings or None,
                  model_id=basis.model_id, output=meta.get("output"))
    generator = torch.Generator().manual_seed(seed)
    members = [_random_half(n, group_of, generator) for _ in range(splits)]
    # every half must hold more patches than concepts, checked before any extraction
    fewest = min(min(int(m.sum()), n - int(m.sum())) for m in members)
    if fewest * positions < basis.n_concepts:
        raise ValueError(f"a half of the split-half check holds {fewest} image(s), {fewest * positions} patches: "
                         f"fewer than the basis's {basis.n_concepts} concepts; use more images or fewer concepts")
    halves, sizes = [], None
    for split, member in enumerate(members):
        smaller = min(int(member.sum()), n - int(member.sum()))
        if group_of is not None and smaller < n / 4:
            warnings.warn(f"split {split + 1} of whole groups holds {int(member.sum())} / {n - int(member.sum())} "
                          "images: a group this large leaves one half too small to compare", stacklevel=2)
        sizes = sizes or (int(member.sum()), int((~member).sum()))
        for h, part in enumerate((member, ~member)):
            name = f"split {split + 1}, half {'AB'[h]}" if splits > 1 else f"half {'AB'[h]}"
            step = None if progress is None else (lambda stage, done, total, name=name:
                                                  progress(f"{name}: {stage}", done, total))
            with warnings.catch_warnings():
                # too few rows per concept in a half was said above, of the halves
                warnings.filterwarnings("ignore", message=r".* patch rows \(.* per concept\): fewer than")
                halves.append(extract(model, basis.layer, _HalfImages(images, part), basis.n_concepts,
                                      progress=step, **kwargs))
    batch_size = int(settings.get("batch_size", 64))
    total = _count_batches(images, batch_size)

    class _Rows:
        def __iter__(self):
            for j, batch in enumerate(iter_batches(images, batch_size)):
                with torch.no_grad():
                    out = tap.to_rows(tap.activations(batch)).float()
                if progress is not None:
                    progress("comparing", j + 1, total)
                yield out

    bases = [basis, *halves]
    pairs = [(0, h) for h in range(1, len(bases))] + [(2 * s + 1, 2 * s + 2) for s in range(splits)]
    counts, inter, n_rows = _overlaps(_Rows(), bases, pairs, chunk_size)
    to_halves = tuple(_pair(basis, bases[h], counts[0], counts[h], inter[0, h], n_rows)
                      for h in range(1, len(bases)))
    between = tuple(_pair(bases[2 * s + 1], bases[2 * s + 2], counts[2 * s + 1], counts[2 * s + 2],
                          inter[2 * s + 1, 2 * s + 2], n_rows) for s in range(splits))
    per_half = torch.stack([c.jaccard for c in to_halves])
    return ConceptStability(per_half.nanmean(0), _nanmin(per_half), to_halves, between, tuple(halves), sizes)


def _nanmin(t: torch.Tensor) -> torch.Tensor:
    """Column minima ignoring NaN (NaN where a column is all NaN)."""
    low = torch.where(torch.isnan(t), torch.full_like(t, math.inf), t).min(0).values
    return torch.where(torch.isinf(low), torch.full_like(low, math.nan), low)
