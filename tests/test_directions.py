"""extract_directions on the synthetic model; detectors' losses; synthetic model and metrics."""
import numpy as np
import pytest
import torch

import pyconcepts as pc
from pyconcepts import detectors
from pyconcepts.metrics import detector_iou, linear_sum_assignment, match_directions, recovery_report
from pyconcepts.synthetic import SyntheticModel, paper_setup


@pytest.mark.slow
@pytest.mark.parametrize("seed,kw", [(0, {}), (5, dict(none_fraction=0.1, noise=0.05))])
def test_recovery_on_synthetic(seed, kw):
    model = SyntheticModel(dim=64, n_concepts=10, n_distractors=6, seed=seed, **kw)
    data = model.sample(50_000)
    basis = pc.extract_directions(data.x, n_concepts=10, seed=seed)
    report = recovery_report(basis, data)
    assert report["encoding_cosine_mean"] >= 0.98, report
    assert report["encoding_cosine_min"] >= 0.95, report
    assert report["iou_min"] >= 0.85, report


def test_paper_setup_and_basis_contract(tmp_path):
    data = paper_setup(6000, seed=0)
    basis = pc.extract_directions(list(data.x.split(1000)), n_concepts=3, seed=0)
    assert basis.decoding.shape == (3, 16) and basis.bias.shape == (3,) and basis.encoding.shape == (3, 16)
    report = recovery_report(basis, data)
    assert report["iou_min"] >= 0.8 and report["encoding_cosine_min"] >= 0.9, report
    # w_i . s_i = 1 and the latent of x + s_i rises by one
    torch.testing.assert_close((basis.decoding * basis.encoding).sum(1), torch.ones(3), rtol=1e-4, atol=1e-4)
    basis.save(tmp_path / "b.safetensors")
    loaded = pc.ConceptBasis.load(tmp_path / "b.safetensors")
    assert torch.equal(loaded.detect(data.x), basis.detect(data.x))
    assert loaded.metadata["settings"]["n_concepts"] == 3


@pytest.mark.slow
def test_same_seed_same_basis_for_tensor_and_stream():
    data = paper_setup(2000, seed=1)
    a = pc.extract_directions(data.x, 3, seed=2, n_init=1)
    b = pc.extract_directions(lambda: iter(data.x.split(700)), 3, seed=2, n_init=1)
    torch.testing.assert_close(a.decoding, b.decoding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.encoding, b.encoding, rtol=1e-3, atol=1e-4)


def test_extract_directions_bad_input():
    x = torch.randn(20, 4)
    with pytest.raises(ValueError, match="n_concepts"):
        pc.extract_directions(x, 0)
    with pytest.raises(ValueError, match="exceeds"):
        pc.extract_directions(x, 21)
    bad = x.clone(); bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pc.extract_directions(bad, 2)
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        pc.extract_directions([x, 3.0], 2)
    with pytest.raises(ValueError, match="empty"):
        pc.extract_directions([], 2)
    for name, value in (("decoder_sample", 0), ("decoder_iter", 0), ("decoder_rounds", -1),
                        ("decoder_penalty", 0.0)):
        with pytest.raises(ValueError, match=name):
            pc.extract_directions(x, 2, **{name: value})
    for value in ("yes", 1, None, "auto"):
        with pytest.raises(ValueError, match="vmf_polish"):
            pc.extract_directions(x, 2, vmf_polish=value)


def test_vmf_polish_runs_where_asked_and_is_recorded():
    data = paper_setup(seed=0)
    on = pc.extract_directions(data.x, 3, seed=0, vmf_polish=True)
    off = pc.extract_directions(data.x, 3, seed=0)
    assert on.metadata["settings"]["vmf_polish"] is True and off.metadata["settings"]["vmf_polish"] is False
    assert off.metadata["vmf_polish"] is None
    polish = on.metadata["vmf_polish"]
    assert polish["concentration"] > 0 and 1 <= polish["iterations"] < 300
    # well separated concepts: the polish leaves the clusters, hence the detectors, as they were
    assert float((on.detect(data.x) == off.detect(data.x)).double().mean()) > 0.99


def test_too_few_rows_per_concept_are_warned_of():
    import warnings

    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"16 concepts from 400 patch rows \(25.0 per concept\)"):
        pc.extract_directions(x, 16, n_init=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc.extract_directions(x, 4, n_init=1)                       # 100 per concept


def test_cluster_missing_from_the_decoder_sample_gets_its_discriminant():
    # a sample of 20 rows out of 2000 holds 4 / 5 / 11 members of the three clusters: a
    # logistic fit with (almost) no positives is an arbitrary direction, the discriminant of
    # the cluster's rows is not
    data = paper_setup(2000, seed=1)
    few = pc.extract_directions(data.x, 3, seed=2, n_init=1, decoder_sample=20)
    full = pc.extract_directions(data.x, 3, seed=2, n_init=1, decoder="discriminant")
    import pyconcepts.directions as directions

    members = torch.tensor(few.metadata["decoder_members"])  # per cluster, in the 20 sample rows
    assert int(members.sum()) == 20
    scarce = members < directions._MIN_DECODER_MEMBERS
    assert 0 < int(scarce.sum()) < 3  # both kinds of filter in one basis
    assert torch.isfinite(few.decoding).all()
    for i in torch.nonzero(scarce).flatten().tolist():
        cos = torch.nn.functional.cosine_similarity(few.decoding[i], full.decoding, dim=1)
        assert float(cos.max()) > 0.999


def test_losses_follow_their_definitions():
    y = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    # entropies 0 and 1 bit
    assert float(detectors.sparsity_loss(y)) == pytest.approx(0.5, abs=1e-5)
    assert float(detectors.soft_maximum(torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)
    assert float(detectors.soft_maximum(torch.tensor([1.0, 1.0]))) == pytest.approx(1.0)
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert float(detectors.max_margin_loss(w)) == pytest.approx(3.0)
    # every concept active on half the rows: no inactive penalty; tau = I makes nu = 1
    y2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(detectors.inactive_loss(y2, tau=1.0)) == 0.0
    assert float(detectors.inactive_loss(torch.zeros(2, 2), tau=1.0)) == pytest.approx(1.0)
    assert float(detectors.excessive_activation_loss(torch.ones(4, 2), rho=0.5)) == pytest.approx(1.0)
    assert float(detectors.max_activation_loss(y2)) == pytest.approx(0.0, abs=1e-6)
    losses = detectors.detector_losses(torch.randn(8, 2), w, torch.zeros(2))
    assert set(losses) == set(detectors.DEFAULT_WEIGHTS)


def test_refine_detectors_runs_with_extra_term_and_keeps_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 5, generator=g)
    w0, b0 = torch.randn(3, 5, generator=g), torch.zeros(3)
    seen = []

    def extra(w, b, batch, step):
        seen.append(step)
        return (b**2).sum() * 0.1

    w, b = detectors.refine_detectors(x, w0, b0, steps=5, batch_size=64, extra_loss=extra, seed=0)
    assert w.shape == (3, 5) and b.shape == (3,) and seen == list(range(5))
    w_same, b_same = detectors.refine_detectors(x, w0, b0, steps=0)
    torch.testing.assert_close(w_same, w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_same, b0, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unknown loss"):
        detectors.refine_detectors(x, w0, b0, steps=1, weights={"nope": 1.0})
    # the max-margin term alone shrinks ||w||
    w_mm, _ = detectors.refine_detectors(x, w0, b0, steps=50, weights={k: 0.0 for k in detectors.DEFAULT_WEIGHTS} | {"max_margin": 1.0})
    assert float(w_mm.norm(dim=1).mean()) < float(w0.norm(dim=1).mean())
    assert detectors.sample_rows(list(x.split(100)), 200, seed=1).shape == (200, 5)


def test_hungarian_matches_bruteforce_and_metrics():
    rng = np.random.default_rng(0)
    import itertools
    for n, m in [(3, 3), (3, 5), (5, 3)]:
        cost = rng.normal(size=(n, m))
        rows, cols = linear_sum_assignment(cost)
        best = min(
            sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n)
        ) if n <= m else min(
            sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m)
        )
        assert cost[rows, cols].sum() == pytest.approx(best)
    truth = torch.eye(3)
    rec = torch.stack([-truth[2], truth[0], truth[1] * 2])
    out = match_directions(rec, truth)
    assert out["truth_index"].tolist() == [1, 2, 0]
    assert out["cosine"].tolist() == [1.0, 1.0, -1.0]  # signed: the flipped one counts -1
    det = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    pres = torch.tensor([[1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    assert detector_iou(det, pres).tolist() == [0.5, 1.0]


def test_synthetic_model_follows_the_paper():
    model = SyntheticModel(dim=16, n_concepts=3, n_distractors=2, seed=0, none_fraction=0.2, overlap=0.3)
    data = model.sample(20_000)
    both = torch.cat([model.encoding, model.distractors])
    cos = both @ both.T - torch.eye(5)
    assert float(cos.abs().max()) <= 0.5 + 1e-6
    torch.testing.assert_close(both.norm(dim=1), torch.ones(5))
    k = data.presence.sum(1)
    assert 0.15 < float((k == 0).float().mean()) < 0.25 and float((k == 2).float().mean()) > 0.15
    assert bool((data.latent[data.presence] >= 2.5).all()) and bool((data.latent[~data.presence] <= 2.5).all())
    # the ideal detectors are exact without noise
    det = data.x @ model.true_decoding.T > model.true_bias
    assert float(detector_iou(det, data.presence).min()) > 0.999
    same = SyntheticModel(dim=16, n_concepts=3, n_distractors=2, seed=0, none_fraction=0.2, overlap=0.3)
    assert torch.equal(same.encoding, model.encoding)
    with pytest.raises(ValueError, match="exceeds"):
        SyntheticModel(dim=4, n_concepts=3, n_distractors=2)


def test_calibrated_scales_recover_a_logistic_slope():
    from pyconcepts.directions import calibrated_scales
    t = torch.linspace(-5, 5, 401, dtype=torch.float64)[None, :].repeat(2, 1)
    n = torch.full_like(t, 1000.0)
    members = n * torch.sigmoid(torch.tensor([[2.0], [0.5]], dtype=torch.float64) * t)
    beta = calibrated_scales(t, n, members)
    assert beta.tolist() == pytest.approx([2.0, 0.5], rel=1e-3)
    # perfectly separated: capped so the members' median score is max_logit
    sep = calibrated_scales(t[:1], n[:1], n[:1] * (t[:1] > 0), max_logit=16.0)
    assert float(sep) == pytest.approx(16.0 / 2.5, rel=0.02)
    # a detector that fires on fewer than half of its members still gets its likelihood's
    # scale (it had the flat floor, 1e-3 / spread, a 1000x smaller filter than its neighbours)
    rows = 1000.0 * torch.exp(-t[:1])                     # most rows, and members, below t = 0
    weak_members = rows * torch.sigmoid(1.5 * t[:1])
    assert float((weak_members * (t[:1] > 0)).sum() / weak_members.sum()) < 0.5
    weak = calibrated_scales(t[:1], rows, weak_members)
    assert float(weak) == pytest.approx(1.5, rel=0.02)
    # scores unrelated to membership: the flat floor
    flat = calibrated_scales(t[:1], n[:1], torch.full_like(t[:1], 10.0))
    assert float(flat) < 1e-2


def test_detectors_come_with_a_sharp_calibrated_sigmoid():
    data = paper_setup(6000, seed=0)
    basis = pc.extract_directions(data.x, 3, seed=0)
    y = torch.sigmoid(data.x @ basis.decoding.T - basis.bias)
    fired = basis.detect(data.x)
    # ||w|| = 1 gave memberships of ~0.3-0.45 everywhere; calibrated, they separate
    assert float(y[fired].mean()) > 0.9 and float(y[~fired].mean()) < 0.1
    assert float(basis.decoding.norm(dim=1).min()) > 2


def _paper_refine(seed, **kw):
    data = paper_setup(6000, seed=seed)
    # The refinement is tested from the discriminant detectors (IoU ~0.97), where it helps.
    # From the default logistic filters (IoU ~0.997) the paper's losses lower IoU to 0.96-0.98
    # (seeds 1, 5): sparsity, sparsity bound and max activation each alone do, their optimum is
    # not the ideal boundary here.
    basis = pc.extract_directions(data.x, 3, seed=seed, decoder="discriminant", alternations=2)
    match = match_directions(basis.encoding, data.model.encoding)["truth_index"]
    report = {}
    opts = dict(steps=300, lr=1e-2, rotation_lr=1e-2, tau=0.25, batch_size=2048, seed=seed)
    opts.update(kw)
    w, b = detectors.refine_detectors(data.x, basis.decoding, basis.bias, report=report, **opts)
    iou = lambda w, b: detector_iou((data.x @ w.T > b)[:, match], data.presence)  # noqa: E731
    return data, basis, iou(basis.decoding, basis.bias), iou(w, b), (w, b), report


def test_refinement_keeps_or_improves_detectors_and_rotates_boundedly():
    _, basis, before, after, _, report = _paper_refine(1)
    assert float(after.min()) >= float(before.min()) - 0.005, (before.tolist(), after.tolist())
    assert float(after.mean()) >= float(before.mean()) - 0.002, (before.tolist(), after.tolist())
    assert report["failed_checks"] == 0 and report["kept_step"] == 300
    # rotation: at most ~rotation_lr radians per step
    _, _, _, _, (w, _), _ = _paper_refine(1, steps=20, rotation_lr=1e-3)
    cos = torch.nn.functional.cosine_similarity(w.double(), basis.decoding.double())
    assert float(cos.min()) >= float(torch.cos(torch.tensor(20 * 1e-3 * 1.05))) - 1e-6


def test_merge_guard_returns_the_last_state_without_duplicates():
    # the inactive loss alone with tau = I (floor nu = 1): every detector is pushed to fire
    # everywhere, the detectors become duplicates
    bad = dict(steps=200, tau=3.0, weights={k: 0.0 for k in detectors.DEFAULT_WEIGHTS if k != "inactive"})
    data, _, _, _, (w, b), free = _paper_refine(2, max_overlap=None, **bad)
    assert free["kept_step"] == 200
    assert float(detectors.pairwise_jaccard(data.x @ w.T > b).max()) > 0.5  # duplicates
    _, _, _, _, (w, b), guarded = _paper_refine(2, **bad)
    assert guarded["failed_checks"] > 0 and guarded["kept_step"] < 200
    assert float(detectors.pairwise_jaccard(data.x @ w.T > b).max()) <= 0.5


def test_clustering_starts_from_given_centroids():
    data = paper_setup(3000, seed=0)
    km = pc.DirectionalClustering(3, seed=0, n_init=1).fit(data.x)
    again = pc.DirectionalClustering(3, seed=5, init=km.centroids_, max_iter=100).fit(data.x)
    assert torch.allclose(again.centroids_, km.centroids_, atol=1e-4)
    with pytest.raises(ValueError, match="init"):
        pc.DirectionalClustering(3, init=torch.zeros(2, 16)).fit(data.x)  # checked by fit
    with pytest.raises(ValueError, match="columns"):
        pc.DirectionalClustering(3, init=torch.ones(3, 5)).fit(data.x)


def test_restarts_with_no_near_best_partner_are_compared_with_all_others(monkeypatch):
    # no run within _NEAR_BEST of the best: that is no evidence of a reproducible clustering
    # (it used to score 1.0, and 'auto' then chose whitening by the order of the images)
    import pyconcepts.directions as directions

    x = torch.randn(3000, 12, generator=torch.Generator().manual_seed(0))
    near = directions._sample_restarts(x, 8, 0, 4, 50, 1e-3)
    monkeypatch.setattr(directions, "_NEAR_BEST", -1.0)  # no run is near-best
    _, agreement, per = directions._sample_restarts(x, 8, 0, 4, 50, 1e-3)
    assert per is not None and per.shape == (8,)
    assert agreement < 0.9 and agreement == pytest.approx(float(per.mean()))
    assert torch.equal(near[0], directions._sample_restarts(x, 8, 0, 4, 50, 1e-3)[0])  # same best run
    _, single, none = directions._sample_restarts(x, 8, 0, 1, 50, 1e-3)
    assert single == 1.0 and none is None


@pytest.mark.parametrize("whitened, plain, chosen", [
    (0.594, 0.586, False),   # a near tie of two poorly reproducing clusterings: the layer's own coordinates
    (0.52, 0.72, False),
    (0.91, 0.37, True),      # synthetic model with concept-free rows
    (0.46, 0.33, True),
    (1.0, 0.9998, True),     # paper's model: both reproduce, the whitened one perfectly
])
def test_auto_whitening_needs_a_clear_gain_in_agreement(monkeypatch, whitened, plain, chosen):
    import pyconcepts.directions as directions

    real = directions._sample_restarts

    def fixed(sample, n_concepts, seed, n_init, max_iter, shrinkage, step=lambda: None):
        start, _, per = real(sample, n_concepts, seed, 2, max_iter, shrinkage, step)
        value = plain if shrinkage == directions._NO_WHITENING_SHRINKAGE else whitened
        return start, value, per

    monkeypatch.setattr(directions, "_sample_restarts", fixed)
    basis = pc.extract_directions(paper_setup(2000, seed=0).x, 3, seed=0)
    assert basis.metadata["whitened"] is chosen
    assert basis.metadata["restart_agreement"] == {"whitened": whitened, "plain": plain}


def test_auto_whitening_keeps_it_where_the_restarts_agree():
    # the paper's model: whitened restarts that reach the best objective share its labels
    data = paper_setup(6000, seed=0)
    basis = pc.extract_directions(data.x, 3, seed=0)
    assert basis.metadata["whitened"] is True
    agreement = basis.metadata["restart_agreement"]
    assert agreement["whitened"] >= agreement["plain"]
    # per concept: each cluster's overlap with its partners, averaging to the chosen agreement
    per_concept = basis.metadata["concept_agreement"]
    assert len(per_concept) == 3 and all(0.0 <= v <= 1.0 for v in per_concept)
    assert sum(per_concept) / 3 == pytest.approx(agreement["whitened"], abs=1e-3)
    report = recovery_report(basis, data)
    assert report["iou_min"] >= 0.95 and report["encoding_cosine_min"] >= 0.95, report


def test_auto_whitening_drops_it_on_a_real_layer_and_the_halves_agree():
    # the demo network's last conv layer (mostly background): in whitened coordinates the
    # restarts share about half of their labels, in plain ones more; the decoding directions
    # from two halves of the images then match (whitened: ~0.55 mean cosine)
    from pyconcepts.datasets.shapes import make_shapes
    from pyconcepts.demo.run import DEMO_LAYER, load_model
    from pyconcepts.metrics import linear_sum_assignment
    from pyconcepts.taps import LayerTap

    images = make_shapes(400, seed=10, watermark="random", watermark_rate=0.3, with_masks=False).images
    with torch.no_grad():
        x = torch.cat(list(LayerTap(load_model(), DEMO_LAYER).rows(images, 100))).float()
    half = x.shape[0] // 2
    a = pc.extract_directions(x[:half].contiguous(), 8, seed=0)
    b = pc.extract_directions(x[half:].contiguous(), 8, seed=1)
    assert a.metadata["whitened"] is False and b.metadata["whitened"] is False
    wa = torch.nn.functional.normalize(a.decoding.double(), dim=1)
    wb = torch.nn.functional.normalize(b.decoding.double(), dim=1)
    cos = (wa @ wb.T).numpy()
    rows, cols = linear_sum_assignment(-cos)
    assert float(cos[rows, cols].mean()) >= 0.8, cos[rows, cols]


def test_refinement_stops_once_the_detections_settle():
    data = paper_setup(3000, seed=0)
    basis = pc.extract_directions(data.x, 3, seed=0)
    report = {}
    detectors.refine_detectors(data.x, basis.decoding, basis.bias, steps=300, check_every=10,
                               stop_flips=1.0, report=report)
    assert report["stopped_early"] and report["steps_run"] == 10
    report = {}
    detectors.refine_detectors(data.x, basis.decoding, basis.bias, steps=30, check_every=10,
                               stop_flips=None, report=report)
    assert not report["stopped_early"] and report["steps_run"] == 30
    with pytest.raises(ValueError, match="stop_flips"):
        detectors.refine_detectors(data.x, basis.decoding, basis.bias, stop_flips=-1.0)


def test_extract_directions_reports_its_progress_step_by_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g) + 4 * torch.eye(5)[torch.randint(0, 3, (600,), generator=g)]
    calls = []
    pc.extract_directions(x, 3, seed=0, n_init=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 10) for i in range(1, 11)]  # 3 + 3 restarts, fit, filters, thresholds, signal
    calls.clear()
    pc.extract_directions(x, 3, seed=0, n_init=3, whiten=False, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (7, 7) and len(calls) == 7
