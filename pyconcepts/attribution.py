"""What concepts do to a network's predictions (METHOD.md section 5).

- ``detection_maps``: per image and concept, the detector output over the layer's grid,
  upsampled to the image.
- ``contribution_maps``: the contribution of every concept at every position to one class
  score: exactly ``a_hat_{p,i} (v_k . s_i) / |P|`` for a global-average-pooling + linear head
  (pass the head), ``a_hat_{p,i} s_i . grad_{x_p} f_k`` in general (the two agree for such a
  head).
- ``rcav``: global influence of each concept on each class: add ``alpha s_i`` at every
  position and count how often each class probability rises; significance against random
  concepts of the same size (signal vectors of random filters' top patches) with Bonferroni
  correction.
- ``maximize_concept``: activation-maximisation validation: optimise an input so that its
  representation moves along s_i and report whether detector i fires.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .basis import concept_indices, layer_to_apply, recorded_clamp, skip_tokens_to_apply
from .outputs import OutputSpec, output_or_recorded, read_scores, scores_kind
from .signal import masked_signal_vectors
from .taps import LayerTap, autograd_on, iter_batches

__all__ = [
    "detection_maps", "contribution_maps", "contribution_totals", "rcav", "RCAVResult", "maximize_concept",
    "ConceptValidation",
]


def _tap(model, basis, layer, skip_tokens, grid=None) -> LayerTap:
    for name in ("decoding", "bias", "encoding", "mean"):
        if not hasattr(basis, name):
            raise TypeError(f"basis must be a ConceptBasis (it has no {name!r})")
    return LayerTap(model, layer_to_apply(basis, layer), skip_tokens=skip_tokens_to_apply(basis, skip_tokens),
                    grid=grid)


def _check_dim(basis, rows, layer):
    if rows.shape[1] != basis.decoding.shape[1]:
        raise ValueError(
            f"the basis has D = {basis.decoding.shape[1]} but layer {layer!r} has {rows.shape[1]} channels"
        )


def _concept_list(concepts, k: int) -> List[int]:
    return list(range(k)) if concepts is None else concept_indices(concepts, k, "concepts")


def _basis_tensors(basis, like: torch.Tensor):
    kw = dict(device=like.device, dtype=like.dtype)
    return (basis.decoding.to(**kw), basis.bias.to(**kw), basis.encoding.to(**kw), basis.mean.to(**kw))


def _latent(rows, w, s, mu):
    return (rows @ w.T - (w @ mu)) / (w * s).sum(1)


def _factor(basis, rows, w, s, mu, idx, reference):
    """(N, K') latent factors of the rows: with ``reference='removal'`` what
    ``intervene(remove=...)`` takes out of them, their excess over the concepts' absent levels
    (``basis.absent_level``; 0 without one); with 'mean' the signed factors."""
    if reference == "mean":
        return _latent(rows, w, s, mu)
    level = getattr(basis, "absent_level", None)
    level = (torch.zeros(len(idx), dtype=rows.dtype, device=rows.device) if level is None
             else level.to(device=rows.device, dtype=rows.dtype)[idx])
    return torch.clamp(_latent(rows, w, s, mu) - level, min=0)


def _contributions(basis, rows, grads, w, s, mu, idx, reference, clamp):
    """(N, K') each concept's contribution at each row: the change of the rows that its
    removal (``reference='removal'``) or its signed factor ('mean') makes along s, dotted with
    the score's gradient ``grads`` (N, D). A removal on a non-negative layer (or ``clamp``)
    passes through the ReLU that ``intervene`` applies: the change is x - max(x - k s, 0),
    so no channel is lowered below zero."""
    factor = _factor(basis, rows, w, s, mu, idx, reference)            # (N, K')
    clamp = recorded_clamp(basis, clamp)
    nonneg = bool((rows >= 0).all()) if clamp is None else clamp
    if reference == "mean" or not nonneg:
        return factor * (grads @ s.T)
    out = torch.empty_like(factor)
    for j in range(s.shape[0]):
        change = rows - torch.clamp(rows - factor[:, j:j + 1] * s[j], min=0)
        out[:, j] = (change * grads).sum(1)
    return out


# ------------------------------------------------------------------------ detection maps
def detection_maps(
    model: nn.Module,
    basis,
    images,
    *,
    layer: Optional[str] = None,
    kind: str = "membership",
    upsample: bool = True,
    batch_size: Optional[int] = None,
    skip_tokens: Optional[int] = None,
    grid=None,
) -> torch.Tensor:
    """(B, K, H, W) detector maps. ``kind``: 'membership' (sigmoid(w.x - b)), 'score'
    (w.x - b; > 0 where detected) or 'latent' (a_hat). With ``upsample`` the scores are
    bilinearly upsampled to the image size before the sigmoid (Network-Dissection style)."""
    if kind not in ("membership", "score", "latent"):
        raise ValueError(f"kind must be 'membership', 'score' or 'latent', got {kind!r}")
    tap = _tap(model, basis, layer, skip_tokens, grid)
    out, seen = [], 0
    for batch in iter_batches(images, batch_size):
        rows = tap.to_rows(tap.activations(batch, seen)).float()
        seen += batch.shape[0]
        _check_dim(basis, rows, tap.layer)
        w, b, s, mu = _basis_tensors(basis, rows)
        values = _latent(rows, w, s, mu) if kind == "latent" else rows @ w.T - b
        maps = tap.rows_to_maps(values, batch.shape[0])
        if upsample:
            maps = F.interpolate(maps, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)
        out.append((torch.sigmoid(maps) if kind == "membership" else maps).cpu())
    if not out:
        raise ValueError("images is empty")
    return torch.cat(out)


# --------------------------------------------------------------------- contribution maps
def _targets(target, n: int, device, n_classes: int) -> torch.Tensor:
    """(n,) class indices from an int or one per image, checked against ``n_classes``
    (negative indices count from the end, as in ``rank_concepts``)."""
    if isinstance(target, (bool, str)):
        raise TypeError(f"target must be a class index or one per image, got {target!r}")
    if callable(target):
        raise TypeError("a callable target needs method='gradient' (the linear method reads one class's "
                        "weights from head)")
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long, device=device)
    else:
        t = torch.as_tensor(target, device=device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"target must hold class indices (integers), got {t.dtype}")
        t = t.long().reshape(-1)
        if t.numel() != n:
            raise ValueError(f"target must be an int or hold one class per image ({n}), got {t.numel()}")
    bad = (t < -n_classes) | (t >= n_classes)
    if bool(bad.any()):
        raise IndexError(f"target {int(t[bad][0])} is out of range for {n_classes} classes")
    return t % n_classes


def contribution_maps(
    model: nn.Module,
    basis,
    images,
    target,
    *,
    layer: Optional[str] = None,
    head: Optional[nn.Linear] = None,
    method: str = "auto",
    concepts=None,
    batch_size: Optional[int] = None,
    skip_tokens: Optional[int] = None,
    grid=None,
    output: OutputSpec = None,
    reference: str = "removal",
    clamp: Optional[bool] = None,
) -> torch.Tensor:
    """(B, K', h, w) contribution of each concept at each position to class ``target``'s
    score (a logit; ``target`` is a class index, one per image, or with the gradient method a
    callable ``f(logits (B, C)) -> (B,)`` such as a margin). ``reference='removal'``
    (default): how much removing the concept there, as ``intervene(remove=...)`` does, lowers
    the score: the change that the removal makes to the
    activation (the concept's excess over its absent level along its signal vector,
    ``max(a_hat - l, 0) s``, through the ReLU that ``intervene`` applies on a non-negative
    layer; ``clamp`` as in ``intervene``) dotted with the score's gradient. Summed over
    positions it is the removal's effect to first order (exactly, through a linear head); the
    concepts' sums are not a decomposition of the score. ``reference='mean'``: the signed latent
    factor from the mean, ``a_hat * (s . d score / dx)`` (METHOD.md section 5), which for a
    complete basis (W S^T = I, K = D) through a linear head adds up to the score minus the
    score at the mean. ``method``: 'linear' (needs ``head``, the nn.Linear after global average
    pooling of this layer), 'gradient' (any network), 'auto' (linear when ``head`` is given).
    ``output``: which part of the model's output holds the class scores (an index, a key or a
    callable; default: the one the basis was extracted with; for a model ending in
    probabilities the score is the log-probability)."""
    output, method = _check_contribution_args(basis, output, reference, method, head)
    out = [tap.rows_to_maps(contrib, b).detach().cpu()
           for tap, contrib, b in _contributions_per_batch(model, basis, images, target, layer, head, method, concepts,
                                                            batch_size, skip_tokens, grid, output, reference, clamp)]
    if not out:
        raise ValueError("images is empty")
    return torch.cat(out)


def contribution_totals(
    model: nn.Module,
    basis,
    images,
    target,
    *,
    layer: Optional[str] = None,
    head: Optional[nn.Linear] = None,
    method: str = "auto",
    concepts=None,
    batch_size: Optional[int] = None,
    skip_tokens: Optional[int] = None,
    output: OutputSpec = None,
    reference: str = "removal",
    clamp: Optional[bool] = None,
) -> torch.Tensor:
    """(B, K') ``contribution_maps`` summed over each image's positions (with the default
    reference: each removal's effect on the target's score to first order). Needs no grid, so
    it also serves token layers whose tokens form no square."""
    output, method = _check_contribution_args(basis, output, reference, method, head)
    out = [contrib.reshape(b, -1, contrib.shape[1]).sum(1).detach().cpu()
           for _, contrib, b in _contributions_per_batch(model, basis, images, target, layer, head, method, concepts,
                                                         batch_size, skip_tokens, None, output, reference, clamp)]
    if not out:
        raise ValueError("images is empty")
    return torch.cat(out)


def _check_contribution_args(basis, output, reference, method, head):
    output = output_or_recorded(output, basis)
    if reference not in ("removal", "mean"):
        raise ValueError(f"reference must be 'removal' or 'mean', got {reference!r}")
    if method not in ("auto", "linear", "gradient"):
        raise ValueError(f"method must be 'auto', 'linear' or 'gradient', got {method!r}")
    if method == "auto":
        method = "linear" if head is not None else "gradient"
    if method == "linear" and not isinstance(head, nn.Linear):
        raise TypeError("method='linear' needs head=<the nn.Linear after global average pooling>")
    return output, method


def _contributions_per_batch(model, basis, images, target, layer, head, method, concepts, batch_size, skip_tokens,
                             grid, output, reference, clamp):
    """Per batch of ``images``: (the tap, the (B * positions, K') contributions, B)."""
    tap = _tap(model, basis, layer, skip_tokens, grid)
    idx = _concept_list(concepts, basis.decoding.shape[0])
    seen = 0
    for batch in iter_batches(images, batch_size):
        b = batch.shape[0]
        offset, seen = seen, seen + b
        if method == "linear":
            rows = tap.to_rows(tap.activations(batch, offset)).float()
            _check_dim(basis, rows, tap.layer)
            if head.in_features != rows.shape[1]:
                raise ValueError(f"head has {head.in_features} inputs but the layer has {rows.shape[1]} channels")
            w, _, s, mu = _basis_tensors(basis, rows)
            w, s = w[idx], s[idx]
            positions = rows.shape[0] // b
            cls = _targets(target, b, rows.device, head.out_features)
            v = head.weight.detach().to(rows)[cls]                      # (B, D)
            grads = (v / positions).repeat_interleave(positions, dim=0)  # d score / d row
            contrib = _contributions(basis, rows, grads, w, s, mu, idx, reference, clamp)
            yield tap, contrib, b
        else:
            batch = tap._check_images(batch, offset)
            captured = {}

            def replace(out_):
                leaf = out_.detach().float().requires_grad_(True)
                captured["leaf"] = leaf
                return leaf.to(out_.dtype)

            with autograd_on(model, "contribution_maps(method='gradient')"):
                logits = read_scores(tap.forward_with(batch, replace), output, "auto")
                if callable(target):
                    score = target(logits)
                    if not isinstance(score, torch.Tensor) or score.shape != (b,):
                        raise ValueError(f"target must give one score per image ({b}), got "
                                         f"{tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__}")
                    if not score.requires_grad:
                        raise ValueError("target's score does not depend on the logits through autograd (detached, "
                                         "or computed outside torch?): the gradient method differentiates it")
                else:
                    score = logits.gather(1, _targets(target, b, logits.device, logits.shape[1])[:, None])
                score.sum().backward()
            leaf = captured["leaf"]
            rows = tap.to_rows(leaf.detach())
            grads = tap.to_rows(leaf.grad)
            _check_dim(basis, rows, tap.layer)
            w, _, s, mu = _basis_tensors(basis, rows)
            w, s = w[idx], s[idx]
            contrib = _contributions(basis, rows.float(), grads.float(), w, s, mu, idx, reference, clamp)
            yield tap, contrib, b


# ---------------------------------------------------------------------------------- RCAV
def auto_permutations(tests: int, level: float, cap: int = 2000) -> int:
    """Null draws for the RCAV test: enough that the smallest attainable Bonferroni-adjusted
    p-value, tests / (n + 1), is 0.8 x the level (at most ``cap``, at least 20). A test is then
    significant when its observed score is more extreme than every null."""
    return int(min(cap, max(20, math.ceil(1.25 * tests / level) - 1)))


@dataclass
class RCAVResult:
    """``scores[i, k]``: fraction of images whose class-k probability rose when concept i was
    added; ``p_values`` from the test against random concepts (NaN for untested classes);
    ``p_adjusted`` Bonferroni-corrected over the tests; ``significant`` = p_adjusted < level;
    ``null_scores`` (draws, concepts, classes) the random concepts' scores (NaN for the draws a
    concept stopped before); ``draws[i]`` the null draws made for concept i."""

    concepts: List[int]
    scores: torch.Tensor
    p_values: torch.Tensor
    p_adjusted: torch.Tensor
    significant: torch.Tensor
    alpha: torch.Tensor
    null_scores: torch.Tensor = field(repr=False)
    level: float = 0.05
    draws: Optional[torch.Tensor] = None

    def influence(self) -> torch.Tensor:
        """(K', C) signed influence: +1 significantly raises the class, -1 lowers it, 0 neither."""
        sign = torch.sign(self.scores - 0.5).long()
        return sign * self.significant.long()


def rcav_tests(n_concepts: int, n_classes: int) -> int:
    """The number of distinct RCAV tests of ``n_concepts`` concepts on ``n_classes`` classes,
    the Bonferroni factor: with two classes, the probability of one rises exactly where the
    other's falls, so their two tests are one (``rcav`` adjusts the larger of the two p-values)."""
    return n_concepts * (1 if n_classes == 2 else n_classes)


def rcav(
    model: nn.Module,
    basis,
    images,
    *,
    layer: Optional[str] = None,
    concepts=None,
    alpha: Union[float, Sequence[float], None] = None,
    n_permutations: Optional[int] = None,
    level: float = 0.05,
    seed: int = 0,
    max_patches: int = 20000,
    batch_size: Optional[int] = None,
    skip_tokens: Optional[int] = None,
    progress=None,
    output: OutputSpec = None,
    classes: Optional[Sequence[int]] = None,
    stop_early: bool = True,
) -> RCAVResult:
    """Global influence of concepts on classes by RCAV with a test against random concepts.

    For concept i, ``alpha_i s_i`` is added at every position (``alpha`` in latent units;
    default: the mean latent factor of the patches where i is detected) and the sign of the
    change of every class probability is recorded per image. The null distribution comes
    from random concepts of the same size: for a random filter, the signal vector of the
    patches it responds to most (as many as concept i is detected on), scaled to the norm of
    s_i and pushed by the same alpha. (Directions from randomly permuted detection labels with
    the concept's own filter, the earlier null, all point along that filter's pattern, close
    to s_i, so they moved the classes as the concept does and the test had little power.)
    p-values are (1 + #null >= observed) / (1 + n_permutations) on |score - 0.5|; Bonferroni
    over concepts x classes (``rcav_tests``: with two classes, one test per concept).
    ``classes``: one class per concept (in ``concepts``' order) to test it on, e.g. the class
    its removal lowers most: one test per concept, however many classes the model has (the
    scores of every class are still measured; the other classes' p-values are NaN). Default:
    every class. ``n_permutations`` (default: ``auto_permutations``, enough that a concept more
    extreme than every null is significant). A concept detected on fewer than two of the sampled
    patches cannot be tested (p = 1). ``output``: which part of the model's output holds the
    class scores (index, key or callable).

    ``stop_early`` (default): a concept's null draws stop once each of its tested classes (with
    two classes, one of the two) has ``h`` nulls at least as extreme as it, the fewest with
    which the full test could no longer call it significant (curtailed sampling). The
    decisions are those of the full test; a stopped pair's p-value is max(h / L, (1 + h) /
    (1 + n_permutations)), L the draws it took to reach h: the larger of Besag and Clifford's
    sequential Monte Carlo p-value and the full test's smallest attainable one, so it is valid
    and never significant. A concept that moves
    the classes like chance then costs a few forward passes instead of ``n_permutations``.
    (No stopping where even h = 0 would not be significant: too few draws for any p < level.)
    """
    output = output_or_recorded(output, basis)
    if n_permutations is not None and (isinstance(n_permutations, bool) or not isinstance(n_permutations, int)
                                       or n_permutations < 1):
        raise ValueError(f"n_permutations must be a positive int or None, got {n_permutations!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    tap = _tap(model, basis, layer, skip_tokens)
    idx = _concept_list(concepts, basis.decoding.shape[0])
    batches, seen = [], 0
    for b in iter_batches(images, batch_size):
        batches.append(tap._check_images(b, seen))
        seen += b.shape[0]
    if not batches:
        raise ValueError("images is empty")
    gen = torch.Generator().manual_seed(seed)
    if progress:  # the passes before the first concept's push are part of the test's time
        progress("rcav", 0, None)
    # the class scores are checked (and logits told from probabilities) before any other work
    with torch.no_grad():
        kind = scores_kind(read_scores(tap.forward_with(batches[0][:2], lambda out: out), output, "logits"))

    def probs(value):
        return read_scores(value, output, kind).softmax(-1)

    # A sample of patch rows for the alphas and the permuted-label directions.
    rows = torch.cat([tap.to_rows(tap.activations(b)).float().cpu() for b in batches])
    _check_dim(basis, rows, tap.layer)
    if rows.shape[0] > max_patches:
        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_patches]]
    w, bias, s, mu = (t.cpu() for t in _basis_tensors(basis, rows))
    w, bias, s = w[idx], bias[idx], s[idx]
    z = rows @ w.T                                               # (N, K')
    detected = z > bias
    latent = (z - w @ mu) / (w * s).sum(1)
    if alpha is None:
        alpha_t = torch.stack([
            latent[detected[:, j], j].mean() if detected[:, j].any() else latent[:, j].std()
            for j in range(len(idx))
        ])
    else:
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32).expand(len(idx)).clone()

    n_detected = detected.sum(0)
    size = s.norm(dim=1)

    def random_concepts() -> torch.Tensor:
        # per tested concept, a concept-like direction of a random filter: the signal vector
        # of the patches it responds to most, as many as the concept is detected on, with
        # the norm of the concept's signal vector (a column with no variance: a zero push)
        filters = torch.randn(len(idx), rows.shape[1], generator=gen)
        z_r = rows @ filters.T
        ranks = z_r.argsort(0, descending=True).argsort(0)
        mask = ranks < n_detected[None, :]
        directions, ok = masked_signal_vectors(rows, z_r, mask)
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return directions * (size * ok)[:, None]

    with torch.no_grad():
        base = [probs(tap.forward_with(b, lambda out: out)).cpu() for b in batches]

    def score(direction: torch.Tensor, amount: float) -> torch.Tensor:
        shift = (amount * direction).to(batches[0].device)
        ups = []
        with torch.no_grad():
            for b, p0 in zip(batches, base):
                p1 = probs(tap.forward_rows(b, lambda r: r + shift.to(r.dtype))).cpu()
                ups.append(p1 > p0)
        return torch.cat(ups).float().mean(0)                     # (C,)

    n_classes = base[0].shape[1]
    if classes is not None:
        classes = [int(c) for c in classes]
        if len(classes) != len(idx):
            raise ValueError(f"classes must name one class per tested concept ({len(idx)}), got {len(classes)}")
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad:
            raise IndexError(f"classes: class {bad[0]} is out of range for {n_classes} classes")
    n_tests = len(idx) if classes is not None else rcav_tests(len(idx), n_classes)
    if n_permutations is None:
        n_permutations = auto_permutations(n_tests, level)
    total = len(idx) * (1 + n_permutations)
    done = 0
    scores = []
    for j in range(len(idx)):
        scores.append(score(s[j], float(alpha_t[j])))
        done += 1
        if progress:
            progress("rcav", done, total)
    scores_t = torch.stack(scores)                                # (K', C)
    observed = (scores_t - 0.5).abs() - 1e-12
    # the (concept, class) pairs whose p-values decide: with two classes both (their p is the
    # larger of the two), with ``classes`` the named one, otherwise every class
    decides = torch.ones_like(scores_t, dtype=torch.bool)
    if classes is not None and n_classes != 2:
        decides = torch.zeros_like(decides)
        decides[torch.arange(len(idx)), torch.tensor(classes)] = True
    # h: the fewest extreme nulls with which the full test's p, (1 + h) / (1 + n), is adjusted to
    # at least the level, in the very arithmetic of the decision below (float64), so that the
    # two agree at the boundary; h = 0 (nothing can be significant) leaves the test unstopped
    hopeless = 0
    while hopeless <= n_permutations and _adjusted(_full_p(hopeless, n_permutations), n_tests) < level:
        hopeless += 1
    stop = stop_early and hopeless >= 1
    untestable = n_detected < 2
    active = ~untestable if stop else torch.ones(len(idx), dtype=torch.bool)
    extreme = torch.zeros_like(scores_t, dtype=torch.float64)
    reached_at = torch.zeros_like(scores_t, dtype=torch.float64)  # draws taken to reach h extremes
    draws = torch.zeros(len(idx), dtype=torch.long)
    null_t = torch.full((n_permutations, len(idx), n_classes), float("nan"))
    if stop:
        total -= int(untestable.sum()) * n_permutations
        if progress:
            progress("rcav", done, total)
    for d in range(n_permutations):
        if not bool(active.any()):
            break
        dirs = random_concepts()  # drawn for every concept, so each one's nulls do not depend on the others'
        for j in torch.nonzero(active).flatten().tolist():
            null_t[d, j] = score(dirs[j], float(alpha_t[j]))
            draws[j] += 1
            done += 1
            if progress:
                progress("rcav", done, total)
        extreme += ((null_t[d] - 0.5).abs() >= observed) & active[:, None]
        if stop:
            newly = (extreme >= hopeless) & (reached_at == 0) & active[:, None]
            reached_at[newly] = float(d + 1)
            reached = reached_at > 0
            # two classes: one test, on the larger p, so one hopeless class ends it
            done_now = active & (reached.any(1) if n_classes == 2 else (reached | ~decides).all(1))
            if bool(done_now.any()):
                total -= int(done_now.sum()) * (n_permutations - d - 1)
                active &= ~done_now
                if progress:
                    progress("rcav", done, total)
    p = _full_p(extreme, n_permutations)
    stopped = (draws < n_permutations)[:, None] & (reached_at > 0)
    curtailed = torch.maximum(hopeless / reached_at.clamp_min(1), torch.full_like(p, _full_p(hopeless, n_permutations)))
    if n_classes == 2:  # a stopped concept's one test: both classes show the p of the class that ended it
        one = torch.where(stopped, curtailed, torch.zeros_like(p)).max(1, keepdim=True).values.expand_as(p)
        stopped = stopped.any(1, keepdim=True).expand_as(p)
        curtailed = one
    p = torch.where(stopped, curtailed, p)
    # Fewer than two detected patches: no signal vector for the concept nor for its random
    # counterparts, so there is no null distribution to test against: not testable, p = 1.
    p[detected.sum(0) < 2] = 1.0
    # two classes: one test per concept; the larger of its two p-values (they differ only
    # where a probability does not move at all) keeps it valid
    tested = p.max(1, keepdim=True).values.expand_as(p) if p.shape[1] == 2 else p
    if classes is not None:  # one hypothesis per concept: the other classes are not tested
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[torch.arange(len(idx)), torch.tensor(classes)] = True
        if p.shape[1] == 2:
            keep[:] = True  # the two classes' tests are one
        p = torch.where(keep, p, torch.full_like(p, float("nan")))
        tested = torch.where(keep, tested, torch.full_like(tested, float("nan")))
    p_adj = _adjusted(tested, n_tests)
    return RCAVResult(idx, scores_t, p, p_adj, p_adj < level, alpha_t, null_t, level, draws)


def _full_p(extreme, n_permutations: int):
    """The permutation p-value (1 + extreme) / (1 + n), in float64 (float32 put (1 + 7) x 5 / 200
    just below 0.2, and a test at level 0.2 passed that should not)."""
    if isinstance(extreme, torch.Tensor):
        return (1.0 + extreme.double()) / (1.0 + n_permutations)
    return (1.0 + extreme) / (1.0 + n_permutations)


def _adjusted(p, n_tests: int):
    """Bonferroni: p x tests, at most 1."""
    return (p * n_tests).clamp(max=1.0) if isinstance(p, torch.Tensor) else min(1.0, p * n_tests)


# ----------------------------------------------------------------- activation maximisation
@dataclass
class ConceptValidation:
    """Result of ``maximize_concept``: how often detector i fires on the layer's positions
    before and after optimising the input, the other detectors' mean firing rate after, and
    the optimised image."""

    concept: int
    fired_before: float
    fired_after: float
    others_fired_after: float
    latent_before: float
    latent_after: float
    fires: bool
    image: torch.Tensor = field(repr=False)


def maximize_concept(
    model: nn.Module,
    basis,
    concept: int,
    *,
    layer: Optional[str] = None,
    image: Optional[torch.Tensor] = None,
    image_shape=None,
    steps: int = 100,
    lr: float = 0.05,
    orthogonal_weight: float = 0.5,
    bounds=(0.0, 1.0),
    min_fraction: float = 0.25,
    seed: int = 0,
    skip_tokens: Optional[int] = None,
) -> ConceptValidation:
    """Optimise an input (from ``image``, or a mid-grey start of ``image_shape`` (C, H, W)
    with a little noise) so that the layer's activations move along s_i: maximise the mean
    projection of the change on s_i/||s_i|| minus ``orthogonal_weight`` times the mean norm
    of the change's orthogonal part. ``fires`` is True when detector i fires on at least
    ``min_fraction`` of the positions afterwards and more often than before."""
    k = basis.decoding.shape[0]
    concept = _concept_list([concept], k)[0]
    tap = _tap(model, basis, layer, skip_tokens)
    gen = torch.Generator().manual_seed(seed)
    if image is None:
        if image_shape is None:
            raise ValueError("give an image or image_shape=(C, H, W) to start from")
        lo, hi = bounds
        image = (lo + hi) / 2 + 0.02 * (hi - lo) * torch.randn(tuple(image_shape), generator=gen)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    start = tap._check_images(image.float())
    h0 = tap.to_rows(tap.activations(start)).float()
    _check_dim(basis, h0, tap.layer)
    w, b, s, mu = _basis_tensors(basis, h0)
    unit = s[concept] / s[concept].norm()

    def stats(rows):
        fired = (rows @ w.T - b) > 0
        lat = _latent(rows, w, s, mu)[:, concept]
        others = torch.cat([fired[:, :concept], fired[:, concept + 1:]], 1)
        return (float(fired[:, concept].float().mean()), float(others.float().mean()) if others.numel() else 0.0,
                float(lat.mean()))

    fired0, _, lat0 = stats(h0)
    grab = {}

    def keep(out_):
        grab["out"] = out_
        return out_

    with tap.eval_mode(), tap.frozen(), autograd_on(model, "maximize_concept"):
        # clones: tensors made under a caller's inference_mode cannot be saved for backward
        x = start.clone().requires_grad_(True)
        h0, unit = h0.clone(), unit.clone()
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            with tap.hook(keep):
                model(x)
            d = tap.to_rows(grab["out"]).float() - h0
            along = d @ unit
            orth = d - along[:, None] * unit
            loss = -along.mean() + orthogonal_weight * orth.norm(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(*bounds)
    final = x.detach()
    h1 = tap.to_rows(tap.activations(final)).float()
    fired1, others1, lat1 = stats(h1)
    fires = fired1 >= min_fraction and fired1 > fired0
    return ConceptValidation(concept, fired0, fired1, others1, lat0, lat1, fires, final.cpu()[0])
