import pytest
import torch
from torch import nn

import pyconcepts as pc
from pyconcepts import attribution as attr
from pyconcepts.taps import LayerTap
from _toy_models import SmallCNN, TinyViT

torch.manual_seed(0)


def basis_for(model, layer, images, k=3, seed=0, skip=0):
    tap = LayerTap(model, layer, skip_tokens=skip)
    rows = tap.to_rows(tap.activations(images))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, rows.shape[1], generator=g)
    s = w / (w * w).sum(1, keepdim=True) + 0.05 * torch.randn(k, rows.shape[1], generator=g)
    b = torch.quantile(rows @ w.T, 0.7, dim=0)
    return pc.ConceptBasis(w, b, s, rows.mean(0), layer=layer)


def test_detection_maps_are_upsampled_detector_outputs():
    model = SmallCNN().eval()
    images = torch.rand(3, 3, 8, 8)
    basis = basis_for(model, "features.3", images)
    maps = attr.detection_maps(model, basis, images, upsample=False, kind="score")
    tap = LayerTap(model, "features.3")
    rows = tap.to_rows(tap.activations(images))
    assert maps.shape == (3, 3, 4, 4)
    assert torch.allclose(maps[1, 2, 3, 0], rows[16 + 12] @ basis.decoding[2] - basis.bias[2], atol=1e-5)
    up = attr.detection_maps(model, basis, images)
    assert up.shape == (3, 3, 8, 8) and float(up.min()) >= 0 and float(up.max()) <= 1


def test_token_model_detection_maps_use_the_patch_grid():
    model = TinyViT().eval()
    images = torch.rand(2, 3, 16, 16)
    basis = basis_for(model, "blocks.1", images, skip=1)
    maps = attr.detection_maps(model, basis, images, skip_tokens=1)
    assert maps.shape == (2, 3, 16, 16)


def test_linear_and_gradient_contributions_agree_for_a_gap_linear_head():
    model = SmallCNN().eval()
    images = torch.rand(4, 3, 8, 8)
    basis = basis_for(model, "features.3", images)
    exact = attr.contribution_maps(model, basis, images, 1, head=model.fc)
    grad = attr.contribution_maps(model, basis, images, 1, method="gradient")
    assert exact.shape == (4, 3, 4, 4)
    assert torch.allclose(exact, grad, atol=1e-5)
    per_image = attr.contribution_maps(model, basis, images, torch.tensor([0, 1, 2, 0]), head=model.fc)
    assert torch.allclose(per_image[1], exact[1], atol=1e-6)


def test_contributions_add_up_for_a_complete_basis():
    # With D concepts whose W S^T = I, x - mean = sum_i a_i s_i, so the contributions of all
    # concepts at all positions sum to the logit minus the logit at the mean activation.
    model = SmallCNN(c=4).eval()
    images = torch.rand(2, 3, 8, 8)
    tap = LayerTap(model, "features.3")
    rows = tap.to_rows(tap.activations(images))
    w = torch.randn(4, 4)
    s = torch.linalg.inv(w).T
    basis = pc.ConceptBasis(w, torch.zeros(4), s, rows.mean(0), layer="features.3")
    c = attr.contribution_maps(model, basis, images, 2, head=model.fc, reference="mean")
    with torch.no_grad():
        logits = model(images)[:, 2]
        at_mean = model.fc(basis.mean)[2]
    assert torch.allclose(c.sum((1, 2, 3)), logits - at_mean, atol=1e-4)


def test_contributions_are_the_removal_effect_through_a_linear_head():
    # by default a concept's summed contribution is what intervene(remove=[i]) takes off the
    # score: exactly, through pooling + linear, with the ReLU clamp that intervene applies on
    # this non-negative layer (and without it when both are told clamp=False)
    model = SmallCNN().eval()
    images = torch.rand(4, 3, 8, 8)
    base = basis_for(model, "features.3", images)
    basis = pc.ConceptBasis(base.decoding, base.bias, base.encoding, base.mean, layer="features.3",
                            absent_level=torch.tensor([-0.3, 0.2, -1.0]))
    assert bool((LayerTap(model, "features.3").activations(images) >= 0).all())
    clipped_somewhere = False
    for clamp in (None, False):
        c = attr.contribution_maps(model, basis, images, 1, head=model.fc, clamp=clamp).sum((2, 3))  # (B, K)
        grad = attr.contribution_maps(model, basis, images, 1, method="gradient", clamp=clamp).sum((2, 3))
        with torch.no_grad():
            before = model(images)[:, 1]
            for i in range(3):
                with pc.intervene(model, basis, remove=[i], clamp=clamp):
                    drop = before - model(images)[:, 1]
                assert torch.allclose(c[:, i], drop, atol=1e-4), (clamp, i)
                assert torch.allclose(grad[:, i], drop, atol=1e-4), (clamp, i)
        assert bool((c.abs() > 1e-3).any())
        if clamp is None:
            clipped = c
        else:
            clipped_somewhere = not torch.allclose(clipped, c, atol=1e-4)
    assert clipped_somewhere  # the clamp mattered on this layer: the test tells the two apart
    with pytest.raises(ValueError, match="reference"):
        attr.contribution_maps(model, basis, images, 1, head=model.fc, reference="zero")


def _planted_concepts():
    """A SmallCNN, its images and patch rows, and two concepts: s[0] along class 0's weight
    (it raises class 0), s[1] random; w = s / ||s||^2."""
    torch.manual_seed(1)
    model = SmallCNN(c=6).eval()
    images = torch.rand(24, 3, 8, 8)
    tap = LayerTap(model, "features.3")
    rows = tap.to_rows(tap.activations(images))
    v = model.fc.weight.detach()
    s = torch.stack([v[0] - v[1:].mean(0), torch.randn(6)])
    return model, images, rows, s / (s * s).sum(1, keepdim=True), s


class _GatedHead(nn.Module):
    """conv -> ReLU (the tapped layer 'act') -> mean -> linear, plus a term in the square of
    channel 5 whose sign depends on the image: a push with a component along channel 5 moves
    the classes one way on some images and the other way on others; one without moves every
    image alike (through a linear head alone every direction would)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        z = self.act(self.conv(x)).mean((2, 3))
        sign = torch.tanh(20.0 * (x.mean((1, 2, 3)) - 0.5))
        return self.fc(z) + 50.0 * (sign * z[:, 5] ** 2)[:, None] * torch.tensor([1.0, -1.0, 0.0])


def _planted_nonlinear():
    """s[0] along class 0's weight without channel 5 (it raises class 0 on every image),
    s[1] random."""
    torch.manual_seed(3)
    model = _GatedHead().eval()
    images = torch.rand(32, 3, 8, 8)
    tap = LayerTap(model, "act")
    rows = tap.to_rows(tap.activations(images))
    v = model.fc.weight.detach()
    planted = v[0] - v[1:].mean(0)
    planted[5] = 0.0
    s = torch.stack([planted, torch.randn(6)])
    return model, images, rows, s / (s * s).sum(1, keepdim=True), s

def test_rcav_finds_a_planted_influence_and_not_a_null_one():
    # a concept direction aligned with class 0's weight raises class 0; its permutation
    # null does not; Bonferroni-adjusted p-values are in [0, 1]
    model, images, rows, w, s = _planted_concepts()
    b = torch.quantile(rows @ w.T, 0.5, dim=0)
    basis = pc.ConceptBasis(w, b, s, rows.mean(0), layer="features.3")
    res = attr.rcav(model, basis, images, alpha=2.0, n_permutations=19, seed=0)
    assert res.scores.shape == (2, 3)
    assert float(res.scores[0, 0]) == 1.0
    assert ((res.p_adjusted >= 0) & (res.p_adjusted <= 1)).all()
    assert torch.allclose(res.p_adjusted, (res.p_values * 6).clamp(max=1))
    assert res.influence().shape == (2, 3)


def test_rcav_counts_one_test_per_concept_with_two_classes():
    # two classes: where one probability rises the other falls, so the two tests are one
    torch.manual_seed(1)
    model = SmallCNN(c=6, classes=2).eval()
    images = torch.rand(24, 3, 8, 8)
    rows = LayerTap(model, "features.3").to_rows(LayerTap(model, "features.3").activations(images))
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    basis = pc.ConceptBasis(w, torch.quantile(rows @ w.T, 0.5, dim=0), w / (w * w).sum(1, keepdim=True),
                            rows.mean(0), layer="features.3")
    res = attr.rcav(model, basis, images, alpha=2.0, n_permutations=9, seed=0)
    assert torch.allclose(res.scores[:, 0] + res.scores[:, 1], torch.ones(2))
    assert torch.equal(res.p_values[:, 0], res.p_values[:, 1])
    assert torch.allclose(res.p_adjusted, (res.p_values * 2).clamp(max=1))
    assert attr.rcav_tests(4, 2) == 4 and attr.rcav_tests(4, 3) == 12
    # enough draws to stop early: a concept that moves the classes as every random one does
    # stops at the 2nd extreme null (h = 2 for 99 draws and 2 tests), both classes with one p
    full = attr.rcav(model, basis, images, alpha=2.0, n_permutations=99, seed=0, stop_early=False)
    early = attr.rcav(model, basis, images, alpha=2.0, n_permutations=99, seed=0)
    assert torch.equal(early.significant, full.significant)
    assert (early.draws < 99).all() and torch.equal(early.p_values[:, 0], early.p_values[:, 1])
    assert (early.p_adjusted >= full.p_adjusted).all()


def test_rcav_does_not_test_a_concept_detected_on_one_patch():
    # one detected patch: no signal vector for it nor for its random counterparts, so no null
    # exists; the concept must come out untestable (p = 1), not significant against a flat null
    model, images, rows, w, s = _planted_nonlinear()
    z = rows @ w.T
    top = z[:, 1].unique(sorted=True)
    b = torch.stack([torch.quantile(z[:, 0], 0.5), (top[-1] + top[-2]) / 2])
    assert (z > b).sum(0).tolist()[1] == 1
    basis = pc.ConceptBasis(w, b, s, rows.mean(0), layer="act")
    res = attr.rcav(model, basis, images, alpha=2.0, n_permutations=39, seed=0)
    assert torch.equal(res.p_values[1], torch.ones(3))
    assert not res.significant[1].any()
    assert (res.p_values[0] < 1).any()  # the other concept is still tested


def test_maximize_concept_moves_the_representation_along_s():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    images = torch.rand(8, 3, 8, 8)
    basis = basis_for(model, "features.3", images)
    out = attr.maximize_concept(model, basis, 0, image_shape=(3, 8, 8), steps=30, lr=0.05)
    assert out.latent_after > out.latent_before
    assert out.image.shape == (3, 8, 8)
    assert 0.0 <= out.fired_after <= 1.0


def test_bad_input_is_named():
    model = SmallCNN().eval()
    images = torch.rand(2, 3, 8, 8)
    basis = basis_for(model, "features.3", images)
    with pytest.raises(IndexError, match="out of range"):
        attr.contribution_maps(model, basis, images, 0, concepts=[5])
    with pytest.raises(TypeError, match="head"):
        attr.contribution_maps(model, basis, images, 0, method="linear")
    wrong = pc.ConceptBasis(torch.randn(2, 3).abs() + 0.1, torch.zeros(2), torch.ones(2, 3), torch.zeros(3),
                            layer="features.3")
    with pytest.raises(ValueError, match="D = 3"):
        attr.detection_maps(model, wrong, images)
    with pytest.raises(ValueError, match="channels"):
        attr.detection_maps(model, basis, torch.rand(2, 4, 8, 8))


def test_nan_images_are_named_by_their_position_among_all():
    model = SmallCNN().eval()
    images = torch.rand(7, 3, 8, 8)
    basis = basis_for(model, "features.3", images)
    images[5, 0, 1, 1] = float("nan")
    where = r"images contain NaN or Inf pixels \(image\(s\) \[5\]\)"
    with pytest.raises(ValueError, match=where):
        attr.detection_maps(model, basis, images, batch_size=2)
    for method in ("gradient", "linear"):
        with pytest.raises(ValueError, match=where):
            attr.contribution_maps(model, basis, images, 0, method=method, head=model.fc, batch_size=2)
    with pytest.raises(ValueError, match=where):
        attr.rcav(model, basis, images, batch_size=2)



def test_contribution_maps_check_the_target_class():
    model = SmallCNN().eval()
    images = torch.rand(3, 3, 8, 8)
    basis = pc.extract(model, "features.3", images, 2, seed=0)
    last = attr.contribution_maps(model, basis, images, 2)
    assert torch.allclose(attr.contribution_maps(model, basis, images, -1), last)
    for target, err in ((3, IndexError), (-4, IndexError), ([0, 1, 7], IndexError), (0.5, TypeError),
                        ([0.0, 1.0, 2.0], TypeError), ("predicted", TypeError)):
        with pytest.raises(err, match="target"):
            attr.contribution_maps(model, basis, images, target)


def test_a_callable_target_is_differentiated_with_the_gradient_method():
    # the margin of class 1 over class 0 is linear in the logits: its contributions are
    # class 1's minus class 0's
    model = SmallCNN().eval()
    images = torch.rand(3, 3, 8, 8)
    basis = basis_for(model, "features.3", images)
    margin = attr.contribution_totals(model, basis, images, lambda z: z[:, 1] - z[:, 0])
    one, zero = (attr.contribution_totals(model, basis, images, c) for c in (1, 0))
    assert torch.allclose(margin, one - zero, atol=1e-5) and margin.abs().max() > 1e-4
    with pytest.raises(TypeError, match="method='gradient'"):
        attr.contribution_maps(model, basis, images, lambda z: z[:, 1], head=model.fc)
    with pytest.raises(ValueError, match="one score per image"):
        attr.contribution_totals(model, basis, images, lambda z: z)
    with pytest.raises(ValueError, match="does not depend on the logits through autograd"):
        attr.contribution_totals(model, basis, images, lambda z: z[:, 1].detach())


def test_rcav_null_of_random_concepts_gives_a_planted_influence_the_smallest_p():
    # s[0] lies along class 0's weight: adding it raises class 0 on every image. Random
    # concepts of the same size do so on about half, so with 19 draws p is 1/20 (the former
    # null, directions of the concept's own filter on permuted labels, moved class 0 alike)
    model, images, rows, w, s = _planted_nonlinear()
    basis = pc.ConceptBasis(w, torch.quantile(rows @ w.T, 0.5, dim=0), s, rows.mean(0), layer="act")
    res = attr.rcav(model, basis, images, alpha=2.0, n_permutations=19, seed=0)
    assert float(res.scores[0, 0]) == 1.0
    assert float(res.p_values[0, 0]) == pytest.approx(1 / 20)
    null_up = res.null_scores[:, 0, 0]
    assert 0.05 < float(null_up.mean()) < 0.95
    # the default draws enough that a concept beyond every null would be significant
    auto = attr.rcav(model, basis, images, alpha=2.0, concepts=[0], seed=0)
    n = auto.null_scores.shape[0]
    assert n == attr.auto_permutations(attr.rcav_tests(1, 3), 0.05) and attr.rcav_tests(1, 3) / (n + 1) < 0.05


def test_rcav_tests_one_class_per_concept_when_told():
    model, images, rows, w, s = _planted_nonlinear()
    basis = pc.ConceptBasis(w, torch.quantile(rows @ w.T, 0.5, dim=0), s, rows.mean(0), layer="act")
    every = attr.rcav(model, basis, images, alpha=2.0, n_permutations=19, seed=0)
    one = attr.rcav(model, basis, images, alpha=2.0, n_permutations=19, seed=0, classes=[0, 2])
    assert torch.equal(one.scores, every.scores)           # every class is still measured
    tested = torch.tensor([[True, False, False], [False, False, True]])
    assert torch.equal(one.p_values[tested], every.p_values[tested])
    assert bool(one.p_values[~tested].isnan().all()) and not bool(one.significant[~tested].any())
    assert torch.allclose(one.p_adjusted[tested], (one.p_values[tested] * 2).clamp(max=1))  # 2 tests, not 6
    assert attr.rcav(model, basis, images, alpha=2.0, seed=0, classes=[0, 2]).null_scores.shape[0] == \
        attr.auto_permutations(2, 0.05)
    with pytest.raises(ValueError, match="one class per tested concept"):
        attr.rcav(model, basis, images, n_permutations=2, classes=[0])
    with pytest.raises(IndexError, match="classes: class 3"):
        attr.rcav(model, basis, images, n_permutations=2, classes=[0, 3])


def test_rcav_stops_a_hopeless_concepts_draws_with_the_full_tests_decisions():
    # level 0.1, 99 draws, 2 tests: a p adjusted below 0.1 needs at most 3 extreme nulls, so a
    # concept stops at its 4th. The planted concept (3 extreme nulls in 99) runs every draw and
    # stays significant; the random one stops within a few draws, with a valid p that is not
    model, images, rows, w, s = _planted_nonlinear()
    basis = pc.ConceptBasis(w, torch.quantile(rows @ w.T, 0.5, dim=0), s, rows.mean(0), layer="act")
    kw = dict(alpha=2.0, n_permutations=99, seed=0, classes=[0, 2], level=0.1)
    full = attr.rcav(model, basis, images, stop_early=False, **kw)
    early = attr.rcav(model, basis, images, **kw)
    assert torch.equal(early.significant, full.significant) and bool(full.significant[0, 0])
    assert torch.equal(early.scores, full.scores)
    assert full.draws.tolist() == [99, 99] and int(early.draws[0]) == 99
    assert torch.equal(early.p_values[0, 0], full.p_values[0, 0])
    made = int(early.draws[1])
    assert made < 10
    assert torch.equal(early.null_scores[:made, 1], full.null_scores[:made, 1])  # the same nulls
    assert bool(early.null_scores[made:, 1].isnan().all())
    h = 4  # Besag-Clifford's h / L, or the full test's floor (1 + h) / 100, whichever is larger
    assert float(early.p_values[1, 2]) == pytest.approx(max(h / made, (1 + h) / 100))
    assert float(early.p_adjusted[1, 2]) >= 0.1
    # too few draws for any p below the level: nothing stops, so the p-values stay exact
    few = attr.rcav(model, basis, images, alpha=2.0, n_permutations=19, seed=0, classes=[0, 2])
    assert few.draws.tolist() == [19, 19]


def test_rcav_p_values_are_exact_at_the_level():
    # 7 extreme nulls of 199, 5 tests: the adjusted p is exactly 0.2, so a test at level 0.2
    # fails (float32 made it 0.19999999 and passed it, while early stopping, computed exactly,
    # did not: the two paths decided differently)
    assert not attr._adjusted(attr._full_p(torch.tensor(7.0), 199), 5) < 0.2
    model, images, rows, w, s = _planted_nonlinear()
    basis = pc.ConceptBasis(w, torch.quantile(rows @ w.T, 0.5, dim=0), s, rows.mean(0), layer="act")
    res = attr.rcav(model, basis, images, alpha=2.0, n_permutations=9, seed=0)
    assert res.p_values.dtype == torch.float64 and res.p_adjusted.dtype == torch.float64
