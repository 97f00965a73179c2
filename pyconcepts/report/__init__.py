"""A static HTML report of a concept basis: ``write_report(out_dir, basis, model, layer, source)``.

``out_dir/index.html`` ranks the concepts by their measured influence on the model's outputs
(the mean change of the class probabilities when the concept is removed with
``pyconcepts.interventions``); a page per concept shows its top-activating patches cropped to
the layer's receptive field, detection maps over whole images, how often it fires with a
histogram of its detector's score, the classes it pushes up and down (with RCAV significance),
and its IoU with ground-truth masks when the image source has them.

The images are streamed once through the model (memory does not grow with their number);
display pictures are fetched only for the images shown. Plain HTML, one stylesheet, inline
SVG charts and PNG pictures (Pillow): the folder opens offline in any browser. The report is
written into a staging folder inside ``out_dir`` and moved into place when done
(``report/folder.py``); it replaces the files an earlier report wrote (listed in
``.pyconcepts-report.json``) and touches nothing else.
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import warnings as _warnings
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Set, Union

import torch
from torch import nn

from ..attribution import rcav as _rcav
from ..attribution import auto_permutations, rcav_tests
from ..images import TensorImages
from ..outputs import OutputWarning, as_is, output_or_recorded
from ..stability import LOW_HALVES_JACCARD, VANISHED_JACCARD
from ..taps import LayerTap, autograd_on, resolve_layer
from .folder import StagedFolder, check_report_folder
from .collect import Measurements, OutputSelected, ReceptiveField, measure, random_reference, receptive_field
from .html import (CSS, MIN_CLASS_IMAGES, MIN_REMOVAL_EFFECT, ClassEffect, ConceptView, JointRemoval, Picture,
                   ReportView, concept_page, index_page)

__all__ = ["write_report", "OPTIONS"]

# Options of write_report(**options) and their defaults.
OPTIONS: Dict[str, object] = {
    "influence_images": 256,   # seeded sample the removal effects (the ranking) are measured on
    "joint_concepts": 3,       # each predicted class's strongest supporters removed together (0: off)
    "joint_classes": 8,        # ... for at most this many classes, the most predicted first
    "rcav_concepts": 4,        # RCAV tests this many of the most influential concepts
    "rcav_images": 32,         # the first images of that sample that RCAV runs on
    "rcav_permutations": None, # random concepts the RCAV test draws; None: enough that the
                               # smallest Bonferroni-adjusted p is 0.8 x the level, at most 2000
    "rcav_level": 0.05,        # significance level after Bonferroni over tested concepts x classes
    "rcav_batch": None,        # images per forward pass in RCAV (default: batch_size)
    "counterfactuals": 6,      # per concept: the sampled images its removal moves most (0: off)
    "random_concepts": 8,      # random concepts removed as the concepts are, the influence's reference (0: off)
    "rf_mass": 0.9,            # share of the input gradient a patch crop holds
    "rf_images": 8,            # images the receptive field is measured on
    "title": None,
    "skip_tokens": 0,          # token maps: leading class/register tokens that are not patches
    "grid": None,              # token maps: the (h, w) patch grid
}


class _Writer:
    """Writes files under ``root`` (the report's staging folder) and remembers what it wrote."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.written: Set[str] = set()

    def write(self, rel: str, data: Union[bytes, str]) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written.add(rel)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_source(source) -> None:
    for attr in ("batches", "display", "names"):
        if not hasattr(source, attr):
            raise TypeError(f"source must be an image source (pyconcepts.images): it has no {attr!r}")
    if not hasattr(source, "__len__"):
        raise TypeError("source must be an image source (pyconcepts.images): it has no len()")
    if len(source.names) != len(source):
        raise ValueError(f"source.names has {len(source.names)} entries for {len(source)} images")


def write_report(
    out_dir,
    basis,
    model: nn.Module,
    layer: Optional[str],
    source,
    *,
    output=None,
    batch_size: int = 64,
    top: int = 16,
    maps: int = 8,
    rcav: bool = True,
    seed: int = 0,
    progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
    warnings: Sequence[str] = (),
    class_names: Optional[Sequence[str]] = None,
    **options,
) -> pathlib.Path:
    """Write the report of ``basis`` (concepts of ``model`` at ``layer``, default the basis's
    layer) over the images of ``source`` into ``out_dir``; returns the path of index.html.
    ``source``: an image source of ``pyconcepts.images`` (``FolderImages``, ``TensorImages``:
    file names, class folders and pictures for display) or a tensor (B, C, H, W) of images as
    the model takes them.

    ``output`` selects the class scores when the model returns a tuple/dict (an index, a key
    or a callable; see ``pyconcepts.outputs``); probabilities are read as log-probabilities. ``top``: patches per concept; ``maps``: detection maps per concept; ``rcav``:
    run the RCAV test (the slowest part). ``warnings``: sentences shown first on the index
    (e.g. that the class names may not be the model's). ``class_names``: the model's outputs in
    order (default: ``source.class_names``, e.g. a folder's class subfolders, when they are as
    many as the outputs; else "class j"). ``options``: see ``OPTIONS``.
    """
    if out_dir is None:
        raise TypeError("out_dir must be a path")
    if isinstance(source, torch.Tensor):  # model-ready images, as pc.extract takes them
        source = TensorImages(source)
    root = check_report_folder(out_dir, getattr(source, "root", None))
    # written into a staging folder in out_dir, moved into place when done (report/folder.py)
    staged = StagedFolder(root)
    try:
        written = _write_report_files(
            staged.path, basis, model, layer, source, output=output, batch_size=batch_size, top=top, maps=maps,
            rcav=rcav, seed=seed, progress=progress, warnings=warnings, class_names=class_names, **options)
        staged.commit(written)
    except BaseException:
        staged.discard()
        raise
    return root / "index.html"


def _write_report_files(
    root: pathlib.Path,
    basis,
    model: nn.Module,
    layer: Optional[str],
    source,
    *,
    output=None,
    batch_size: int = 64,
    top: int = 16,
    maps: int = 8,
    rcav: bool = True,
    seed: int = 0,
    progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
    warnings: Sequence[str] = (),
    class_names: Optional[Sequence[str]] = None,
    **options,
) -> Set[str]:
    """``write_report``'s work, writing into ``root`` (its staging folder); returns the
    files written, relative to ``root``."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        known = sorted([*OPTIONS, "batch_size", "top", "maps", "rcav", "seed"])
        raise TypeError(f"write_report got unknown option(s) {unknown}; known: {known}")
    opts = {**OPTIONS, **options}
    for name in ("decoding", "bias", "encoding", "mean", "latent", "n_concepts"):
        if not hasattr(basis, name):
            raise TypeError(f"basis must be a ConceptBasis (it has no {name!r})")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layer = layer if layer is not None else getattr(basis, "layer", None)
    if layer is None:
        raise ValueError("layer is needed: the basis does not record the layer it was extracted at")
    resolve_layer(model, layer)  # a clear error naming the model's layers
    _check_source(source)
    if not isinstance(rcav, bool):  # a JSON string "false" would read as true
        raise TypeError(f"rcav must be true or false, got {rcav!r}")
    batch_size = _check_int("batch_size", batch_size, 1)
    top = _check_int("top", top, 1)
    maps = _check_int("maps", maps, 0)
    influence_images = _check_int("influence_images", opts["influence_images"], 1)
    rcav_images = _check_int("rcav_images", opts["rcav_images"], 2 if rcav else 0)
    rcav_concepts = _check_int("rcav_concepts", opts["rcav_concepts"], 1)
    joint_concepts = _check_int("joint_concepts", opts["joint_concepts"], 0)
    joint_classes = _check_int("joint_classes", opts["joint_classes"], 1)
    n_counterfactuals = _check_int("counterfactuals", opts["counterfactuals"], 0)
    n_random = _check_int("random_concepts", opts["random_concepts"], 0)
    if n_random in (1, 2):
        raise ValueError(f"random_concepts must be 0 (off) or at least 3 (a median of one or two draws is no "
                         f"reference), got {n_random}")
    if opts["rcav_permutations"] is not None:
        _check_int("rcav_permutations", opts["rcav_permutations"], 1)
    rcav_batch = _check_int("rcav_batch", opts["rcav_batch"] or batch_size, 1)
    level = float(opts["rcav_level"])
    if not 0 < level < 1:
        raise ValueError(f"rcav_level must be in (0, 1), got {level!r}")

    # the index shows the warnings on how the outputs were read, as the terminal does
    with _recorded_warnings(OutputWarning) as output_warnings:
        wrapped = OutputSelected(model, output_or_recorded(output, basis))
        tap = LayerTap(wrapped, "inner." + layer, skip_tokens=int(opts["skip_tokens"]), grid=opts["grid"])
        class_names = _class_names(wrapped, tap, source, class_names)  # before the heavy work
        m = measure(wrapped, tap, basis, source, batch_size=batch_size, top=top, maps=maps,
                    influence_images=influence_images, rcav_images=rcav_images if rcav else 0,
                    seed=seed, progress=progress)
        k, c = basis.n_concepts, m.n_classes

        reference = (random_reference(wrapped, tap, basis, m.influence_images, m.patches_fired.double() / m.n_patches,
                                      n_random, batch_size=batch_size, seed=seed, progress=progress)
                     if n_random else None)

        with autograd_on(model, "write_report"):  # the input gradient, also under a caller's no_grad
            rf = receptive_field(tap, m.probe[: int(opts["rf_images"])], m.grid, mass=float(opts["rf_mass"]))

        # rank: influence first, the concept index breaks ties
        order = sorted(range(k), key=lambda i: (-float(m.odds_change[i]), i))

        result, tested, n_perm = None, [], 0
        if rcav and m.rcav_images is not None and m.rcav_images.shape[0] >= 2:
            tested = sorted(order[:rcav_concepts])
            # more than two classes: each concept is tested on one class, the one its measured
            # removal lowers most, so that the cost (null draws x concepts x images) and the
            # Bonferroni factor do not grow with the number of classes
            # (among the classes predicted on enough sampled images to speak for them, as the index does)
            eligible = m.class_images >= MIN_CLASS_IMAGES
            if not bool(eligible.any()):
                eligible = torch.ones_like(eligible)
            rcav_classes = ([int(torch.argmin(m.class_odds_change[i].masked_fill(~eligible, float("inf"))))
                             for i in tested] if c > 2 else None)
            n_tests = len(tested) if rcav_classes is not None else rcav_tests(len(tested), c)
            n_perm = opts["rcav_permutations"] or auto_permutations(n_tests, level)
            result = _rcav(wrapped, basis, m.rcav_images, layer=tap.layer, concepts=tested, n_permutations=n_perm,
                           level=level, seed=seed, batch_size=rcav_batch, skip_tokens=int(opts["skip_tokens"]),
                           progress=progress, classes=rcav_classes, output=as_is)
        row_of = {i: r for r, i in enumerate(tested)}
        joint = (_joint_removals(wrapped, tap, basis, m, class_names, batch_size, joint_concepts, joint_classes,
                                 progress) if joint_concepts else [])
        writer = _Writer(root)
        pictures = _write_pictures(writer, source, m, rf, order, progress)
        counterfactuals = _write_counterfactuals(writer, tap, basis, source, m, class_names, n_counterfactuals,
                                                 batch_size, progress)

        agreement = (getattr(basis, "metadata", None) or {}).get("concept_agreement")
        if agreement is not None and len(agreement) != k:
            agreement = None
        halves = (getattr(basis, "metadata", None) or {}).get("halves_jaccard")  # pc.concept_stability
        if halves is not None and len(halves) != k:
            halves = None
        halves_lowest = (getattr(basis, "metadata", None) or {}).get("halves_lowest")
        if halves is None or halves_lowest is None or len(halves_lowest) != k:
            halves_lowest = None
        views = []
        for rank, i in enumerate(order, start=1):
            effects = []
            for j in range(c):
                e = ClassEffect(class_names[j], float(m.class_odds_change[i, j]), images=int(m.class_images[j]),
                                fires=float(m.class_fire_rate[i, j]))
                if i in row_of:
                    r = row_of[i]
                    e.rcav = float(result.scores[r, j])
                    if not math.isnan(float(result.p_values[r, j])):  # the class it was tested on
                        e.p = float(result.p_values[r, j])
                        e.p_adjusted = float(result.p_adjusted[r, j])
                        e.significant = bool(result.significant[r, j])
                        e.all_draws = int(result.null_scores.shape[0])
                        e.draws = int(result.draws[r]) if result.draws is not None else e.all_draws
                effects.append(e)
            edges = m.histogram.edges(i).tolist()
            w, s = basis.decoding[i].cpu(), basis.encoding[i].cpu()
            views.append(ConceptView(
                index=i, rank=rank, influence=float(m.odds_change[i]), odds_drop=float(m.odds_drop[i]),
                flips=float(m.flips[i]), patch_share=float(m.patches_fired[i]) / m.n_patches,
                image_share=float(m.images_fired[i]) / m.n_images, margin=float(1.0 / w.norm()),
                cos_ws=float(w @ s / (w.norm() * s.norm()).clamp_min(1e-12)),
                hist_counts=m.histogram.counts[i].tolist(), hist_edges=edges,
                patches=pictures["top"][i], maps=pictures["map"][i], effects=effects,
                mask_iou=([(name, float(m.mask_iou[i, j])) for j, name in enumerate(m.mask_names)]
                          if m.mask_iou is not None else None),
                agreement=float(agreement[i]) if agreement is not None else None,
                halves=float(halves[i]) if halves is not None and halves[i] is not None else None,
                halves_lowest=(float(halves_lowest[i]) if halves_lowest is not None and halves_lowest[i] is not None
                               else None),
                edited_share=float(m.edited_patches[i]) / m.n_patches,
                counterfactuals=counterfactuals[i],
            ))

        n_s, n_total = len(m.influence_sample), m.n_images
        sample_words = (f"all {n_total} images" if n_s == n_total else
                        f"a random sample of {n_s} of the {n_total} images (seed {seed})")
        influence_note = (
            f"Removal: pyconcepts.intervene(remove=[i]) on {sample_words}; the concept's latent factor is "
            "lowered to its level where the concept is not detected, along its signal vector, at every patch "
            "(strength 1). Per class, on the sampled images predicted as it: green, the class's log-odds "
            "log(p/(1-p)) fall without the concept (the concept supports it there); red: they rise.")
        rcav_note = ""
        if result is not None:
            tests = n_tests
            floor = min(1.0, tests / (n_perm + 1))
            which = "every concept" if len(tested) == k else f"the {len(tested)} most influential concepts"
            per_test = (" (with two classes, one per concept: the two classes' probabilities move in opposite ways)"
                        if c == 2 else " (one per concept: the class its removal lowers most; the other classes' "
                                       "shares are shown untested)")
            rcav_note = (
                f"RCAV (on {which}): the share of {m.rcav_images.shape[0]} images whose class probability rises when "
                f"the concept is added (alpha = its mean latent factor where detected); p against {n_perm} random "
                f"concepts of the same size (signal vectors of random filters' top patches; a concept's draws stop once "
                f"it can no longer be significant, {_draws_words(result)}), Bonferroni over {tests} "
                f"tests" + per_test + f"; * = p (Bonferroni) < {level:g}. The smallest "
                f"attainable Bonferroni p is {floor:.3g}" + (" (raise rcav_permutations to reach significance)."
                                                          if floor >= level else "."))
            # on the tested (concept, class) pairs only: a concept that moves every image alike (0% or
            # 100%) can get no smaller p than the share of null draws that do so too
            tested_pairs = ~result.p_values.isnan()                                     # (K', C)
            nulls = result.null_scores[:, tested_pairs]                                  # (draws, pairs)
            made = ~nulls.isnan()                                                        # stopped early: NaN
            extreme = ((nulls == 0) | (nulls == 1)) & made
            saturated = float(extreme.sum()) / int(made.sum()) if bool(made.any()) else 0.0
            if saturated >= 0.05:
                rcav_note += (
                    f" Here {saturated:.0%} of the null draws on the tested classes are 0% or 100%: random concepts, too, "
                    "move every image's probability the same way, so a concept that does so gets a p no smaller than "
                    "that share" + (" and the test cannot tell it from chance" if saturated >= 0.5 else "") +
                    " (typical when the rest of the network is close to linear, such as pooling and a linear head).")
        crop_note = (f"One patch per image: the {top} images whose best patch scores highest, that patch outlined "
                     f"(its cell of the {m.grid[0]} x {m.grid[1]} grid). {rf.describe()[0].upper()}{rf.describe()[1:]}. "
                     "Captions: image name and detector score.")
        map_note = ("The images whose best patch scores highest (as the top patches) among those the detector fires "
                    "on in part (on some patches, under 90% of them), so that where it fires and where it does not "
                    "both show: bright where it fires, dark where it does not; the yellow line is w.x = b (scores "
                    "upsampled bilinearly to the image). Captions: image name and the share of its patches where it "
                    "fires.")
        counterfactual_note = (
            f"The images of {sample_words} whose predicted class's log-odds removing this concept changes most (at "
            f"least {MIN_REMOVAL_EFFECT:g}), measured as the influence is: lit where the removal edits the layer (the "
            "concept's latent factor above its absent level, brighter where it is further above; upsampled "
            "bilinearly), the yellow line where the edit starts. Captions: image name; its predicted class's "
            "log-odds before and after the removal, and the new prediction where it changes.")
        notes = [
            f"Influence: the mean change of the predicted class's log-odds, |log(p'/(1-p')) - log(p/(1-p))| (the "
            f"margin of the prediction; unlike a probability it still moves when the model is confident), when the "
            f"concept is removed at {layer} from {sample_words} (as pc.rank_concepts(target='predicted') "
            f"measures it). Flips: predictions that change." + (
                f" Reference: {len(reference.influence)} random concepts, each a random filter detected on as many "
                f"patches as a concept of the basis, with the signal vector of those patches, removed the same way "
                f"(scaled by {reference.strength:.3g} so that their median edit of a patch is as large as the "
                f"concepts'): their influence has median {reference.median:.3f} (the red tick in each bar; range "
                f"{float(reference.influence.min()):.3f}-{reference.highest:.3f}). A concept no more influential than "
                f"the median (grey bar) moves the predictions no more than a typical random edit of the layer of "
                f"that size; the bar's tooltip says how many random concepts it exceeds. It is a rough reference: a "
                f"few draws, and each random concept edits more or less than the median (influence grows with the "
                f"edit), so another seed moves it, and the largest random influence most. An unconfident or fragile "
                f"model moves under any edit." if reference is not None else ""),
            "Fires on: the share of the layer's patches where the detector fires (w.x > b on the raw activation); "
            "edits: the share its removal edits (its latent factor above its level where it is not detected), so "
            "much of its influence can come from patches where it is not detected.",
            *(["Agree: how well the concept's cluster overlaps its partners in the other k-means restarts "
               "of the extraction that came near the best one (matched Jaccard); below 0.5 (marked !) the clustering "
               "could as well have drawn the concept elsewhere, and another seed may not give it back. It is a weak "
               "guide to what other images change" + ("." if halves is not None else ": extract --stability "
                                                      "(pc.concept_stability) measures that.")]
              if agreement is not None else []),
            *([f"Halves: the split-half check (pc.concept_stability, extract --stability): the images were split "
               f"into two random halves and extracted again on each; the mean Jaccard of the concept's detection set "
               f"with its partners there / the lowest, in the half that gave it back worst. Marked ! where the mean "
               f"is below {LOW_HALVES_JACCARD:g} or the lowest below {VANISHED_JACCARD:g} (a half merged it into "
               f"another concept or drew it elsewhere): other images change it. Half with half (above): how well "
               f"the two halves' concepts agree with each other overall."] if halves is not None else []),
            "Pushes up / down: the classes whose log-odds fall / rise the most (by at least 0.01) when the concept "
            "is removed, each measured on the sampled images predicted as it (a class predicted on fewer than "
            f"{MIN_CLASS_IMAGES} of them is left out here: one image would speak for it; the concept pages give "
            "every class with its image count)" +
            ("; classes marked * come first: RCAV finds that adding the concept raises / lowers their "
             "probability significantly. " + rcav_note if result is not None else " (RCAV not run)."),
            f"Top patches: {crop_note}",
        ]
        if m.mask_iou is not None:
            notes.append("Best mask IoU: Network-Dissection IoU of the detector's upsampled map with the source's "
                         "ground-truth masks, summed over all images; the best-matching mask is named.")
        from .. import __version__

        model_name = getattr(basis, "model_id", None) or type(model).__name__
    view = ReportView(
        title=opts["title"] or f"Concepts of {model_name} at {layer}",
        facts=[("model", model_name), ("layer", layer), ("grid", f"{m.grid[0]} x {m.grid[1]}"),
               ("input", f"{m.input_size[0]} x {m.input_size[1]}"), ("images", str(n_total)),
               ("concepts", str(k)), ("classes", str(c)),
               *([("random concepts' influence", f"median {reference.median:.3f} ({len(reference.influence)} draws)")]
                 if reference is not None else []),
               *([("half with half", f"{float(basis.metadata['halves_mean_jaccard']):.2f} "
                                     f"({int(basis.metadata.get('halves_splits', 1))} random splits)")]
                 if halves is not None and basis.metadata.get("halves_mean_jaccard") is not None else [])],
        notes=notes, concepts=views, has_masks=m.mask_iou is not None, has_rcav=result is not None,
        random_influence=reference.influence.tolist() if reference is not None else None,
        rcav_note=rcav_note, version=__version__, joint=joint,
        warnings=[str(w) for w in warnings] + output_warnings
                 + _unread_layer_warning(m, joint, layer, int(opts["skip_tokens"])),
        joint_note=(
            f"A network can spread what it relies on over several concepts; removing one of them then changes "
            f"few predictions (the flips above) while removing them together changes many. Per class predicted "
            f"on {sample_words}: its (up to) {joint_concepts} strongest supporters, the concepts whose single "
            f"removal lowers its log-odds the most (by at least {MIN_REMOVAL_EFFECT:g}) on the images predicted "
            f"as it, removed together from those images; the mean log-odds log(p/(1-p)) of the class before and "
            f"after, and the share of those predictions that change (changed). Every concept removed: the "
            f"same with all {k} concepts removed at once, what the concepts carry together (the other classes' "
            f"concepts go too, which can raise a class); layer at its mean: every patch of the layer replaced by one row, "
            f"the layer's mean activation over all patches (this erases where things are, too), what the layer "
            f"carries at all. A class whose log-odds stay high with every concept removed but fall with the "
            f"layer at its mean relies on something the concepts do not capture; one that stays high with the "
            f"layer at its mean does not need this layer, or reaches the output around it (a skip connection or a "
            f"concatenation that bypasses it); every concept removed can also "
            f"go further than the layer at its mean (a removal lowers each concept to its absent level, below "
            f"the mean). Detections left / new: the removed concepts' detections on those images that remain "
            f"after the removal, and those it creates, as shares of the detections before it. Several concepts "
            f"are removed one after another, and where a later one's signal vector raises the filter of one "
            f"removed earlier, that one comes back in part (on a post-ReLU layer the ReLU after the edit moves them "
            f"too). A large share left or new says the removal did not "
            f"take those concepts out, and its log-odds do not measure what they carry."),
    )
    writer.write("report.css", CSS)
    for j, cv in enumerate(views):
        writer.write(cv.page, concept_page(view, cv, crop_note, map_note, influence_note, counterfactual_note))
        if progress:
            progress("report: pages", j + 1, len(views) + 1)
    writer.write("index.html", index_page(view))
    if progress:
        progress("report: pages", len(views) + 1, len(views) + 1)
    return writer.written


@contextlib.contextmanager
def _recorded_warnings(category):
    """Collects the distinct messages of ``category`` warned inside the block into the list it
    yields. The warnings recorded in the block (any category, under the caller's filters) are
    shown when it ends, each distinct one once."""
    messages: List[str] = []
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.filterwarnings("always", category=category)  # each call's, to be deduplicated below
        yield messages
    shown = set()
    for w in caught:
        key = (w.category, str(w.message), w.filename, w.lineno)
        if key in shown:
            continue
        shown.add(key)
        if issubclass(w.category, category) and str(w.message) not in messages:
            messages.append(str(w.message))
        _warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _draws_words(result) -> str:
    """How many null draws the RCAV test made per tested concept, in words."""
    n = result.null_scores.shape[0]
    if result.draws is None:
        return f"{n} draws each"
    made = [int(d) for d in result.draws]
    if all(d == n for d in made):
        return f"all {n} draws made for each"
    return "draws made: " + ", ".join(f"concept {i}: {d}" for i, d in zip(result.concepts, made))


def _unread_layer_warning(m: Measurements, joint: List[JointRemoval], layer: str, skip_tokens: int) -> List[str]:
    """A warning when no removal moves any output and neither does the layer at its mean: the
    outputs do not read the edited positions, so every influence is 0 for that reason."""
    if float(m.odds_change.abs().max()) > 1e-6:
        return []
    if any(j.mean_after is not None and abs(j.mean_after - j.before) > 1e-6 for j in joint):
        return []
    skipped = (f" The first {skip_tokens} token(s) are not edited (skip_tokens): a head that reads only them, "
               "such as a transformer's class token at its last block, ignores every patch token."
               if skip_tokens else "")
    return [f"No concept's removal changes any output, and replacing every patch of {layer} by its mean does "
            f"not either: the model's outputs do not read the positions edited here, so the influences below are "
            f"0 for that reason, not because the concepts do not matter.{skipped} Tap an earlier layer."]


def _class_names(model: nn.Module, tap: LayerTap, source, given: Optional[Sequence[str]]) -> List[str]:
    """The names of the model's outputs, checked on one image before any heavy work: ``given``
    (they must be as many as the outputs), else the source's class names when they are, else
    "class j" (with a warning when the source's names are a different number)."""
    first = next(iter(source.batches(1)), None)
    if first is None:
        raise ValueError("source is empty: no images to report on")
    with tap.eval_mode(), torch.no_grad():
        n_outputs = int(model(tap._check_images(first[:1])).shape[-1])
    if given is not None:
        if isinstance(given, (str, bytes)) or not all(isinstance(n, str) for n in given):
            raise TypeError(f"class_names must be a list of str, one per output, got {given!r}")
        names = list(given)
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class_names names {twice[0]!r} twice")
        if len(names) != n_outputs:
            raise ValueError(f"class_names has {len(names)} names but the model outputs {n_outputs} classes")
        return names
    names = getattr(source, "class_names", None)
    if names is not None and len(names) != n_outputs:
        _warnings.warn(f"the source names {len(names)} classes (e.g. its subfolders) but the model outputs "
                       f"{n_outputs}: the report calls them class 0 .. class {n_outputs - 1}; pass class_names= "
                       "to name them", stacklevel=3)
        names = None
    return [str(n) for n in names] if names is not None else [f"class {j}" for j in range(n_outputs)]


def _joint_removals(model: nn.Module, tap: LayerTap, basis, m: Measurements, class_names: List[str],
                    batch_size: int, size: int, max_classes: int, progress) -> List[JointRemoval]:
    """Per class predicted on the influence sample (the most predicted first, at most
    ``max_classes``): its ``size`` strongest supporters by single removal on those images
    (``m.class_odds_change``), removed together from the sample images predicted as it."""
    from ..interventions import intervene, log_odds

    images = m.influence_images
    if images is None or images.shape[0] == 0:
        return []

    mean = basis.mean.detach()

    def logits_of(x, remove=None, layer_mean=False, detections=None):
        """The model's outputs on ``x`` with the concepts ``remove`` removed, or with the layer
        at its mean; with ``remove``, ``detections`` (a list) receives, per image, the removed
        concepts' (patch, concept) detections before, kept and new: three (N,) tensors."""
        out = []
        counts = []
        with tap.eval_mode(), torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                chunk = tap._check_images(x[start:start + batch_size])
                if layer_mean:  # every patch row replaced by the layer's mean row
                    out.append(tap.forward_rows(chunk, lambda rows: mean.to(rows).expand_as(rows)).float().cpu())
                else:
                    rows = {}

                    def grab(key):
                        def hook(module, inputs, output):
                            rows[key] = basis.detect(tap.to_rows(output).float().cpu())[:, remove]
                        return hook

                    # hooks run in the order they were added: one before the edit, one after
                    first = tap.module.register_forward_hook(grab("before"))
                    try:
                        with intervene(model, basis, layer=tap.layer, remove=remove, skip_tokens=tap.skip_tokens):
                            last = tap.module.register_forward_hook(grab("after"))
                            try:
                                out.append(model(chunk).float().cpu())
                            finally:
                                last.remove()
                    finally:
                        first.remove()
                    b = chunk.shape[0]
                    was, now = rows["before"].reshape(b, -1), rows["after"].reshape(b, -1)
                    counts.append(torch.stack([was.sum(1), (was & now).sum(1), (~was & now).sum(1)]))
        if detections is not None and counts:
            detections.extend(torch.cat(counts, 1).unbind(0))
        return torch.cat(out)

    def shares(counts, sel=None):
        """Detections kept and new as shares of those before (None where there were none)."""
        if not counts:
            return None, None
        seen, kept, new = (int((c if sel is None else c[sel]).sum()) for c in counts)
        return (kept / seen if seen else None), (new / seen if seen else None)

    # the unedited outputs were measured by the ranking: each image's top class and its log-odds
    predicted, before_odds = m.predicted, m.image_odds.double()
    # what all the concepts carry, against what the whole layer carries: every concept removed,
    # and the layer replaced by its mean (its content gone)
    every_counts: List[torch.Tensor] = []
    every = logits_of(images, list(range(basis.n_concepts)), detections=every_counts)
    flat = logits_of(images, layer_mean=True)
    predictions = torch.bincount(predicted, minlength=m.n_classes)
    classes = [int(c) for c in torch.argsort(predictions, descending=True, stable=True)
               if predictions[c] > 0][:max_classes]
    joint = []
    if progress:  # each class's removals take a while: the stage starts here
        progress("report: joint removals", 0, len(classes))
    for j, c in enumerate(classes):
        change = m.class_odds_change[:, c]
        supporters = [int(i) for i in torch.argsort(change, stable=True)[:size] if change[i] <= -MIN_REMOVAL_EFFECT]
        sel = predicted == c
        cls = torch.full((int(sel.sum()),), c)
        removed_counts: List[torch.Tensor] = []
        if supporters:
            after = logits_of(images[sel], supporters, detections=removed_counts)
            after_odds, after_changed = log_odds(after, cls).mean(), (after.argmax(1) != c).double().mean()
        else:
            after_odds, after_changed = before_odds[sel].mean(), torch.zeros(())
        left, created = shares(removed_counts)
        all_left, all_created = shares(every_counts, sel)
        joint.append(JointRemoval(
            class_names[c], int(sel.sum()), supporters, float(before_odds[sel].mean()),
            float(after_odds), float(after_changed),
            all_after=float(log_odds(every[sel], cls).mean()),
            all_changed=float((every[sel].argmax(1) != c).double().mean()),
            mean_after=float(log_odds(flat[sel], cls).mean()),
            mean_changed=float((flat[sel].argmax(1) != c).double().mean()),
            left=left, created=created, all_left=all_left, all_created=all_created))
        if progress:
            progress("report: joint removals", j + 1, len(classes))
    return joint


def _write_counterfactuals(writer: _Writer, tap: LayerTap, basis, source, m: Measurements,
                           class_names: List[str], per_concept: int, batch_size: int,
                           progress) -> Dict[int, List[Picture]]:
    """Per concept, the (up to) ``per_concept`` sampled images whose predicted class's log-odds
    its removal changes most (by at least ``MIN_REMOVAL_EFFECT``), drawn lit where the removal
    edits the layer, with the log-odds before and after."""
    from .pictures import overlay_png

    k = basis.n_concepts
    out: Dict[int, List[Picture]] = {i: [] for i in range(k)}
    if per_concept == 0 or m.image_change is None or m.influence_images is None:
        return out
    chosen = {}
    for i in range(k):
        change = m.image_change[i]
        top = torch.argsort(change.abs(), descending=True, stable=True)[:per_concept].tolist()
        chosen[i] = [j for j in top if abs(float(change[j])) >= MIN_REMOVAL_EFFECT]
    positions = sorted({j for picked in chosen.values() for j in picked})
    if not positions:
        return out
    level = getattr(basis, "absent_level", None)
    level = torch.zeros(k) if level is None else level.detach().cpu().float()
    # where the default removal edits: the latent factor above its absent level
    edit_maps: Dict[int, torch.Tensor] = {}
    if progress:
        progress("report: counterfactuals", 0, k)
    for start in range(0, len(positions), batch_size):
        part = positions[start:start + batch_size]
        with torch.no_grad():
            rows = tap.to_rows(tap.activations(m.influence_images[part])).float().cpu()
        above = tap.rows_to_maps(basis.latent(rows) - level, len(part))  # (b, K, h, w)
        for t, j in enumerate(part):
            edit_maps[j] = above[t]
    names = source.names
    pictures = source.display([m.influence_sample[j] for j in positions])
    if not isinstance(pictures, torch.Tensor) or pictures.dim() != 4 or pictures.shape[0] != len(positions):
        raise ValueError("source.display must return (n, H, W, 3) uint8 pictures")
    picture_of = dict(zip(positions, pictures.to(torch.uint8).cpu().numpy()))
    done = 0
    for i in range(k):
        for slot, j in enumerate(chosen[i]):
            name = str(names[m.influence_sample[j]])
            cls, after_cls = int(m.predicted[j]), int(m.image_after[i, j])
            before = float(m.image_odds[j])
            after = before - float(m.image_change[i, j])
            edit = edit_maps[j][i]
            # brightness: sigmoid of the edit in units of a third of this image's largest one
            scale = max(float(edit.max()), 1e-12) / 3
            rel = f"images/c{i:03d}-removed-{slot:02d}.png"
            writer.write(rel, overlay_png(picture_of[j], edit / scale))
            now = f", now {class_names[after_cls]}" if after_cls != cls else ""
            share = float((edit > 0).float().mean())
            out[i].append(Picture(
                rel, name, f"{class_names[cls]} {before:+.2f} \u2192 {after:+.2f}{now}",
                f"{name}: predicted {class_names[cls]}, log-odds {before:+.3f} before and {after:+.3f} after "
                f"concept {i} is removed" + (f"; the prediction becomes {class_names[after_cls]}" if now else "")
                + f"; the removal edits {100 * share:.0f}% of its patches"))
        done += 1
        if progress:
            progress("report: counterfactuals", done, k)
    return out


def _write_pictures(writer: _Writer, source, m: Measurements, rf: ReceptiveField, order: List[int],
                    progress) -> Dict[str, Dict[int, List[Picture]]]:
    """Fetch the display pictures of the images shown (in chunks) and write the crops and maps."""
    from .pictures import crop_png, overlay_png

    names = source.names
    h, w = m.grid
    needs: Dict[int, list] = defaultdict(list)
    for i in range(m.top_patches.values.shape[0]):
        for slot in range(m.top_patches.values.shape[1]):
            if math.isfinite(float(m.top_patches.values[i, slot])):
                needs[int(m.top_patches.index[i, slot])].append(("top", i, slot))
        for slot in range(m.top_maps.values.shape[1]):
            if math.isfinite(float(m.top_maps.values[i, slot])):
                needs[int(m.top_maps.index[i, slot])].append(("map", i, slot))
    out = {"top": defaultdict(dict), "map": defaultdict(dict)}
    indices = sorted(needs)
    chunk = 32
    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        pics = source.display(part)
        if not isinstance(pics, torch.Tensor) or pics.dim() != 4 or pics.shape[0] != len(part) or pics.shape[-1] != 3:
            raise ValueError(f"source.display must return (n, H, W, 3) uint8 pictures, got "
                             f"{tuple(pics.shape) if isinstance(pics, torch.Tensor) else type(pics).__name__}")
        pics = pics.to(torch.uint8).cpu().numpy()
        for picture, img in zip(pics, part):
            scale = (picture.shape[0] / m.input_size[0], picture.shape[1] / m.input_size[1])
            for kind, i, slot in needs[img]:
                name = str(names[img])
                if kind == "top":
                    pos = int(m.top_patches.payload["pos"][i, slot])
                    r, col = divmod(pos, w)
                    score = float(m.top_patches.values[i, slot])
                    latent = float(m.top_patches.payload["latent"][i, slot])
                    rel = f"images/c{i:03d}-top-{slot:02d}.png"
                    writer.write(rel, crop_png(picture, rf.box(r, col, scale), rf.cell_box(r, col, scale)))
                    out["top"][i][slot] = Picture(
                        rel, name, f"score {score:+.2f}",
                        f"{name}: patch ({r}, {col}), detector score {score:+.3f}, latent factor {latent:.3f}")
                else:
                    score_map = m.top_maps.payload["map"][i, slot].float()
                    share = float((score_map > 0).float().mean())
                    rel = f"images/c{i:03d}-map-{slot:02d}.png"
                    writer.write(rel, overlay_png(picture, score_map))
                    out["map"][i][slot] = Picture(
                        rel, name, f"fires on {100 * share:.0f}% of it",
                        f"{name}: fires on {100 * share:.1f}% of the patches, mean membership "
                        f"{float(torch.sigmoid(score_map).mean()):.3f}")
        if progress:
            progress("report: pictures", min(start + chunk, len(indices)), len(indices))
    k = m.top_patches.values.shape[0]
    return {kind: {i: [out[kind][i][s] for s in sorted(out[kind][i])] for i in range(k)} for kind in out}
