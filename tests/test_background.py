"""Rows that carry no concept (background) in extract_directions: background_filters."""
import pytest
import torch

import pyconcepts as pc
from pyconcepts import directions
from pyconcepts.directions import background_filters
from pyconcepts.metrics import recovery_report
from pyconcepts.synthetic import SyntheticModel, paper_setup


def test_detectors_skip_background_rows():
    seed = 0
    # 30% of the rows carry no concept; noise-free, so the ideal filters detect perfectly.
    # Without the background treatment (background_rounds=0) every cluster's filter and
    # threshold take in the background rows the clustering gave it: min IoU 0.65-0.69 on
    # seeds 0-2; with it 0.94-0.96 (0.85-0.87 without its discriminant correction).
    model = SyntheticModel(seed=seed, dim=32, n_concepts=5, n_distractors=4, none_fraction=0.3)
    data = model.sample(12000)
    basis = pc.extract_directions(data.x, 5, seed=seed)
    report = recovery_report(basis, data)
    assert report["iou_min"] >= 0.8, report
    assert report["encoding_cosine_min"] >= 0.95, report
    assert 0.2 <= basis.metadata["background_share"] <= 0.4, basis.metadata["background_share"]
    plain = pc.extract_directions(data.x, 5, seed=seed, background_rounds=0)
    assert plain.metadata["background_share"] == 0.0
    assert recovery_report(plain, data)["iou_min"] < report["iou_min"]


def test_discriminants_correct_the_background_filters(monkeypatch):
    # The rejection rounds settle on filters tilted against the other concepts, with their
    # boundaries inside the concepts; background_discriminants corrects both. Same model as
    # above, seeds 0-2: min IoU 0.944 / 0.959 / 0.963 with it, 0.855 / 0.858 / 0.871 without.
    seed = 1
    model = SyntheticModel(seed=seed, dim=32, n_concepts=5, n_distractors=4, none_fraction=0.3)
    data = model.sample(12000)
    corrected = recovery_report(pc.extract_directions(data.x, 5, seed=seed), data)
    monkeypatch.setattr(directions, "_DISCRIMINANT_ROUNDS", 0)
    uncorrected = recovery_report(pc.extract_directions(data.x, 5, seed=seed), data)
    assert corrected["iou_min"] >= 0.92, corrected
    assert corrected["iou_min"] >= uncorrected["iou_min"] + 0.05, (corrected, uncorrected)
    assert corrected["encoding_cosine_min"] >= 0.95, corrected


def test_background_discriminants_keep_filters_without_background():
    # no background row in the labels: nothing to correct against, the inputs come back
    g = torch.Generator().manual_seed(0)
    u = torch.randn(300, 4, generator=g)
    labels = u[:, :3].argmax(1)
    v, c = torch.randn(3, 4, dtype=torch.float64, generator=g), torch.zeros(3, dtype=torch.float64)
    w, t, out = directions.background_discriminants(u, labels, labels, v, c, 3)
    assert w is v and t is c and torch.equal(out, labels)


def test_no_background_found_where_every_row_carries_a_concept():
    # the first fit rejects ~0.1% of the rows: below the detection share, so the fit, the
    # thresholds and the basis are those without the background treatment
    data = paper_setup(3000, seed=0)
    basis = pc.extract_directions(data.x, 3, seed=0)
    plain = pc.extract_directions(data.x, 3, seed=0, background_rounds=0)
    assert basis.metadata["background_share"] == 0.0
    assert torch.equal(basis.decoding, plain.decoding) and torch.equal(basis.bias, plain.bias)


def test_background_filters_labels():
    # three tight concept clusters and diffuse rows around the origin, the latter labelled by
    # their largest coordinate as a clustering would: the concept rows keep their labels and
    # about half of the diffuse ones (measured 0.48) end as background (label 3). The first
    # fit rejects few rows here, so the detection share is set to 0 to force the iteration.
    g = torch.Generator().manual_seed(0)
    concept = torch.cat([torch.randn(400, 3, generator=g) * 0.3 + 4.0 * torch.eye(3)[i] for i in range(3)])
    diffuse = torch.randn(600, 3, generator=g) * 0.7
    u = torch.cat([concept, diffuse])
    labels = torch.cat([torch.arange(3).repeat_interleave(400), diffuse.argmax(1)])
    v, c, out = background_filters(u, labels, 3, detect_share=0.0)
    assert v.shape == (3, 3) and c.shape == (3,)
    assert torch.equal(out[:1200], labels[:1200])
    assert float((out[1200:] == 3).double().mean()) >= 0.4
    # at the default share no background is detected: the labels come back unchanged
    _, _, same = background_filters(u, labels, 3)
    assert torch.equal(same, labels)


def test_background_rounds_is_checked():
    x = paper_setup(300, seed=0).x
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="background_rounds"):
            pc.extract_directions(x, 3, background_rounds=bad)


def test_discriminant_rounds_is_checked():
    u = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="discriminant_rounds"):
            background_filters(u, u.argmax(1), 3, discriminant_rounds=bad)
