"""The report's pages: plain HTML, one shared stylesheet, inline SVG charts; every piece of
text goes through ``esc``."""
from __future__ import annotations

import html
import math
import statistics
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from ..directions import LOW_CONCEPT_AGREEMENT
from ..stability import LOW_HALVES_JACCARD, VANISHED_JACCARD, unstable_concepts

__all__ = ["esc", "CSS", "ConceptView", "ClassEffect", "Picture", "ReportView", "index_page", "concept_page",
           "histogram_svg"]


def esc(text) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class Picture:
    src: str          # path relative to the report's root
    caption: str      # the image's name
    detail: str       # one short figure under it
    title: str        # the tooltip


@dataclass
class ClassEffect:
    name: str
    removal: float                 # mean change of the class's log-odds when the concept is removed,
                                   # on the sample images predicted as the class (0 without any)
    images: int = 0                # those images
    fires: Optional[float] = None  # share of those images where the detector fires
    rcav: Optional[float] = None   # fraction of images whose probability rose when it was added
    p: Optional[float] = None
    p_adjusted: Optional[float] = None
    significant: bool = False
    draws: Optional[int] = None      # null draws RCAV made before it stopped (None: all of them)
    all_draws: Optional[int] = None  # the draws a full test makes

    @property
    def rcav_supported(self) -> bool:
        """Significant under RCAV, and the measured removal does not point the other way
        (adding the concept raises the class while removing it raises the class too, or the
        reverse: the two tests disagree, and the measured removal is shown)."""
        if not self.significant or self.rcav is None:
            return False
        if self.rcav > 0.5:
            return self.removal < MIN_REMOVAL_EFFECT
        return self.removal > -MIN_REMOVAL_EFFECT


@dataclass
class ConceptView:
    index: int
    rank: int
    influence: float               # mean |change| of the predicted class's log-odds when removed
    odds_drop: float               # its signed mean: > 0 when the concept supports the prediction
    flips: float
    patch_share: float
    image_share: float
    margin: float
    cos_ws: float
    hist_counts: List[int]
    hist_edges: List[float]
    patches: List[Picture]
    maps: List[Picture]
    effects: List[ClassEffect]     # every class
    mask_iou: Optional[List[Tuple[str, float]]] = None
    agreement: Optional[float] = None  # overlap with its partners in near-best k-means restarts
    halves: Optional[float] = None  # mean Jaccard with its partners in the split-half check
    halves_lowest: Optional[float] = None  # ... in the half that gave it back worst
    edited_share: Optional[float] = None  # patches the default removal edits
    counterfactuals: List[Picture] = field(default_factory=list)  # sampled images its removal moves most

    @property
    def page(self) -> str:
        return f"concepts/concept-{self.index:03d}.html"

    def up_down(self, n: int = 3) -> Tuple[List[ClassEffect], List[ClassEffect]]:
        """Classes the concept pushes up and down: first those RCAV finds significant (where the
        measured removal does not point the other way), then by the log-odds the class loses /
        gains when the concept is removed, leaving out changes below ``MIN_REMOVAL_EFFECT`` (a
        non-significant RCAV score says nothing) and classes predicted on fewer than
        ``MIN_CLASS_IMAGES`` sampled images (one image's change would speak for the class)."""
        effects = [e for e in self.effects if e.images >= MIN_CLASS_IMAGES]
        sig_up = sorted((e for e in effects if e.rcav_supported and e.rcav > 0.5), key=lambda e: -e.rcav)
        sig_down = sorted((e for e in effects if e.rcav_supported and e.rcav < 0.5), key=lambda e: e.rcav)
        rest = [e for e in effects if not e.rcav_supported]
        up = sig_up + sorted((e for e in rest if e.removal <= -MIN_REMOVAL_EFFECT), key=lambda e: e.removal)
        down = sig_down + sorted((e for e in rest if e.removal >= MIN_REMOVAL_EFFECT), key=lambda e: -e.removal)
        return up[:n], down[:n]


@dataclass
class JointRemoval:
    class_name: str
    n_images: int                  # sample images predicted as the class
    concepts: List[int]            # its strongest supporters, removed together
    before: float                  # mean log-odds of the class on those images
    after: float                   # ... with the concepts removed
    changed: float                 # share of those predictions that change
    all_after: Optional[float] = None     # mean log-odds with every concept removed
    all_changed: Optional[float] = None   # ... and the share of predictions that change
    mean_after: Optional[float] = None    # mean log-odds with the layer replaced by its mean
    mean_changed: Optional[float] = None
    # the removed concepts' detections (patch, concept) that the removal keeps / creates, as
    # shares of those before it (several removals can bring one back: see interventions)
    left: Optional[float] = None
    created: Optional[float] = None
    all_left: Optional[float] = None      # ... with every concept removed
    all_created: Optional[float] = None


@dataclass
class ReportView:
    title: str
    facts: List[Tuple[str, str]]          # (label, value) shown under the title
    notes: List[str]                      # how to read the figures (plain text, escaped)
    concepts: List[ConceptView]           # in rank order
    has_masks: bool
    has_rcav: bool
    rcav_note: str = ""
    version: str = ""
    joint: List[JointRemoval] = field(default_factory=list)
    joint_note: str = ""
    warnings: List[str] = field(default_factory=list)  # shown first on the index (plain text)
    # the influences of random concepts removed the same way (see report.collect.random_reference)
    random_influence: Optional[List[float]] = None

    @property
    def random_median(self) -> float:
        return float(statistics.median(self.random_influence)) if self.random_influence else 0.0

    def below_random(self, c: "ConceptView") -> bool:
        """The concept's influence is no larger than the median random concept's."""
        return bool(self.random_influence) and c.influence <= self.random_median

    def random_words(self, c: "ConceptView") -> str:
        """Where the concept's influence stands among the random concepts', in words."""
        n = len(self.random_influence or [])
        above = sum(1 for v in self.random_influence or [] if c.influence > v)
        return (f"larger than {above} of the {n} random concepts' (median {self.random_median:.3f}, range "
                f"{min(self.random_influence):.3f}-{max(self.random_influence):.3f})")


CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --bg: #f6f8fa; --card: #ffffff;
  --accent: #0969da; --fire: #d4760a; --up: #1a7f37; --down: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--ink); background: var(--bg); }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 6px; }
h2 { font-size: 17px; margin: 0 0 10px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.facts { display: flex; flex-wrap: wrap; gap: 6px 18px; color: var(--muted); margin: 4px 0 16px; }
.facts b { color: var(--ink); font-weight: 600; }
.card.warning { border-left: 4px solid var(--down); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 16px 18px; overflow-x: auto;
  margin: 14px 0; }
.notes { color: var(--muted); font-size: 13px; margin: 0; padding-left: 18px; }
.notes li { margin: 2px 0; }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .03em; border-bottom: 1px solid var(--line); padding: 6px 8px; white-space: nowrap; }
td { border-bottom: 1px solid #eef1f4; padding: 6px 8px; vertical-align: middle; }
tr:last-child td { border-bottom: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.rank { color: var(--muted); font-variant-numeric: tabular-nums; }
.name { font-weight: 600; white-space: nowrap; }
.bar { position: relative; height: 10px; width: 120px; background: #eef1f4; border-radius: 5px; overflow: hidden;
  display: inline-block; vertical-align: middle; margin-right: 8px; }
.bar > span { position: absolute; left: 0; top: 0; bottom: 0; background: var(--accent); border-radius: 5px; }
.bar > i.ref { position: absolute; top: 0; bottom: 0; width: 2px; background: var(--down); }
.bar.weak > span { background: #9aa5b1; }
.thumbs { display: flex; flex-wrap: wrap; gap: 3px; min-width: 127px; }
td.push { max-width: 190px; overflow-wrap: anywhere; }
td.push .cls { white-space: normal; display: block; }
.thumbs img { width: 40px; height: 40px; border-radius: 3px; image-rendering: pixelated; display: block; }
.cls { white-space: nowrap; }
.up { color: var(--up); } .down { color: var(--down); }
.sig { font-weight: 700; }
.weak { opacity: .6; }
.muted { color: var(--muted); }
.small { font-size: 12px; }
.nav { display: flex; justify-content: space-between; margin-bottom: 10px; font-size: 13px; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; margin: 10px 0 4px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.stat .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.stat .l { color: var(--muted); font-size: 12px; }
.grid { display: grid; gap: 10px; }
.grid.patches { grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); }
.grid.maps { grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); }
figure { margin: 0; }
figure img { width: 100%; height: auto; display: block; border-radius: 4px; image-rendering: pixelated;
  background: #000; }
figcaption .detail { color: var(--ink); font-variant-numeric: tabular-nums; }
figcaption { font-size: 11px; color: var(--muted); margin-top: 3px; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
.two { display: grid; grid-template-columns: minmax(0, 5fr) minmax(0, 6fr); gap: 14px; }
.effects td, .effects th { padding: 5px 6px; }
@media (max-width: 900px) { .two { grid-template-columns: 1fr; } }
.two > .col > .card:first-child { margin-top: 0; }
svg.hist { width: 100%; height: auto; max-width: 640px; display: block; }
td .cls { display: block; }
.caption { color: var(--muted); font-size: 12px; margin: 6px 0 0; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; fill: #59636e; }
footer { color: var(--muted); font-size: 12px; margin-top: 24px; }
"""


def _page(title: str, body: str, root: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<link rel=\"stylesheet\" href=\"{esc(root)}report.css\">\n"
        f"</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _pct(x: float) -> str:
    if x == 0:
        return "0%"
    if x < 0.001:
        return "<0.1%"
    return f"{100 * x:.1f}%"


def _p(p: Optional[float]) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


# a class whose probability moves less than this when the concept is removed is not listed
MIN_REMOVAL_EFFECT = 1e-2   # log-odds
# nor one predicted on fewer sampled images than this: its mean change would be one or two images'
MIN_CLASS_IMAGES = 5


def _class_tag(e: ClassEffect, kind: str) -> str:
    arrow = "&#8593;" if kind == "up" else "&#8595;"
    if e.rcav_supported:
        return (f"<span class=\"cls {kind} sig\" title=\"significant (RCAV, Bonferroni)\">"
                f"{arrow}&#160;{esc(e.name)}*</span>")
    why = ("from the removal effect" if e.rcav is None else
           "from the removal effect (RCAV: significant the other way; the measured removal is shown)"
           if e.significant else "from the removal effect (RCAV: not significant)")
    return f"<span class=\"cls {kind} weak\" title=\"{why}\">{arrow}&#160;{esc(e.name)}</span>"


def _facts(facts: Sequence[Tuple[str, str]]) -> str:
    return "<div class=\"facts\">" + "".join(
        f"<span>{esc(label)}: <b>{esc(value)}</b></span>" for label, value in facts) + "</div>"


# ------------------------------------------------------------------------------ index
def index_page(view: ReportView) -> str:
    # the bars' scale: the largest concept (or the random median's tick, when above it)
    top = max([c.influence for c in view.concepts] + ([view.random_median] if view.random_influence else [])) or 1.0
    agree = any(c.agreement is not None for c in view.concepts)
    halves = any(c.halves is not None or c.halves_lowest is not None for c in view.concepts)
    head = ["#", "concept", "influence", "flips", "fires on"] + (["agree"] if agree else []) + \
        (["halves"] if halves else []) + ["pushes up", "pushes down"]
    if view.has_masks:
        head.append("best mask IoU")
    head.append("top patches")
    num = {"flips", "fires on", "best mask IoU", "agree", "halves"}
    rows = []
    for c in view.concepts:
        up, down = c.up_down(2)
        cells = [
            f"<td class=\"rank\">{c.rank}</td>",
            f"<td class=\"name\"><a href=\"{esc(c.page)}\">concept {c.index}</a></td>",
            _influence_cell(view, c, top),
            f"<td class=\"num\">{esc(_pct(c.flips))}</td>",
            f"<td class=\"num\" title=\"{esc(_pct(c.image_share))} of the images\">{esc(_pct(c.patch_share))}"
            + (f"<br><span class=\"muted small\" title=\"patches its removal edits (its latent factor above its "
               f"level where it is not detected)\">edits {esc(_pct(c.edited_share))}</span>"
               if c.edited_share is not None else "") + "</td>",
            *([_agreement_cell(c.agreement)] if agree else []),
            *([_halves_cell(c)] if halves else []),
            "<td class=\"push\">" + (" ".join(_class_tag(e, "up") for e in up) or "<span class=\"muted\">-</span>")
            + "</td>",
            "<td class=\"push\">" + (" ".join(_class_tag(e, "down") for e in down)
                                     or "<span class=\"muted\">-</span>") + "</td>",
        ]
        if view.has_masks:
            if c.mask_iou:
                name, best = max(c.mask_iou, key=lambda t: t[1])
                cells.append(f"<td class=\"num\">{best:.2f} <span class=\"muted\">{esc(name)}</span></td>")
            else:
                cells.append("<td class=\"num muted\">-</td>")
        thumbs = "".join(f"<img src=\"{esc(p.src)}\" alt=\"\" title=\"{esc(p.title)}\">" for p in c.patches[:6])
        cells.append(f"<td><a class=\"thumbs\" href=\"{esc(c.page)}\">{thumbs}</a></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th class=\"num\">{esc(h)}</th>" if h in num else f"<th>{esc(h)}</th>" for h in head)
    notes = "".join(f"<li>{esc(n)}</li>" for n in view.notes)
    body = (
        f"<h1>{esc(view.title)}</h1>\n{_facts(view.facts)}\n{_warnings_card(view)}"
        f"<div class=\"card\"><h2>Concepts, most influential first</h2>\n"
        f"<table class=\"ranking\">\n<thead><tr>{header}</tr></thead>\n<tbody>\n" + "\n".join(rows) +
        "\n</tbody>\n</table></div>\n" + _joint_card(view) +
        f"<div class=\"card\"><h2>How to read this report</h2><ul class=\"notes\">{notes}</ul></div>\n"
        f"<footer>Written by pyconcepts {esc(view.version)}. Static files: no network, no server.</footer>"
    )
    return _page(view.title, body, "")


def _influence_cell(view: ReportView, c: ConceptView, top: float) -> str:
    """The influence with its bar; with random concepts measured, a red tick at their median
    influence, the bar greyed where the concept's is no larger, and the tooltip saying how many
    random concepts it exceeds."""
    bar = f"<span style=\"width:{100 * c.influence / top:.1f}%\"></span>"
    if not view.random_influence:
        return f"<td class=\"num\"><span class=\"bar\">{bar}</span>{c.influence:.3f}</td>"
    tick = f"<i class=\"ref\" style=\"left:{min(100 * view.random_median / top, 99.0):.1f}%\"></i>"
    weak = view.below_random(c)
    title = ("removing it changes the predictions " + view.random_words(c) + "; the red tick: their median"
             + ("; no more than a typical random edit of the layer" if weak else ""))
    return (f"<td class=\"num{' muted' if weak else ''}\" title=\"{esc(title)}\">"
            f"<span class=\"bar{' weak' if weak else ''}\">{bar}{tick}</span>{c.influence:.3f}</td>")


def _warnings_card(view: ReportView) -> str:
    if not view.warnings:
        return ""
    return ("<div class=\"card warning\"><h2>Check before you read on</h2><ul class=\"notes\">"
            + "".join(f"<li>{esc(w)}</li>" for w in view.warnings) + "</ul></div>\n")


# concepts whose restart agreement is below this are marked (see directions.py)
LOW_AGREEMENT = LOW_CONCEPT_AGREEMENT


def _figure(value: float, low: float) -> str:
    """``value`` to 2 decimals, or 3 where 2 would round a value below ``low`` up to it (0.496
    against 0.5 would read "0.50", marked as low)."""
    return f"{value:.3f}" if value < low <= round(value, 2) else f"{value:.2f}"


def _marked_cell(value: Optional[float], low: float, why_low: str, why_missing: str = "") -> str:
    """A table cell with a reproducibility figure, marked "!" (with ``why_low`` as its tooltip)
    below ``low``."""
    if value is None:
        title = f" title=\"{esc(why_missing)}\"" if why_missing else ""
        return f"<td class=\"num muted\"{title}>-</td>"
    if value < low:
        return f"<td class=\"num down\" title=\"{esc(why_low)}: trust it less\">{_figure(value, low)} !</td>"
    return f"<td class=\"num\">{value:.2f}</td>"


def _halves_unstable(c: "ConceptView") -> bool:
    return bool(unstable_concepts([c.halves], [c.halves_lowest]))


def _halves_cell(c: "ConceptView") -> str:
    if c.halves is None:
        return "<td class=\"num muted\" title=\"it fires on none of the images compared\">-</td>"
    lowest = (f" <span class=\"muted\">/ {_figure(c.halves_lowest, VANISHED_JACCARD)}</span>"
              if c.halves_lowest is not None else "")
    if _halves_unstable(c):
        return (f"<td class=\"num down\" title=\"extractions on halves of the images draw this concept elsewhere "
                f"or merge it into another: trust it less\">{_figure(c.halves, LOW_HALVES_JACCARD)}{lowest} !</td>")
    return f"<td class=\"num\">{c.halves:.2f}{lowest}</td>"


def _agreement_cell(value: Optional[float]) -> str:
    return _marked_cell(value, LOW_AGREEMENT, "the k-means restarts do not reproduce this concept",
                        "no other restart came near the best one")


def _joint_card(view: ReportView) -> str:
    if not view.joint:
        return ""
    page = {c.index: c.page for c in view.concepts}
    rows = []
    coverage = any(j.all_after is not None for j in view.joint)

    def detections(left, created):
        if left is None:
            return ""
        return (f"<br><span class=\"muted small\" title=\"the removed concepts' detections that remain / that the "
                f"removal creates, as shares of those before it\">detections left {esc(_pct(left))}, new "
                f"{esc(_pct(created))}</span>")

    def outcome(after, changed, left=None, created=None):
        if after is None:
            return "<td class=\"num muted\">-</td>"
        return (f"<td class=\"num\">{after:+.2f} <span class=\"muted\">({esc(_pct(changed))})</span>"
                f"{detections(left, created)}</td>")

    for j in view.joint:
        links = ", ".join(f"<a href=\"{esc(page[i])}\">{i}</a>" for i in j.concepts) or \
            "<span class=\"muted\">none supports it</span>"
        rows.append(
            f"<tr><td>{esc(j.class_name)}</td><td class=\"num\">{j.n_images}</td><td>{links}</td>"
            f"<td class=\"num\">{j.before:+.2f} &#8594; {j.after:+.2f}{detections(j.left, j.created)}</td>"
            f"<td class=\"num\">{esc(_pct(j.changed))}</td>"
            + (outcome(j.all_after, j.all_changed, j.all_left, j.all_created)
               + outcome(j.mean_after, j.mean_changed) if coverage else "")
            + "</tr>")
    head = ("<tr><th>predicted class</th><th class=\"num\">images</th><th>removed together</th>"
            "<th class=\"num\">log-odds of the class</th><th class=\"num\">changed</th>"
            + ("<th class=\"num\">every concept removed</th><th class=\"num\">layer at its mean</th>"
               if coverage else "") + "</tr>")
    return (f"<div class=\"card\"><h2>Each class's strongest concepts, removed together</h2>"
            f"<p class=\"muted\">{esc(view.joint_note)}</p>\n"
            f"<table class=\"ranking\">\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) +
            "\n</tbody>\n</table></div>\n")


# ---------------------------------------------------------------------------- charts
def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < 1e-12 * step else t)
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.3g}"


def histogram_svg(counts: Sequence[int], edges: Sequence[float], width: int = 560, height: int = 190) -> str:
    """Bars of ``counts`` on ``edges`` (len(counts) + 1), log-scaled heights, the threshold 0
    marked; bins at or above 0 (where the detector fires) in the accent colour."""
    nz = [j for j, c in enumerate(counts) if c > 0]
    if not nz:
        return "<p class=\"muted\">no patches</p>"
    zero = min(range(len(edges)), key=lambda j: abs(edges[j]))
    first = max(0, min(nz[0], zero - 1) - 1)
    last = min(len(counts) - 1, max(nz[-1], zero) + 1)
    lo, hi = edges[first], edges[last + 1]
    left, right, top, bottom = 46, 10, 14, 34
    pw, ph = width - left - right, height - top - bottom
    peak = max(counts)
    ly = lambda c: ph * math.log10(1 + c) / math.log10(1 + peak)  # noqa: E731
    xv = lambda v: left + pw * (v - lo) / (hi - lo)  # noqa: E731
    parts = [f"<svg class=\"hist\" viewBox=\"0 0 {width} {height}\" "
             "role=\"img\" aria-label=\"histogram of the detector score\" xmlns=\"http://www.w3.org/2000/svg\">"]
    decade = 1
    while decade <= peak:
        y = top + ph - ly(decade)
        parts.append(f"<line x1=\"{left}\" x2=\"{left + pw}\" y1=\"{y:.1f}\" y2=\"{y:.1f}\" stroke=\"#eef1f4\"/>")
        label = f"{decade:,}" if decade < 1_000_000 else f"1e{int(math.log10(decade))}"
        parts.append(f"<text x=\"{left - 5}\" y=\"{y + 3.5:.1f}\" text-anchor=\"end\">{label}</text>")
        decade *= 10
    for j in range(first, last + 1):
        c = counts[j]
        if c <= 0:
            continue
        x0, x1 = xv(edges[j]), xv(edges[j + 1])
        hgt = ly(c)
        colour = "#d4760a" if edges[j] >= 0 else "#8c959f"
        parts.append(
            f"<rect x=\"{x0 + 0.5:.1f}\" y=\"{top + ph - hgt:.1f}\" width=\"{max(x1 - x0 - 1, 0.8):.1f}\" "
            f"height=\"{hgt:.1f}\" fill=\"{colour}\"><title>{_fmt(edges[j])} to {_fmt(edges[j + 1])}: "
            f"{c:,} patches</title></rect>")
    parts.append(f"<line x1=\"{left}\" x2=\"{left + pw}\" y1=\"{top + ph}\" y2=\"{top + ph}\" stroke=\"#8c959f\"/>")
    for t in _nice_ticks(lo, hi):
        x = xv(t)
        parts.append(f"<line x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"{top + ph}\" y2=\"{top + ph + 4}\" stroke=\"#8c959f\"/>")
        parts.append(f"<text x=\"{x:.1f}\" y=\"{top + ph + 16}\" text-anchor=\"middle\">{_fmt(t)}</text>")
    x0 = xv(0.0)
    parts.append(f"<line x1=\"{x0:.1f}\" x2=\"{x0:.1f}\" y1=\"{top - 4}\" y2=\"{top + ph}\" stroke=\"#1f2328\" "
                 "stroke-dasharray=\"4 3\"/>")
    parts.append(f"<text x=\"{x0 + 4:.1f}\" y=\"{top + 6}\" style=\"fill:#1f2328\">fires &#8594;</text>")
    parts.append(f"<text x=\"{left + pw / 2:.1f}\" y=\"{height - 3}\" text-anchor=\"middle\">"
                 "detector score w&#183;x &#8722; b (patches, log scale)</text>")
    parts.append("</svg>")
    return "".join(parts)


def _diverging(value: float, scale: float, width: int = 150) -> str:
    """A bar from the centre: right (green) for positive, left (red) for negative."""
    half = width / 2
    length = 0 if scale <= 0 else min(abs(value) / scale, 1.0) * (half - 2)
    x = half if value >= 0 else half - length
    colour = "#1a7f37" if value >= 0 else "#cf222e"
    return (f"<svg width=\"{width}\" height=\"12\" viewBox=\"0 0 {width} 12\" xmlns=\"http://www.w3.org/2000/svg\">"
            f"<rect x=\"0\" y=\"2\" width=\"{width}\" height=\"8\" rx=\"4\" fill=\"#eef1f4\"/>"
            f"<rect x=\"{x:.1f}\" y=\"2\" width=\"{length:.1f}\" height=\"8\" rx=\"2\" fill=\"{colour}\"/>"
            f"<line x1=\"{half}\" x2=\"{half}\" y1=\"0\" y2=\"12\" stroke=\"#59636e\"/></svg>")


# ---------------------------------------------------------------------- concept page
def _figures(pictures: Sequence[Picture], root: str) -> str:
    return "".join(
        f"<figure><img src=\"{esc(root + p.src)}\" alt=\"{esc(p.title)}\" title=\"{esc(p.title)}\">"
        f"<figcaption>{esc(p.caption)}<br><span class=\"detail\">{esc(p.detail)}</span></figcaption></figure>"
        for p in pictures)


def concept_page(view: ReportView, c: ConceptView, crop_note: str, map_note: str, influence_note: str,
                 counterfactual_note: str = "") -> str:
    root = "../"
    order = view.concepts
    pos = order.index(c)
    prev_link = (f"<a href=\"{esc(root + order[pos - 1].page)}\">&#8592; rank {pos}: concept {order[pos - 1].index}</a>"
                 if pos > 0 else "<span></span>")
    next_link = (f"<a href=\"{esc(root + order[pos + 1].page)}\">rank {pos + 2}: concept {order[pos + 1].index} &#8594;</a>"
                 if pos + 1 < len(order) else "<span></span>")
    nav = (f"<div class=\"nav\"><a href=\"{root}index.html\">&#8593; all concepts</a>"
           f"<span>{prev_link} &#160; {next_link}</span></div>")
    stats = [
        (f"{c.influence:.3f}", "influence: mean change of the predicted class's log-odds when removed"
         + (f"; {view.random_words(c)}" if view.random_influence else "")),
        (f"{c.odds_drop:+.3f}", "mean drop of the predicted class's log-odds when removed (> 0: it supports "
                                "the prediction)"),
        (_pct(c.flips), "predictions that change when it is removed"),
        (_pct(c.patch_share), "of patches where it fires"),
        (_pct(c.image_share), "of images with at least one such patch"),
        *([(_pct(c.edited_share), "of patches that removing it edits (its latent factor above its level "
                                  "where it is not detected)")]
          if c.edited_share is not None else []),
        (f"{c.margin:.3g}", "detector margin 1/||w|| (activation units)"),
    ]
    if c.agreement is not None:
        stats.append((_figure(c.agreement, LOW_AGREEMENT), "overlap with its partners in the near-best k-means restarts"
                      + (" (low: trust it less)" if c.agreement < LOW_AGREEMENT else "")))
    if c.halves is not None:
        worst = f"; {c.halves_lowest:.2f} in the half that gave it back worst" if c.halves_lowest is not None else ""
        stats.append((f"{c.halves:.2f}", "overlap with its partners in extractions on halves of the images" + worst
                      + (" (low: trust it less)" if _halves_unstable(c) else "")))
    if c.mask_iou:
        name, best = max(c.mask_iou, key=lambda t: t[1])
        stats.append((f"{best:.2f}", f"IoU with the ground-truth mask '{name}'"))
    stat_html = "<div class=\"stats\">" + "".join(
        f"<div class=\"stat\"><div class=\"v\">{esc(v)}</div><div class=\"l\">{esc(label)}</div></div>"
        for v, label in stats) + "</div>"

    up, down = c.up_down(3)
    summary = []
    if up:
        summary.append("pushes up " + " ".join(_class_tag(e, "up") for e in up))
    if down:
        summary.append("pushes down " + " ".join(_class_tag(e, "down") for e in down))

    # class table: every class when few; else those predicted on some sampled image (or tested
    # by RCAV), and of those the six most raised and lowered when still many
    effects = c.effects if len(c.effects) <= 12 else [e for e in c.effects if e.images > 0 or e.p is not None]
    unseen = len(c.effects) - len(effects)
    tested = bool(c.effects) and c.effects[0].rcav is not None
    if len(effects) > 12:
        key = (lambda e: e.rcav) if tested else (lambda e: -e.removal)
        ranked = sorted(effects, key=key, reverse=True)
        effects = ranked[:6] + ranked[-6:]
    scale = max((abs(e.removal) for e in c.effects), default=0.0)
    head = ("<th>class</th><th class=\"num\">images</th><th class=\"num\">fires in</th>"
            "<th colspan=\"2\">support (log-odds lost)</th>")
    if view.has_rcav:
        head += "<th class=\"num\">RCAV</th><th class=\"num\">p (Bonf.)</th>"
    rows = []
    for e in effects:
        fires = _pct(e.fires) if e.images and e.fires is not None else "-"
        row = (f"<td>{esc(e.name)}</td><td class=\"num\">{e.images}</td><td class=\"num\">{esc(fires)}</td>" +
               (f"<td>{_diverging(-e.removal, scale, 90)}</td><td class=\"num\">{-e.removal:+.3f}</td>"
                if e.images else "<td></td><td class=\"num muted\">-</td>"))
        if view.has_rcav:
            if e.rcav is None:
                row += "<td class=\"num muted\">-</td><td class=\"num muted\">-</td>"
            else:
                kind = "up" if e.rcav > 0.5 else "down"
                cls = f"num {kind} sig" if e.significant else "num"
                title = f"p = {_p(e.p)} before correction"
                stopped = ""
                if e.draws is not None and e.all_draws is not None and e.draws < e.all_draws:
                    # a sequential test's p: valid, but not the number the full test would give
                    title += (f"; the test stopped after {e.draws} of {e.all_draws} null draws, once the concept could "
                              "no longer be significant: this is the stopped test's p (valid, coarser than the full "
                              "test's; pc.rcav(stop_early=False) makes every draw)")
                    stopped = f" <span class=\"muted\">(stopped at {e.draws})</span>"
                row += (f"<td class=\"{cls}\">{esc(_pct(e.rcav))}{'*' if e.significant else ''}</td>"
                        f"<td class=\"num\" title=\"{esc(title)}\">{_p(e.p_adjusted)}{stopped}</td>")
        rows.append(f"<tr>{row}</tr>")
    class_table = f"<table class=\"effects\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    if unseen:
        class_table += (f"<p class=\"caption\">{unseen} class{'es' if unseen > 1 else ''} that no sampled image is "
                        "predicted as (and RCAV did not test) are left out.</p>")
    rcav_caption = ""
    if view.has_rcav:
        rcav_caption = (f"<p class=\"caption\">{esc(view.rcav_note)}</p>" if tested else
                        "<p class=\"caption\">RCAV was run on the most influential concepts only; not on this one.</p>")

    mask_html = ""
    if c.mask_iou is not None:
        top_iou = max((v for _, v in c.mask_iou), default=0.0) or 1.0
        mask_rows = "".join(
            f"<tr><td>{esc(name)}</td><td class=\"num\"><span class=\"bar\"><span style=\"width:"
            f"{100 * v / top_iou:.1f}%\"></span></span>{v:.3f}</td></tr>"
            for name, v in sorted(c.mask_iou, key=lambda t: -t[1]))
        mask_html = (
            "<div class=\"card\"><h2>Overlap with ground-truth masks</h2>"
            f"<table><thead><tr><th>mask</th><th class=\"num\">IoU</th></tr></thead><tbody>{mask_rows}</tbody></table>"
            "<p class=\"caption\">Network-Dissection IoU: the detector's map, upsampled to the image, against each "
            "mask; intersections and unions summed over all images.</p></div>")

    body = (
        f"{nav}<h1>Concept {c.index} <span class=\"muted\">&#183; rank {c.rank} of {len(order)}</span></h1>"
        f"<div class=\"facts\">{' &#183; '.join(summary) if summary else ''}</div>{_warnings_card(view)}{stat_html}"
        f"<div class=\"card\"><h2>Top-activating patches</h2>"
        + ("<p class=\"muted\">The detector fires on no patch: these are its highest scores, all below its "
           "threshold.</p>" if c.patch_share == 0 else "")
        + f"<div class=\"grid patches\">{_figures(c.patches, root)}</div>"
        f"<p class=\"caption\">{esc(crop_note)}</p></div>"
        f"<div class=\"card\"><h2>Detection maps</h2>"
        + (f"<div class=\"grid maps\">{_figures(c.maps, root)}</div>" if c.maps else
           "<p class=\"muted\">No image to show: the detector fires on none of the images in part (it fires "
           "on every patch of an image or on none).</p>")
        + f"<p class=\"caption\">{esc(map_note)}</p></div>"
        + (f"<div class=\"card\"><h2>What removing it changes</h2><div class=\"grid maps\">"
           f"{_figures(c.counterfactuals, root)}</div><p class=\"caption\">{esc(counterfactual_note)}</p></div>"
           if c.counterfactuals else "") +
        "<div class=\"two\"><div class=\"col\">"
        f"<div class=\"card\"><h2>Detector score over all patches</h2>{histogram_svg(c.hist_counts, c.hist_edges)}"
        f"<p class=\"caption\">It fires on {esc(_pct(c.patch_share))} of the patches (orange bars). The detector's "
        "sigmoid is between 0.27 and 0.73 within one margin of the threshold (|score| &lt; 1).</p></div>"
        f"{mask_html}</div>"
        f"<div class=\"col\"><div class=\"card\"><h2>Effect on the classes</h2>{class_table}"
        f"<p class=\"caption\">{esc(influence_note)}</p>{rcav_caption}</div></div>"
        "</div>"
        f"<footer>Written by pyconcepts {esc(view.version)}.</footer>"
    )
    return _page(f"Concept {c.index} - {view.title}", body, root)
