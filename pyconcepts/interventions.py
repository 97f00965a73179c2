"""Interventions on concepts at a layer (METHOD.md section 5).

With w_i (decoding), s_i (encoding), gain g_i = w_i . s_i and the latent factor
a_hat_i(x) = (w_i . x - w_i . mean) / g_i (``ConceptBasis.latent``):

- **set** concept i to t: ``x' = x + (t - a_hat_i(x)) s_i``, so that ``a_hat_i(x') = t``
  (this is METHOD.md's ``x + ((t' - w_i.x)/g_i) s_i`` with ``t' = t g_i + w_i . mean``: t is
  in the units of ``basis.latent``; t = 0 puts the concept at its average);
- **scale** concept i by c: ``x' = x + (c - 1) a_hat_i(x) s_i``;
- **remove** concept i: ``x' = x - m k s_i`` with ``k = strength * max(a_hat_i(x) - l_i, 0)``,
  where ``l_i`` is the concept's absent level (``basis.absent_level``: its mean latent factor
  where it is not detected; 0, the mean, for bases saved without it): the concept's excess over
  its level when absent is taken out, and a patch already at or below that level is left alone,
  so the edit never adds the concept. ``membership`` says where: ``"all"`` (the default of
  ``intervene``, ``counterfactual`` and ``rank_concepts``) edits every patch, weak occurrences
  below the detector's threshold too; ``"soft"`` (the default of ``correct``, the paper's
  suppression) weights the edit by the detector's membership ``m = sigmoid(w_i . x - b_i)``;
  ``"hard"`` by ``m = 1[w_i . x > b_i]``. The gated edits leave inputs without the concept
  alone, which a permanent correction wants; on a real network most of a concept's effect is in
  patches below the threshold (MTCNN RNet, ``benchmarks.real_network``: removing the top-5 face
  concepts lowers the face margin by 3.1 logits with ``"all"``, 1.6 with ``"soft"``; PCA's top 5
  2.8). The result is passed through a ReLU only when the layer's output is non-negative
  (post-ReLU maps: as recorded in the basis, ``metadata["nonnegative"]``, when it was
  extracted; for a basis without that record, when the edited batch is); ``clamp`` overrides
  this.
- **amplify** concept i by c: the removal's excess scaled instead of taken out,
  ``x' = x + (c - 1) m max(a_hat_i(x) - l_i, 0) s_i`` (c > 1 raises the concept where it is
  above its absent level, c = 0 removes it; with the same ``membership``). Unlike ``scale``,
  which multiplies the latent factor about the mean, it never moves a patch below that level.

Several concepts in one edit (one edit per concept):
1. remove and amplify: one concept after the other in index order (the order they are given
   in does not matter), each reading the row as the edits before it left it. Where a removed
   concept's signal vector raises another removed concept's filter, a concept removed earlier
   can come back in part; the last one is at its level. The joint rules tried did worse on a
   real layer: on MTCNN RNet (K = 16) the filters respond to other concepts' signal vectors at
   up to -1.5 per unit (condition number of the coupling 300), and removing every concept
   exactly to its level, or just below it, has no bounded solution (projected Gauss-Seidel
   diverges); summing the single removals instead, each read on the unedited patch, took out
   all but 3 of the 36,308 detections of all 16 concepts but created 31,116 new ones (one after
   the other: 571 remain, 4,296 created).
2. set and scale, on that result: each such concept's target t_i is computed from the
   unedited row, and ``x' = x - sum_j c_j s_j`` with c solving
   ``sum_j (w_i . s_j / g_i) c_j = a_hat_i(x) - t_i``, so that each lands exactly on its own
   target (one at a time, an edit along s_j would move every concept whose filter is not
   orthogonal to s_j), also where a removal moved it. A pseudo-inverse with a relative cutoff
   of 1e-6: concepts with nearly the same filters and signal vectors get a least-squares
   compromise, and targets far apart for such concepts take large edits. These edits can in
   turn move removed concepts off their level.
The final ReLU, where it applies, can move the latent factors off their targets.

``direction="decoding"`` replaces s_i by w_i / ||w_i||^2 (the paper's control: editing along
the filter instead of the signal vector).

``intervene`` is a context manager; ``correct`` installs a permanent suppression whose
parameters live in the layer's buffers, so they are saved in ``model.state_dict()``;
``restore_corrections`` re-installs them on a fresh model from such a state dict.
``rank_concepts`` orders concepts by the measured drop of a chosen output when each is
removed (or greedily, sets of concepts; or a first-order gradient estimate of the same drop).
``counterfactual`` and ``rank_concepts`` take ``output=`` for models that return tuples or
dicts (``pyconcepts.outputs``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .basis import (concept_index, concept_indices, layer_to_apply, recorded_clamp,
                    skip_tokens_to_apply)
from .outputs import OutputSpec, output_or_recorded, read_scores, scores_kind
from .taps import LayerTap, autograd_on, iter_batches, resolve_layer

__all__ = [
    "intervene", "correct", "counterfactual", "Correction", "Counterfactual",
    "restore_corrections", "edit_rows", "rank_concepts", "ConceptRanking",
]

_PREFIX = "pyconcepts_correction_"
_DIRECTIONS = ("encoding", "decoding")
_MEMBERSHIPS = ("soft", "hard", "all")


def _check_basis(basis):
    for name in ("decoding", "bias", "encoding", "mean"):
        if not hasattr(basis, name):
            raise TypeError(f"basis must be a ConceptBasis (it has no {name!r}), got {type(basis).__name__}")
    return basis


def _layer_name(basis, layer: Optional[str]) -> str:
    return layer_to_apply(basis, layer)


def _check_dim(basis_dim: int, rows: torch.Tensor, layer: str) -> None:
    if rows.shape[1] != basis_dim:
        raise ValueError(
            f"the basis has D = {basis_dim} but layer {layer!r} has {rows.shape[1]} channels; "
            "was the basis extracted at another layer or model?"
        )


def edit_rows(
    rows: torch.Tensor,
    decoding: torch.Tensor,
    bias: torch.Tensor,
    encoding: torch.Tensor,
    mean: torch.Tensor,
    *,
    set: Optional[Mapping[int, float]] = None,
    scale: Optional[Mapping[int, float]] = None,
    remove: Sequence[int] = (),
    strength: float = 1.0,
    direction: str = "encoding",
    clamp: Optional[bool] = None,
    membership: str = "all",
    absent_level: Optional[torch.Tensor] = None,
    amplify: Optional[Mapping[int, float]] = None,
) -> torch.Tensor:
    """Apply the section-5 edits to patch rows (N, D); indices are rows of the basis tensors.
    ``absent_level`` (K,): the latent level a removal lowers each concept to (None: 0, the
    mean). With several concepts (see the module docstring) the removals and amplifications
    are made one after the other in index order, then the set and scale edits land exactly on
    their targets. Differentiable in ``rows`` and in the basis tensors (not through a
    hard membership)."""
    _check_direction_membership(direction, membership)
    set, scale, amplify = dict(set or {}), dict(scale or {}), dict(amplify or {})
    removed = {int(i) for i in remove}
    edited = sorted({int(i) for i in (*set, *scale, *removed, *amplify)})
    if not edited:
        return rows
    w = decoding.to(device=rows.device, dtype=rows.dtype)[edited]
    b = bias.to(device=rows.device, dtype=rows.dtype)[edited]
    mu = mean.to(device=rows.device, dtype=rows.dtype)
    if direction == "encoding":
        s = encoding.to(device=rows.device, dtype=rows.dtype)[edited]
    else:
        s = w / (w * w).sum(1, keepdim=True)
    gain = (w * s).sum(1)
    offset = w @ mu
    level = (torch.zeros_like(gain) if absent_level is None
             else absent_level.to(device=rows.device, dtype=rows.dtype)[edited])
    nonneg = bool((rows.detach() >= 0).all()) if clamp is None else bool(clamp)
    x = rows
    # remove, amplify: one concept after the other, in index order (so the order they are
    # given in does not matter), each reading the row as the edits before it left it
    for j, i in enumerate(edited):
        if i not in removed and i not in amplify:
            continue
        latent = (x @ w[j] - offset[j]) / gain[j]
        excess = _gated_excess(latent, j, level, gain, offset, b, membership)
        factor = (float(amplify[i]) - 1.0 if i in amplify else 0.0) - (strength if i in removed else 0.0)
        x = x + (factor * excess)[:, None] * s[j]
    # set, scale, last: every such concept lands exactly on its target (a scale's from the
    # unedited row), all solved at once, whatever the removals did to it
    exact = [j for j, i in enumerate(edited) if i in set or i in scale]
    if exact:
        unedited = (rows @ w[exact].T - offset[exact]) / gain[exact]
        latent = unedited if x is rows else (x @ w[exact].T - offset[exact]) / gain[exact]
        drops = []
        for col, j in enumerate(exact):
            i, t = edited[j], unedited[:, col]
            if i in set:
                t = torch.full_like(t, float(set[i]))
            if i in scale:
                t = float(scale[i]) * t
            drops.append(latent[:, col] - t)
        drop = torch.stack(drops, 1)
        if len(exact) > 1:
            # moving along s_j changes concept i's latent factor by (w_i . s_j) / g_i per unit
            pick = torch.tensor(exact, device=rows.device)
            coupling = (w[pick] @ s[pick].T) / gain[pick][:, None]         # unit diagonal
            drop = drop @ torch.linalg.pinv(coupling.double(), rtol=1e-6).T.to(drop.dtype)
        x = x - drop @ s[exact]
    if nonneg:
        x = torch.relu(x)
    return x


def _check_direction_membership(direction: str, membership: str) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if membership not in _MEMBERSHIPS:
        raise ValueError(f"membership must be one of {_MEMBERSHIPS}, got {membership!r}")


def _gated_excess(t, j, level, gain, offset, b, membership):
    """Concept j's excess over its absent level at latent factor t, weighted by ``membership``."""
    excess = torch.clamp(t - level[j], min=0)
    if membership == "soft":
        return torch.sigmoid(gain[j] * t + offset[j] - b[j]) * excess
    if membership == "hard":
        return (gain[j] * t + offset[j] > b[j]).to(t.dtype) * excess
    return excess


def _finite_value(value, name: str, i: int, low: Optional[float] = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: the value for concept {i} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: the value for concept {i} must be finite, got {value!r}")
    if low is not None and v < low:
        raise ValueError(f"{name}: the value for concept {i} must be >= {low:g}, got {value!r}")
    return v


def _check_strength(strength) -> float:
    """A removal's strength: finite and >= 0 (a negative one would add the concept)."""
    try:
        v = float(strength)
    except (TypeError, ValueError):
        raise TypeError(f"strength must be a number, got {strength!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r} (a negative strength would "
                         "add the concept; amplify={i: factor} raises a concept where it is present)")
    return v


def _normalise_amplify(basis, amplify) -> Dict[int, float]:
    k = basis.decoding.shape[0]
    if amplify is not None and not isinstance(amplify, Mapping):
        raise TypeError(f"amplify must map concept indices to factors, e.g. {{3: 2.0}}, got {amplify!r}")
    return {concept_index(i, k, "amplify"): _finite_value(c, "amplify", i, low=0.0)
            for i, c in dict(amplify or {}).items()}


def _check_one_edit_each(removed: Sequence[int], amplified: Mapping[int, float], set_: Mapping[int, float],
                         scaled: Mapping[int, float], remove_name: str = "remove") -> None:
    """One edit per concept: two on the same concept would be applied one after the other
    (set and scale first, then removals and amplifications), so the result would be
    neither."""
    edits = ((remove_name, removed), ("amplify", amplified), ("set", set_), ("scale", scaled))
    for a in range(len(edits)):
        for b in range(a + 1, len(edits)):
            both = sorted(set(edits[a][1]) & set(edits[b][1]))
            if both:
                raise ValueError(f"concept {both[0]} is given to both {edits[a][0]}= and {edits[b][0]}=: "
                                 "give each concept one edit")


def _normalise_edits(basis, set, scale, remove, remove_name: str = "remove"):
    k = basis.decoding.shape[0]
    set_ = {}
    for i, t in dict(set or {}).items():
        set_[concept_index(i, k, "set")] = _finite_value(t, "set", i)
    scale_ = {}
    for i, c in dict(scale or {}).items():
        scale_[concept_index(i, k, "scale")] = _finite_value(c, "scale", i)
    remove_ = concept_indices(remove, k, remove_name)
    return set_, scale_, remove_


class _EditHook:
    def __init__(self, tap: LayerTap, basis, set_, scale_, remove_, strength, direction, clamp,
                 membership="all", amplify_=None):
        self.tap, self.basis = tap, basis
        self.kwargs = dict(set=set_, scale=scale_, remove=remove_, strength=strength,
                           direction=direction, clamp=clamp, membership=membership, amplify=amplify_)

    def __call__(self, module, inputs, output):
        tap = self.tap
        tap.shape = tap._describe(output)
        rows = tap.to_rows(output)
        _check_dim(self.basis.decoding.shape[1], rows, tap.layer)
        new = edit_rows(rows, self.basis.decoding, self.basis.bias, self.basis.encoding,
                        self.basis.mean, absent_level=getattr(self.basis, "absent_level", None),
                        **self.kwargs)
        return tap.from_rows(new, output)


@contextlib.contextmanager
def intervene(
    model: nn.Module,
    basis,
    *,
    layer: Optional[str] = None,
    set: Optional[Mapping[int, float]] = None,
    remove: Union[int, Sequence[int], None] = None,
    scale: Optional[Mapping[int, float]] = None,
    strength: float = 1.0,
    direction: str = "encoding",
    clamp: Optional[bool] = None,
    skip_tokens: Optional[int] = None,
    membership: str = "all",
    amplify: Optional[Mapping[int, float]] = None,
):
    """Within the ``with`` block, ``model`` sees edited activations at ``layer`` (default: the
    layer recorded in the basis). ``set={i: t}`` sets latent factors, ``scale={i: c}`` scales
    them (about the mean), ``remove=[i, ...]`` lowers concepts to their absent level (by
    ``strength`` >= 0 of their excess over it), ``amplify={i: c}`` multiplies their excess over
    that level by c (c > 1 raises the concept where it is above its level, 0 removes it);
    ``membership``: where removal and amplification act ('all', every patch; 'soft' or
    'hard', weighted by the detector). With several concepts, set and scale are solved
    jointly so that each lands on its target, and removals and amplifications are made one
    after the other in index order (see the module docstring). Yields the model."""
    basis = _check_basis(basis)
    _check_direction_membership(direction, membership)
    strength = _check_strength(strength)
    set_, scale_, remove_ = _normalise_edits(basis, set, scale, remove)
    amplify_ = _normalise_amplify(basis, amplify)
    if not (set_ or scale_ or remove_ or amplify_):
        raise ValueError("nothing to change: give remove=, set=, scale= or amplify=")
    _check_one_edit_each(remove_, amplify_, set_, scale_)
    tap = LayerTap(model, _layer_name(basis, layer), skip_tokens=skip_tokens_to_apply(basis, skip_tokens))
    handle = tap.module.register_forward_hook(
        _EditHook(tap, basis, set_, scale_, remove_, strength, direction, recorded_clamp(basis, clamp),
                  membership, amplify_))
    try:
        yield model
    finally:
        handle.remove()


# --------------------------------------------------------------------------- corrections
class _CorrectionHook:
    """Reads its parameters from the layer's buffers at every call, so that loading a state
    dict (which copies into those buffers) updates the correction too."""

    def __init__(self, layer_name: str, skip_tokens: int):
        self.layer_name = layer_name
        self.skip_tokens = skip_tokens

    def __call__(self, module, inputs, output):
        get = lambda name: getattr(module, _PREFIX + name)  # noqa: E731
        tap = LayerTap.__new__(LayerTap)
        tap.layer, tap.skip_tokens, tap.token_grid, tap.shape = self.layer_name, self.skip_tokens, None, None
        rows = tap.to_rows(output)
        decoding = get("decoding")
        _check_dim(decoding.shape[1], rows, self.layer_name)
        direction = _DIRECTIONS[int(get("direction"))]
        clamp_code = int(get("clamp"))
        # corrections saved before the membership option existed are soft
        code = int(get("membership")) if hasattr(module, _PREFIX + "membership") else 0
        # ... and remove down to the mean
        level = get("absent_level") if hasattr(module, _PREFIX + "absent_level") else None
        new = edit_rows(
            rows, decoding, get("bias"), get("encoding"), get("mean"), absent_level=level,
            remove=list(range(decoding.shape[0])), strength=float(get("strength")),
            direction=direction, clamp=None if clamp_code < 0 else bool(clamp_code),
            membership=_MEMBERSHIPS[code],
        )
        return tap.from_rows(new, output)


class Correction:
    """A permanent suppression hook on one layer. ``remove()`` takes it (and its buffers) off."""

    def __init__(self, module: nn.Module, handle, layer: str, concepts: List[int]):
        self.module, self._handle, self.layer, self.concepts = module, handle, layer, concepts

    @property
    def active(self) -> bool:
        return self._handle is not None

    def remove(self) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        for name in list(self.module._buffers):
            if name.startswith(_PREFIX):
                del self.module._buffers[name]
        if hasattr(self.module, "_pyconcepts_correction"):
            del self.module._pyconcepts_correction

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Correction(layer={self.layer!r}, concepts={self.concepts}, {state})"


def _install(model: nn.Module, layer: str, tensors: Dict[str, torch.Tensor], skip_tokens: int,
             concepts: List[int]) -> Correction:
    module = resolve_layer(model, layer)
    if getattr(module, "_pyconcepts_correction", None) is not None:
        raise RuntimeError(f"layer {layer!r} already carries a correction; remove() it first")
    for name, value in tensors.items():
        module.register_buffer(_PREFIX + name, value)
    handle = module.register_forward_hook(_CorrectionHook(layer, skip_tokens))
    correction = Correction(module, handle, layer, concepts)
    module._pyconcepts_correction = correction
    return correction


def correct(
    model: nn.Module,
    basis,
    concepts: Union[int, Sequence[int]],
    *,
    layer: Optional[str] = None,
    strength: float = 1.0,
    direction: str = "encoding",
    clamp: Optional[bool] = None,
    skip_tokens: Optional[int] = None,
    membership: str = "soft",
) -> Correction:
    """Suppress ``concepts`` at ``layer`` from now on (model correction, METHOD.md s. 5).

    The concepts' directions are stored as buffers of the layer module (names starting with
    ``pyconcepts_correction_``), so ``model.state_dict()`` carries the correction; use
    ``restore_corrections(model, state_dict)`` on a fresh model before ``load_state_dict``.
    """
    basis = _check_basis(basis)
    _check_direction_membership(direction, membership)
    strength = _check_strength(strength)
    _, _, idx = _normalise_edits(basis, None, None, concepts, "concepts")
    if not idx:
        raise ValueError("concepts is empty: name at least one concept to suppress")
    # stored, and so removed one after the other, in index order, as intervene removes them
    idx = sorted(set(idx))
    name = _layer_name(basis, layer)
    device = next((p.device for p in model.parameters()), basis.decoding.device)
    sel = torch.tensor(idx, dtype=torch.long)
    pick = lambda t: t.detach().cpu()[sel].clone().to(device)  # noqa: E731
    tensors = {
        "decoding": pick(basis.decoding), "bias": pick(basis.bias), "encoding": pick(basis.encoding),
        "mean": basis.mean.detach().clone().to(device),
        "strength": torch.tensor(float(strength), device=device),
        "direction": torch.tensor(_DIRECTIONS.index(direction), device=device),
        "clamp": torch.tensor(-1 if recorded_clamp(basis, clamp) is None else int(recorded_clamp(basis, clamp)),
                              device=device),
        "membership": torch.tensor(_MEMBERSHIPS.index(membership), device=device),
    }
    if getattr(basis, "absent_level", None) is not None:
        tensors["absent_level"] = pick(basis.absent_level)
    return _install(model, name, tensors, skip_tokens_to_apply(basis, skip_tokens), idx)


def restore_corrections(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                        skip_tokens: int = 0) -> List[Correction]:
    """Re-install the corrections recorded in ``state_dict`` (from a corrected model) on
    ``model``, so that ``model.load_state_dict(state_dict)`` then succeeds."""
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        head, _, leaf = key.rpartition(".")
        if leaf.startswith(_PREFIX):
            layers.setdefault(head, {})[leaf[len(_PREFIX):]] = value.detach().clone()
    out = []
    for layer, tensors in layers.items():
        missing = {"decoding", "bias", "encoding", "mean", "strength", "direction", "clamp"} - set(tensors)
        if missing:
            raise ValueError(f"state_dict has an incomplete correction at {layer!r} (missing {sorted(missing)})")
        out.append(_install(model, layer, tensors, skip_tokens, list(range(tensors["decoding"].shape[0]))))
    return out


# ------------------------------------------------------------------------ counterfactuals
@dataclass
class Counterfactual:
    """Predictions of a batch with and without an intervention."""

    logits_before: torch.Tensor
    logits_after: torch.Tensor

    @property
    def probs_before(self) -> torch.Tensor:
        return self.logits_before.softmax(-1)

    @property
    def probs_after(self) -> torch.Tensor:
        return self.logits_after.softmax(-1)

    @property
    def pred_before(self) -> torch.Tensor:
        return self.logits_before.argmax(-1)

    @property
    def pred_after(self) -> torch.Tensor:
        return self.logits_after.argmax(-1)

    @property
    def changed(self) -> torch.Tensor:
        """(B,) bool: the predicted class changed."""
        return self.pred_before != self.pred_after

    def __repr__(self) -> str:
        """A summary (the tensors hold one row per image: print the attributes for them)."""
        before, after = self.logits_before, self.logits_after
        tensors = ("tensors: logits_before, logits_after, probs_before, probs_after, pred_before, "
                   "pred_after, changed")
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                and before.dim() == 2 and before.shape == after.shape):
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (before, after)]
            return f"Counterfactual(logits_before {shapes[0]}, logits_after {shapes[1]}; {tensors})"
        n, classes = before.shape
        if n == 0 or classes == 0:
            return f"Counterfactual(0 images, {classes} classes; {tensors})"
        rows = torch.arange(n, device=before.device)
        pred = self.pred_before
        dp = (self.probs_after[rows, pred] - self.probs_before[rows, pred]).float().mean()
        changed = int(self.changed.sum())
        return (f"Counterfactual({n} image{'s' if n != 1 else ''}, {classes} classes: {changed} prediction"
                f"{'s' if changed != 1 else ''} changed, predicted class's probability {float(dp):+.3f} on "
                f"average; {tensors})")


def counterfactual(
    model: nn.Module,
    basis,
    images,
    concepts: Union[int, Sequence[int], None] = None,
    *,
    layer: Optional[str] = None,
    set: Optional[Mapping[int, float]] = None,
    scale: Optional[Mapping[int, float]] = None,
    strength: float = 1.0,
    direction: str = "encoding",
    batch_size: Optional[int] = None,
    skip_tokens: Optional[int] = None,
    membership: str = "all",
    output: OutputSpec = None,
    amplify: Optional[Mapping[int, float]] = None,
) -> Counterfactual:
    """The model's outputs on ``images`` as they are and with ``concepts`` removed (or with
    the ``set`` / ``scale`` / ``amplify`` edits of ``intervene``). ``images``: a tensor
    (B, C, H, W) or an iterable of batches.
    ``output``: which part of the model's output holds the class scores (an index, a key or
    a callable; ``pyconcepts.outputs``). A model that ends in probabilities is recorded as
    log-probabilities, so ``probs_before`` / ``probs_after`` are its own probabilities."""
    basis = _check_basis(basis)
    output = output_or_recorded(output, basis)
    strength = _check_strength(strength)
    set_, scale_, remove_ = _normalise_edits(basis, set, scale, concepts, "concepts")  # before any forward pass
    amplify_ = _normalise_amplify(basis, amplify)
    if not (set_ or scale_ or remove_ or amplify_):
        raise ValueError("nothing to change: give concepts to remove, or set=, scale= or amplify= edits")
    _check_one_edit_each(remove_, amplify_, set_, scale_, "concepts")
    _check_direction_membership(direction, membership)
    tap = LayerTap(model, _layer_name(basis, layer), skip_tokens=skip_tokens_to_apply(basis, skip_tokens))
    # the hook intervene installs, built once: the layer and skip_tokens were checked (and
    # warned of) above, and no warnings filter is touched per batch (that would reset Python's
    # once-per-location memory and repeat the model's own warnings for every batch)
    edit_hook = _EditHook(tap, basis, set_, scale_, remove_, strength, direction, recorded_clamp(basis, None),
                          membership, amplify_)
    before, after = [], []
    kind = "auto"
    with tap.eval_mode(), torch.no_grad():
        seen = 0
        for batch in iter_batches(images, batch_size):
            batch = tap._check_images(batch, seen)
            seen += batch.shape[0]
            raw = read_scores(model(batch), output, "logits")
            if kind == "auto":
                kind = scores_kind(raw)
            before.append(read_scores(raw, None, kind).float().cpu())
            handle = tap.module.register_forward_hook(edit_hook)
            try:
                after.append(read_scores(model(batch), output, kind).float().cpu())
            finally:
                handle.remove()
    if not before:
        raise ValueError("images is empty")
    return Counterfactual(torch.cat(before), torch.cat(after))


# ------------------------------------------------------------------------------ ranking
_RANK_METHODS = ("removal", "gradient")


@dataclass
class ConceptRanking:
    """Concepts ordered by their effect on an output, largest first.

    ``concepts``: basis indices; ``effects``: (len(concepts),) the mean drop of the score over
    the images when the concept is removed (``method='removal'``: measured;
    ``'gradient'``: its first-order estimate, the removal's change of the layer dotted with
    the score's gradient). With ``greedy`` the i-th effect is the drop when the first i + 1
    concepts are removed together.

    A plain (not greedy) removal ranking also measures, in the same forward passes and in the
    same order: ``abs_effects`` (the mean |change| of the score), ``class_effects``
    (len(concepts), C) the mean change of every class's log-odds log(p / (1 - p)) (> 0: the
    removal raises that class, so the concept holds it down), ``flip_rates`` (the share of
    images whose top class changes), ``image_effects`` (len(concepts), N) each image's drop
    of the score and ``image_predictions`` (len(concepts), N) its top class after the
    removal; ``predicted`` (N,) is each image's top class before any removal and
    ``base_scores`` (N,) its score then (so that the score after removing ``concepts[j]`` is
    ``base_scores - image_effects[j]``). They are None for the gradient and greedy rankings."""

    concepts: List[int]
    effects: torch.Tensor
    method: str
    greedy: bool
    base_score: float
    abs_effects: Optional[torch.Tensor] = None
    class_effects: Optional[torch.Tensor] = None
    flip_rates: Optional[torch.Tensor] = None
    image_effects: Optional[torch.Tensor] = None
    predicted: Optional[torch.Tensor] = None
    base_scores: Optional[torch.Tensor] = None
    image_predictions: Optional[torch.Tensor] = None


def log_odds(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B,) log(p / (1 - p)) of class ``classes[b]`` under softmax(scores[b]): its score minus
    the log-sum-exp of the other classes' scores. Exact where p rounds to 1 in float32, so a
    confident model's changes still show (a probability saturates)."""
    own = scores.gather(1, classes[:, None].long())[:, 0]
    others = scores.scatter(1, classes[:, None].long(), float("-inf"))
    return own - torch.logsumexp(others, dim=1)


def every_log_odds(scores: torch.Tensor) -> torch.Tensor:
    """(B, C) float64 log(p_j / (1 - p_j)) of every class: below the top class (p <= 1/2) from
    log p - log1p(-p), for the top class as in ``log_odds`` (exact where its p rounds to 1)."""
    s = scores.double()
    logp = torch.log_softmax(s, dim=1)
    out = logp - torch.log1p(-logp.exp().clamp(max=0.5))
    top = s.argmax(1)
    out[torch.arange(s.shape[0]), top] = log_odds(s, top)
    return out


def _score_fn(target, n_classes: int):
    """score(logits (B, C), predicted (B,)) -> (B,)."""
    if isinstance(target, str):
        if target != "predicted":
            raise ValueError(f"target must be a class index, a callable or 'predicted', got {target!r}")
        return lambda logits, predicted: log_odds(logits.float(), predicted)
    if callable(target):
        return lambda logits, predicted: target(logits)
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"target must be a class index (int), a callable on the (B, C) logits or "
                        f"'predicted', got {target!r}")
    if not -n_classes <= target < n_classes:
        raise IndexError(f"target {target} is out of range for {n_classes} classes")
    return lambda logits, predicted: logits[:, target]


def rank_concepts(
    model: nn.Module,
    basis,
    images,
    *,
    target,
    layer: Optional[str] = None,
    output: OutputSpec = None,
    method: str = "removal",
    greedy: int = 0,
    concepts: Optional[Sequence[int]] = None,
    strength: float = 1.0,
    direction: str = "encoding",
    membership: str = "all",
    batch_size: Optional[int] = None,
    skip_tokens: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ConceptRanking:
    """Rank concepts by their effect on a chosen output of ``model`` over ``images``.

    ``target``: a class index (its logit; the log-probability for a model that ends in
    probabilities), a callable ``f(logits (B, C)) -> (B,)`` (e.g. a margin), or
    ``'predicted'``: each image's log-odds of the class the unedited model predicts for it
    (how much the concept supports the model's own decisions).
    ``output``: which part of the model's output holds the class scores (index, key or
    callable). ``method='removal'`` removes each concept (as ``intervene(remove=...)`` does,
    with the same ``strength``, ``direction`` and ``membership``) and measures the drop of the
    mean score; ``greedy=m`` instead picks m concepts one at a time, each the one whose
    removal together with those already picked lowers the score most. ``method='gradient'``
    estimates each removal's drop to first order from one backward pass per batch.
    ``concepts`` restricts the candidates (default: all). ``progress(done, total)`` is called
    once before the first pass over the images (done 0, with removals) and after each removal
    measured. The layer's activations of every image are held in memory.
    Returns a ``ConceptRanking``."""
    basis = _check_basis(basis)
    output = output_or_recorded(output, basis)
    if method not in _RANK_METHODS:
        raise ValueError(f"method must be one of {_RANK_METHODS}, got {method!r}")
    _check_direction_membership(direction, membership)
    strength = _check_strength(strength)
    if isinstance(greedy, bool) or not isinstance(greedy, int) or greedy < 0:
        raise ValueError(f"greedy must be a non-negative int (the number of concepts to pick), got {greedy!r}")
    if greedy and method != "removal":
        raise ValueError("greedy ranking measures removals: use method='removal'")
    if isinstance(target, str) and target != "predicted":
        raise ValueError(f"target must be a class index, a callable or 'predicted', got {target!r}")
    k = basis.decoding.shape[0]
    candidates = (list(range(k)) if concepts is None
                  else _normalise_edits(basis, None, None, concepts, "concepts")[2])
    if not candidates:
        raise ValueError("concepts is empty: name at least one concept to rank")
    greedy = min(greedy, len(candidates))
    tap = LayerTap(model, _layer_name(basis, layer), skip_tokens=skip_tokens_to_apply(basis, skip_tokens))
    edit = dict(strength=float(strength), direction=direction, membership=membership,
                absent_level=getattr(basis, "absent_level", None), clamp=recorded_clamp(basis, None))
    batches, kind, score = [], "auto", None
    seen = 0
    if progress is not None and method == "removal":  # the unedited pass below is part of the work
        progress(0, sum(len(candidates) - r for r in range(greedy)) if greedy else len(candidates))
    for batch in iter_batches(images, batch_size):
        batch = tap._check_images(batch, seen)
        seen += batch.shape[0]
        with torch.no_grad():
            acts = tap.activations(batch)
            value = tap.forward_with(batch, lambda out: out)
        raw = read_scores(value, output, "logits")
        if score is None:  # the output and the target are checked on the first batch
            kind = scores_kind(raw)
            score = _score_fn(target, raw.shape[1])
        logits = read_scores(raw, None, kind).float()
        predicted = logits.argmax(1)
        base = score(logits, predicted).float()
        if base.shape != (batch.shape[0],):
            raise ValueError(f"target must give one score per image ({batch.shape[0]}), got shape {tuple(base.shape)}")
        _check_dim(basis.decoding.shape[1], tap.to_rows(acts), tap.layer)
        # the layer's output only: its rows are laid out again per removal (a copy per batch
        # would double what the ranking holds)
        batches.append((batch, acts, base, predicted, every_log_odds(logits)))
    if not batches:
        raise ValueError("images is empty")
    n_images = sum(b[0].shape[0] for b in batches)
    base_score = float(sum(b[2].sum() for b in batches) / n_images)
    tensors = (basis.decoding, basis.bias, basis.encoding, basis.mean)
    n = len(candidates)
    total_steps = (sum(n - r for r in range(greedy)) if greedy else n) if method == "removal" else len(batches)
    done = [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(done[0], total_steps)

    def removal(removed: List[int], detail: bool = False):
        """The mean drop of the score when ``removed`` are removed; with ``detail`` also the
        mean |drop|, the mean change of every class's log-odds and the share of flips."""
        total, total_abs, flips, classes, per_image, tops = 0.0, 0.0, 0, None, [], []
        with torch.no_grad():
            for batch, acts, base, predicted, odds in batches:
                new = tap.from_rows(edit_rows(tap.to_rows(acts), *tensors, remove=removed, **edit), acts)
                logits = read_scores(tap.forward_with(batch, lambda _: new), output, kind).float()
                change = base - score(logits, predicted).float()
                total += float(change.sum())
                if detail:
                    total_abs += float(change.abs().sum())
                    flips += int((logits.argmax(1) != predicted).sum())
                    shift = (every_log_odds(logits) - odds).sum(0)
                    classes = shift if classes is None else classes + shift
                    per_image.append(change.detach().cpu())
                    tops.append(logits.argmax(1).cpu())
        step()
        if not detail:
            return total / n_images
        return (total / n_images, total_abs / n_images, classes / n_images, flips / n_images,
                torch.cat(per_image), torch.cat(tops))

    if method == "gradient":
        effects = torch.zeros(len(candidates), dtype=torch.float64)
        for batch, acts, _, predicted, _ in batches:
            rows = tap.to_rows(acts)
            with autograd_on(model, "rank_concepts(method='gradient')"):
                leaf = acts.detach().float().clone().requires_grad_(True)
                out = tap.forward_with(batch, lambda o: leaf.to(o.dtype))
                score(read_scores(out, output, kind).float(), predicted).float().sum().backward()
            grads = tap.to_rows(leaf.grad).double()
            rows_f = rows.float()
            for j, c in enumerate(candidates):
                delta = (rows_f - edit_rows(rows_f, *tensors, remove=[c], **edit)).double()
                effects[j] += float((delta * grads).sum())
            step()
        effects = (effects / n_images).float()
        order = torch.argsort(effects, descending=True, stable=True)
        return ConceptRanking([candidates[i] for i in order], effects[order], method, False, base_score)
    if greedy:
        chosen: List[int] = []
        effects_g: List[float] = []
        for _ in range(greedy):
            trials = [(removal(chosen + [c]), c) for c in candidates if c not in chosen]
            best = max(trials, key=lambda t: t[0])
            chosen.append(best[1])
            effects_g.append(best[0])
        return ConceptRanking(chosen, torch.tensor(effects_g), method, True, base_score)
    measured = [removal([c], detail=True) for c in candidates]
    effects = torch.tensor([m[0] for m in measured])
    order = torch.argsort(effects, descending=True, stable=True)
    return ConceptRanking(
        [candidates[i] for i in order], effects[order], method, False, base_score,
        abs_effects=torch.tensor([measured[i][1] for i in order]),
        class_effects=torch.stack([measured[i][2] for i in order]).float(),
        flip_rates=torch.tensor([measured[i][3] for i in order]),
        image_effects=torch.stack([measured[i][4] for i in order]),
        predicted=torch.cat([b[3].cpu() for b in batches]),
        base_scores=torch.cat([b[2].detach().cpu() for b in batches]),
        image_predictions=torch.stack([measured[i][5] for i in order]),
    )
