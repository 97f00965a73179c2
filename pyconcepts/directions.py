"""``extract_directions``: clustering -> detectors with thresholds -> signal vectors.

The pipeline (METHOD.md sections 2-3; the calibration steps are our choice, measured on the
synthetic model in ``benchmarks/recovery.py``):

1. **Directional clustering** (``DirectionalClustering``), whitened or not (``whiten``).
   Whitening by the activation covariance keeps high-variance, concept-free directions
   (distractors) from dominating the cosines: on the paper's synthetic model the plain
   clustering fails (IoU ~0.1). On real layers it does the opposite: the whitened rows are
   nearly isotropic, restarts end in different clusterings of almost the same objective, and
   the directions do not reproduce across halves of the data (demo layer: 0.54 mean cosine
   vs 0.94 plain). ``whiten="auto"`` (default) decides from the data: the ``n_init``
   restarts (default 10: on the synthetic model about a third of the k-means++ seedings end
   in a clustering that splits one concept and merges two) run on a sample in both
   coordinates; the coordinates whose near-best restarts (objective within 1% of the best;
   all the others where none is) share more of the best restart's labels win; whitened ones
   must remove a tenth of the plain ones' disagreement (``_WHITENING_GAIN``: a near tie
   between two poorly reproducing clusterings went either way with the order of the images,
   and the layer's own coordinates are the safer of the two there). The best restart in the
   chosen coordinates starts one Lloyd fit over all rows.
   **vMF polish** (``vmf_polish``, off by default): from that fit's centroids, EM of a von
   Mises-Fisher mixture with one concentration shared by the clusters
   (``clustering.vmf_mixture_polish``) on the sample the restarts were drawn from, run to
   convergence; from then on a row's cluster is its most probable mixture component. The hard
   assignments of k-means leave many local optima that differ in the rows at the cluster
   boundaries, and different seeds stop in different ones; the soft posteriors smooth them
   away, so seeds agree more on real layers. On well separated clusters in high dimensions the
   soft posteriors pull the means together (lower synthetic detector IoU), hence off by
   default (figures in BENCHMARKS.md). The restart agreement is still measured on the k-means
   restarts, so with the polish it errs on the cautious side.
2. **Decoding directions.** A centroid estimates an encoding direction, not a filter. Default
   (``decoder='logistic'``): per cluster, a logistic regression of membership against the rest
   in the whitened coordinates with a small L2 penalty (``logistic_filters``) on a bounded
   sample of rows: as the penalty -> 0 its direction tends to the maximum-margin separator
   (the paper's max-margin criterion); rows of other clusters that the filter places on its
   side are then left out of its negatives and it is refit (``decoder_rounds``: rows that
   carry two concepts). ``decoder='discriminant'``: the linear discriminant
   w_i = Sigma^-1 (mu_i - mu_rest) (Sigma the activation covariance), a filter from first and
   second moments only. Measured on the paper's synthetic model (pc.extract, seeds 0-9): the
   discriminant is 0.70-0.90 cosine to the ideal filter (the clusters are uniform boxes, not
   Gaussians), and since a signal vector is Cov(x, w.x) / Var(w.x), every error of the filter
   reappears in the encoding, amplified along the distractors (4x their variance): encoding
   cosine 0.88-0.98 even after the alternation of step 5. Oracle check: signal vectors of the
   ideal filters on the true detections give >= 0.99, so the estimator was never the problem.
   The logistic filters are >= 0.99 cosine to the ideal ones on every seed. Without
   whitening the fit runs in unit-variance coordinates with a ridge penalty of 1: the filters
   stay near the differences of the cluster means instead of leaning on low-variance
   directions. The fit stops once its detections and directions settle.
   **Background** (``background_filters``, ``background_rounds``; whitened fits only): where
   the filters reject more than 5% of their own clusters' rows, the clusters hold rows of no
   concept; those rows become negatives of every filter, the fit is repeated until they
   settle, and the thresholds (step 3) count them as members of no cluster. The settled
   filters still respond to the other concepts and their boundaries lie inside the concepts:
   ``background_discriminants`` replaces a filter by a linear discriminant against the
   background rows where that one responds less to the other concepts' patterns, and moves
   each boundary out to where the other clusters' rows begin.
3. **Thresholds without labels.** b_i maximises the F1 agreement between the half-space
   {w_i . x > b_i} and cluster i's membership, from streamed histograms of w_i . x. The
   membership says which concept wins at a patch; the threshold places the boundary where
   the members stop outnumbering the rest.
   **Margins** from the same histograms (``calibrated_scales``): ||w_i|| is set so that
   sigmoid(w_i . x - b_i) is the calibrated probability of cluster membership (a
   one-parameter logistic fit, capped at a members' median score of 16). Unit-norm filters
   gave every patch a membership of ~0.3-0.45 on the demo layer, from which the refinement
   losses could not tell patches apart. Detection (w . x > b) does not depend on the scale.
4. **Signal vectors** conditioned on the detections P_i (``ops.masked_moments``), and each
   concept's latent level where it is not detected (``absent_level``, what a removal lowers it to).
5. **Pattern-to-filter alternation** (``alternations`` rounds, default 0; it was 2 with the
   discriminant filters, whose errors it partly corrected): filters from the signal vectors, W = (S^T Sigma_w^-1 S)^-1 S^T Sigma_w^-1 with Sigma_w the pooled
   within-cluster covariance (not the total one, which makes distractor errors grow), re-thresholded, signal vectors again,
   averaged with the previous estimate. Measured on the synthetic model: an error in the
   filters comes back transposed with flipped sign, so the undamped alternation oscillates;
   the averaged one improves the encoding directions for 1-2 rounds and then drifts (8 rounds
   are worse than 2). The filters it yields detect worse than the discriminants (they cancel
   the *estimated* other signal vectors exactly and amplify their errors), so the
   discriminant detectors are kept and the encoding directions are rescaled so that
   w_i . s_i = 1. Any S with S Sigma_w^+ S^T diagonal is a fixed point of the round, the true
   one among many, so the rounds cannot pull toward the truth: from the logistic filters they
   only drift (paper synthetic, seeds 0-9: min encoding cosine 0.984 / 0.972 / 0.933 after
   0 / 2 / 4 rounds).
6. **Refinement** (optional, ``refine=True``): the paper's losses on the detectors
   (``detectors.refine_detectors``) over a bounded sample of patches.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional

import torch

from . import ops
from .basis import ConceptBasis
from .clustering import DirectionalClustering, vmf_mixture_polish
from .signal import AbsentSums
from .stats import (DEFAULT_CHUNK_SIZE, StreamingMoments, all_reduce_sum_, fail_together, iter_chunks,
                    local_only)

__all__ = ["extract_directions", "pattern_to_filter", "f1_thresholds", "logistic_filters"]

_HIST_BINS = 4096
# fewer sampled members than this: a cluster's logistic filter is replaced by its discriminant
_MIN_DECODER_MEMBERS = 5
# The decoder's L-BFGS runs in blocks of this many iterations and stops once a block flips at
# most _DECODER_FLIPS of the rows' detections and turns no filter by more than 1 - cos =
# _DECODER_TURN.
_DECODER_BLOCK = 10
_DECODER_FLIPS = 1e-4
_DECODER_TURN = 1e-5
# Rounds after the first start from the fit before them: a third of the iterations.
_LATER_ROUND_SHARE = 3


def pattern_to_filter(encoding: torch.Tensor, covariance: torch.Tensor, rtol: float = 1e-8) -> torch.Tensor:
    """Filters W (K, D) with W S^T = I and least output variance: (S Sigma^-1 S^T)^-1 S Sigma^-1.

    ``encoding`` rows are the signal vectors S (K, D); ``covariance`` (D, D) the data's.
    """
    s = encoding.to(torch.float64)
    precision = torch.linalg.pinv(covariance.to(torch.float64), hermitian=True, rtol=rtol)
    a = s @ precision
    return torch.linalg.solve(a @ s.T, a)


def logistic_filters(
    u: torch.Tensor, labels: torch.Tensor, n_concepts: int, *, penalty: float = 1e-6,
    max_iter: int = 100, rounds: int = 3, init=None,
):
    """One-vs-rest logistic regressions of cluster membership: (v (K, D), c (K,)) float64.

    ``u`` (n, D): rows in whitened coordinates; ``labels`` (n,): each row's cluster. Minimises,
    per concept, mean_p BCE(v_i . u_p - c_i, [label_p == i]) + penalty / 2 ||v_i||^2 (all
    concepts at once by L-BFGS; the sum is separable). With a small ``penalty`` the direction
    of v_i approaches the hard-margin separator of the cluster (Rosset, Zhu & Hastie 2004): the
    paper's maximum-margin criterion, in the whitened metric. For Gaussian clusters with a
    shared covariance it agrees with the linear discriminant.

    A clustering gives each row one concept; a row carrying two is a member of one cluster and
    a false negative of the other's detector, which tilts that filter away from the first
    concept. So after each fit, ``rounds`` times, the rows of other clusters that detector i
    places on its positive side are left out of its negatives and the fit is repeated (measured
    on the synthetic model with 20% two-concept patches: min encoding cosine 0.90 -> 0.985
    after 3 rounds; with one concept per patch about 10 rows in 12000 are left out and nothing
    changes). ``init``: (v, c) to start from instead of zeros. A label ``n_concepts`` marks a
    row of no concept: a negative of every filter, never left out.
    """
    if not 0 < penalty:
        raise ValueError(f"penalty must be > 0, got {penalty}")
    u = u.to(torch.float32).contiguous()
    n = u.shape[0]
    # label n_concepts: a row of no concept (a negative of every filter)
    target = torch.nn.functional.one_hot(labels.long().to(u.device), n_concepts + 1)[:, :n_concepts].to(u.dtype)
    weight = torch.ones_like(target)
    background = (labels.to(u.device) >= n_concepts)[:, None]  # negatives of every filter, always
    params = torch.zeros(n_concepts, u.shape[1] + 1, dtype=u.dtype, device=u.device)
    if init is not None:  # (v, c) of an earlier fit: the start of L-BFGS
        params[:, :-1], params[:, -1] = init[0].to(params), init[1].to(params)
    ones = torch.ones(n, 1, dtype=u.dtype, device=u.device)
    design = torch.cat([u, -ones], 1)  # score = design @ params.T

    def closure():
        # loss and gradient in closed form (no autograd graph: a few GEMMs per evaluation)
        score = design @ params.T
        loss = (weight * (torch.nn.functional.softplus(score) - target * score)).sum() / n
        residual = weight * (torch.sigmoid(score) - target) / n
        grad = residual.T @ design
        grad[:, :-1] += penalty * params[:, :-1]
        params.grad = grad
        return loss + 0.5 * penalty * params[:, :-1].pow(2).sum()

    for round_ in range(rounds + 1):
        params = params.detach().clone().requires_grad_(True)
        optimiser = torch.optim.LBFGS([params], lr=1, max_iter=_DECODER_BLOCK, history_size=20,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                      tolerance_change=1e-12)
        detected, direction = None, None
        # a later round starts from the previous fit, with a few rows left out of the negatives
        budget = max_iter if round_ == 0 else max(_DECODER_BLOCK, max_iter // _LATER_ROUND_SHARE)
        with torch.no_grad():
            for _ in range(max(1, math.ceil(budget / _DECODER_BLOCK))):
                optimiser.step(closure)
                # early stop: the detections on the rows and the filters' directions settled
                now = (design @ params.T) > 0
                unit = _unit(params[:, :-1].double())
                if detected is not None and int((now != detected).sum()) <= _DECODER_FLIPS * now.numel() \
                        and float((unit * direction).sum(1).min()) >= 1 - _DECODER_TURN:
                    break
                detected, direction = now, unit
            score = design @ params.T
            new_weight = ((target > 0) | (score <= 0) | background).to(u.dtype)
        if torch.equal(new_weight, weight):
            break  # no row left the negatives: another round fits the same problem
        weight = new_weight
    out = params.detach().to(torch.float64)
    return out[:, :-1], out[:, -1]


def background_filters(
    u: torch.Tensor, labels: torch.Tensor, n_concepts: int, *, background_rounds: int = 20,
    rounds: int = 3, tol: float = 1e-3, detect_share: float = None, discriminant_rounds: int = None, **fit,
):
    """``logistic_filters``, with the rows of no concept left out of the positives where the
    fit finds them: (v (K, D), c (K,), labels (n,)): float64, float64, int64.

    A clustering puts every row into some cluster, also the rows that carry no concept (real
    layers are mostly such background). As positives they tilt a filter towards the part of
    the background that its cluster holds, and since the fit can separate them from the rest
    by the *other* concepts' low values, the tilt sustains itself; the threshold then fires on
    them too. A row is **background** when the filter of its own cluster, fit with the
    background rows as negatives, does not place it on its positive side
    (v_l . u_p - c_l <= 0).

    **Detection.** First the usual fit (``logistic_filters`` with ``rounds``). If its filters
    reject at most ``detect_share`` of the rows of their own clusters, the clusters are
    taken to be concepts (the rejected rows are boundary errors) and that fit is returned as
    it is. Measured on the synthetic model (50k rows, seeds 0-1): 0.1-2.5% rejected without
    background (two-concept rows included), 7.8-14.5% with 10-50% background rows; on the
    demo layer (whitened) 1.4%.

    **Iteration.** Otherwise the rejected rows get label ``n_concepts`` (a negative of every
    filter), the filters are refit and every row is decided anew from its clustering label
    (a row can return), at most ``background_rounds`` times and until at most ``tol`` of the
    rows change. These fits leave no rows out of the negatives (``rounds=0``): other
    clusters' rows on a filter's positive side are mostly background there, not second
    concepts, and leaving them out keeps the tilt. The last fit, on the final labels, does
    (background rows stay negatives). A cluster whose filter would reject all but
    ``_MIN_DECODER_MEMBERS`` of its members keeps them. ``fit``: further keyword arguments of
    ``logistic_filters``. The returned labels mark the background rows with ``n_concepts``.

    **Correction.** The iteration settles on filters that still respond to the other concepts:
    the clustering gives cluster i the background rows in which concept i is the largest
    relative to the others, so the first fit learns "i minus the rest", and any half-space
    labelling is (nearly) a fixed point of a refit, so the rounds keep that tilt. Its
    boundary also lies inside the concepts (each refit moves it into the sparser side).
    ``background_discriminants`` (``discriminant_rounds``, default
    ``_DISCRIMINANT_ROUNDS``; 0 skips it) corrects both on the final labels.
    """
    detect_share = _BACKGROUND_SHARE if detect_share is None else detect_share
    discriminant_rounds = _DISCRIMINANT_ROUNDS if discriminant_rounds is None else discriminant_rounds
    if isinstance(discriminant_rounds, bool) or not isinstance(discriminant_rounds, int) or discriminant_rounds < 0:
        raise ValueError(f"discriminant_rounds must be a non-negative int, got {discriminant_rounds!r}")
    labels = labels.long().to(u.device)

    def decide(v, c):
        rejected = (u.to(torch.float64) * v[labels]).sum(1) - c[labels] <= 0
        # a cluster that would lose (nearly) every member keeps them: its filter, not its
        # rows, is what failed
        kept = torch.bincount(labels[~rejected], minlength=n_concepts)[:n_concepts]
        rejected &= (kept >= _MIN_DECODER_MEMBERS)[labels]
        return torch.where(rejected, torch.full_like(labels, n_concepts), labels)

    v, c = logistic_filters(u, labels, n_concepts, rounds=rounds, **fit)
    if background_rounds == 0:
        return v, c, labels
    current = decide(v, c)
    if int((current == n_concepts).sum()) <= detect_share * labels.shape[0]:
        return v, c, labels
    # each refit starts from the one before: a third of the iterations (as later decoder rounds)
    later = dict(fit, max_iter=max(_DECODER_BLOCK, fit.get("max_iter", 100) // _LATER_ROUND_SHARE))
    for _ in range(background_rounds):
        v, c = logistic_filters(u, current, n_concepts, rounds=0, init=(v, c), **later)
        now = decide(v, c)
        changed = int((now != current).sum())
        current = now
        if changed <= tol * labels.shape[0]:
            break
    v, c = logistic_filters(u, current, n_concepts, rounds=rounds, init=(v, c), **fit)
    if discriminant_rounds == 0:
        return v, c, current
    return background_discriminants(u, labels, current, v, c, n_concepts, rounds=discriminant_rounds, tol=tol)


def _concept_patterns(u64: torch.Tensor, current: torch.Tensor, k: int):
    """(class means (k + 1, D), patterns (k, D)): mean of each concept's rows minus the mean of
    the background rows (label k), what a concept adds to the background."""
    one = torch.nn.functional.one_hot(current, k + 1).to(u64.dtype)
    means = (one.T @ u64) / one.sum(0).clamp_min(1)[:, None]
    return means, means[:k] - means[k]


def _crosstalk(filters: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(k,) |mean_{j != i} (w_i . p_j) / (w_i . p_i)|: how much filter i responds to the other
    concepts' patterns, relative to its own (0 for filters with W P^T diagonal)."""
    k = filters.shape[0]
    m = filters @ patterns.T
    own = m.diagonal()
    safe = torch.where(own.abs() > 0, own, torch.ones_like(own))
    ratio = (m - torch.diag(own)) / safe[:, None]
    out = (ratio.sum(1) / max(k - 1, 1)).abs()
    return torch.where(own > 0, out, torch.full_like(out, math.inf))


def _min_error_cut(z: torch.Tensor, member: torch.Tensor) -> float:
    """The threshold t minimising #(member, z <= t) + #(not member, z > t): where the members
    stop being the majority (no pull towards the rarer side, unlike a soft fit's boundary)."""
    order = torch.argsort(z)
    zs, m = z[order], member[order].to(torch.float64)
    errors = m.cumsum(0) + ((1 - m).sum() - (1 - m).cumsum(0))
    j = int(errors.argmin())
    return float(0.5 * (zs[j] + zs[min(j + 1, zs.shape[0] - 1)]))


def _detection_jaccard(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) Jaccard overlap of the rows labelled i in ``a`` and in ``b``."""
    one_a = torch.nn.functional.one_hot(a, k + 1)[:, :k].bool()
    one_b = torch.nn.functional.one_hot(b, k + 1)[:, :k].bool()
    inter = (one_a & one_b).sum(0).to(torch.float64)
    union = (one_a | one_b).sum(0).to(torch.float64)
    return inter / union.clamp_min(1)


def background_discriminants(
    u: torch.Tensor, labels: torch.Tensor, current: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
    n_concepts: int, *, rounds: int = 8, tol: float = 1e-3,
):
    """Corrects ``background_filters``' filters and boundaries: (v (K, D), c (K,), labels (n,)).

    ``u`` (n, D) whitened rows, ``labels`` their clusters, ``current`` the labels of
    ``background_filters`` (K: background), (v, c) its logistic filters (v . u - c > 0).

    **Directions.** Linear discriminants against the background: w_i = Sigma_w^+ (mu_i - mu_K),
    with mu the class means of the current labels and Sigma_w the covariance pooled within the
    K + 1 classes. They use every row, not the rows at the boundary that steer a near-max-margin
    fit, and Sigma_w (the spread within each class, not the spread between the concepts) keeps
    them from leaning on the other concepts. After each fit every cluster's rows are decided anew
    (member where w_i . u exceeds the ``_min_error_cut`` against the current labels), at most
    ``rounds`` times, until at most ``tol`` of the rows change. Per concept the direction kept
    is the candidate (the logistic filter or one of these rounds) with the least ``_crosstalk``
    to the other concepts' patterns (mu_j - mu_K, from the labels of ``background_filters``):
    a discriminant replaces the logistic filter only if its crosstalk is below
    ``_CROSSTALK_GAIN`` times the logistic filter's, and only if its members overlap the
    logistic filter's by a Jaccard of at least ``_DISCRIMINANT_AGREEMENT`` (on a real sparse
    layer the discriminants of some clusters degenerate: they fire on every row or on none).

    **Boundaries.** The rows of the other clusters are rows where concept i is absent (a
    clustering puts a row into the cluster of its strongest concept). The boundary of concept i
    moves out from its fit's own boundary (which lies inside the concept) down to where those
    rows begin: the (1 - ``_OTHER_CLUSTERS_TAIL``) quantile of w_i . u over the rows of the other
    clusters; never up. The returned labels: cluster i's rows above that boundary keep label i,
    the others are background (K). A cluster that would keep fewer than
    ``_MIN_DECODER_MEMBERS`` rows keeps its members, as in ``background_filters``.
    """
    k = n_concepts
    u64 = u.to(torch.float64)
    labels = labels.long().to(u.device)
    current = current.long().to(u.device)
    if not bool((current == k).any()):
        return v, c, current  # no background left: nothing to correct against
    _, patterns = _concept_patterns(u64, current, k)

    def cuts(w, member_labels):
        z = u64 @ w.T
        return torch.tensor([_min_error_cut(z[:, i], member_labels == i) for i in range(k)],
                            dtype=torch.float64, device=u.device)

    def relabel(w, t):
        own = (u64 @ w.T - t).gather(1, labels[:, None]).flatten()
        return torch.where(own > 0, labels, torch.full_like(labels, k))

    scale = v.norm(dim=1).clamp_min(1e-300)
    candidates = [(v / scale[:, None], c / scale)]
    candidate_labels = [current]
    fit_labels = current
    for _ in range(rounds):
        means, _ = _concept_patterns(u64, fit_labels, k)
        centred = u64 - means[fit_labels]
        within = centred.T @ centred / max(u64.shape[0], 1)
        w = (means[:k] - means[k]) @ torch.linalg.pinv(within, hermitian=True, rtol=1e-8)
        norm = w.norm(dim=1).clamp_min(1e-300)
        w = w / norm[:, None]
        t = cuts(w, fit_labels)
        now = relabel(w, t)
        candidates.append((w, t))
        candidate_labels.append(now)
        changed = int((now != fit_labels).sum())
        fit_labels = now
        if changed <= tol * u64.shape[0]:
            break
    crosstalk = torch.stack([_crosstalk(w, patterns) for w, _ in candidates])           # (C, K)
    agreement = torch.stack([_detection_jaccard(current, l, k) for l in candidate_labels])  # (C, K)
    crosstalk[1:][agreement[1:] < _DISCRIMINANT_AGREEMENT] = math.inf
    best = crosstalk[1:].min(0)
    pick = torch.where(best.values < _CROSSTALK_GAIN * crosstalk[0], best.indices + 1,
                       torch.zeros_like(best.indices))
    w = torch.stack([candidates[int(pick[i])][0][i] for i in range(k)])
    own_cut = torch.stack([candidates[int(pick[i])][1][i] for i in range(k)])
    z = u64 @ w.T
    tail = torch.empty(k, dtype=torch.float64, device=u.device)
    for i in range(k):
        others = z[labels != i, i]
        tail[i] = torch.quantile(others, 1 - _OTHER_CLUSTERS_TAIL) if others.numel() else own_cut[i]
    t = torch.minimum(own_cut, tail)
    rejected = (z - t).gather(1, labels[:, None]).flatten() <= 0
    kept = torch.bincount(labels[~rejected], minlength=k)[:k]
    rejected &= (kept >= _MIN_DECODER_MEMBERS)[labels]
    return w, t, torch.where(rejected, torch.full_like(labels, k), labels)


def _discriminants(class_sums, class_counts, total_sum, total_count, covariance, rtol=1e-8):
    counts = class_counts.to(torch.float64)
    mean_in = class_sums / counts.clamp_min(1)[:, None]
    rest = (total_count - counts).clamp_min(1)
    mean_out = (total_sum[None, :] - class_sums) / rest[:, None]
    precision = torch.linalg.pinv(covariance.to(torch.float64), hermitian=True, rtol=rtol)
    return (mean_in - mean_out) @ precision


def f1_thresholds(
    x, decoding: torch.Tensor, labels_of, n_concepts: int, center: torch.Tensor,
    covariance: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, *, return_scale: bool = False,
    expected_rows: Optional[int] = None,
):
    """(K,) thresholds b_i maximising F1 of {w_i . x > b_i} against {label == i}.

    ``labels_of(chunk)`` gives each row's label. Streams per-concept histograms of w_i . x
    (``_HIST_BINS`` bins over mean +- 8 std of w_i . x, outliers clamped to the end bins).
    With ``return_scale``, also the (K,) sigmoid scales of ``calibrated_scales`` from the same
    histograms: ``(bias, scale)``.
    """
    w64 = decoding.to(torch.float64)
    mean_z = w64 @ center.to(torch.float64)
    std_z = ((w64 @ covariance.to(torch.float64)) * w64).sum(1).clamp_min(1e-300).sqrt()
    lo, width = mean_z - 8 * std_z, 16 * std_z / _HIST_BINS
    k = n_concepts
    hist_all = torch.zeros(k * _HIST_BINS, dtype=torch.float64)
    hist_member = torch.zeros(k * _HIST_BINS, dtype=torch.float64)
    offsets = torch.arange(k) * _HIST_BINS
    w32 = decoding.to(torch.float32)
    with fail_together("the threshold histograms"):
        for chunk in iter_chunks(x, chunk_size, dim=decoding.shape[1]):
            z = (chunk.to(torch.float32) @ w32.to(chunk.device).T).cpu().to(torch.float64)
            bins = ((z - lo) / width).floor().clamp(0, _HIST_BINS - 1).long() + offsets
            hist_all += torch.bincount(bins.flatten(), minlength=k * _HIST_BINS).to(torch.float64)
            labels = labels_of(chunk).cpu()
            member = labels < k  # label k: a row of no concept, a member of no cluster
            member_bins = bins[member].gather(1, labels[member, None]).flatten()
            hist_member += torch.bincount(member_bins, minlength=k * _HIST_BINS).to(torch.float64)
    all_reduce_sum_(hist_all, hist_member)  # this rank's shard -> all rows (torchrun)
    if expected_rows is not None:
        _check_rows_read(int(hist_all.sum()) // k, expected_rows, "the threshold pass")
    hist_all = hist_all.view(k, _HIST_BINS)
    hist_member = hist_member.view(k, _HIST_BINS)
    # counts above each lower bin edge (detector fires for bins >= j when b = edge j)
    above_all = hist_all.flip(1).cumsum(1).flip(1)
    above_member = hist_member.flip(1).cumsum(1).flip(1)
    members = hist_member.sum(1, keepdim=True)
    f1 = 2 * above_member / (above_all + members).clamp_min(1)
    best = f1.argmax(1)
    bias = lo + width * best.to(torch.float64)
    if not return_scale:
        return bias.to(torch.float32)
    centres = lo[:, None] + width[:, None] * (torch.arange(_HIST_BINS, dtype=torch.float64) + 0.5)
    scale = calibrated_scales(centres - bias[:, None], hist_all, hist_member)
    return bias.to(torch.float32), scale.to(torch.float32)


def calibrated_scales(
    score: torch.Tensor, count_all: torch.Tensor, count_member: torch.Tensor, max_logit: float = 16.0,
) -> torch.Tensor:
    """(K,) scale beta_i making sigmoid(beta_i t) the calibrated probability of membership.

    ``score`` (K, M): bin centres t of w_i . x - b_i; ``count_all``/``count_member`` (K, M):
    rows and cluster members per bin. beta_i maximises the binned log-likelihood
    sum m log sigmoid(beta t) + (n - m) log sigmoid(-beta t) (a one-parameter logistic
    regression with the threshold held; concave in beta, solved by bisection on its
    derivative in log beta). Clusters that a half-space separates perfectly would send beta to
    infinity: beta is capped so that the members' median score is ``max_logit``
    (sigmoid = 1 - 1e-7), or their 90th percentile for a detector that fires on fewer than
    half of its members (the likelihood still picks the scale below the cap). Only a detector
    whose scores say nothing about membership (the likelihood falls from the smallest scale
    tried on, or no member scores above the threshold) gets that smallest scale (a flat
    sigmoid), never a negative one.
    """
    t = score.to(torch.float64)
    n = count_all.to(torch.float64)
    m = count_member.to(torch.float64)
    out = torch.empty(t.shape[0], dtype=torch.float64)
    for i in range(t.shape[0]):
        members = m[i]
        cum = members.cumsum(0)

        def member_score(share):  # the score below which this share of the members lies
            at = torch.searchsorted(cum, torch.tensor(share * float(cum[-1]), dtype=torch.float64))
            return float(t[i][min(int(at), t.shape[1] - 1)]) if cum[-1] > 0 else 0.0

        median_score = member_score(0.5)
        # a detector that fires on fewer than half of its members: the cap from the upper ones
        reference = median_score if median_score > 0 else member_score(0.9)
        spread = float(((n[i] * t[i] ** 2).sum() / n[i].sum().clamp_min(1)).sqrt().clamp_min(1e-300))
        lo = 1e-3 / spread                     # sigmoid nearly flat over the data
        hi = max_logit / reference if reference > 0 else lo

        def slope(beta):  # d LL / d beta
            return float((t[i] * (m[i] - n[i] * torch.sigmoid(beta * t[i]))).sum())

        if hi <= lo or slope(lo) <= 0:
            out[i] = max(lo, min(hi, lo))
            continue
        if slope(hi) >= 0:
            out[i] = hi
            continue
        a, b = math.log(lo), math.log(hi)
        for _ in range(60):
            mid = 0.5 * (a + b)
            if slope(math.exp(mid)) > 0:
                a = mid
            else:
                b = mid
        out[i] = math.exp(0.5 * (a + b))
    return out


# background_filters: background is detected when the first fit's filters reject more than
# this share of the rows of their own clusters (measured: <= 2.5% without background rows,
# >= 7.8% with 10% or more)
_BACKGROUND_SHARE = 0.05
# background_discriminants: rounds of discriminants; a discriminant replaces a logistic filter
# only with crosstalk below this multiple of the filter's (measured on the synthetic model:
# 0.4-0.7 with 20-50% background, 0.96-1.0 at 10%, where the logistic filter is the better one)
# and members overlapping the filter's by at least this Jaccard (synthetic: >= 0.90); the
# boundary lies where this share of the other clusters' rows scores above it.
_DISCRIMINANT_ROUNDS = 8
_CROSSTALK_GAIN = 0.8
_DISCRIMINANT_AGREEMENT = 0.8
_OTHER_CLUSTERS_TAIL = 5e-4
# Restarts of the clustering run on a sample of at least this many rows (or every row).
_RESTART_ROWS = 8192
_RESTART_ROWS_PER_CONCEPT = 256
# Fewer patch rows than this per concept: extraction warns that the concepts are noise (and
# the split-half check that its halves will redraw most of them).
MIN_ROWS_PER_CONCEPT = 50
# Restarts whose objective is within this relative gap of the best one's are "near-best".
_NEAR_BEST = 0.01
# whiten="auto" keeps whitened coordinates only where their restarts disagree (1 - matched
# Jaccard) at most (1 - this) times as much as the plain ones' (where whitening is needed,
# measured on the synthetic models: 0.09 vs 0.63, 0.54 vs 0.67, 0 vs 0.0002-0.006; a near
# tie on a real layer: 0.406 vs 0.414)
_WHITENING_GAIN = 0.1
# A concept whose cluster overlaps its partners in the near-best restarts by less than this
# (metadata "concept_agreement") is one the clustering could as well have drawn elsewhere: on
# the MTCNN RNet (K = 16) three concepts fell below it, one of which another seed did not give
# back (Jaccard 0.10); the 13 above it all came back at Jaccard >= 0.86.
LOW_CONCEPT_AGREEMENT = 0.5
# "No whitening": a floor so far above the spectrum that the transform is a scalar multiple
# of the identity (cosines, hence the clustering, do not see the scalar).
_NO_WHITENING_SHRINKAGE = 1e6
# ... and its decoder's ridge penalty per unit variance: the filters stay near the
# differences of the cluster means instead of leaning on low-variance directions
_PLAIN_DECODER_PENALTY = 1.0


@contextlib.contextmanager
def _one_thread():
    """Torch ops on one thread: the restarts and the decoder fit are long loops of small ops,
    where a second thread costs a barrier per op (and, when the cores are shared, waits for
    that thread to be scheduled at each of them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def matched_label_jaccard(a: torch.Tensor, b: torch.Tensor, n_concepts: int, per_cluster: bool = False):
    """Mean Jaccard overlap of two labelings' clusters, paired by the Hungarian method; with
    ``per_cluster``, the (n_concepts,) float64 overlaps of a's clusters with their partners."""
    from .metrics import linear_sum_assignment

    one_a = torch.nn.functional.one_hot(a.long().cpu(), n_concepts).to(torch.float32)
    one_b = torch.nn.functional.one_hot(b.long().cpu(), n_concepts).to(torch.float32)
    inter = one_a.T @ one_b
    union = one_a.sum(0)[:, None] + one_b.sum(0)[None, :] - inter
    jac = (inter / union.clamp_min(1)).double().numpy()
    rows, cols = linear_sum_assignment(-jac)
    if per_cluster:
        out = torch.zeros(n_concepts, dtype=torch.float64)
        out[torch.as_tensor(rows)] = torch.as_tensor(jac[rows, cols])
        return out
    return float(jac[rows, cols].mean())


def _sample_restarts(sample: torch.Tensor, n_concepts: int, seed: int, n_init: int, max_iter: int,
                     shrinkage: float, step=lambda: None):
    """``n_init`` spherical k-means runs on the sample rows in the coordinates of the given
    whitening (sample mean and covariance). Returns (best centroids, agreement, per cluster):
    the mean ``matched_label_jaccard`` of the best run (largest objective) with each near-best
    run (``_NEAR_BEST``), or with every other run when none came near it: how reproducible the
    clustering is in these coordinates; and the (K,) mean overlap of each of the best run's
    clusters with its partner in those runs (1.0 and None for a single run)."""
    from .clustering import whitening_matrix

    mean = sample.to(torch.float64).mean(0)
    centred = sample.to(torch.float64) - mean
    covariance = centred.T @ centred / max(sample.shape[0] - 1, 1)
    u = (centred @ whitening_matrix(covariance, shrinkage)).to(torch.float32).contiguous()
    runs = []
    for r in range(n_init):
        with _one_thread(), local_only():  # every rank holds the same sample
            km = DirectionalClustering(n_concepts, seed=seed * 7919 + r, center=False,
                                       max_iter=max_iter, pruning=False, num_threads=1).fit(u)
        runs.append((km.objective_, km.centroids_, km.labels_))
        step()
    best = max(range(n_init), key=lambda r: runs[r][0])
    top = runs[best][0]
    # runs that end in a clearly worse optimum say the best one is distinct, not that the
    # clustering is arbitrary: only the near-best runs are compared. Where no run came near the
    # best, the runs scatter over distinct optima: that is no evidence of a reproducible
    # clustering (scored 1.0, it made 'auto' pick whitening by the order of the images), so
    # the best run is compared with all of them.
    others = [r for r in range(n_init) if r != best]
    near = [r for r in others if runs[r][0] >= top - _NEAR_BEST * abs(top)]
    per = [matched_label_jaccard(runs[best][2], runs[r][2], n_concepts, per_cluster=True)
           for r in (near or others)]
    if not per:
        return runs[best][1], 1.0, None
    per_cluster = torch.stack(per).mean(0)
    return runs[best][1], float(per_cluster.mean()), per_cluster


def extract_directions(
    x,
    n_concepts: int,
    seed: int = 0,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    whiten_shrinkage: float = 1e-3,
    whiten="auto",
    alternations: int = 0,
    decoder: str = "logistic",
    decoder_penalty: float = 1e-6,
    decoder_iter: int = 100,
    decoder_sample: int = 65536,
    decoder_rounds: int = 3,
    background_rounds: int = 20,
    vmf_polish: bool = False,
    refine: bool = False,
    refine_options: Optional[dict] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    layer: Optional[str] = None,
    model_id: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ConceptBasis:
    """Concept direction pairs of the activations ``x`` (a tensor (N, D) or chunk stream).

    Returns a ``ConceptBasis`` (decoding W, bias b, encoding S, mean). See the module
    docstring for the steps; ``seed`` fixes every random choice. ``progress(done, total)`` is
    called after each restart and each later step (the fit on all rows, the filters, the
    thresholds, the signal vectors).
    """
    if isinstance(n_concepts, bool) or not isinstance(n_concepts, int) or n_concepts < 1:
        raise ValueError(f"n_concepts must be a positive int, got {n_concepts!r}")
    if isinstance(alternations, bool) or not isinstance(alternations, int) or alternations < 0:
        raise ValueError(f"alternations must be a non-negative int, got {alternations!r}")
    if decoder not in ("logistic", "discriminant"):
        raise ValueError(f"decoder must be 'logistic' or 'discriminant', got {decoder!r}")
    for name, value in (("decoder_sample", decoder_sample), ("decoder_iter", decoder_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(decoder_rounds, bool) or not isinstance(decoder_rounds, int) or decoder_rounds < 0:
        raise ValueError(f"decoder_rounds must be a non-negative int, got {decoder_rounds!r}")
    if isinstance(background_rounds, bool) or not isinstance(background_rounds, int) or background_rounds < 0:
        raise ValueError(f"background_rounds must be a non-negative int, got {background_rounds!r}")
    if not isinstance(vmf_polish, bool):
        raise ValueError(f"vmf_polish must be True or False, got {vmf_polish!r}")
    if not decoder_penalty > 0:
        raise ValueError(f"decoder_penalty must be > 0, got {decoder_penalty!r}")
    if whiten not in (True, False, "auto"):
        raise ValueError(f"whiten must be True, False or 'auto', got {whiten!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int, got {n_init!r}")
    settings = dict(
        n_concepts=n_concepts, seed=seed, n_init=n_init, max_iter=max_iter,
        whiten_shrinkage=whiten_shrinkage, whiten=whiten, alternations=alternations, decoder=decoder,
        decoder_penalty=decoder_penalty, decoder_iter=decoder_iter, decoder_sample=decoder_sample,
        decoder_rounds=decoder_rounds, background_rounds=background_rounds, vmf_polish=vmf_polish, refine=refine,
        refine_options=refine_options or {}, chunk_size=chunk_size,
    )
    from .detectors import sample_rows

    # One sample serves the restarts and the decoder fit.
    sample = sample_rows(x, max(decoder_sample, _RESTART_ROWS), seed, chunk_size)
    if not bool(torch.isfinite(sample).all()):
        raise ValueError("x contains NaN or Inf rows")
    if sample.shape[0] > 0 and bool((sample == sample[:1]).all()):
        raise ValueError("x has no spread to whiten: its rows (a sample of them) are all identical")
    if sample.shape[0] < n_concepts:
        raise ValueError(f"n_concepts = {n_concepts} exceeds the number of rows N = {sample.shape[0]}")
    wanted = max(decoder_sample, _RESTART_ROWS)
    if sample.shape[0] < wanted and sample.shape[0] < MIN_ROWS_PER_CONCEPT * n_concepts:
        # the sample is every row: so few per concept that the clusters are noise (every
        # restart then agrees, and the concepts look stable when they are not)
        warnings.warn(f"{n_concepts} concepts from {sample.shape[0]} patch rows ({sample.shape[0] / n_concepts:.1f} "
                      f"per concept): fewer than {MIN_ROWS_PER_CONCEPT} per concept give concepts that other "
                      "images would not give back; use more images or fewer concepts", stacklevel=2)
    order = torch.randperm(sample.shape[0], generator=torch.Generator().manual_seed(seed))
    restart_rows = sample[order[:max(_RESTART_ROWS, _RESTART_ROWS_PER_CONCEPT * n_concepts)]]
    whitened = whiten is not False
    shrinkage = whiten_shrinkage if whitened else _NO_WHITENING_SHRINKAGE
    total_steps = n_init * (2 if whiten == "auto" and n_init > 1 else 1) + 4
    done = [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(done[0], total_steps)

    start, agreement, per_concept = _sample_restarts(restart_rows, n_concepts, seed, n_init, max_iter,
                                                     shrinkage, step)
    plain_agreement = None if whitened else agreement
    agreement = agreement if whitened else None
    if whiten == "auto" and n_init > 1:
        # keep the coordinates in which the restarts reproduce each other's clustering more
        plain_start, plain_agreement, plain_per_concept = _sample_restarts(
            restart_rows, n_concepts, seed, n_init, max_iter, _NO_WHITENING_SHRINKAGE, step)
        if (1 - agreement) > (1 - _WHITENING_GAIN) * (1 - plain_agreement):
            start, shrinkage, whitened = plain_start, _NO_WHITENING_SHRINKAGE, False
            per_concept = plain_per_concept
    km = DirectionalClustering(
        n_concepts, seed=seed, whiten=True, whiten_shrinkage=shrinkage, init=start,
        max_iter=max_iter, chunk_size=chunk_size,
    )
    try:
        km.fit(x)
    except ValueError:
        # finite rows whose whitening scale leaves float32 fail as non-finite rows: say why
        whitening = getattr(km, "transform_matrix_", None)
        if whitening is not None and not bool(torch.isfinite(whitening).all()):
            raise ValueError(
                "x has no spread to whiten: its rows are all identical, or so small (e.g. "
                "denormal) that the whitening scale exceeds float32; rescale x"
            ) from None
        raise
    mean, covariance = km.mean_.to(torch.float64), km.covariance_
    # the clustering's labels from here on: the vMF mixture's MAP component (its EM runs on the
    # whole sample the restarts were drawn from: on the restart rows alone, which differ from
    # seed to seed, the seeds agreed less than without the polish), or the nearest centroid
    mixture = vmf_mixture_polish(km._transform(sample.to(torch.float32)), km.centroids_) if vmf_polish else None
    step()  # the fit on all rows
    k, d = n_concepts, km.n_features_in_

    def labels_of(chunk):
        # no separate finiteness pass over every chunk: cosine_assign (or predict) finds
        # non-finite rows
        xt = km._transform(chunk.to(torch.float32))
        if mixture is not None:
            return mixture.predict(xt)
        return ops.cosine_assign(xt, km.centroids_.to(xt.device))[0]

    # class sums of raw rows by cluster: the discriminants
    class_sums = torch.zeros(k, d, dtype=torch.float64)
    class_counts = torch.zeros(k, dtype=torch.int64)
    lowest = None  # the smallest activation: is the layer non-negative (post-ReLU)?
    with fail_together("the class sums"):
        for chunk in iter_chunks(x, chunk_size, dim=d):
            sums, counts = ops.spherical_update(chunk, labels_of(chunk), k)
            class_sums += sums.cpu()
            class_counts += counts.cpu()
            # kept on the chunk's device: no synchronisation per chunk
            low = chunk.min()
            lowest = low if lowest is None else torch.minimum(lowest, low.to(lowest.device))
    negatives = torch.tensor([int(lowest is not None and float(lowest) < 0)], dtype=torch.int64)
    all_reduce_sum_(class_sums, class_counts, negatives)
    total = class_counts.sum()
    _check_rows_read(int(total), km.n_samples_, "the class-sums pass")
    discriminants = _discriminants(class_sums, class_counts, class_sums.sum(0), total, covariance)
    if decoder == "logistic":
        sample = sample[order[:decoder_sample]] if sample.shape[0] > decoder_sample else sample
        sample_labels = labels_of(sample)
        u = km.transform(sample)
        # without whitening the transform is a tiny multiple of the identity: unit mean
        # variance, so that the penalty means what it means in whitened units
        gain = 1.0 if whitened else float(1.0 / u.pow(2).mean().sqrt().clamp_min(1e-30))
        penalty = decoder_penalty if whitened else max(decoder_penalty, _PLAIN_DECODER_PENALTY)
        with _one_thread():
            # background rows only where the fit is near max-margin (whitened): the ridge-penalised
            # plain fit rejects members of well-defined clusters (its boundary lies inside them)
            background = background_rounds if whitened else 0
            v, offset, fit_labels = background_filters(u * gain, sample_labels, k, background_rounds=background,
                                                       penalty=penalty, max_iter=decoder_iter,
                                                       rounds=decoder_rounds)
        # back to raw coordinates: v . T (x - mean) = (T v) . (x - mean), T symmetric
        decoding = v @ km.transform_matrix_.to(torch.float64) * gain
        # a cluster with (almost) no member in the sample has no separator to fit: its filter
        # comes from the class sums over all rows instead
        decoder_members = torch.bincount(sample_labels.cpu(), minlength=k)[:k]
        scarce = decoder_members < _MIN_DECODER_MEMBERS
        background_share = float((fit_labels == k).double().mean())
        if background_share > 0:
            labels_of = _background_labels(labels_of, decoding, offset, mean, ~scarce)
        decoding[scarce] = discriminants[scarce]
    else:
        decoding, decoder_members, background_share = discriminants, None, None
    decoding = decoding / decoding.norm(dim=1, keepdim=True).clamp_min(1e-300)
    step()  # the filters
    decoding = decoding.to(torch.float32)
    bias, scale = f1_thresholds(x, decoding, labels_of, k, mean, covariance, chunk_size, return_scale=True,
                                expected_rows=km.n_samples_)
    # the margin 1/||w_i||: the sigmoid calibrated to the cluster membership, so that
    # y_i = sigmoid(w_i . x - b_i) is a usable membership (refinement starts from it)
    decoding, bias = decoding * scale[:, None], bias * scale

    step()  # the thresholds
    if refine:
        from .detectors import refine_detectors, sample_rows

        sample = sample_rows(x, (refine_options or {}).get("sample_size", 65536), seed, chunk_size)
        opts = {key: v for key, v in (refine_options or {}).items() if key != "sample_size"}
        decoding, bias = refine_detectors(sample, decoding, bias, seed=seed, **opts)

    # Pooled within-cluster covariance: total minus the between-cluster part of the means.
    # The signal vectors are moments *within* the detections, so the filters that pair with
    # them are minimum-variance under the within covariance; with the total covariance an
    # error of the encoding along a distractor comes back ~var_total/var_within (x5 on the
    # paper's model) larger each round, with this one it comes back unchanged.
    shares = class_counts.to(torch.float64) / max(int(total), 1)
    centred_means = class_sums / class_counts.to(torch.float64).clamp_min(1)[:, None] - mean
    within = covariance.to(torch.float64) - (centred_means * shares[:, None]).T @ centred_means
    encoding, absent = _signal_vectors(x, decoding, bias, mean, chunk_size, km.n_samples_)
    step()  # the signal vectors
    for _ in range(alternations):
        filters = pattern_to_filter(encoding / encoding.norm(dim=1, keepdim=True), within)
        filters = (filters / filters.norm(dim=1, keepdim=True)).to(torch.float32)
        filter_bias = f1_thresholds(x, filters, labels_of, k, mean, covariance, chunk_size,
                                    expected_rows=km.n_samples_)
        update, _ = _signal_vectors(x, filters, filter_bias, mean, chunk_size, km.n_samples_)
        # Averaging successive estimates damps the oscillation of the alternation (an error
        # in the filters comes back transposed and with flipped sign in the signal vectors).
        encoding = 0.5 * (_unit(encoding) + _unit(update))
    # the encoding's scale: w_i . s_i = 1 with the decoding kept
    gain = (decoding.to(torch.float64) * encoding.to(torch.float64)).sum(1)
    encoding = (encoding.to(torch.float64) / gain[:, None]).to(torch.float32)
    absent = absent.levels(encoding)
    return ConceptBasis(
        decoding, bias, encoding, mean.to(torch.float32), absent_level=absent,
        layer=layer, model_id=model_id,
        metadata={
            "method": f"directional-clustering+{decoder}+f1-threshold+signal-vectors",
            "settings": settings,
            "n_samples": km.n_samples_,
            "cluster_objective": km.objective_,
            # the vMF mixture polish of the clustering (None: not run): its shared concentration
            # and EM iterations
            "vmf_polish": None if mixture is None else {"concentration": round(mixture.concentration, 4),
                                                        "iterations": mixture.n_iter},
            "whitened": whitened,
            "restart_agreement": {"whitened": agreement, "plain": plain_agreement},
            # per concept (the fit on all rows starts from the best restart's centroids, in
            # order): its cluster's mean overlap with its partners in the near-best restarts;
            # low where the clustering could as well have drawn the concept elsewhere
            "concept_agreement": None if per_concept is None else [round(float(v), 4) for v in per_concept],
            "decoder_members": None if decoder_members is None else decoder_members.tolist(),
            # share of the decoder sample's rows taken as background (background_filters)
            "background_share": background_share,
            # every activation >= 0 (a post-ReLU layer): edits are passed through a ReLU
            "nonnegative": bool(int(negatives) == 0),
        },
    )


def _background_labels(labels_of, filters, offset, mean, judged):
    """``labels_of`` with label K (no concept) for the rows that the logistic filter of their
    own cluster (raw coordinates: filters . (x - mean) - offset, as fit by
    ``background_filters``) does not place on its positive side; clusters not ``judged`` keep
    every member."""
    k = filters.shape[0]
    w = filters.to(torch.float32)
    threshold = torch.where(judged, offset, torch.full_like(offset, -math.inf)).to(torch.float32)
    mean = mean.to(torch.float32)

    def labels(chunk):
        own = labels_of(chunk)
        centred = chunk.to(torch.float32) - mean.to(chunk.device)
        score = (centred @ w.to(chunk.device).T).gather(1, own[:, None].long()).flatten()
        return torch.where(score > threshold.to(chunk.device)[own], own, torch.full_like(own, k))

    return labels


def _check_rows_read(read: int, expected: int, where: str) -> None:
    """A re-read stream must yield the rows the clustering's statistics pass counted."""
    if read != expected:
        raise ValueError(f"{where} read {read} rows of x, but the statistics pass read {expected}: "
                         "the stream changed between passes (it must yield the same rows every time)")


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _signal_vectors(x, decoding, bias, center, chunk_size, expected_rows):
    """(signal vectors (K, D) float64, the concepts' ``AbsentSums``) from one read of x."""
    moments = StreamingMoments(decoding, bias, center.to(decoding.device))
    absent = AbsentSums(decoding, bias, center)
    with fail_together("the signal-vector moments"):
        for chunk in iter_chunks(x, chunk_size, dim=decoding.shape[1]):
            moments.update(chunk)
            absent.update(chunk)
    absent.all_reduce()
    rows = torch.tensor([absent.rows], dtype=torch.float64)
    all_reduce_sum_(rows)
    _check_rows_read(int(rows), expected_rows, "the signal-vector pass")
    out = moments.all_reduce().signal_vectors()
    bad = torch.isnan(out).any(dim=1)
    if bool(bad.any()):
        # a detector that never fires: fall back to its direction (documented weak spot)
        out[bad] = decoding.to(torch.float64)[bad] / (decoding.to(torch.float64)[bad].norm(dim=1, keepdim=True) ** 2)
    return out, absent
