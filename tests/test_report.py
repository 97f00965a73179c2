import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("PIL", reason="the report draws its pictures with Pillow")

from pyconcepts.basis import ConceptBasis  # noqa: E402
from pyconcepts.images import TensorImages  # noqa: E402
from pyconcepts.interventions import counterfactual, edit_rows, intervene  # noqa: E402
from pyconcepts.report import write_report  # noqa: E402
from pyconcepts.report.collect import _RunningTop, _SymmetricHistogram, receptive_field  # noqa: E402
from pyconcepts.taps import LayerTap  # noqa: E402

WEIRD = "<b>a&b \"q\" 'r'</b>"


class TinyNet(nn.Module):
    def __init__(self, n_classes=3, as_dict=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, n_classes)
        self.as_dict = as_dict

    def forward(self, x):
        h = self.act2(self.conv2(self.act(self.conv1(x))))
        logits = self.fc(h.mean((2, 3)))
        return {"aux": h, "logits": logits} if self.as_dict else logits


def _basis(k=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g)
    s = w / (w * w).sum(1, keepdim=True)          # w_i . s_i = 1
    return ConceptBasis(w, torch.full((k,), 0.2), s, torch.zeros(d), layer="act", model_id="tiny")


def _source(n=12, masks=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=g)
    kw = {}
    if masks:
        kw = dict(masks=torch.rand(n, 2, 16, 16, generator=g) > 0.7, mask_names=["sky", WEIRD])
    names = [f"img {i} {WEIRD}.png" for i in range(n)]
    return TensorImages(images, names=names, labels=torch.arange(n) % 3,
                        class_names=["cat", "dog", WEIRD], **kw)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.text = [], []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src"):
                self.links.append(value)

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


FAST = dict(batch_size=5, top=4, maps=2, influence_images=64, rcav_images=8, rcav_permutations=5, seed=0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet().eval()
    out = tmp_path_factory.mktemp("report")
    (out / "notes.txt").write_text("mine")
    index = write_report(out, _basis(), model, "act", _source(), **FAST)
    return out, index, model


def test_every_link_of_every_page_exists(report):
    out, index, _ = report
    assert index == out / "index.html" and index.is_file()
    pages = sorted(out.rglob("*.html"))
    assert len(pages) == 1 + 3
    for page in pages:
        for link in _parse(page).links:
            assert not re.match(r"^[a-z]+://", link), f"{page.name} links outside the folder: {link}"
            target = (page.parent / link.split("#")[0]).resolve()
            assert target.is_file(), f"{page.relative_to(out)} links to a missing {link}"
            assert out.resolve() in target.parents
    pngs = list((out / "images").glob("*.png"))
    assert len(pngs) == 3 * (4 + 2)
    from PIL import Image
    for png in pngs:
        with Image.open(png) as im:
            assert im.size[0] > 0 and im.mode == "RGB"


def test_warnings_come_first_and_only_when_given(report, tmp_path):
    out, index, model = report
    assert "Check before you read on" not in index.read_text(encoding="utf-8")
    write_report(tmp_path, _basis(), model, "act", _source(masks=False), warnings=["names <may> be wrong"],
                 **{**FAST, "rcav": False})
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert text.index("Check before you read on") < text.index("Concepts, most influential first")
    assert "names &lt;may&gt; be wrong" in text
    page = (tmp_path / "concepts" / "concept-000.html").read_text(encoding="utf-8")
    assert page.index("Check before you read on") < page.index("Top-activating patches")


def test_index_has_one_row_per_concept_ranked_by_measured_influence(report):
    out, _, model = report
    text = (out / "index.html").read_text(encoding="utf-8")
    body = text.split("<tbody>")[1].split("</tbody>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)
    assert len(rows) == 3
    concepts = [int(re.search(r"concept (\d+)</a>", r).group(1)) for r in rows]
    shown = [float(re.search(r"</(?:span|i)></span>([0-9.]+)</td>", r).group(1)) for r in rows]
    assert sorted(concepts) == [0, 1, 2]
    assert shown == sorted(shown, reverse=True)
    # the influence, measured independently: all 12 images (the sample covers them), mean
    # |change| of the predicted class's log-odds log(p / (1 - p)) with the concept removed
    images = _source().images
    for concept, value in zip(concepts, shown):
        cf = counterfactual(model, _basis(), images, [concept])
        pred = cf.probs_before.argmax(1)
        rows = torch.arange(pred.numel())

        def log_odds(p):
            p = p[rows, pred].double()
            return torch.log(p) - torch.log1p(-p)
        change = (log_odds(cf.probs_after) - log_odds(cf.probs_before)).abs().mean()
        assert value == pytest.approx(float(change), abs=6e-4, rel=1e-3)
    for c in concepts:
        assert (out / "concepts" / f"concept-{c:03d}.html").is_file()
    # under "fires on", the share of patches the removal edits (as on the concept page)
    tap = LayerTap(model, "act")
    with torch.no_grad():
        layer_rows = tap.to_rows(tap.activations(images))
    edited = (_basis().latent(layer_rows) > 0).double().mean(0)            # no absent level: 0
    for concept, row in zip(concepts, re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)):
        shown_edits = re.search(r">edits ([0-9.<%]+)</span>", row).group(1)
        assert shown_edits == f"{100 * float(edited[concept]):.1f}%", (concept, shown_edits)


def test_text_is_escaped_and_masks_column_only_with_masks(report, tmp_path):
    out, _, model = report
    for page in [out / "index.html", *sorted((out / "concepts").glob("*.html"))]:
        text = page.read_text(encoding="utf-8")
        assert "<b>a&" not in text and "a&b" not in text and '"q"' not in text, page.name
    escaped = "&lt;b&gt;a&amp;b &quot;q&quot; &#x27;r&#x27;&lt;/b&gt;"
    concept_text = (out / "concepts" / "concept-000.html").read_text(encoding="utf-8")
    assert re.search(r"img \d+ " + re.escape(escaped) + r"\.png", concept_text)              # an image name
    assert escaped in concept_text.split("Effect on the classes")[1]                         # a class name
    assert escaped in concept_text.split("Overlap with ground-truth masks")[1]               # a mask name
    assert "best mask IoU" in (out / "index.html").read_text(encoding="utf-8")
    assert "Overlap with ground-truth masks" in concept_text
    plain = write_report(tmp_path / "plain", _basis(), model, "act", _source(masks=False), rcav=False, **{
        k: v for k, v in FAST.items() if not k.startswith("rcav")})
    assert "best mask IoU" not in plain.read_text(encoding="utf-8")
    assert "Overlap with ground-truth masks" not in (tmp_path / "plain" / "concepts" / "concept-000.html").read_text()


def test_rewrite_replaces_only_its_own_files(report, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    (out / "concepts").mkdir()
    (out / "concepts" / "mine.html").write_text("<p>user page</p>")
    model = TinyNet().eval()
    fast = {**FAST, "rcav_permutations": 3}
    write_report(out, _basis(k=3), model, None, _source(n=6, masks=False), **fast)
    assert (out / "concepts" / "concept-002.html").is_file()
    write_report(out, _basis(k=2, seed=1), model, None, _source(n=6, masks=False), **fast)
    assert not (out / "concepts" / "concept-002.html").exists()       # written by the first report
    assert not (out / "images" / "c002-top-00.png").exists()
    assert (out / "keep.txt").read_text() == "user file"
    assert (out / "concepts" / "mine.html").read_text() == "<p>user page</p>"
    assert not [p for p in out.rglob(".tmp-*")]


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_interrupted_report_leaves_the_previous_one_whole(tmp_path):
    out = tmp_path / "r"
    model = TinyNet().eval()
    fast = {**FAST, "rcav_permutations": 3}
    write_report(out, _basis(k=3), model, None, _source(n=6, masks=False), **fast)
    (out / "keep.txt").write_text("user file")
    before = _tree(out)

    def interrupt(stage, done, total):
        if stage.startswith("report: pages") and done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_report(out, _basis(k=2, seed=1), model, None, _source(n=6, masks=False), progress=interrupt, **fast)
    assert _tree(out) == before                                   # not one picture of the new run
    assert not list(out.glob(".pyconcepts-staging-*"))            # no staging folder left
    # a staging folder of a run that was killed (no process holds its lock) is cleared by the next one
    dead = out / ".pyconcepts-staging-dead"
    (dead / "images").mkdir(parents=True)
    write_report(out, _basis(k=2, seed=1), model, None, _source(n=6, masks=False), **fast)
    assert not list(out.glob(".pyconcepts-staging-*"))
    assert (out / "keep.txt").read_text() == "user file" and not (out / "concepts" / "concept-002.html").exists()


def test_a_folder_with_a_reports_file_names_that_no_report_wrote_is_refused(tmp_path):
    from pyconcepts.images import FolderImages

    model = TinyNet().eval()
    theirs = tmp_path / "theirs"
    (theirs / "images").mkdir(parents=True)
    (theirs / "index.html").write_text("<p>their page</p>")
    with pytest.raises(ValueError, match="holds files of a report's names.*index.html"):
        write_report(theirs, _basis(), model, None, _source(n=6, masks=False), **FAST)
    assert (theirs / "index.html").read_text() == "<p>their page</p>"
    # a report inside the images folder would be read as images by the next run
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    from PIL import Image

    for j in range(2):
        Image.new("RGB", (8, 8), (40 * j, 0, 0)).save(photos / "a" / f"{j}.png")
    with pytest.raises(ValueError, match="lies inside the images folder"):
        write_report(photos / "report", _basis(), model, None, FolderImages(photos), **FAST)
    assert not (photos / "report").exists()


def test_the_report_folder_itself_is_kept_as_it_is(tmp_path, monkeypatch):
    # written into its folder, never replacing it: the working directory, a link to the
    # folder, the user's empty folders and permissions all stay
    import stat

    real = tmp_path / "real"
    (real / "empty").mkdir(parents=True)
    (real / "mine").mkdir()
    os.chmod(real / "mine", 0o700)
    os.symlink(real, tmp_path / "link")
    inode = os.stat(real).st_ino
    monkeypatch.chdir(real)
    fast = {**FAST, "rcav": False}
    write_report(".", _basis(), TinyNet().eval(), None, _source(n=6, masks=False), **fast)
    index = write_report(tmp_path / "link", _basis(k=2), TinyNet().eval(), None, _source(n=6, masks=False), **fast)
    assert index.is_file() and (real / "index.html").is_file() and os.path.islink(tmp_path / "link")
    assert os.stat(real).st_ino == inode and (real / "empty").is_dir()
    assert stat.S_IMODE(os.stat(real / "mine").st_mode) == 0o700
    assert not (real / "concepts" / "concept-002.html").exists()      # the first report's third page


def test_output_selector_and_bad_input(tmp_path):
    model = TinyNet(as_dict=True).eval()
    src = _source(n=6, masks=False)
    fast = {**FAST, "rcav_permutations": 3}
    with pytest.raises(TypeError, match="output="):
        write_report(tmp_path / "a", _basis(), model, "act", src, **fast)
    assert write_report(tmp_path / "b", _basis(), model, "act", src, output="logits", **fast).is_file()
    assert write_report(tmp_path / "c", _basis(), model, "act", src, output=lambda o: o["logits"], rcav=False,
                        **{k: v for k, v in fast.items() if not k.startswith("rcav")}).is_file()
    plain = TinyNet().eval()
    with pytest.raises(ValueError, match="top"):
        write_report(tmp_path / "d", _basis(), plain, "act", src, top=0)
    with pytest.raises(TypeError, match="unknown option"):
        write_report(tmp_path / "d", _basis(), plain, "act", src, colour="red")
    with pytest.raises(TypeError, match="rcav must be true or false, got 'false'"):  # JSON's "false", quoted
        write_report(tmp_path / "d", _basis(), plain, "act", src, rcav="false")
    # a plain tensor of images, as pc.extract takes them: named "image i"
    index = write_report(tmp_path / "t", _basis(), plain, "act", src.images, rcav=False,
                         **{k: v for k, v in fast.items() if not k.startswith("rcav")})
    assert re.search(r"image \d+<", (index.parent / "concepts" / "concept-000.html").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "d", _basis(), plain, "nope", src)
    with pytest.raises(ValueError, match="channels"):
        write_report(tmp_path / "d", _basis(d=5), plain, "act", src, rcav=False)
    with pytest.warns(UserWarning, match="names 1 classes"):  # the outputs get numbers instead
        bad = TensorImages(src.images, class_names=["one"])
        write_report(tmp_path / "d", _basis(), plain, "act", bad, rcav=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        write_report(tmp_path / "file", _basis(), plain, "act", src)


def test_running_top_matches_a_global_top_k():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 4, generator=g)
    pos = torch.randint(0, 9, (50, 4), generator=g)
    top = _RunningTop(4, 5)
    for start in range(0, 50, 7):
        top.update(values[start:start + 7], torch.arange(start, min(start + 7, 50)), pos=pos[start:start + 7])
    want = values.T.topk(5, dim=1)
    assert torch.equal(top.values, want.values)
    assert torch.equal(top.index, want.indices)
    assert torch.equal(top.payload["pos"], pos.T.gather(1, want.indices))


def test_symmetric_histogram_is_exact_after_its_bins_widen():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(100, 2, generator=g) * s for s in (0.1, 1.0, 30.0)]
    hist = _SymmetricHistogram(2, half=8)
    for c in chunks:
        hist.update(c)
    everything = torch.cat(chunks)
    for i in range(2):
        edges = hist.edges(i)
        assert float(edges[0]) <= float(everything[:, i].min()) and float(everything[:, i].max()) < float(edges[-1])
        want = torch.histogram(everything[:, i].double(), bins=edges).hist.long()
        assert torch.equal(hist.counts[i], want)
        assert float(edges[8]) == 0.0                      # the threshold is a bin edge


def test_receptive_field_of_two_convolutions():
    model = nn.Sequential()
    model.add_module("c1", nn.Conv2d(1, 2, 3, stride=2, padding=1))
    model.add_module("c2", nn.Conv2d(2, 2, 3, padding=1))
    tap = LayerTap(model, "c2")
    rf = receptive_field(tap, torch.rand(2, 1, 16, 16), (8, 8))
    assert rf.extent == (7, 7) and rf.stride == (2.0, 2.0)
    assert 2 <= rf.size <= 7
    # a 16 px input is under ReceptiveField.MIN_CROP: every crop is the whole picture
    assert rf.crop_side == 16 and rf.box(0, 0) == rf.box(7, 7) == (0, 0, 16, 16)
    assert "the square each patch reads is" in rf.describe()
    rf.MIN_CROP = 0   # crops of the patch's own square
    top, left, bottom, right = rf.box(0, 0)
    assert (top, left) == (0, 0) and bottom - top == rf.size == right - left      # slid inside the image
    top, left, bottom, right = rf.box(7, 7)
    assert (bottom, right) == (16, 16)
    # on a rectangular input a crop is cut to the shorter side, and the caption says so
    wide = receptive_field(tap, torch.rand(2, 1, 16, 40), (8, 20))
    wide.MIN_CROP = 24
    top, left, bottom, right = wide.box(4, 10)
    assert (bottom - top, right - left) == (16, 24) and wide.describe().startswith("16 x 24 px crops of 16 x 40")


def test_a_token_grid_cell_is_where_its_patch_was_embedded():
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from _toy_models import TinyViT

    torch.manual_seed(0)
    model = TinyViT().eval()                       # 16 px inputs, 4 px patches: a 4 x 4 grid
    tap = LayerTap(model, "blocks.1", skip_tokens=1)
    with torch.no_grad():
        tap.activations(torch.rand(1, 3, 16, 16))
    rf = receptive_field(tap, torch.rand(4, 3, 16, 16), (4, 4))
    assert rf.centre == (10.0, 10.0)               # cell (2, 2): rows and columns 8..12
    assert rf.cell_box(2, 2) == (8, 8, 12, 12) and rf.cell_box(0, 3) == (0, 12, 4, 16)


def test_demo_source_names_masks_and_classes(tmp_path):
    from pyconcepts.datasets.shapes import CLASSES, CONCEPTS, make_shapes
    from pyconcepts.demo.model import DEMO_LAYER
    from pyconcepts.demo.run import load_model, shapes_source

    data = make_shapes(6, seed=3, watermark="random", watermark_rate=0.5)
    src = shapes_source(data)
    assert len(src) == 6 and src.class_names == list(CLASSES)
    masks, names = src.concept_masks
    assert names == list(CONCEPTS) and torch.equal(masks([1, 4]), data.masks[[1, 4]])
    assert src.names[0].startswith("0000 ") and src.names[0].split()[-1] in ("circle", "square", "triangle", "+mark")
    assert torch.equal(src.display([2])[0], (data.images[2].permute(1, 2, 0) * 255).round().to(torch.uint8))
    index = write_report(tmp_path, _basis(k=2, d=64), load_model(), DEMO_LAYER, src, rcav=False, top=2, maps=1)
    text = index.read_text(encoding="utf-8")
    assert "best mask IoU" in text and "watermark" in (tmp_path / "concepts" / "concept-000.html").read_text()


def test_nan_activations_are_refused(tmp_path):
    model = TinyNet().eval()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        write_report(tmp_path, _basis(), model, "act", _source(n=4, masks=False), rcav=False)


def test_demo_command_writes_the_report_to_report_dir_by_default():
    from pyconcepts.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.report_dir == "report" and not args.no_report
    args = build_parser().parse_args(["demo", "--report-dir", "out dir", "--no-report"])
    assert args.report_dir == "out dir" and args.no_report


def test_log_odds_of_a_confident_prediction_do_not_saturate():
    from pyconcepts.interventions import log_odds as _log_odds
    scores = torch.tensor([[40.0, 0.0, -5.0], [1.0, 2.0, 3.0]])
    got = _log_odds(scores, torch.tensor([0, 2]))
    # p = 1 - 4e-18 rounds to 1 in float32 and float64, yet the log-odds are exact
    assert float(got[0]) == pytest.approx(40.0 - math.log(1 + math.exp(-5.0)), rel=1e-6)
    p = torch.softmax(scores[1].double(), 0)[2]
    assert float(got[1]) == pytest.approx(float(torch.log(p / (1 - p))), rel=1e-5)


def test_every_class_log_odds_match_the_definition_and_stay_finite():
    from pyconcepts.interventions import every_log_odds as _every_log_odds
    scores = torch.tensor([[50.0, 0.0, -3.0], [0.3, 0.1, -0.2]])
    got = _every_log_odds(scores)
    p = torch.softmax(scores[1].double(), 0)
    torch.testing.assert_close(got[1], torch.log(p / (1 - p)))
    assert bool(torch.isfinite(got).all())          # p rounds to 1 for class 0 of row 0
    assert float(got[0, 0]) == pytest.approx(50.0 - math.log(1 + math.exp(-3.0)), rel=1e-9)
    assert float(got[0, 1]) == pytest.approx(0.0 - math.log(math.exp(50.0) + math.exp(-3.0)), rel=1e-9)


def test_joint_table_removes_each_classes_strongest_supporters_together(tmp_path):
    import html as html_lib

    import pyconcepts as pc
    from pyconcepts.interventions import log_odds

    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():  # a head that reads the layer strongly: removals move the classes
        model.fc.weight.mul_(40.0)
        model.fc.bias.copy_(-model.fc(model.act2(model.conv2(model.act(model.conv1(_source().images))))
                                      .mean((2, 3))).mean(0) + model.fc.bias)
    out = tmp_path / "joint"
    write_report(out, _basis(), model, "act", _source(), **{**FAST, "rcav": False})
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "removed together</h2>" in text
    card = text.split("removed together</h2>")[1].split("</table>")[0]
    body = card.split("<tbody>")[1]
    left = r"(?:<br><span class=\"muted small\" title=\"[^\"]*\">detections left ([^,]*), new ([^<]*)</span>)?"
    rows = re.findall(r"<tr><td>(.*?)</td><td class=\"num\">(\d+)</td><td>(.*?)</td>"
                      r"<td class=\"num\">([-+0-9.]+) &#8594; ([-+0-9.]+)" + left
                      + r"</td><td class=\"num\">([^<]*)</td>"
                      r"<td class=\"num\">([-+0-9.]+) <span class=\"muted\">\(([^<]*)\)</span>" + left + "</td>"
                      r"<td class=\"num\">([-+0-9.]+) <span class=\"muted\">\(([^<]*)\)</span></td></tr>", body)
    assert rows, card
    # independently: every image is in the sample (12 <= 64); each concept's single removal
    # measured with intervene on the images predicted as the class, the strongest removed together
    images = _source().images
    basis = _basis()
    names = ["cat", "dog", WEIRD]
    with torch.no_grad():
        before = model(images)
    predicted = before.argmax(1)
    assert len(set(predicted.tolist())) >= 2  # the per-class choice is exercised
    tap = LayerTap(model, "act")
    with torch.no_grad(), pc.intervene(model, basis, layer="act", remove=[0, 1, 2]):
        every = model(images)
    with torch.no_grad():
        flat = tap.forward_rows(images, lambda rows: basis.mean.expand_as(rows))

    def detections_shown(remove, sel):
        rows_sel = tap.to_rows(tap.activations(images[sel]))
        edited = edit_rows(rows_sel, basis.decoding, basis.bias, basis.encoding, basis.mean, remove=remove,
                           absent_level=basis.absent_level)
        was, now = basis.detect(rows_sel)[:, remove], basis.detect(edited)[:, remove]
        seen = int(was.sum())
        return (_pct_text(int((was & now).sum()) / seen), _pct_text(int((~was & now).sum()) / seen)) if seen else None

    for (name, n, links, b, a, left_shown, new_shown, changed, all_after, all_changed, all_left, all_new,
         mean_after, mean_changed) in rows:
        c = names.index(html_lib.unescape(name))
        sel = predicted == c
        assert int(n) == int(sel.sum())
        cls = torch.full((int(sel.sum()),), c)
        effect = torch.zeros(3)
        for i in range(3):
            with torch.no_grad(), pc.intervene(model, basis, layer="act", remove=[i]):
                effect[i] = (log_odds(model(images[sel]), cls) - log_odds(before[sel], cls)).mean()
        supporters = [int(i) for i in torch.argsort(effect, stable=True)[:3] if effect[i] <= -1e-2]
        assert [int(v) for v in re.findall(r">(\d+)</a>", links)] == supporters
        with torch.no_grad(), pc.intervene(model, basis, layer="act", remove=supporters):
            after = model(images[sel])
        assert float(b) == pytest.approx(float(log_odds(before[sel], cls).mean()), abs=6e-3)
        assert float(a) == pytest.approx(float(log_odds(after, cls).mean()), abs=6e-3)
        want = detections_shown(supporters, sel)
        assert (left_shown, new_shown) == (want or ("", "")), (left_shown, new_shown, want)
        assert (all_left, all_new) == (detections_shown([0, 1, 2], sel) or ("", ""))
        share = float((after.argmax(1) != c).double().mean())
        assert changed == f"{100 * share:.0f}%" or changed.startswith(f"{100 * share:.1f}"), (changed, share)
        # what every concept carries together, and what the layer carries at all
        for shown, shown_changed, logits in ((all_after, all_changed, every), (mean_after, mean_changed, flat)):
            assert float(shown) == pytest.approx(float(log_odds(logits[sel], cls).mean()), abs=6e-3)
            moved = float((logits[sel].argmax(1) != c).double().mean())
            assert shown_changed in (f"{100 * moved:.0f}%", f"{100 * moved:.1f}%"), (shown_changed, moved)


def _pct_text(x):
    from pyconcepts.report.html import _pct
    return _pct(x)


class _Gate(nn.Module):
    """Concept 0 (channel 0) scales the margin whose sign channel 1 decides: it supports
    whichever class is predicted, so its mean effect over all images cancels."""

    def __init__(self):
        super().__init__()
        self.act = nn.Identity()

    def forward(self, x):
        h = self.act(x[:, :2])
        z = 8.0 * h[:, 0].mean((1, 2)) * (h[:, 1].mean((1, 2)) - 0.5)
        return torch.stack([z, -z], 1)


def test_class_effects_are_measured_on_the_images_predicted_as_each_class(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 12
    images = torch.rand(n, 3, 8, 8, generator=g)
    images[:, 0] = 0.5 + 0.5 * images[:, 0]
    images[:, 1] = torch.where(torch.arange(n) % 2 == 0, 0.2, 0.8)[:, None, None]
    model = _Gate().eval()
    assert sorted(set(model(images).argmax(1).tolist())) == [0, 1]
    rows = images[:, :2].permute(0, 2, 3, 1).reshape(-1, 2)
    basis = ConceptBasis(torch.eye(2), torch.tensor([0.75, 0.5]), torch.eye(2), rows.mean(0), layer="act")
    source = TensorImages(images, names=[f"{i}.png" for i in range(n)], class_names=["left", "right"])
    write_report(tmp_path, basis, model, "act", source, **{**FAST, "rcav": False})
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    row = [r for r in re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>")[1].split("</tbody>")[0], flags=re.S)
           if "concept 0</a>" in r][0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)
    up = cells[5]
    # on each class's own images removing it lowers that class: it pushes both up (averaged
    # over all images, the two changes cancel and neither class would show)
    assert "&#8593;&#160;left" in up and "&#8593;&#160;right" in up, up
    card = text.split("removed together</h2>")[1].split("</table>")[0]
    for name in ("left", "right"):
        line = re.search(rf"<tr><td>{name}</td>.*?</tr>", card, flags=re.S).group(0)
        assert ">0</a>" in line, line


def test_concepts_the_restarts_do_not_reproduce_are_marked(tmp_path):
    model = TinyNet().eval()
    basis = _basis()
    basis.metadata["concept_agreement"] = [0.9, 0.3, 0.4963]
    write_report(tmp_path, basis, model, "act", _source(masks=False), **{**FAST, "rcav": False})
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert ">agree</th>" in text
    rows = re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>")[1].split("</tbody>")[0], flags=re.S)
    by_concept = {int(re.search(r"concept (\d+)</a>", r).group(1)): r for r in rows}
    assert "0.30 !" in by_concept[1] and "!" not in re.sub(r"<[^>]+>", "", by_concept[0])
    assert ">0.90<" in by_concept[0] and ">0.496 !<" in by_concept[2]     # not "0.50 !" below the 0.5 mark
    page = (tmp_path / "concepts" / "concept-001.html").read_text(encoding="utf-8")
    assert "trust it less" in page


def test_concepts_the_halves_do_not_give_back_are_marked(tmp_path):
    model = TinyNet().eval()
    basis = _basis()
    # concept 1: good on average but gone in one half; concept 2: poor on average
    basis.metadata.update(halves_jaccard=[0.8, 0.65, 0.2], halves_lowest=[0.7, 0.05, 0.1], halves_mean_jaccard=0.61,
                          halves_splits=3)
    write_report(tmp_path, basis, model, "act", _source(masks=False), **{**FAST, "rcav": False})
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert ">halves</th>" in text and ">agree</th>" not in text
    rows = re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>")[1].split("</tbody>")[0], flags=re.S)
    by_concept = {int(re.search(r"concept (\d+)</a>", r).group(1)): r for r in rows}
    plain = {i: re.sub(r"<[^>]+>", "", r) for i, r in by_concept.items()}
    assert "0.20 / 0.10 !" in plain[2] and "0.65 / 0.05 !" in plain[1] and "0.80 / 0.70" in plain[0]
    assert "!" not in plain[0]
    assert "two random halves" in text  # the note says what the column is
    assert "half with half: <b>0.61 (3 random splits)</b>" in text
    page = (tmp_path / "concepts" / "concept-001.html").read_text(encoding="utf-8")
    assert "gave it back worst (low: trust it less)" in page
    # a concept that fires on none of the compared images is shown, not marked
    basis.metadata.update(halves_jaccard=[0.8, None, 0.9], halves_lowest=[0.7, None, 0.8])
    write_report(tmp_path / "b", basis, model, "act", _source(masks=False), **{**FAST, "rcav": False})
    text = (tmp_path / "b" / "index.html").read_text(encoding="utf-8")
    assert "it fires on none of the images compared" in text and " !</td>" not in text


def test_concept_page_gives_firing_per_predicted_class_and_the_patches_removal_edits(report):
    out, _, model = report
    images = _source().images
    basis = _basis()
    tap = LayerTap(model, "act")
    with torch.no_grad():
        rows = tap.to_rows(tap.activations(images))
        predicted = model(images).argmax(1)
    fired = basis.detect(rows).reshape(len(images), -1, 3).any(1)            # (B, K)
    edited = (basis.latent(rows) > 0).double().mean(0)                       # no absent level: 0
    for i in range(3):
        text = (out / "concepts" / f"concept-{i:03d}.html").read_text(encoding="utf-8")
        share = re.search(r"<div class=\"v\">([0-9.<%]+)</div><div class=\"l\">of patches that removing it edits", text)
        assert share and share.group(1) == f"{100 * float(edited[i]):.1f}%", (i, share)
        table = text.split("<table class=\"effects\">")[1].split("</table>")[0]
        for c, name in enumerate(["cat", "dog", WEIRD]):
            sel = predicted == c
            cell = re.search(rf"<td>{re.escape(html_escape(name))}</td><td class=\"num\">(\d+)</td>"
                             rf"<td class=\"num\">([^<]*)</td>", table)
            assert cell and int(cell.group(1)) == int(sel.sum())
            want = "-" if not bool(sel.any()) else f"{100 * float(fired[sel, i].double().mean()):.1f}%"
            if want.startswith("0.0"):
                want = "0%"
            assert cell.group(2) == want, (i, name, cell.group(2), want)


def html_escape(text):
    import html as html_lib
    return html_lib.escape(text, quote=True)


def test_detection_maps_show_images_the_concept_covers_in_part(tmp_path):
    images = torch.full((4, 3, 8, 8), 0.2)
    images[:, 1] = torch.tensor([0.2, 0.8, 0.2, 0.8])[:, None, None]
    images[0, 0] = 1.0                      # fires everywhere, as strongly as anywhere
    images[1, 0, :, :3] = 0.9               # fires on 3 of 8 columns, less strongly
    images[2, 0, :2, :2] = 1.0              # fires on a corner, most strongly
    images[3, 0] = 0.599                    # just below the threshold everywhere: membership ~0.5
    rows = images[:, :2].permute(0, 2, 3, 1).reshape(-1, 2)
    basis = ConceptBasis(torch.eye(2) * 20, torch.tensor([12.0, 10.0]), torch.eye(2) / 20, rows.mean(0),
                         layer="act")
    source = TensorImages(images, names=["full.png", "part.png", "corner.png", "flat.png"],
                          class_names=["left", "right"])
    write_report(tmp_path, basis, _Gate().eval(), "act", source, **{**FAST, "maps": 3, "rcav": False})
    page = (tmp_path / "concepts" / "concept-000.html").read_text(encoding="utf-8")
    # the strongest images it covers in part, strongest first; not the one it fills, nor the
    # one it misses
    assert "corner.png: fires on 6.2% of the patches" in page.split("c000-map-00.png")[1][:400]
    assert "part.png: fires on 37.5% of the patches" in page.split("c000-map-01.png")[1][:400]
    assert "c000-map-02.png" not in page


def test_rcav_runs_on_a_random_part_of_the_sample():
    from pyconcepts.report.collect import OutputSelected, measure

    model = OutputSelected(TinyNet().eval(), None)
    tap = LayerTap(model, "inner.act")
    m = measure(model, tap, _basis(), _source(n=40), batch_size=8, top=2, maps=1, influence_images=20,
                rcav_images=6, seed=0)
    assert len(m.rcav_indices) == 6 and set(m.rcav_indices) <= set(m.influence_sample)
    assert m.rcav_indices != sorted(m.influence_sample)[:6]   # not the first (one class of a sorted folder)
    assert m.rcav_images.shape[0] == 6


def test_a_significant_rcav_result_that_the_removal_contradicts_is_not_shown_as_a_push():
    from pyconcepts.report.html import ClassEffect, ConceptView

    agree = ClassEffect("a", removal=-0.5, images=6, rcav=0.9, significant=True)       # both: supports a
    clash = ClassEffect("b", removal=+0.4, images=6, rcav=1.0, significant=True)       # removal raises b
    rare = ClassEffect("c", removal=-2.0, images=4)     # the largest change, on too few images to speak
    view = ConceptView(index=0, rank=1, influence=1.0, odds_drop=0.5, flips=0.0, patch_share=0.1,
                       image_share=0.2, margin=1.0, cos_ws=1.0, hist_counts=[], hist_edges=[], patches=[], maps=[],
                       effects=[agree, clash, rare])
    up, down = view.up_down()
    assert [e.name for e in up] == ["a"] and [e.name for e in down] == ["b"]
    assert agree.rcav_supported and not clash.rcav_supported
    rare.images = 5
    assert [e.name for e in view.up_down()[0]] == ["a", "c"]


def test_concept_page_shows_the_images_its_removal_moves_most(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 14
    images = torch.rand(n, 3, 8, 8, generator=g)
    images[:, 1] = torch.where(torch.arange(n) % 2 == 0, 0.3, 0.7)[:, None, None]
    images[:, 1] += 0.2 * torch.rand(n, 1, 1, generator=g) - 0.1  # margins of different sizes
    model = _Gate().eval()
    rows = images[:, :2].permute(0, 2, 3, 1).reshape(-1, 2)
    # concept 0 reads channel 0, which scales every margin; concept 1 reads the class channel
    basis = ConceptBasis(torch.eye(2), torch.tensor([0.6, 0.5]), torch.eye(2), rows.mean(0), layer="act",
                         absent_level=torch.tensor([-0.2, -0.05]))
    names = [f"{i} {WEIRD}.png" for i in range(n)]
    classes = ["left", "right"]
    source = TensorImages(images, names=names, class_names=classes)
    write_report(tmp_path, basis, model, "act", source, **{**FAST, "rcav": False})

    def odds(logits, cls):  # log(p / (1 - p)) of class cls, in float64
        p = logits.double().softmax(1)[torch.arange(len(logits)), cls]
        return torch.log(p) - torch.log1p(-p)

    shown = flipped_seen = 0
    with torch.no_grad():
        before = model(images)
        pred = before.argmax(1)
        for i in range(2):
            with intervene(model, basis, remove=[i]):
                after = model(images)
            change = odds(before, pred) - odds(after, pred)
            top = torch.argsort(change.abs(), descending=True, stable=True)[:6].tolist()
            want = [j for j in top if abs(float(change[j])) >= 0.01]
            page = (tmp_path / "concepts" / f"concept-{i:03d}.html").read_text(encoding="utf-8")
            if not want:
                assert "What removing it changes" not in page
                continue
            card = page.split("What removing it changes</h2>")[1].split("</div></div>")[0]
            titles = re.findall(r"title=\"([^\"]*)\"", card)
            assert len(titles) == len(want), (i, titles)
            for title, j in zip(titles, want):
                a, b = float(odds(before, pred)[j]), float(odds(after, pred)[j])
                assert title.startswith(html_escape(
                    f"{names[j]}: predicted {classes[int(pred[j])]}, log-odds {a:+.3f} before and {b:+.3f} "
                    f"after concept {i} is removed")), (title, a, b)
                flipped = int(after[j].argmax()) != int(pred[j])
                assert ("the prediction becomes" in title) == flipped, title
                shown += 1
                flipped_seen += flipped
    assert shown >= 6 and flipped_seen >= 1, (shown, flipped_seen)  # the case exercises both
    write_report(tmp_path, basis, model, "act", source, **{**FAST, "rcav": False, "counterfactuals": 0})
    assert "What removing it changes" not in (tmp_path / "concepts" / "concept-000.html").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="counterfactuals"):
        write_report(tmp_path, basis, model, "act", source, **{**FAST, "counterfactuals": -1})


def test_with_more_than_two_classes_rcav_tests_each_concept_on_one_class(report):
    out, _, _ = report
    tested_pages = 0
    for page in sorted((out / "concepts").glob("concept-*.html")):
        text = page.read_text(encoding="utf-8")
        table = text.split("<table class=\"effects\">")[1].split("</table>")[0]
        p_cells = [c for c in re.findall(r"<td class=\"num\" title=\"p = [^\"]*\">([^<]*)(?:<span[^>]*>[^<]*</span>)?"
                                         r"</td>", table) if c != "-"]
        # a test that stopped early says so, with the draws it made (of rcav_permutations = 5)
        for title, made in re.findall(r"title=\"(p = [^\"]*)\">[^<]*<span class=\"muted\">\(stopped at (\d+)\)", table):
            assert int(made) < 5 and f"stopped after {made} of 5 null draws" in title
        shares = re.findall(r"<td class=\"num[^\"]*\">([0-9.]+%\*?)</td><td class=\"num\" title=\"p =", table)
        if p_cells:
            tested_pages += 1
            assert len(p_cells) == 1, (page.name, p_cells)
            assert len(shares) == 3  # every class's RCAV share is still shown
    assert tested_pages == 3  # the basis's 3 concepts (rcav_concepts 4)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "Bonferroni over 3 tests (one per concept" in index


def test_class_names_are_checked_before_the_heavy_work(tmp_path):
    model = TinyNet().eval()
    stages = []
    progress = lambda stage, done, total: stages.append(stage)  # noqa: E731
    with pytest.raises(ValueError, match="class_names has 2 names but the model outputs 3 classes"):
        write_report(tmp_path, _basis(), model, "act", _source(), class_names=["a", "b"], progress=progress, **FAST)
    assert stages == []  # nothing was measured
    for bad, err in (("abc", TypeError), ([1, 2, 3], TypeError), (["x", "y", "x"], ValueError)):
        with pytest.raises(err, match="class_names"):
            write_report(tmp_path, _basis(), model, "act", _source(), class_names=bad, **FAST)
    index = write_report(tmp_path, _basis(), model, "act", _source(), class_names=["x", "y", "z"], rcav=False,
                         **{k: v for k, v in FAST.items() if k != "rcav_permutations"})
    assert ">x</td>" in index.read_text(encoding="utf-8")
    wrong = _source()
    wrong.class_names = ["only", "two"]
    with pytest.warns(UserWarning, match="names 2 classes .* but the model outputs 3"):
        index = write_report(tmp_path, _basis(), model, "act", wrong, rcav=False,
                             **{k: v for k, v in FAST.items() if k != "rcav_permutations"})
    assert ">class 0</td>" in index.read_text(encoding="utf-8")


def test_with_many_classes_the_class_table_leaves_out_classes_never_predicted(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(n_classes=14).eval()
    src = _source(masks=False)
    names = [f"c{j}" for j in range(14)]
    write_report(tmp_path, _basis(), model, "act", src, class_names=names, rcav=False,
                 **{k: v for k, v in FAST.items() if not k.startswith("rcav")})
    with torch.no_grad():
        predicted = set(model(src.images).argmax(1).tolist())
    page = (tmp_path / "concepts" / "concept-000.html").read_text(encoding="utf-8")
    table = page.split("<table class=\"effects\">")[1].split("</table>")[0]
    shown = re.findall(r"<tr><td>(c\d+)</td>", table)
    assert sorted(shown) == sorted(f"c{j}" for j in predicted)
    assert f"{14 - len(predicted)} classes that no sampled image is predicted as" in page


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_report_refinement_and_gradient_calls_work_under_no_grad_and_inference_mode(tmp_path, mode):
    import pyconcepts as pc
    from pyconcepts.attribution import maximize_concept

    model = TinyNet().eval()
    with mode():  # a caller's mode: the gradients these calls need are their own
        source, basis = _source(), _basis()        # tensors made in that mode, too
        index = write_report(tmp_path, basis, model, "act", source, **FAST)
        refined = pc.extract(model, "act", source.images, 2, refine=True,
                             options={"refine_steps": 3, "ura_images": 4, "ura_batch": 4, "n_init": 1})
        ranking = pc.rank_concepts(model, basis, source.images, target=0, method="gradient")
        maps = pc.contribution_maps(model, basis, source.images[:3], 0)
        check = maximize_concept(model, basis, 0, image=source.images[0], steps=3)
    assert index.is_file() and refined.n_concepts == 2 and len(ranking.concepts) == 3
    assert bool(torch.isfinite(maps).all()) and check.concept == 0
    # a model whose parameters were made in inference mode cannot pass gradients: said plainly
    with torch.inference_mode():
        frozen_model = TinyNet().eval()
    with pytest.raises(RuntimeError, match="created under torch.inference_mode"):
        pc.contribution_maps(frozen_model, basis, source.images[:3], 0)
    # ... while the calls that need none still run
    assert pc.counterfactual(frozen_model, basis, source.images, [0]).logits_after.shape[0] == 12


class _LinearHead(nn.Module):
    """conv -> ReLU (the tapped 'act') -> mean -> linear: any push at 'act' moves every image's
    class scores alike, so RCAV's null draws are all 0% or 100%."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_the_rcav_note_says_when_random_concepts_move_every_image_alike(tmp_path):
    torch.manual_seed(0)
    write_report(tmp_path, _basis(), _LinearHead().eval(), "act", _source(), **FAST)
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Here 100% of the null draws on the tested classes are 0% or 100%" in index
    assert "cannot tell it from chance" in index


def test_a_concept_that_never_fires_says_so(tmp_path):
    basis = _basis()
    basis = ConceptBasis(basis.decoding, torch.tensor([0.2, 1e6, 0.2]), basis.encoding, basis.mean, layer="act")
    write_report(tmp_path, basis, TinyNet().eval(), "act", _source(), rcav=False,
                 **{k: v for k, v in FAST.items() if not k.startswith("rcav")})
    page = (tmp_path / "concepts" / "concept-001.html").read_text(encoding="utf-8")
    assert "The detector fires on no patch: these are its highest scores" in page
    assert "No image to show: the detector fires on none of the images in part" in page
    other = (tmp_path / "concepts" / "concept-000.html").read_text(encoding="utf-8")
    assert "fires on no patch" not in other


class _IgnoresLayer(nn.Module):
    """The tapped 'act' runs but the output does not depend on it (as a ViT's head at its last
    block ignores the patch tokens)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        self.act(self.conv(x))
        return self.fc(x.mean((2, 3)))


def test_a_layer_the_outputs_do_not_read_is_said_so(tmp_path):
    torch.manual_seed(0)
    write_report(tmp_path, _basis(), _IgnoresLayer().eval(), "act", _source(), rcav=False,
                 **{k: v for k, v in FAST.items() if not k.startswith("rcav")})
    assert "the model&#x27;s outputs do not read the positions edited here" in (tmp_path / "index.html").read_text(
        encoding="utf-8")
    write_report(tmp_path, _basis(), TinyNet().eval(), "act", _source(), rcav=False,
                 **{k: v for k, v in FAST.items() if not k.startswith("rcav")})
    assert "do not read the positions" not in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_a_report_given_its_output_function_does_not_ask_for_it_again(tmp_path):
    import warnings

    basis = _basis()
    basis.metadata["output_callable"] = "pooled"       # extracted with a function output=
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        write_report(tmp_path, basis, TinyNet().eval(), "act", _source(masks=False), output=lambda out: out, **FAST)
    assert not [w for w in seen if "pass it again" in str(w.message)]
    with pytest.warns(UserWarning, match="extracted with output=pooled"):   # not given: said once
        write_report(tmp_path / "b", basis, TinyNet().eval(), "act", _source(masks=False), **{**FAST, "rcav": False})


def test_a_report_folder_the_moves_cannot_reach_is_refused_before_any_work(tmp_path):
    import tempfile

    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system (/dev/shm) to link into")
    out = tmp_path / "r"
    write_report(out, _basis(k=2), TinyNet().eval(), None, _source(n=6, masks=False), **{**FAST, "rcav": False})
    elsewhere = tempfile.mkdtemp(dir=shm)
    try:
        import shutil

        for f in (out / "images").iterdir():
            shutil.move(str(f), os.path.join(elsewhere, f.name))
        (out / "images").rmdir()
        os.symlink(elsewhere, out / "images")     # the pictures on another file system
        before = _tree(out)
        with pytest.raises(OSError, match="another file system"):
            write_report(out, _basis(k=3), TinyNet().eval(), None, _source(n=6, masks=False),
                         **{**FAST, "rcav": False})
        assert _tree(out) == before and not list(out.glob(".pyconcepts-staging-*"))
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_sigmoid_output_is_warned_of_on_the_index_too(tmp_path):
    # one score per image, all in [0, 1]: read as a logit, which the terminal warns of; the
    # index, which is what gets shared, says it too (once), and a logit output says nothing
    class Sigmoid(TinyNet):
        def forward(self, x):
            return super().forward(x).sigmoid()

    torch.manual_seed(0)
    opts = {k: v for k, v in FAST.items() if not k.startswith("rcav")}
    with pytest.warns(UserWarning, match="every one lies in"):
        write_report(tmp_path / "p", _basis(), Sigmoid(n_classes=1).eval(), "act", _source(masks=False), rcav=False,
                     class_names=["no", "yes"], **opts)
    text = (tmp_path / "p" / "index.html").read_text(encoding="utf-8")
    assert text.index("Check before you read on") < text.index("every one lies in [0, 1]")
    assert text.count("every one lies in [0, 1]") == 1
    write_report(tmp_path / "l", _basis(), TinyNet(n_classes=2).eval(), "act", _source(masks=False), rcav=False,
                 class_names=["no", "yes"], **opts)
    assert "Check before you read on" not in (tmp_path / "l" / "index.html").read_text(encoding="utf-8")


def test_rcav_and_the_pushes_leave_out_a_class_predicted_on_too_few_images(tmp_path, monkeypatch):
    # class 2 is predicted on 1 of 24 images; concept 2's removal lowers it most, on that one
    # image: RCAV tests the concept on a class with enough images, and the index does not list
    # class 2 as a push
    import pyconcepts.report as rep
    from pyconcepts.report.html import MIN_CLASS_IMAGES

    torch.manual_seed(0)
    model = TinyNet().eval()
    src = _source(n=24, masks=False)
    with torch.no_grad():
        model.fc.weight.mul_(50)
        z = model(src.images)
        model.fc.bias.sub_(z.mean(0))
        model.fc.bias[2] -= z.std(0)[2]
        counts = torch.bincount(model(src.images).argmax(1), minlength=3)
    assert counts[2] == 1 and (counts[:2] >= MIN_CLASS_IMAGES).all()
    seen = {}
    rcav, measure = rep._rcav, rep.measure
    monkeypatch.setattr(rep, "_rcav", lambda *a, **k: (seen.setdefault("classes", k["classes"]), rcav(*a, **k))[1])
    monkeypatch.setattr(rep, "measure", lambda *a, **k: seen.setdefault("m", measure(*a, **k)))
    write_report(tmp_path, _basis(), model, "act", src, class_names=["a", "b", "rare"], **FAST)
    assert int(seen["m"].class_odds_change[2].argmin()) == 2       # the rare class would be chosen
    assert 2 not in seen["classes"] and len(seen["classes"]) == 3
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "&#160;rare" not in index
    assert ">rare</td><td class=\"num\">1</td>" in (tmp_path / "concepts" / "concept-002.html").read_text(
        encoding="utf-8")


class _ReadsChannelZero(nn.Module):
    """A 4-channel layer ('act', the image's own pixels); the class logit reads its channel 0
    only, squashed (so the removal's effect is not the same on every image)."""

    def __init__(self):
        super().__init__()
        self.act = nn.Identity()

    def forward(self, x):
        h = self.act(x)
        z = 6 * torch.tanh(3 * (h[:, 0].mean((1, 2)) - 0.5))
        return torch.stack([torch.zeros_like(z), z], 1)


def _channel_zero_and_three():
    """A basis of two channel concepts, 0 (the one _ReadsChannelZero reads, varied per image) and
    3 (ignored), and 40 images of 4 channels."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 4, 6, 6, generator=g)
    images[:, 0] = images[:, 0] * 0.5 + torch.rand(40, 1, 1, generator=g) * 0.5
    eye = torch.eye(4)[[0, 3]]
    rows = images.permute(0, 2, 3, 1).reshape(-1, 4)
    basis = ConceptBasis(eye, torch.quantile(rows @ eye.T, 0.7, dim=0), eye, rows.mean(0), layer="act")
    src = TensorImages(images, names=[f"{i}.png" for i in range(40)], labels=torch.arange(40) % 2,
                       class_names=["no", "yes"])
    return basis, src


def test_the_index_compares_each_influence_with_random_concepts(tmp_path):
    # concept 0 is the channel the output reads; concept 1 a channel it ignores: 0 is above
    # every random concept (random filters over 4 channels move channel 0 only in part), 1 is
    # no larger than some (its influence is 0)
    basis, src = _channel_zero_and_three()
    write_report(tmp_path, basis, _ReadsChannelZero().eval(), "act", src, class_names=["no", "yes"], rcav=False,
                 **{k: v for k, v in FAST.items() if not k.startswith("rcav")})
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "random concepts&#x27; influence" in index
    median = float(re.search(r"median ([0-9.]+) \(8 draws\)", index).group(1))
    highest = float(re.search(r"range [0-9.]+-([0-9.]+)\)", index).group(1))
    assert 0 < median <= highest
    body = index.split("<tbody>")[1].split("</tbody>")[0]
    rows_html = {int(re.search(r"concept (\d+)</a>", r).group(1)): r for r in re.findall(r"<tr>(.*?)</tr>", body, re.S)}
    influence = {c: float(re.search(r"</i></span>([0-9.]+)</td>", r).group(1)) for c, r in rows_html.items()}
    assert influence[0] > highest and "bar weak" not in rows_html[0]
    assert "larger than 8 of the 8 random concepts" in rows_html[0]
    assert influence[1] <= median and "bar weak" in rows_html[1] and "larger than 0 of the 8" in rows_html[1]
    write_report(tmp_path / "off", basis, _ReadsChannelZero().eval(), "act", src, class_names=["no", "yes"],
                 rcav=False, random_concepts=0, **{k: v for k, v in FAST.items() if not k.startswith("rcav")})
    assert "random concepts" not in (tmp_path / "off" / "index.html").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="random_concepts must be 0 .* or at least 3"):
        write_report(tmp_path / "one", basis, _ReadsChannelZero().eval(), "act", src, rcav=False, random_concepts=1,
                     **{k: v for k, v in FAST.items() if not k.startswith("rcav")})


def test_every_long_stage_is_announced_before_its_work(tmp_path):
    # a stage's time (the CLI's "stage: n/n (12.3 s)") runs from its first call: each one that
    # starts with a pass over images says so at done 0, before that pass (the model reads the
    # channel concept 0 is, so its removal moves images enough for counterfactuals)
    basis, src = _channel_zero_and_three()
    calls = []
    write_report(tmp_path, basis, _ReadsChannelZero().eval(), "act", src, class_names=["no", "yes"],
                 progress=lambda *a: calls.append(a), **FAST)
    first = {}
    for stage, done, _ in calls:
        first.setdefault(stage, done)
    for stage in ("report: removals", "report: random concepts", "rcav", "report: joint removals",
                  "report: counterfactuals"):
        assert first.get(stage) == 0, (stage, first)

def test_an_rcav_test_that_stopped_early_says_so_beside_its_p(tmp_path):
    # random concepts on a random net cannot be significant: each test stops after a few of its
    # null draws, and the p shown is that stopped test's, which the page must say
    torch.manual_seed(0)
    write_report(tmp_path, _basis(), TinyNet().eval(), "act", _source(), **{**FAST, "rcav_permutations": None})
    stopped = 0
    for page in sorted((tmp_path / "concepts").glob("concept-*.html")):
        text = page.read_text(encoding="utf-8")
        for title, shown, made in re.findall(r"<td class=\"num\" title=\"(p = [^\"]*)\">([0-9.]+) "
                                             r"<span class=\"muted\">\(stopped at (\d+)\)</span></td>", text):
            stopped += 1
            n = int(re.search(r"of (\d+) null draws", title).group(1))
            assert int(made) < n and f"stopped after {made} of {n} null draws" in title
            assert 0 < float(shown) <= 1
    assert stopped == 3  # the basis's 3 concepts, each tested once
