"""The report's measurements, streamed over an image source in one pass.

Per concept, memory stays bounded whatever the number of images: counts, a histogram of the
detector score, the running top patches (one per image), the running top detection maps
(h x w each), intersections and unions with ground-truth masks. After the pass, the effect of
removing each concept is measured by ``pyconcepts.rank_concepts(target='predicted')`` on a
seeded sample of at most ``influence_images`` images (held in memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..interventions import rank_concepts
from ..outputs import OutputSpec, as_is, check_output_spec, read_scores
from ..taps import LayerTap, autograd_on

__all__ = ["OutputSelected", "ReceptiveField", "receptive_field", "Measurements", "measure"]


# ------------------------------------------------------------------------------ outputs
class OutputSelected(nn.Module):
    """``model`` whose forward returns only its class logits, read with
    ``pyconcepts.outputs.read_scores`` (``output`` picks them from a tuple/dict; probabilities
    become log-probabilities). Its layer names are the model's with the prefix ``inner.``, so
    taps, interventions and RCAV work through it."""

    def __init__(self, model: nn.Module, output: OutputSpec):
        super().__init__()
        self.inner = model
        self.output = check_output_spec(output)

    def forward(self, x):
        return read_scores(self.inner(x), self.output)


# ----------------------------------------------------------------------- receptive field
@dataclass
class ReceptiveField:
    """Where a position of the layer's grid looks in the input.

    The patch at grid cell (r, c) is centred at ``(centre_y + (r - r0) * stride_y,
    centre_x + (c - c0) * stride_x)`` input pixels; ``size`` is the side of the square around
    that centre holding ``mass`` of the gradient of the cell's activation with respect to the
    input (measured at the centre cell (r0, c0)); ``extent`` is the (height, width) of the
    region where that gradient is non-zero (the theoretical receptive field, clipped to the
    image)."""

    size: int
    extent: Tuple[int, int]
    stride: Tuple[float, float]
    centre: Tuple[float, float]
    cell: Tuple[int, int]
    input_size: Tuple[int, int]
    mass: float
    method: str

    # crops show at least this many input pixels a side (or the whole input): a receptive field
    # of a few pixels (8 x 8 of a 24 x 24 face) is unreadable without its surroundings
    MIN_CROP = 32

    @property
    def crop_side(self) -> int:
        return max(self.size, min(self.MIN_CROP, max(self.input_size)))

    def box(self, r: int, c: int, scale: Tuple[float, float] = (1.0, 1.0)) -> Tuple[int, int, int, int]:
        """(top, left, bottom, right) of cell (r, c)'s crop in a picture ``scale`` times the
        input size: a square of side ``size`` slid to stay inside the picture (so every crop
        has the same size and still holds the cell's centre)."""
        h, w = self.input_size
        sy, sx = scale
        side_y = max(1, min(round(self.crop_side * sy), round(h * sy)))
        side_x = max(1, min(round(self.crop_side * sx), round(w * sx)))
        cy = (self.centre[0] + (r - self.cell[0]) * self.stride[0]) * sy
        cx = (self.centre[1] + (c - self.cell[1]) * self.stride[1]) * sx
        top = int(round(cy - side_y / 2))
        left = int(round(cx - side_x / 2))
        top = min(max(top, 0), round(h * sy) - side_y)
        left = min(max(left, 0), round(w * sx) - side_x)
        return top, left, top + side_y, left + side_x

    def cell_box(self, r: int, c: int, scale: Tuple[float, float] = (1.0, 1.0)) -> Tuple[int, int, int, int]:
        """(top, left, bottom, right) of the stride-sized cell itself."""
        sy, sx = scale
        cy = (self.centre[0] + (r - self.cell[0]) * self.stride[0]) * sy
        cx = (self.centre[1] + (c - self.cell[1]) * self.stride[1]) * sx
        hy, hx = self.stride[0] * sy / 2, self.stride[1] * sx / 2
        return int(round(cy - hy)), int(round(cx - hx)), int(round(cy + hy)), int(round(cx + hx))

    def describe(self) -> str:
        how = {"gradient": f"the square around each patch holding {self.mass:.0%} of the gradient of its "
                           "activation with respect to the input",
               "stride": "the patch's own cell (input size / grid size): the gradient was zero"}[self.method]
        side = self.crop_side
        # a crop stays inside the input: on a rectangular input it is cut to the shorter side
        dims = f"{min(side, self.input_size[0])} x {min(side, self.input_size[1])}"
        if side >= max(self.input_size) and side > self.size:
            crop = (f"whole {self.input_size[0]} x {self.input_size[1]} px inputs (crops show at least "
                    f"{self.MIN_CROP} px a side, for context); the square each patch reads is {self.size} x {self.size} px "
                    f"(not drawn)")
        elif side > self.size:
            crop = (f"{dims} px crops of {self.input_size[0]} x {self.input_size[1]} inputs (at least "
                    f"{self.MIN_CROP} px a side, for context); the square each patch reads is {self.size} x {self.size} px "
                    f"(not drawn)")
        else:
            crop = f"{dims} px crops of {self.input_size[0]} x {self.input_size[1]} inputs"
        return (f"{crop}: {how} "
                f"(theoretical receptive field {self.extent[0]} x {self.extent[1]} px, stride "
                f"{self.stride[0]:g} x {self.stride[1]:g} px)")


class _Stop(Exception):
    pass


def receptive_field(tap: LayerTap, images: torch.Tensor, grid: Tuple[int, int], mass: float = 0.9) -> ReceptiveField:
    """Measure the layer's receptive field on ``images`` (a few model inputs, (n, C, H, W)):
    the gradient of the centre cell's summed activation with respect to the input, its
    absolute values summed over images and channels."""
    h, w = grid
    big_h, big_w = images.shape[-2:]
    stride = (big_h / h, big_w / w)
    r0, c0 = h // 2, w // 2
    captured = {}

    def grab(out):
        captured["rows"] = tap.to_rows(out)
        raise _Stop()

    with autograd_on(tap.model, "the receptive field"), tap.eval_mode(), tap.frozen(), tap.hook(grab):
        x = images.detach().to(tap.device, torch.float32).clone().requires_grad_(True)
        try:
            tap.model(x)
        except _Stop:
            pass
        rows = captured["rows"].reshape(x.shape[0], h * w, -1)
        grad = torch.autograd.grad(rows[:, r0 * w + c0].float().sum(), x, allow_unused=True)[0]
    default_centre = ((r0 + 0.5) * stride[0], (c0 + 0.5) * stride[1])
    if grad is None or not bool(torch.isfinite(grad).all()) or float(grad.abs().sum()) == 0.0:
        side = max(1, int(round(max(stride))))
        return ReceptiveField(side, (side, side), stride, default_centre, (r0, c0), (big_h, big_w), mass, "stride")
    g = grad.detach().abs().sum((0, 1)).double().cpu()             # (H, W)
    nz = torch.nonzero(g > 0)
    extent = (int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1))
    total = float(g.sum())
    ys = torch.arange(big_h, dtype=torch.float64) + 0.5
    xs = torch.arange(big_w, dtype=torch.float64) + 0.5
    cy = float((g.sum(1) * ys).sum() / total)
    cx = float((g.sum(0) * xs).sum() / total)
    # the smallest centred square holding `mass` of the gradient (at least one cell)
    size = max(big_h, big_w)
    for side in range(max(1, int(math.floor(min(stride)))), max(big_h, big_w) + 1):
        top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
        inside = g[max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)].sum()
        if float(inside) >= mass * total:
            size = side
            break
    # a token grid's cell is where its patch was embedded: the grid geometry, exactly (attention
    # spreads the centre cell's gradient over the image, and its centre of mass drifts)
    centre = default_centre if tap.shape is not None and tap.shape.kind == "tokens" else (cy, cx)
    return ReceptiveField(size, extent, stride, centre, (r0, c0), (big_h, big_w), mass, "gradient")


# --------------------------------------------------------------------------- streaming
class _SymmetricHistogram:
    """Per-concept histograms of values on bins of width ``w_i`` symmetric about 0 (the
    detector's threshold). When a value falls outside +-``half * w_i``, adjacent bins merge
    pairwise and the width doubles, so the histogram is exact for its bins in one pass."""

    def __init__(self, k: int, half: int = 32):
        self.k, self.half = k, half
        self.counts = torch.zeros(k, 2 * half, dtype=torch.int64)
        self.width = torch.zeros(k, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().cpu()
        if values.numel() == 0:
            return
        top = values.abs().amax(0)                                  # (K,)
        for i in range(self.k):
            if self.width[i] == 0:
                need = max(float(top[i]), 1e-6) / self.half
                self.width[i] = 2.0 ** math.ceil(math.log2(need))
            while float(top[i]) >= self.half * float(self.width[i]):
                c = self.counts[i]
                # bins [-half*w, half*w) -> pairs merge toward the centre, outer half empties
                merged = c.reshape(-1, 2).sum(1)                    # (half,) covering the same range
                new = torch.zeros_like(c)
                new[self.half // 2: self.half // 2 + self.half] = merged
                self.counts[i] = new
                self.width[i] *= 2
        idx = torch.floor(values / self.width).long() + self.half   # (N, K)
        idx = idx.clamp(0, 2 * self.half - 1) + torch.arange(self.k)[None, :] * (2 * self.half)
        self.counts += torch.bincount(idx.flatten(), minlength=self.k * 2 * self.half).reshape(self.k, -1)

    def edges(self, i: int) -> torch.Tensor:
        return (torch.arange(2 * self.half + 1, dtype=torch.float64) - self.half) * self.width[i]


class _RunningTop:
    """Per concept, the ``size`` largest values seen so far with their image index and
    payload (position, latent factor, map...)."""

    def __init__(self, k: int, size: int):
        self.size = size
        self.values = torch.full((k, 0), -math.inf)
        self.index = torch.zeros((k, 0), dtype=torch.int64)
        self.payload: Dict[str, torch.Tensor] = {}

    def update(self, values: torch.Tensor, index: torch.Tensor, **payload: torch.Tensor) -> None:
        """values (B, K); index (B,); each payload (B, K, ...)."""
        k = values.shape[1]
        vals = torch.cat([self.values, values.T.float()], 1)
        idx = torch.cat([self.index, index[None, :].expand(k, -1)], 1)
        keep = vals.topk(min(self.size, vals.shape[1]), dim=1).indices         # (K, size)
        self.values = vals.gather(1, keep)
        self.index = idx.gather(1, keep)
        for name, new in payload.items():
            new = new.transpose(0, 1)                                          # (K, B, ...)
            old = self.payload.get(name)
            both = new if old is None else torch.cat([old, new.to(old.dtype)], 1)
            gather = keep.reshape(*keep.shape, *([1] * (both.dim() - 2))).expand(-1, -1, *both.shape[2:])
            self.payload[name] = both.gather(1, gather)


@dataclass
class Measurements:
    """Everything the report shows, per concept i (K concepts, C classes, M masks)."""

    n_images: int
    grid: Tuple[int, int]
    input_size: Tuple[int, int]
    n_classes: int
    patches_fired: torch.Tensor           # (K,) patches where detector i fires
    images_fired: torch.Tensor            # (K,) images with at least one such patch
    histogram: _SymmetricHistogram
    top_patches: _RunningTop              # values: best score in the image; payload pos, latent
    top_maps: _RunningTop                 # values: best score of images covered in part; payload map
    influence_sample: List[int]           # image indices the removal effects were measured on
    # from rank_concepts(target='predicted') on that sample, indexed by concept:
    class_odds_change: torch.Tensor       # (K, C) mean change of class c's log-odds on removal, over
                                          # the sample images predicted as c (0 where there is none)
    class_images: torch.Tensor            # (C,) sample images predicted as each class
    class_fire_rate: torch.Tensor         # (K, C) share of those images where detector i fires
    edited_patches: torch.Tensor          # (K,) patches the default removal edits (latent above its level)
    odds_change: torch.Tensor             # (K,) mean |change| of the predicted class's log-odds
    odds_drop: torch.Tensor               # (K,) mean drop of the predicted class's log-odds
    flips: torch.Tensor                   # (K,) fraction of predictions that change
    # per sampled image (positions in influence_sample), from the same removals:
    predicted: Optional[torch.Tensor] = None     # (S,) its top class before any removal
    image_odds: Optional[torch.Tensor] = None    # (S,) that class's log-odds before any removal
    image_change: Optional[torch.Tensor] = None  # (K, S) their drop when concept i is removed
    image_after: Optional[torch.Tensor] = None   # (K, S) its top class after that removal
    influence_images: Optional[torch.Tensor] = field(default=None, repr=False)  # the sample's inputs
    probe: torch.Tensor = field(repr=False, default=None)  # the first few inputs (receptive field)
    rcav_images: Optional[torch.Tensor] = field(default=None, repr=False)   # inputs for RCAV
    rcav_indices: List[int] = field(default_factory=list)
    mask_names: Optional[List[str]] = None
    mask_iou: Optional[torch.Tensor] = None  # (K, M) Network-Dissection IoU
    mask_pixels: Optional[torch.Tensor] = None  # (M,) pixels of each mask over the images

    @property
    def n_patches(self) -> int:
        return self.n_images * self.grid[0] * self.grid[1]


# detection maps are drawn for images the concept fires on in part: on fewer than this share
_MAP_MAX_SHARE = 0.9


def _sample(n: int, size: int, seed: int) -> List[int]:
    if size >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed))
    return sorted(int(i) for i in torch.randperm(n, generator=g)[:size])


def measure(
    model: OutputSelected,
    tap: LayerTap,
    basis,
    source,
    *,
    batch_size: int,
    top: int,
    maps: int,
    influence_images: int,
    rcav_images: int,
    seed: int,
    progress: Optional[Callable] = None,
) -> Measurements:
    """One pass over ``source.batches(batch_size)``."""
    n_total = len(source)
    if n_total == 0:
        raise ValueError("source is empty: no images to report on")
    k = basis.n_concepts
    sample = _sample(n_total, influence_images, seed)
    sample_set = set(sample)
    # RCAV's images: a seeded random part of the sample (its first indices would be one class
    # of a folder sorted by class)
    rcav_set = set(sample[i] for i in _sample(len(sample), rcav_images, seed + 1)) if rcav_images > 0 else set()
    rcav_keep: List[torch.Tensor] = []
    masks_fn, mask_names = (source.concept_masks if source.concept_masks is not None else (None, None))
    hist = _SymmetricHistogram(k)
    top_patches = _RunningTop(k, top)
    top_maps = _RunningTop(k, maps)
    patches_fired = torch.zeros(k, dtype=torch.int64)
    images_fired = torch.zeros(k, dtype=torch.int64)
    inter = union_det = mask_pixels = None
    influence_batches: List[torch.Tensor] = []
    influence_fired: List[torch.Tensor] = []
    edited = torch.zeros(k, dtype=torch.int64)
    level = getattr(basis, "absent_level", None)
    level = torch.zeros(k) if level is None else level.detach().cpu().float()
    n_batches = math.ceil(n_total / batch_size)
    grid = input_size = None
    seen = 0
    decoding, bias = basis.decoding.cpu(), basis.bias.cpu()
    layer = tap.layer[len("inner."):] if isinstance(model, OutputSelected) else tap.layer
    for j, batch in enumerate(source.batches(batch_size)):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise ValueError(f"source.batches() must yield (B, C, H, W) tensors, got "
                             f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        b = batch.shape[0]
        index = torch.arange(seen, seen + b)
        acts = tap.activations(batch, seen)
        rows = tap.to_rows(acts).float()
        if rows.shape[1] != basis.dim:
            raise ValueError(f"the basis has D = {basis.dim} but layer {layer!r} has {rows.shape[1]} channels; "
                             "was the basis extracted at another layer or model?")
        rows = rows.cpu()
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"layer {layer!r} gave NaN or Inf activations for images {seen}..{seen + b - 1} "
                             "of the source")
        if grid is None:
            probe = batch[:16].detach().cpu()
            maps_probe = tap.rows_to_maps(rows[:, :1], b)
            grid = tuple(maps_probe.shape[-2:])
            input_size = tuple(batch.shape[-2:])
        scores = rows @ decoding.T - bias                            # (B*P, K)
        latent = basis.latent(rows)
        edited += (latent > level).sum(0)  # where removal (membership 'all') changes the patch
        p = grid[0] * grid[1]
        per_image = scores.reshape(b, p, k)
        fired = per_image > 0
        patches_fired += fired.sum((0, 1))
        images_fired += fired.any(1).sum(0)
        hist.update(scores)
        best, pos = per_image.max(1)                                 # (B, K)
        top_patches.update(best, index, pos=pos, latent=latent.reshape(b, p, k).gather(1, pos[:, None, :])[:, 0])
        # the maps shown: the images the concept is strongest in (their best patch scores
        # highest, as the top patches), among those it covers in part (fires on some patches,
        # under 90% of them), so that where it is and where it is not both show
        share = fired.float().mean(1)                                 # (B, K)
        cover = torch.where((share > 0) & (share < _MAP_MAX_SHARE), best, torch.full_like(best, -math.inf))
        score_maps = tap.rows_to_maps(scores, b)                     # (B, K, h, w)
        top_maps.update(cover, index, map=score_maps.to(torch.float16))
        if masks_fn is not None:
            masks = masks_fn(index.tolist())
            if masks.dim() != 4 or masks.shape[0] != b:
                raise ValueError(f"source.concept_masks returned shape {tuple(masks.shape)} for {b} images")
            det = F.interpolate(score_maps, size=tuple(masks.shape[-2:]), mode="bilinear",
                                align_corners=False) > 0
            d = det.flatten(2).float()
            m = masks.bool().flatten(2).float()
            step = torch.einsum("nkp,ncp->kc", d, m).double()
            inter = step if inter is None else inter + step
            union_det = d.sum((0, 2)).double() + (0 if union_det is None else union_det)
            mask_pixels = m.sum((0, 2)).double() + (0 if mask_pixels is None else mask_pixels)
        chosen = [i for i in range(b) if seen + i in sample_set]
        if chosen:
            influence_batches.append(batch[chosen].detach().cpu())
            influence_fired.append(fired.any(1)[chosen])
            keep = [i for i in chosen if seen + i in rcav_set]
            if keep:
                rcav_keep.append(batch[keep].detach().cpu())
        seen += b
        if progress:
            progress("report: images", j + 1, n_batches)
    if seen == 0:
        raise ValueError("source.batches() yielded no images")
    if seen != n_total:
        raise ValueError(f"source has len {n_total} but its batches held {seen} images")
    # the removal effects, in concept order (the ranking returns them largest drop first)
    influence = torch.cat(influence_batches)
    ranking = rank_concepts(
        model, basis, influence, target="predicted", layer=tap.layer, output=as_is,
        batch_size=batch_size, skip_tokens=tap.skip_tokens,
        progress=(lambda done, total: progress("report: removals", done, total)) if progress else None)
    at = torch.argsort(torch.tensor(ranking.concepts))
    # per class, on the images predicted as it: the change of its log-odds (the drop's negative)
    n_classes = ranking.class_effects.shape[1]
    predicted = torch.nn.functional.one_hot(ranking.predicted.long(), n_classes).double()   # (N, C)
    class_images = predicted.sum(0)
    own_change = -(ranking.image_effects[at].double() @ predicted) / class_images.clamp_min(1)
    fire_rate = (torch.cat(influence_fired).double().T @ predicted) / class_images.clamp_min(1)
    iou = None
    if inter is not None:
        union = union_det[:, None] + mask_pixels[None, :] - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union)).float()
    return Measurements(
        n_images=seen, grid=grid, input_size=input_size, n_classes=n_classes,
        patches_fired=patches_fired, images_fired=images_fired, histogram=hist,
        top_patches=top_patches, top_maps=top_maps, influence_sample=sample,
        class_odds_change=own_change.float(), class_images=class_images.long(),
        class_fire_rate=fire_rate.float(), edited_patches=edited,
        odds_change=ranking.abs_effects[at].float(),
        odds_drop=ranking.effects[at].float(), flips=ranking.flip_rates[at].float(),
        predicted=ranking.predicted.long(), image_odds=ranking.base_scores.float(),
        image_change=ranking.image_effects[at].float(), image_after=ranking.image_predictions[at].long(),
        influence_images=influence, probe=probe,
        rcav_images=torch.cat(rcav_keep) if rcav_keep else None,
        rcav_indices=sorted(rcav_set),
        mask_names=list(mask_names) if mask_names is not None else None,
        mask_iou=iou, mask_pixels=mask_pixels.float() if mask_pixels is not None else None,
    )


@dataclass
class RandomReference:
    """The influence of random concepts, measured as the concepts' is: what a concept's
    influence can be compared with. ``influence[r]``: mean |change| of the predicted class's
    log-odds when random concept r is removed; ``flips[r]`` the predictions it changes;
    ``fire_rates[r]`` the share of the sampled patches it is detected on; ``strength`` the one
    factor their removals were scaled by so that their median edit is the concepts' median."""

    influence: torch.Tensor
    flips: torch.Tensor
    fire_rates: torch.Tensor
    strength: float = 1.0

    @property
    def highest(self) -> float:
        return float(self.influence.max())

    @property
    def median(self) -> float:
        return float(self.influence.double().quantile(0.5))  # the middle two's mean for an even count


def random_reference(model: OutputSelected, tap: LayerTap, basis, images: torch.Tensor, fire_rates: torch.Tensor,
                     n: int, *, batch_size: int, seed: int, max_rows: int = 20000,
                     progress: Optional[Callable] = None) -> Optional[RandomReference]:
    """Remove ``n`` random concepts from ``images`` as the report removes the basis's ones.

    A random concept is built as RCAV's null is: a random filter, detected on its top-scoring
    patches (as many as a real concept: the ``fire_rates`` of the basis's concepts at evenly
    spaced quantiles), its signal vector the rows' covariance with its score there over the
    score's variance, its absent level the mean latent factor where it is not detected. The
    removals are scaled by one factor so that the median edit size (mean |change of a row| over
    the patches) of the random concepts is that of the basis's concepts: the same amount of
    editing, along directions the network was not shown to use. None where the layer has too
    few patches (under 4) or no random concept has a signal vector."""
    from ..basis import ConceptBasis
    from ..signal import absent_levels, masked_signal_vectors

    gen = torch.Generator().manual_seed(seed + 7)
    if progress:
        progress("report: random concepts", 0, n)
    with torch.no_grad():
        rows = torch.cat([tap.to_rows(tap.activations(images[i:i + batch_size])).float().cpu()
                          for i in range(0, images.shape[0], batch_size)])
    if rows.shape[0] > max_rows:
        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
    if rows.shape[0] < 4:
        return None
    mean = basis.mean.detach().float().cpu()
    rates = fire_rates.double().sort().values
    at = ((torch.arange(n, dtype=torch.float64) + 0.5) / n * len(rates)).long().clamp(max=len(rates) - 1)
    counts = (rates[at] * rows.shape[0]).round().long().clamp(2, rows.shape[0] - 1)
    filters = torch.randn(n, rows.shape[1], generator=gen)
    z = rows @ filters.T                                                   # (N, n)
    order = z.sort(0, descending=True).values
    bias = order[counts - 1, torch.arange(n)] - 1e-6 * order.abs().amax(0).clamp_min(1.0)
    signal, ok = masked_signal_vectors(rows, z, z > bias)
    if not bool(ok.any()):  # no variance of the score among a random concept's patches
        return None
    filters, bias, signal, z = filters[ok], bias[ok], signal[ok], z[:, ok]
    absent = absent_levels(rows, filters, bias, signal, mean)
    random_basis = ConceptBasis(filters, bias, signal, mean, layer=basis.layer, absent_level=absent)
    for key in ("nonnegative", "skip_tokens"):  # edited as the basis's concepts are (a post-ReLU clamp)
        if key in (getattr(basis, "metadata", None) or {}):
            random_basis.metadata[key] = basis.metadata[key]
    strength = _edit_size(basis, rows).median() / _edit_size(random_basis, rows).median().clamp_min(1e-12)
    strength = float(strength.clamp(1e-3, 1e3)) if bool(torch.isfinite(strength)) else 1.0
    ranking = rank_concepts(
        model, random_basis, images, target="predicted", layer=tap.layer, output=as_is, strength=strength,
        batch_size=batch_size, skip_tokens=tap.skip_tokens,
        progress=(lambda done, total: progress("report: random concepts", done, total)) if progress else None)
    at = torch.argsort(torch.tensor(ranking.concepts))
    return RandomReference(ranking.abs_effects[at].float(), ranking.flip_rates[at].float(),
                           (z > bias).float().mean(0), strength)


def _edit_size(basis, rows: torch.Tensor) -> torch.Tensor:
    """(K,) mean norm of the change a removal makes to a row, over ``rows``: the latent factor's
    excess over the absent level times the signal vector's norm."""
    w, s = basis.decoding.detach().float().cpu(), basis.encoding.detach().float().cpu()
    latent = (rows @ w.T - w @ basis.mean.detach().float().cpu()) / (w * s).sum(1)
    absent = basis.absent_level.detach().float().cpu() if basis.absent_level is not None else torch.zeros(len(w))
    return (latent - absent).clamp_min(0).mean(0) * s.norm(dim=1)
