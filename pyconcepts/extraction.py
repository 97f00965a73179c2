"""``pc.extract`` (module ``pyconcepts.extraction``): concept direction pairs of a network's layer, with refinement and URA.

Pipeline (METHOD.md sections 2-4):

1. **Patches.** The layer's output is streamed as patch rows through a ``LayerTap`` (eval
   mode, no grad, batch by batch). Rows are kept in memory only up to ``cache_rows``; beyond
   that every pass over the data re-runs the network's first part, so memory stays bounded.
2. **Directional clustering, thresholds and signal vectors** (``extract_directions``).
3. **Refinement** (``refine=True``; off by default) of the detectors (W, b) by the paper's
   losses (``detectors.refine_detectors``) plus **URA** through the frozen rest of the network
   (``ura.URALoss``; both the unconstrained and the span(S)-constrained move, kappa ~
   U[0.5, 0.9]), on a bounded sample of patches and a small pool of images. It starts from
   the calibrated sigmoids of step 2, rotates each direction by at most ``refine_rotation_lr``
   radians per step, and its merge guard keeps the last state in which no two detectors
   overlap by more than ``merge_guard`` (Jaccard); a refinement whose every step it rejects
   warns that it changed nothing. Off by default because, measured, it does not improve what
   it is for once the clustering stage fits max-margin filters: paper synthetic (seeds 0-9),
   min detector IoU 0.994-0.999 without it, 0.972-0.985 with it (60 steps; 0.966-0.983 with
   the former 300 steps + 25 joint steps); MTCNN RNet (``benchmarks.real_network``, K = 16):
   the same top-5 face-margin drop (on all 400 images the merge guard rejected every step),
   the detection sets reproduce less across halves (Jaccard 0.65 vs 0.66; 300 steps also
   turned the directions, 0.85 -> 0.76), at
   about twice the cost.
4. **Joint step** (``joint_steps``, 0 by default): W, b refined again together with the
   encoding, adding the filter-signal orthogonality loss L_fso. The encoding in this step is
   the signal-vector estimator itself, evaluated differentiably on each batch (our choice:
   free S parameters could satisfy L_fso without moving W). The demo runs this step alone.
5. **Encoding**: by default (``final_encoding='alternation'``, a historical name) the
   clustering stage's encoding (signal vectors of its logistic filters, after ``alternations``
   pattern-to-filter rounds, 0 by default) rescaled so that w_i . s_i = 1 for the final
   detectors; ``'signal'`` recomputes plain signal vectors of the final detectors instead.
   Measured on the paper's synthetic model (seeds 0-9): the refinement turns the filters by a
   little (cosine to the ideal filters 0.995-0.998 -> 0.978-0.997), and a signal vector
   carries every filter error, so the clustering stage's encoding is the closer one (min
   cosine 0.984 vs 0.970).

Every weight, schedule and threshold has a default in ``DEFAULTS`` and can be overridden by
``options={...}``. ``progress(stage, done, total)`` reports each loop (the command line turns
it into progress bars).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from . import detectors
from .basis import ConceptBasis
from .directions import extract_directions
from .signal import absent_levels, masked_signal_vectors, signal_vectors
from .stats import DEFAULT_CHUNK_SIZE, KeyedRowSample, distributed, fail_together, shard_offset
from .outputs import OutputSpec, check_output_spec, read_scores, scores_kind
from .taps import LayerTap, autograd_on, is_image_source, is_one_shot, iter_batches
from .ura import URALoss

__all__ = ["extract", "DEFAULTS", "fso_loss", "batch_signal_vectors"]

DEFAULTS: Dict[str, object] = {
    # patch collection
    "batch_size": 64,            # images per forward pass when `images` is one tensor
    "cache_rows": 2_000_000,     # keep at most this many patch rows in memory, else stream
    # directional clustering (extract_directions)
    "n_init": 10,                # k-means restarts: with 3, about 1 seed in 10 of the paper's
                                 # synthetic model kept a split + merged clustering (IoU 0.34)
    "max_iter": 100,
    "whiten": "auto",            # cluster in whitened coordinates: True, False or 'auto' (where
                                 # the restarts reproduce each other more; see directions.py)
    "decoder": "logistic",       # filters of the clustering stage: 'logistic' (max-margin fit of
                                 # the cluster memberships) or 'discriminant' (LDA); see directions.py
    "decoder_penalty": 1e-6,     # L2 penalty of the logistic filters (whitened units)
    "decoder_sample": 65536,     # patch rows the logistic filters are fitted on
    "background_rounds": 20,     # refits that take rows of no concept out of the filters'
                                 # positives (whitened fits only; 0: off; see directions.py)
    "vmf_polish": False,         # polish the k-means clustering by EM of a von Mises-Fisher
                                 # mixture with one shared concentration (seeds agree more on
                                 # real layers; lowers the synthetic IoU; see directions.py)
    "alternations": 0,           # pattern-to-filter rounds of the encoding estimate: with the
                                 # logistic filters they only drift (paper synthetic, seeds 0-9:
                                 # min encoding cosine 0.984 with 0 rounds, 0.93 with 4)
    "final_encoding": "alternation",  # 'alternation': rescale the clustering stage's encoding
                                 # to the final detectors; 'signal': plain signal vectors of them
    # refinement of the detectors (paper losses + URA)
    "refine_sample": 65536,      # patch rows drawn for the gradient steps
    "refine_steps": 60,
    "refine_lr": 1e-2,           # Adam on the margins and hyperplane offsets
    "refine_rotation_lr": 2e-3,  # radians per step, at most, for the unit directions
    "refine_batch": 2048,
    "merge_guard": 0.5,          # stop when two detectors' Jaccard overlap passes this (None: off)
    "refine_stop_flips": 1e-3,   # end a refinement once 10 steps flip at most this share of the
                                 # probe's detections (None: run every step)
    "loss_weights": None,        # overrides of detectors.DEFAULT_WEIGHTS
    # tau: the inactive-classifier floor nu = tau / I. With tau = 1 the floor is the uniform
    # share, which a concept rarer than average is always under: the loss (weight 15) then
    # inflates it (paper synthetic, I = 3: nu = 1/3 = each concept's true share, IoU 0.97 ->
    # 0.93-0.95). The loss is a guard against dead detectors, so the floor sits well below.
    "tau": 0.25, "gamma": 2.0, "rho": 0.5, "soft_max_power": 4.0,
    # URA
    "ura_weight": 0.25,
    "ura_form": "both",          # 'unconstrained', 'constrained' or 'both'
    "ura_images": 64,            # size of the image pool f+ is run on (a seeded random sample)
    "ura_batch": 16,             # images per URA evaluation
    "ura_every": 1,              # evaluate URA every n-th step
    "kappa_range": (0.5, 0.9),
    "outputs": "auto",           # what the class scores are: 'logits', 'probs' or 'auto' (told
                                 # apart on the first batch)
    # joint step with L_fso
    "joint_steps": 0,
    "joint_lr": 2e-3,
    "joint_rotation_lr": 2e-3,
    "fso_weight": 1.0,
}


# numeric options: whole numbers >= 1, whole numbers >= 0, finite numbers > 0 and >= 0
_AT_LEAST_ONE = ("batch_size", "cache_rows", "n_init", "max_iter", "decoder_sample", "refine_sample",
                 "refine_batch", "ura_images", "ura_batch", "ura_every")
_AT_LEAST_ZERO = ("background_rounds", "alternations", "refine_steps", "joint_steps")
_POSITIVE = ("decoder_penalty", "refine_lr", "refine_rotation_lr", "joint_lr", "joint_rotation_lr", "tau",
             "gamma", "soft_max_power")
_NON_NEGATIVE = ("ura_weight", "fso_weight", "rho")


def _check_number_options(opts: Dict[str, object]) -> None:
    """Each numeric option of ``opts`` of the right kind and sign; errors name the option."""
    for names, low in ((_AT_LEAST_ONE, 1), (_AT_LEAST_ZERO, 0)):
        for name in names:
            v = opts[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"options[{name!r}] must be a whole number >= {low}, got {v!r}")
    for names, strict in ((_POSITIVE, True), (_NON_NEGATIVE, False)):
        for name in names:
            v = opts[name]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= 0 if strict else v < 0):
                raise ValueError(f"options[{name!r}] must be a finite number {'>' if strict else '>='} 0, got {v!r}")


def fso_loss(decoding: torch.Tensor, encoding: torch.Tensor) -> torch.Tensor:
    """L_fso = sqrt(mean_{i != j} (w_i . s_j)^2) on unit vectors (METHOD.md section 3)."""
    k = decoding.shape[0]
    if k < 2:
        return decoding.new_zeros(())
    w = decoding / decoding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = encoding / encoding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = w @ s.T
    off = g - torch.diag(torch.diagonal(g))
    return torch.sqrt((off ** 2).sum() / (k * (k - 1)) + 1e-12)


def batch_signal_vectors(x: torch.Tensor, decoding: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Differentiable signal vectors on one batch: Cov_{P_i}[x, z_i] / Var_{P_i}[z_i] with the
    hard detection masks P_i (no gradient through the masks). Detectors firing on fewer than
    two rows get w_i / ||w_i||^2."""
    z = x @ decoding.T                                           # (B, K)
    s, ok = masked_signal_vectors(x, z, z > bias)
    fallback = decoding / (decoding * decoding).sum(1, keepdim=True).clamp_min(1e-12)
    return torch.where(ok[:, None], s, fallback)


class _PatchSource:
    """A re-iterable of patch-row chunks: cached in memory up to ``cache_rows`` rows, else
    recomputed through the tap on every pass (images must then be re-iterable).

    While streaming it also keeps the URA image pool: ``ura_images`` images drawn uniformly
    at random (seeded) from the whole stream, so that class-sorted data still gives URA every
    class. ``probe(batch)``, when given, runs once on the first batch (after its layer output
    was checked) so a model whose output cannot be used fails before any clustering."""

    def __init__(self, tap: LayerTap, images, batch_size: int, cache_rows: int, ura_images: int,
                 progress: Optional[Callable], seed: int = 0,
                 probe: Optional[Callable[[torch.Tensor], None]] = None):
        self.tap, self.images, self.batch_size = tap, images, batch_size
        self.cached: Optional[List[torch.Tensor]] = []
        self.n_rows = 0
        pool = _ImagePool(ura_images, seed, images)
        one_shot = is_one_shot(images)
        total = _count_batches(images, batch_size)
        seen = 0
        for j, batch in enumerate(iter_batches(images, batch_size)):
            rows = tap.to_rows(tap.activations(batch, seen)).float().contiguous()
            seen += batch.shape[0]
            if j == 0:
                _warn_if_not_a_grid(tap)
            if j == 0 and probe is not None:
                probe(batch)
            pool.offer(batch)
            self.n_rows += rows.shape[0]
            if self.cached is not None:
                if self.n_rows <= cache_rows or one_shot:
                    self.cached.append(rows.cpu())
                else:
                    self.cached = None  # too many to keep: later passes re-run the network
            if progress:
                progress("patches", j + 1, total)
        if self.n_rows == 0:
            raise ValueError("images is empty: no patches to extract concepts from")
        self.pool: List[torch.Tensor] = pool.images()
        if self.cached is not None:
            self.cached = _coalesce(self.cached, DEFAULT_CHUNK_SIZE)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.cached is not None:
            return iter(self.cached)
        return (self.tap.to_rows(self.tap.activations(b)).float().contiguous()
                for b in iter_batches(self.images, self.batch_size))


class _ImagePool:
    """A seeded uniform sample of ``size`` images from a stream of batches, the same for any
    batching and, under torch.distributed, on every rank and for any sharding: each image's
    key is a hash of (seed, its global index) (``stats.KeyedRowSample``), the global index
    counting the images of the ranks before this one. The pool is in global image order."""

    def __init__(self, size: int, seed: int, images):
        self.size = max(0, int(size))
        self.sample = KeyedRowSample(self.size, int(seed) + 0x5EED) if self.size else None
        self.shape: Optional[torch.Size] = None
        self.seen = 0
        if self.sample is not None and distributed():
            with fail_together("the URA image count"):
                local = _count_images(images)
            self.seen = shard_offset(local)

    def offer(self, batch: torch.Tensor) -> None:
        n = batch.shape[0]
        if self.sample is not None:
            if self.shape is not None and batch.shape[1:] != self.shape:
                raise ValueError(
                    f"image batches differ in shape ({tuple(self.shape)} then {tuple(batch.shape[1:])}); "
                    "URA needs images of one size"
                )
            self.shape = batch.shape[1:]
            self.sample.update(batch.detach().reshape(n, -1), self.seen)
        self.seen += n

    def images(self) -> List[torch.Tensor]:
        if self.sample is None:
            return []
        rows = self.sample.all_reduce().rows()
        return [rows.view(rows.shape[0], *self.shape)] if rows.shape[0] else []


def _count_images(images) -> int:
    """The number of images in ``images`` (a tensor, a source-backed batch stream, or any
    re-iterable of batches, which is then read once without the network)."""
    if isinstance(images, torch.Tensor):
        return images.shape[0]
    if is_image_source(images):
        return len(images)
    source = getattr(images, "source", None)
    if source is not None and hasattr(source, "__len__"):
        return len(source)
    return sum(batch.shape[0] for batch in iter_batches(images))


def _warn_if_not_a_grid(tap: LayerTap) -> None:
    """A token layer whose tokens (after ``skip_tokens``) are no square grid: most likely a
    class or register token is counted as a patch."""
    shape = tap.shape
    if shape is not None and shape.kind == "conv" and tap.skip_tokens:
        warnings.warn(f"layer {tap.layer!r} is a (batch, channels, height, width) map: skip_tokens="
                      f"{tap.skip_tokens} applies to token layers only and is not used", stacklevel=4)
    if shape is None or shape.kind != "tokens" or tap.token_grid is not None:
        return
    n = shape.positions
    if round(n ** 0.5) ** 2 != n:
        warnings.warn(
            f"layer {tap.layer!r} gives a 3-D output, read as (batch, tokens, channels): {n} tokens of "
            f"{shape.channels} channels per image after skip_tokens={tap.skip_tokens}, not a square grid. If "
            "leading tokens are class or register tokens, pass skip_tokens=N (command line: --skip-tokens N): "
            "they would count as patches; a rectangular grid is given as options={'grid': (h, w)} for the "
            "report (command line: --options '{\"grid\": [h, w]}'); if its axes are (batch, channels, "
            "positions), tap a layer with another layout", stacklevel=4)


def _coalesce(pieces: List[torch.Tensor], rows: int) -> List[torch.Tensor]:
    """The cached per-batch pieces regrouped into chunks of about ``rows`` rows: every pass
    (clustering, thresholds, moments) then costs a few large native calls instead of one
    small call per image batch, which dominated the run time on small layers."""
    out: List[torch.Tensor] = []
    group: List[torch.Tensor] = []
    size = 0
    pieces.reverse()
    while pieces:
        piece = pieces.pop()  # drop as we go so the peak memory stays ~ one extra chunk
        group.append(piece)
        size += piece.shape[0]
        if size >= rows:
            out.append(torch.cat(group) if len(group) > 1 else group[0])
            group, size = [], 0
    if group:
        out.append(torch.cat(group) if len(group) > 1 else group[0])
    return out


def _count_batches(images, batch_size) -> Optional[int]:
    if isinstance(images, torch.Tensor) or is_image_source(images):
        return max(1, math.ceil(len(images) / batch_size))
    try:
        return len(images)
    except TypeError:
        return None


def extract(
    model: nn.Module,
    layer: str,
    images,
    n_concepts: int,
    seed: int = 0,
    refine: bool = False,
    ura: bool = True,
    *,
    skip_tokens: int = 0,
    options: Optional[Dict[str, object]] = None,
    progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
    model_id: Optional[str] = None,
    output: OutputSpec = None,
) -> ConceptBasis:
    """Concept direction pairs at ``layer`` of ``model`` from ``images``.

    ``images``: a tensor (B, C, H, W) or an iterable of batches (tensors or tuples whose first
    item is the batch). ``refine``: the gradient refinement (paper losses, joint L_fso step;
    off by default, see the module docstring); ``ura``: add URA to it. ``output``: which part
    of the model's output holds the class scores URA reads (an index into a tuple, a dict key, or a callable; see
    ``pyconcepts.outputs``); with URA on, the first batch is run through the whole model and
    an output that is not (B, C) logits or probabilities raises before any clustering.
    ``options`` overrides ``DEFAULTS``. Returns a ``ConceptBasis`` recording the layer, the
    settings and the refinement's last loss values.
    """
    if isinstance(n_concepts, bool) or not isinstance(n_concepts, int) or n_concepts < 1:
        raise ValueError(f"n_concepts must be a positive int, got {n_concepts!r}")
    if n_concepts == 1:
        warnings.warn("n_concepts=1: the one concept's cluster holds every patch, so its detector fires nearly "
                      "everywhere and detects nothing in particular; extract 2 or more", stacklevel=2)
    opts = dict(DEFAULTS)
    unknown = set(options or {}) - set(opts)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(options or {})
    _check_number_options(opts)
    output = check_output_spec(output)
    if opts["outputs"] not in ("auto", "logits", "probs"):
        raise ValueError(f"options['outputs'] must be 'auto', 'logits' or 'probs', got {opts['outputs']!r}")
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        # the refinement fits by gradients, also under a caller's no_grad or inference_mode
        with autograd_on(model if refine else None, "extract(refine=True)"):
            return _extract(model, layer, images, n_concepts, seed, refine, ura, skip_tokens, opts,
                            progress, model_id, output)
    finally:
        torch.random.set_rng_state(torch_state)


def _output_probe(tap: LayerTap, output, opts):
    """Run the whole model on two images of the first batch and check that ``output`` reads
    (B, C) class scores from it; fixes options['outputs'] when it is 'auto'."""

    def probe(batch):
        with torch.no_grad():
            value = tap.forward_with(batch[:2], lambda out: out)
        scores = read_scores(value, output, "logits")
        if opts["outputs"] == "auto":
            opts["outputs"] = scores_kind(scores)

    return probe


def _extract(model, layer, images, k, seed, refine, ura, skip_tokens, opts, progress, model_id,
             output=None):
    tap = LayerTap(model, layer, skip_tokens=skip_tokens)
    uses_output = bool(refine and ura)
    # an output= the user names is checked even when nothing reads it: a mistake shows early
    source = _PatchSource(tap, images, int(opts["batch_size"]), int(opts["cache_rows"]),
                          int(opts["ura_images"]) if uses_output else 0, progress, seed=seed,
                          probe=_output_probe(tap, output, opts) if uses_output or output is not None
                          else None)
    if progress:
        progress("clustering", 0, 1)
    basis = extract_directions(source, k, seed=seed, n_init=int(opts["n_init"]),
                               max_iter=int(opts["max_iter"]), whiten=opts["whiten"],
                               alternations=int(opts["alternations"]),
                               decoder=str(opts["decoder"]), decoder_penalty=float(opts["decoder_penalty"]),
                               decoder_sample=int(opts["decoder_sample"]),
                               background_rounds=int(opts["background_rounds"]),
                               vmf_polish=opts["vmf_polish"],
                               layer=layer, model_id=model_id,
                               progress=(lambda done, total: progress("clustering", done, total))
                               if progress else None)
    mean = basis.mean
    decoding, bias, encoding = basis.decoding, basis.bias, basis.encoding
    history: Dict[str, float] = {}
    guards: Dict[str, dict] = {}
    if refine:
        sample = detectors.sample_rows(source, int(opts["refine_sample"]), seed)
        ura_loss = None
        if ura:
            pool = torch.cat(source.pool)
            ura_loss = URALoss(tap, pool, form=str(opts["ura_form"]),
                               kappa_range=tuple(opts["kappa_range"]), batch_size=int(opts["ura_batch"]),
                               outputs=str(opts["outputs"]), seed=seed, output=output)
        decoding, bias = _refine(sample, decoding, bias, encoding, mean, ura_loss, opts, seed,
                                 progress, history, guards.setdefault("refinement", {}))
        _warn_if_guard_kept_nothing(guards["refinement"], "refinement", opts)
        if int(opts["joint_steps"]) > 0:
            decoding, bias = _joint(sample, decoding, bias, mean, ura_loss, opts, seed, progress,
                                    history, guards.setdefault("joint", {}))
            _warn_if_guard_kept_nothing(guards["joint"], "joint step", opts)
    if progress:
        progress("signal vectors", 0, 1)
    if opts["final_encoding"] == "alternation":
        gain = (decoding.double() * encoding.double()).sum(1)
        encoding, dead = (encoding.double() / gain[:, None]).float(), []
    else:
        encoding, dead = _final_signal_vectors(source, decoding, bias, mean)
    # the level a removal lowers each concept to, for the final detectors
    same = not refine and opts["final_encoding"] == "alternation"  # the clustering stage's pairs
    absent = basis.absent_level if same else absent_levels(source, decoding, bias, encoding, mean)
    if progress:
        progress("signal vectors", 1, 1)
    metadata = dict(basis.metadata)
    # extract_directions' own settings record refine=False (the refinement runs here)
    metadata["settings"] = dict(metadata.get("settings", {}), refine=bool(refine))
    metadata.update({
        "method": "pyconcepts.extract: " + metadata.get("method", "")
        + ("+refinement" if refine else "") + ("+URA" if refine and ura else "")
        + ("+joint-fso" if refine and int(opts["joint_steps"]) > 0 else ""),
        "extract_settings": {key: (list(v) if isinstance(v, tuple) else v) for key, v in opts.items()},
        "refine": bool(refine), "ura": bool(ura), "seed": seed,
        "final_losses": history, "merge_guard": guards, "silent_detectors": dead, "n_patches": source.n_rows,
        "skip_tokens": skip_tokens,
        # the class scores' place in the model's output (an index or a key; a callable is not
        # recorded): the CLI's commands, counterfactual, rank_concepts, contribution_maps, rcav
        # and the report use it when no output is given (outputs.output_or_recorded)
        "output": output if isinstance(output, (int, str)) and not isinstance(output, bool) else None,
        # a function's name only, so that later calls without it can say what to pass again
        "output_callable": (getattr(output, "__pyconcepts_spec__", None) or getattr(output, "__qualname__", None)
                            or type(output).__name__) if callable(output) else None,
    })
    basis = ConceptBasis(decoding, bias, encoding, mean, layer=layer, model_id=model_id, metadata=metadata,
                         absent_level=absent)
    # the model's architecture and weights: a basis saved from Python is refused by the
    # command line for other weights, as one saved by extract is
    basis.record_model(model)
    return basis


def _warn_if_guard_kept_nothing(report: dict, stage: str, opts) -> None:
    """A refinement whose every checked step the merge guard rejected returns its start
    unchanged: say so, rather than let a refined basis pass for one."""
    if report.get("steps_run", 0) > 0 and report.get("kept_step", 0) == 0 and report.get("failed_checks", 0) > 0:
        warnings.warn(
            f"the {stage} changed nothing: its merge guard rejected every step (two detectors came to "
            f"overlap by more than merge_guard = {opts['merge_guard']} Jaccard), so the detectors are "
            "those it started from; options={'merge_guard': None} turns the guard off", stacklevel=3)


def _weights(opts) -> Dict[str, float]:
    weights = dict(detectors.DEFAULT_WEIGHTS)
    weights.update(opts["loss_weights"] or {})
    return weights


def _guard(opts) -> Optional[float]:
    return None if opts["merge_guard"] is None else float(opts["merge_guard"])


def _stop(opts) -> Optional[float]:
    return None if opts["refine_stop_flips"] is None else float(opts["refine_stop_flips"])


def _refine(sample, decoding, bias, encoding, mean, ura_loss, opts, seed, progress, history,
            guard_report):
    steps = int(opts["refine_steps"])
    ura_w, every = float(opts["ura_weight"]), max(1, int(opts["ura_every"]))
    fixed_s = encoding.detach()

    def extra(w, b, batch, step):
        if ura_loss is None or ura_w == 0 or step % every:
            return w.new_zeros(())
        return ura_w * ura_loss(w, b, fixed_s)

    def callback(step, losses):
        history.update({f"refine_{key}": value for key, value in losses.items()})
        if progress:
            progress("refinement", step + 1, steps)

    return detectors.refine_detectors(
        sample, decoding, bias, weights=_weights(opts),
        extra_loss=extra if ura_loss is not None else None, steps=steps,
        batch_size=int(opts["refine_batch"]), lr=float(opts["refine_lr"]),
        rotation_lr=float(opts["refine_rotation_lr"]), tau=float(opts["tau"]),
        gamma=float(opts["gamma"]), rho=float(opts["rho"]), v=float(opts["soft_max_power"]),
        seed=seed, center=mean, callback=callback, max_overlap=_guard(opts),
        report=guard_report, stop_flips=_stop(opts),
    )


def _joint(sample, decoding, bias, mean, ura_loss, opts, seed, progress, history, guard_report):
    """W, b and the (batch-estimated) encoding together, with L_fso and constrained URA."""
    steps = int(opts["joint_steps"])
    ura_w, fso_w, every = float(opts["ura_weight"]), float(opts["fso_weight"]), max(1, int(opts["ura_every"]))

    def extra(w, b, batch, step):
        s = batch_signal_vectors(batch, w, b)
        total = fso_w * fso_loss(w, s)
        history["joint_fso"] = float(total.detach()) / fso_w if fso_w else 0.0
        if ura_loss is not None and ura_w and step % every == 0:
            total = total + ura_w * ura_loss(w, b, s)
        return total

    def callback(step, losses):
        history.update({f"joint_{key}": value for key, value in losses.items()})
        if progress:
            progress("joint step", step + 1, steps)

    return detectors.refine_detectors(
        sample, decoding, bias, weights=_weights(opts), extra_loss=extra, steps=steps,
        batch_size=int(opts["refine_batch"]), lr=float(opts["joint_lr"]),
        rotation_lr=float(opts["joint_rotation_lr"]), tau=float(opts["tau"]),
        gamma=float(opts["gamma"]), rho=float(opts["rho"]), v=float(opts["soft_max_power"]),
        seed=seed + 1, center=mean, callback=callback, max_overlap=_guard(opts),
        report=guard_report, stop_flips=_stop(opts),
    )


def _final_signal_vectors(source, decoding, bias, mean):
    try:
        return signal_vectors(source, decoding, bias, center=mean), []
    except ValueError:
        pass
    # some detector never fires on the data: estimate the rest, keep w / ||w||^2 for it
    counts = torch.zeros(decoding.shape[0], dtype=torch.int64)
    for chunk in source:
        counts += (chunk @ decoding.T > bias).sum(0).cpu()
    dead = torch.nonzero(counts < 2).flatten().tolist()
    alive = torch.nonzero(counts >= 2).flatten()
    encoding = decoding / (decoding * decoding).sum(1, keepdim=True)
    if alive.numel():
        encoding[alive] = signal_vectors(source, decoding[alive], bias[alive], center=mean)
    return encoding, dead

