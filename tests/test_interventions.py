import pytest
import torch

import pyconcepts as pc
from pyconcepts.interventions import edit_rows, restore_corrections
from pyconcepts.taps import LayerTap
from _toy_models import SmallCNN, TinyResNet, TinyViT

torch.manual_seed(0)


def random_basis(d, k=3, layer=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g)
    s = w / (w * w).sum(1, keepdim=True) + 0.05 * torch.randn(k, d, generator=g)
    return pc.ConceptBasis(w, torch.zeros(k), s, torch.rand(d, generator=g), layer=layer)


def _restored_copy(model):
    """A fresh SmallCNN with ``model``'s state dict, corrections re-installed from it."""
    fresh = SmallCNN().eval()
    state = model.state_dict()
    restore_corrections(fresh, state)
    fresh.load_state_dict(state)
    return fresh


def test_set_puts_the_latent_factor_at_the_target():
    basis = random_basis(6)
    x = torch.randn(50, 6)
    y = edit_rows(x, basis.decoding, basis.bias, basis.encoding, basis.mean, set={1: 2.5}, clamp=False)
    assert torch.allclose(basis.latent(y)[:, 1], torch.full((50,), 2.5), atol=1e-4)
    # METHOD.md form: x + ((t' - w.x) / (w.s)) s with t' = t (w.s) + w.mean
    w, s, mu = basis.decoding[1], basis.encoding[1], basis.mean
    t_raw = 2.5 * (w @ s) + w @ mu
    expected = x + ((t_raw - x @ w) / (w @ s))[:, None] * s
    assert torch.allclose(y, expected, atol=1e-5)


def test_scale_multiplies_the_latent_factor():
    basis = random_basis(6)
    x = torch.randn(40, 6)
    y = edit_rows(x, basis.decoding, basis.bias, basis.encoding, basis.mean, scale={0: 3.0}, clamp=False)
    assert torch.allclose(basis.latent(y)[:, 0], 3 * basis.latent(x)[:, 0], atol=1e-4)


def test_remove_follows_the_relu_formula_only_where_detected():
    basis = random_basis(5, k=1)
    x = torch.rand(30, 5) * 3
    y = edit_rows(x, basis.decoding, basis.bias, basis.encoding, basis.mean, remove=[0], membership="soft")
    w, b, s = basis.decoding[0], basis.bias[0], basis.encoding[0]
    m = torch.sigmoid(x @ w - b)
    k = torch.clamp(basis.latent(x)[:, 0], min=0)
    assert torch.allclose(y, torch.relu(x - (m * k)[:, None] * s), atol=1e-5)
    # negative-valued activations are not clamped (auto)
    z = x - 10
    yz = edit_rows(z, basis.decoding, basis.bias, basis.encoding, basis.mean, remove=[0], membership="soft")
    assert (yz < 0).any()


def test_hard_membership_edits_only_detected_rows():
    basis = random_basis(5, k=1)
    x = torch.rand(40, 5) * 3
    y = edit_rows(x, basis.decoding, basis.bias, basis.encoding, basis.mean, remove=[0], membership="hard")
    w, b, s = basis.decoding[0], basis.bias[0], basis.encoding[0]
    detected = x @ w > b
    assert detected.any() and (~detected).any()
    assert torch.equal(y[~detected], x[~detected])
    k = torch.clamp(basis.latent(x)[:, 0], min=0)
    assert torch.allclose(y[detected], torch.relu(x - k[:, None] * s)[detected], atol=1e-5)
    with pytest.raises(ValueError, match="membership"):
        edit_rows(x, basis.decoding, basis.bias, basis.encoding, basis.mean, remove=[0], membership="fuzzy")


def test_hard_correction_survives_a_state_dict_round_trip():
    model = SmallCNN().eval()
    images = torch.rand(4, 3, 8, 8)
    basis = random_basis(8, layer="features.3")
    with torch.no_grad(), pc.intervene(model, basis, remove=[1], membership="hard", strength=2.0):
        want = model(images)
    pc.correct(model, basis, [1], membership="hard", strength=2.0)
    fresh = _restored_copy(model)
    with torch.no_grad():
        assert torch.allclose(fresh(images), want, atol=1e-6)


@pytest.mark.parametrize("make, layer, skip", [(SmallCNN, "features.3", 0), (TinyResNet, "layer1", 0), (TinyViT, "blocks.0", 1)])
def test_intervene_context_changes_outputs_and_then_restores(make, layer, skip):
    model = make().eval()
    images = torch.rand(4, 3, 16, 16)
    d = LayerTap(model, layer, skip_tokens=skip).to_rows(
        LayerTap(model, layer, skip_tokens=skip).activations(images)).shape[1]
    basis = random_basis(d, layer=layer)
    with torch.no_grad():
        before = model(images)
        with pc.intervene(model, basis, set={0: 5.0}, scale={1: 0.0}, skip_tokens=skip):
            during = model(images)
        after = model(images)
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)


def test_intervene_edits_match_edit_rows_at_the_layer():
    model = SmallCNN().eval()
    images = torch.rand(3, 3, 8, 8)
    tap = LayerTap(model, "features.3")
    basis = random_basis(8, layer="features.3")
    rows = tap.to_rows(tap.activations(images))
    want = edit_rows(rows, basis.decoding, basis.bias, basis.encoding, basis.mean, remove=[2])
    with pc.intervene(model, basis, remove=[2]):
        got = tap.to_rows(tap.activations(images))
    assert torch.allclose(got, want, atol=1e-6)


def test_correction_removes_in_index_order_like_intervene():
    model = SmallCNN().eval()
    images = torch.rand(6, 3, 8, 8)
    tap = LayerTap(model, "features.3")
    rows = tap.to_rows(tap.activations(images))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 8, generator=g)
    s = (w + 0.8 * w.roll(1, 0)) / (w * w).sum(1, keepdim=True)   # each s_i moves the next filter
    basis = pc.ConceptBasis(w, (rows @ w.T).median(0).values, s, rows.mean(0), layer="features.3")
    edit = lambda r, i: edit_rows(r, basis.decoding, basis.bias, basis.encoding, basis.mean,  # noqa: E731
                                  remove=[i], membership="soft")
    # the order matters for this basis: 2 then 0 is not 0 then 2
    assert not torch.allclose(edit(edit(rows, 2), 0), edit(edit(rows, 0), 2), atol=1e-4)
    with torch.no_grad(), pc.intervene(model, basis, remove=[2, 0], membership="soft"):
        want = model(images)
    for given in ([2, 0], [0, 2]):
        fix = pc.correct(model, basis, given)
        with torch.no_grad():
            assert torch.allclose(model(images), want, atol=1e-6), given
        assert fix.concepts == [0, 2]
        fix.remove()


def test_correction_is_permanent_saved_in_state_and_removable(tmp_path):
    model = SmallCNN().eval()
    images = torch.rand(6, 3, 8, 8)
    basis = random_basis(8, layer="features.3")
    with torch.no_grad():
        plain = model(images)
        with pc.intervene(model, basis, remove=[0, 2], membership="soft"):
            edited = model(images)
    fix = pc.correct(model, basis, [0, 2])  # soft by default
    with torch.no_grad():
        assert torch.allclose(model(images), edited, atol=1e-6)
    state = model.state_dict()
    assert any("pyconcepts_correction_" in key for key in state)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(RuntimeError, match="already"):
        pc.correct(model, basis, [1])

    fresh = SmallCNN().eval()
    loaded = torch.load(tmp_path / "m.pt")
    restore_corrections(fresh, loaded)
    fresh.load_state_dict(loaded)
    with torch.no_grad():
        assert torch.allclose(fresh(images), edited, atol=1e-6)

    fix.remove()
    assert not fix.active
    assert not any("pyconcepts_correction_" in key for key in model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(images), plain)


def test_counterfactual_reports_both_predictions():
    model = SmallCNN().eval()
    images = torch.rand(5, 3, 8, 8)
    basis = random_basis(8, layer="features.3")
    cf = pc.counterfactual(model, basis, images, [0], set={1: 50.0})
    assert cf.logits_before.shape == cf.logits_after.shape == (5, 3)
    with torch.no_grad():
        assert torch.allclose(cf.logits_before, model(images))
    assert cf.changed.dtype == torch.bool
    assert torch.allclose(cf.probs_after.sum(1), torch.ones(5))


def test_counterfactual_prints_a_summary_not_its_logits():
    from pyconcepts.interventions import Counterfactual

    before = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    after = torch.tensor([[0.0, 2.0], [0.0, 1.0], [3.0, 0.0]])  # the first prediction flips
    text = repr(Counterfactual(before, after))
    dp = (after.softmax(-1)[0, 0] - before.softmax(-1)[0, 0]) / 3  # the other two do not move
    assert text.startswith("Counterfactual(3 images, 2 classes: 1 prediction changed, ")
    assert f"predicted class's probability {float(dp):+.3f} on average" in text
    assert "tensors: logits_before, logits_after, probs_before, probs_after, pred_before, pred_after, changed" in text
    # a real one: one line whatever the number of images, the fields as they were
    cf = pc.counterfactual(SmallCNN().eval(), random_basis(8, layer="features.3"), torch.rand(160, 3, 8, 8), [0])
    assert "\n" not in repr(cf) and len(repr(cf)) < 300 and str(cf) == repr(cf)
    assert repr(cf).startswith("Counterfactual(160 images, 3 classes: ")
    assert [f.name for f in __import__("dataclasses").fields(cf)] == ["logits_before", "logits_after"]
    assert "0 images" in repr(Counterfactual(torch.zeros(0, 3), torch.zeros(0, 3)))
    assert "logits_before (3,)" in repr(Counterfactual(torch.zeros(3), torch.zeros(3)))


def test_bad_input_is_named():
    model = SmallCNN().eval()
    images = torch.rand(2, 3, 8, 8)
    basis = random_basis(8, layer="features.3")
    with pytest.raises(IndexError, match="out of range"):
        with pc.intervene(model, basis, remove=[3]):
            pass
    with pytest.raises(IndexError, match="out of range"):
        pc.correct(model, basis, [7])
    wrong_d = random_basis(5, layer="features.3")
    with pytest.raises(ValueError, match="D = 5"):
        with pc.intervene(model, wrong_d, remove=[0]):
            model(images)
    with pytest.raises(ValueError, match="does not exist"):
        with pc.intervene(model, basis, layer="features.33", remove=[0]):
            pass
    with pytest.raises(ValueError, match="direction"):
        pc.correct(model, basis, [0], direction="sideways")
    with pytest.raises(ValueError, match="layer is needed"):
        with pc.intervene(model, random_basis(8), remove=[0]):
            pass


def _basis_at(model, layer, images, k=4, seed=0):
    tap = LayerTap(model, layer)
    rows = tap.to_rows(tap.activations(images))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, rows.shape[1], generator=g)
    bias = (rows @ w.T).median(0).values
    s = w / (w * w).sum(1, keepdim=True) + 0.05 * torch.randn(k, rows.shape[1], generator=g)
    return pc.ConceptBasis(w, bias, s, rows.mean(0), layer=layer)


def test_rank_concepts_by_removal_measures_each_drop():
    model = SmallCNN().eval()
    images = torch.rand(12, 3, 8, 8)
    basis = _basis_at(model, "features.3", images)
    r = pc.rank_concepts(model, basis, images, target=2)
    assert sorted(r.concepts) == [0, 1, 2, 3] and r.method == "removal"
    assert torch.all(r.effects[:-1] >= r.effects[1:])
    with torch.no_grad():
        base = model(images)[:, 2]
        for c, e in zip(r.concepts, r.effects):
            with pc.intervene(model, basis, remove=[c]):
                after = model(images)[:, 2]
            assert abs(float((base - after).mean()) - float(e)) < 1e-5


def test_rank_concepts_predicted_measures_log_odds_every_class_and_flips():
    model = SmallCNN().eval()
    images = torch.rand(12, 3, 8, 8)
    basis = _basis_at(model, "features.3", images, seed=2)
    r = pc.rank_concepts(model, basis, images, target="predicted", batch_size=5)
    assert sorted(r.concepts) == [0, 1, 2, 3]
    assert r.class_effects.shape == (4, 3) and r.flip_rates.shape == (4,) and r.abs_effects.shape == (4,)

    def odds(logits, cls):  # log(p / (1 - p)) from the probabilities, in float64
        p = logits.double().softmax(1)[torch.arange(len(logits)), cls]
        return torch.log(p) - torch.log1p(-p)

    with torch.no_grad():
        before = model(images)
        pred = before.argmax(1)
        for j, c in enumerate(r.concepts):
            with pc.intervene(model, basis, remove=[c]):
                after = model(images)
            change = odds(before, pred) - odds(after, pred)
            assert float(r.effects[j]) == pytest.approx(float(change.mean()), abs=1e-4)
            assert float(r.abs_effects[j]) == pytest.approx(float(change.abs().mean()), abs=1e-4)
            assert float(r.flip_rates[j]) == pytest.approx(float((after.argmax(1) != pred).double().mean()))
            assert torch.allclose(r.image_effects[j].double(), change, atol=1e-4)
            assert torch.equal(r.image_predictions[j], after.argmax(1))
            assert torch.allclose((r.base_scores - r.image_effects[j]).double(), odds(after, pred), atol=1e-4)
            for cls in range(3):
                every = torch.full((12,), cls)
                shift = (odds(after, every) - odds(before, every)).mean()
                assert float(r.class_effects[j, cls]) == pytest.approx(float(shift), abs=1e-4)
    # the gradient and greedy rankings do not measure the per-class effects
    assert torch.equal(r.predicted, pred)
    assert torch.allclose(r.base_scores.double(), odds(before, pred), atol=1e-4)
    g = pc.rank_concepts(model, basis, images, target="predicted", method="gradient")
    assert g.class_effects is None and g.flip_rates is None
    seen = []
    pc.rank_concepts(model, basis, images, target=0, greedy=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(d, 7) for d in range(0, 8)]  # the unedited pass starts it; 4 + 3 removals measured
    with pytest.raises(ValueError, match="'predicted'"):
        pc.rank_concepts(model, basis, images, target="argmax")


def test_rank_concepts_gradient_is_exact_for_a_linear_rest_and_greedy_starts_at_the_top():
    # after features.3 SmallCNN is mean pooling + a linear head: the first-order estimate of
    # a removal's drop is the drop
    model = SmallCNN().eval()
    images = torch.rand(10, 3, 8, 8)
    basis = _basis_at(model, "features.3", images, seed=1)
    margin = lambda logits: logits[:, 0] - logits[:, 1]  # noqa: E731
    removal = pc.rank_concepts(model, basis, images, target=margin, membership="hard")
    gradient = pc.rank_concepts(model, basis, images, target=margin, membership="hard", method="gradient")
    assert removal.concepts == gradient.concepts
    assert torch.allclose(removal.effects, gradient.effects, atol=1e-4)
    greedy = pc.rank_concepts(model, basis, images, target=margin, membership="hard", greedy=2)
    assert greedy.concepts[0] == removal.concepts[0] and len(greedy.concepts) == 2
    assert abs(float(greedy.effects[0]) - float(removal.effects[0])) < 1e-5
    with torch.no_grad():
        before = margin(model(images))
        with pc.intervene(model, basis, remove=greedy.concepts, membership="hard"):
            after = margin(model(images))
    assert abs(float((before - after).mean()) - float(greedy.effects[1])) < 1e-5


def test_rank_concepts_reads_the_selected_output_and_names_bad_arguments():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN()

        def forward(self, x):
            return torch.zeros(len(x), 4), self.net(x).softmax(1)

    model = Pair().eval()
    images = torch.rand(6, 3, 8, 8)
    basis = _basis_at(model, "net.features.3", images)
    r = pc.rank_concepts(model, basis, images, target=0, output=1, method="gradient")
    assert len(r.concepts) == 4
    with pytest.raises(TypeError, match="pass output="):
        pc.rank_concepts(model, basis, images, target=0)
    with pytest.raises(IndexError, match="target 3"):
        pc.rank_concepts(model, basis, images, target=3, output=1)
    with pytest.raises(ValueError, match="method"):
        pc.rank_concepts(model, basis, images, target=0, output=1, method="saliency")
    with pytest.raises(ValueError, match="greedy"):
        pc.rank_concepts(model, basis, images, target=0, output=1, method="gradient", greedy=2)
    with pytest.raises(ValueError, match="empty"):
        pc.rank_concepts(model, basis, images[:0], target=0, output=1)


def test_membership_all_takes_the_positive_latent_out_everywhere():
    basis = random_basis(5, k=1)
    x = torch.randn(60, 5) * 3
    y = edit_rows(x, basis.decoding, basis.bias, basis.encoding, basis.mean, remove=[0], membership="all")
    a = basis.latent(x)[:, 0]
    assert torch.allclose(y, x - a.clamp(min=0)[:, None] * basis.encoding[0], atol=1e-5)
    after = basis.latent(y)[:, 0]
    assert torch.allclose(after[a > 0], torch.zeros(int((a > 0).sum())), atol=1e-4)
    assert torch.equal(y[a <= 0], x[a <= 0])


def test_removal_lowers_a_concept_to_its_absent_level():
    basis = random_basis(5, k=2)
    x = torch.randn(80, 5) * 3
    level = torch.tensor([-0.7, 0.3])
    with_level = pc.ConceptBasis(basis.decoding, basis.bias, basis.encoding, basis.mean, absent_level=level)
    a = with_level.latent(x)[:, 0]
    y = edit_rows(x, with_level.decoding, with_level.bias, with_level.encoding, with_level.mean,
                  remove=[0], clamp=False, absent_level=level)
    above = a > level[0]
    assert above.any() and (~above).any()
    assert torch.allclose(with_level.latent(y)[above, 0], torch.full((int(above.sum()),), -0.7), atol=1e-4)
    assert torch.equal(y[~above], x[~above])  # never raises a concept
    # intervene and correct use the basis' level; a basis without one removes down to the mean
    model = SmallCNN().eval()
    images = torch.rand(4, 3, 8, 8)
    base = random_basis(8, k=3, layer="features.3")
    leveled = pc.ConceptBasis(base.decoding, base.bias, base.encoding, base.mean, layer="features.3",
                              absent_level=torch.tensor([-2.0, -1.0, 0.5]))
    tap = LayerTap(model, "features.3")
    rows = tap.to_rows(tap.activations(images))
    with pc.intervene(model, leveled, remove=[1]):
        got = tap.to_rows(tap.activations(images))
    want = edit_rows(rows, leveled.decoding, leveled.bias, leveled.encoding, leveled.mean, remove=[1],
                     absent_level=leveled.absent_level)
    assert torch.allclose(got, want, atol=1e-6)
    with pc.intervene(model, base, remove=[1]):
        plain = tap.to_rows(tap.activations(images))
    assert not torch.allclose(plain, got)
    with torch.no_grad(), pc.intervene(model, leveled, remove=[0, 2], membership="hard"):
        edited = model(images)
    fix = pc.correct(model, leveled, [0, 2], membership="hard")
    fresh = _restored_copy(model)
    with torch.no_grad():
        assert torch.allclose(model(images), edited, atol=1e-6)
        assert torch.allclose(fresh(images), edited, atol=1e-6)
    fix.remove()


def test_extracted_absent_level_is_the_mean_latent_where_undetected(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 6, generator=g)
    x[:1000, 0] += 6
    x[1000:2000, 1] += 6
    basis = pc.extract_directions(x, 3, seed=0)
    assert basis.absent_level is not None
    latent, detected = basis.latent(x), basis.detect(x)
    for i in range(3):
        assert float(basis.absent_level[i]) == pytest.approx(float(latent[~detected[:, i], i].mean()), abs=1e-4)
    path = tmp_path / "b.safetensors"
    basis.save(path)
    assert torch.equal(pc.ConceptBasis.load(path).absent_level, basis.absent_level)
    with pytest.raises(ValueError, match="absent_level"):
        pc.ConceptBasis(basis.decoding, basis.bias, basis.encoding, basis.mean, absent_level=torch.zeros(2))


def _coupled_basis():
    """Filters and signal vectors far from orthogonal to each other: an edit along s_j moves
    concept i's latent factor by (w_i . s_j) / g_i, here raising concept 0 when concept 1 is
    taken out and lowering it when concept 3 is."""
    e = torch.eye(6)
    w = torch.stack([e[0], e[1], e[2] + e[3], e[4] + 0.5 * e[0]])
    s = torch.stack([e[0] + 0.5 * e[1], e[1] - 0.6 * e[0], e[2] + 0.3 * e[5], e[4] + 0.4 * e[0] - 0.2 * e[1]])
    s = s / (w * s).sum(1, keepdim=True)
    mean = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.1, 0.0])
    level = torch.tensor([-0.2, 0.1, 0.0, 0.3])
    return pc.ConceptBasis(w, torch.zeros(4), s, mean, absent_level=level)


def _edit(basis, rows, **kw):
    return edit_rows(rows, basis.decoding, basis.bias, basis.encoding, basis.mean,
                     absent_level=basis.absent_level, clamp=False, **kw)


def test_several_removals_are_made_in_index_order_whatever_order_they_are_given_in():
    basis = _coupled_basis()
    rows = torch.randn(500, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b64 = pc.ConceptBasis(*(t.double() for t in (basis.decoding, basis.bias, basis.encoding, basis.mean)),
                          absent_level=basis.absent_level.double())
    for kw in (dict(), dict(strength=0.5), dict(membership="soft")):
        joint = _edit(b64, rows, remove=[3, 0, 1], **kw)
        one_at_a_time = rows
        for i in (0, 1, 3):
            one_at_a_time = _edit(b64, one_at_a_time, remove=[i], **kw)
        assert torch.allclose(joint, one_at_a_time, atol=1e-12), kw
    # the last one removed is at or below its level everywhere; the coupling can bring an
    # earlier one back (concept 1's signal vector raises concept 0's filter)
    after = b64.latent(_edit(b64, rows, remove=[1, 3, 0]))
    assert bool((after[:, 3] <= b64.absent_level[3] + 1e-9).all())
    assert bool((after[:, 0] > b64.absent_level[0] + 0.01).any())
    # amplify with removals: in the same order, each on what the earlier edits left
    both = _edit(b64, rows, remove=[0], amplify={1: 3.0})
    assert torch.allclose(both, _edit(b64, _edit(b64, rows, remove=[0]), amplify={1: 3.0}), atol=1e-12)


def test_several_set_and_scale_edits_each_hit_their_target_and_amplify_scales_the_excess():
    basis = _coupled_basis()
    rows = torch.randn(300, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b64 = pc.ConceptBasis(*(t.double() for t in (basis.decoding, basis.bias, basis.encoding, basis.mean)),
                          absent_level=basis.absent_level.double())
    before = b64.latent(rows)
    after = b64.latent(_edit(b64, rows, set={0: 2.0, 1: -1.0}, scale={3: 0.5}))
    assert torch.allclose(after[:, 0], torch.full_like(after[:, 0], 2.0), atol=1e-6)
    assert torch.allclose(after[:, 1], torch.full_like(after[:, 1], -1.0), atol=1e-6)
    assert torch.allclose(after[:, 3], 0.5 * before[:, 3], atol=1e-6)
    amplified = b64.latent(_edit(b64, rows, amplify={3: 3.0}))
    excess = torch.clamp(before[:, 3] - b64.absent_level[3], min=0)
    assert torch.allclose(amplified[:, 3], before[:, 3] + 2.0 * excess, atol=1e-6)
    # amplify by 0 is a removal
    assert torch.allclose(_edit(b64, rows, amplify={1: 0.0}), _edit(b64, rows, remove=[1]), atol=1e-8)
    # with removals and amplifications of other (coupled) concepts in the same edit, set and
    # scale still land on their targets: they are solved last, on what the removals left
    mixed = b64.latent(_edit(b64, rows, remove=[1], amplify={2: 2.0}, set={0: 2.0}, scale={3: 0.5}))
    removals_only = b64.latent(_edit(b64, rows, remove=[1], amplify={2: 2.0}))
    assert (removals_only[:, 0] - before[:, 0]).abs().max() > 0.1   # the removals do move concept 0
    assert torch.allclose(mixed[:, 0], torch.full_like(mixed[:, 0], 2.0), atol=1e-6)
    assert torch.allclose(mixed[:, 3], 0.5 * before[:, 3], atol=1e-6)


def test_amplify_raises_what_remove_lowers_and_bad_edit_values_are_refused():
    model = SmallCNN().eval()
    images = torch.rand(12, 3, 8, 8)
    basis = _basis_at(model, "features.3", images, seed=2)
    with torch.no_grad():
        base = model(images)[:, 2]
        with pc.intervene(model, basis, remove=[1]):
            removed = model(images)[:, 2]
        with pc.intervene(model, basis, amplify={1: 2.0}, clamp=False):
            amplified = model(images)[:, 2]
        with pc.intervene(model, basis, amplify={1: 0.0}):
            zero = model(images)[:, 2]
    assert torch.allclose(zero, removed, atol=1e-5)
    # to first order amplifying by 2 moves the logit as far the other way as removing does
    assert float(((amplified - base) * (base - removed)).sum()) > 0
    for kw, match in ((dict(remove=[0], strength=-1.0), "strength"),
                      (dict(remove=[0], strength=float("nan")), "strength"),
                      (dict(set={0: float("inf")}), "set"), (dict(scale={1: float("nan")}), "scale"),
                      (dict(amplify={0: -2.0}), "amplify"), (dict(amplify={9: 2.0}), "amplify")):
        with pytest.raises((ValueError, IndexError), match=match):
            with pc.intervene(model, basis, **kw):
                pass
    with pytest.raises(ValueError, match="strength"):
        pc.correct(model, basis, [0], strength=-5.0)
    with pytest.raises(ValueError, match="strength"):
        pc.counterfactual(model, basis, images, [0], strength=float("inf"))
    with pytest.raises(ValueError, match="strength"):
        pc.rank_concepts(model, basis, images, target=0, strength=-0.5)


def test_bad_images_concepts_and_empty_edits_are_named():
    import numpy as np

    model = SmallCNN().eval()
    images = torch.rand(6, 3, 8, 8)
    basis = _basis_at(model, "features.3", images, seed=2)
    bad = images.clone()
    bad[4, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"images contain NaN or Inf pixels \(image\(s\) \[4\]\)"):
        pc.counterfactual(model, basis, bad, [0], batch_size=3)       # its position among all images
    with pytest.raises(ValueError, match="images contain NaN"):
        pc.rank_concepts(model, basis, bad, target=0)
    with pytest.raises(ValueError, match=r"images contain NaN or Inf pixels \(image\(s\) \[4\]\)"):
        pc.extract(model, "features.3", bad, 2, options={"batch_size": 3})
    # float64 images run in the model's dtype
    cf64 = pc.counterfactual(model, basis, images.double(), [0])
    cf32 = pc.counterfactual(model, basis, images, [0])
    assert torch.allclose(cf64.logits_after, cf32.logits_after, atol=1e-5)
    # concept indices: numpy and 0-d tensors are ints; a float is not; the argument is named
    ints = pc.counterfactual(model, basis, images, [np.int64(1), torch.tensor(2)])
    assert torch.equal(ints.logits_after, pc.counterfactual(model, basis, images, [1, 2]).logits_after)
    with pytest.raises(TypeError, match="concepts: concept index must be an int, got 2.0"):
        pc.counterfactual(model, basis, images, 2.0)
    with pytest.raises(IndexError, match="concepts: concept index 9"):
        pc.rank_concepts(model, basis, images, target=0, concepts=[9])
    with pytest.raises(TypeError, match="set: the value for concept 1 must be a number"):
        pc.counterfactual(model, basis, images, set={1: "a"})
    with pytest.raises(ValueError, match="nothing to change"):
        pc.counterfactual(model, basis, images)
    with pytest.raises(ValueError, match="nothing to change"):
        with pc.intervene(model, basis):
            pass
    with pytest.raises(ValueError, match="concept 1 is given to both concepts= and amplify="):
        pc.counterfactual(model, basis, images, [1], amplify={1: 2.0})
    # two edits of one concept would be made one after the other, giving neither
    for edits, names in ((dict(remove=[1], set={1: 1.0}), "remove= and set="),
                         (dict(amplify={0: 2.0}, set={0: 1.0}), "amplify= and set="),
                         (dict(set={1: 0.0}, scale={1: 2.0}), "set= and scale="),
                         (dict(remove=[-1], scale={basis.n_concepts - 1: 2.0}), "remove= and scale=")):
        with pytest.raises(ValueError, match=f"concept . is given to both {names}"):
            with pc.intervene(model, basis, **edits):
                pass
    with pytest.raises(TypeError, match="amplify must map concept indices to factors"):
        with pc.intervene(model, basis, amplify=[1]):
            pass


def test_the_relu_after_an_edit_follows_the_layer_the_basis_records_not_the_batch():
    model = SmallCNN().eval()
    images = torch.rand(6, 3, 8, 8)
    relu_basis = pc.extract(model, "features.3", images, 2, seed=0)     # a ReLU's output
    conv_basis = pc.extract(model, "features.2", images, 2, seed=0)     # the conv before it
    assert relu_basis.metadata["nonnegative"] is True and conv_basis.metadata["nonnegative"] is False
    tap = LayerTap(model, "features.3")
    with torch.no_grad():
        rows = tap.to_rows(tap.activations(images))
    strong = dict(remove=[0], strength=3.0)
    for recorded in (True, False):
        basis = pc.ConceptBasis(relu_basis.decoding, relu_basis.bias, relu_basis.encoding, relu_basis.mean,
                                absent_level=relu_basis.absent_level, layer="features.3",
                                metadata={"nonnegative": recorded})
        want = edit_rows(rows, basis.decoding, basis.bias, basis.encoding, basis.mean,
                         absent_level=basis.absent_level, clamp=recorded, **strong)
        assert bool((want < 0).any()) != recorded
        seen = []
        with torch.no_grad(), pc.intervene(model, basis, **strong):
            # registered after the edit's hook: sees the edited output
            hook = tap.module.register_forward_hook(lambda m, i, o: seen.append(tap.to_rows(o)))
            try:
                model(images)
            finally:
                hook.remove()
        assert torch.allclose(seen[0], want, atol=1e-6), recorded


def test_a_basis_applied_at_another_layer_than_it_records_warns():
    import warnings

    model = SmallCNN().eval()
    images = torch.rand(4, 3, 8, 8)
    basis = _basis_at(model, "features.3", images)          # 8 channels, as features.1 has
    with pytest.warns(UserWarning, match="extracted at layer 'features.3' and is applied at 'features.1'"):
        pc.counterfactual(model, basis, images, [0], layer="features.1")
    with pytest.warns(UserWarning, match="applied at 'features.1'"):
        pc.rank_concepts(model, basis, images, target=0, layer="features.1")
    with pytest.warns(UserWarning, match="applied at 'features.1'"):
        pc.attribution.contribution_maps(model, basis, images, 0, layer="features.1")
    renamed = pc.ConceptBasis(basis.decoding, basis.bias, basis.encoding, basis.mean, layer="3")
    with pytest.warns(UserWarning, match="extracted at layer '3' and is applied at 'features.3'"):
        pc.counterfactual(model, renamed, images, [0], layer="features.3")   # a name that only ends alike
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc.counterfactual(model, basis, images, [0])                 # the recorded layer
        pc.counterfactual(model, basis, images, [0], layer="features.3")


def test_the_python_api_uses_the_skip_tokens_the_basis_records():
    import warnings

    torch.manual_seed(0)
    model = TinyViT().eval()
    images = torch.rand(8, 3, 16, 16)   # 128 patches: enough for 2 concepts
    with pytest.warns(UserWarning, match="17 tokens of 16 channels per image after skip_tokens=0, not a square"):
        pc.extract(model, "blocks.0", images, 2, seed=0, options={"n_init": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        basis = pc.extract(model, "blocks.0", images, 2, seed=0, skip_tokens=1, options={"n_init": 1})
    assert basis.metadata["skip_tokens"] == 1
    # the default follows the basis: the class token is left alone, as the extraction did
    default = pc.counterfactual(model, basis, images, [0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = pc.counterfactual(model, basis, images, [0], skip_tokens=1)
    assert torch.equal(default.logits_after, explicit.logits_after)
    with pytest.warns(UserWarning, match="extracted with skip_tokens=1 and is applied with skip_tokens=0") as seen:
        other = pc.counterfactual(model, basis, images, set={0: 5.0}, skip_tokens=0, batch_size=2)  # class token too
    assert len([w for w in seen if "skip_tokens" in str(w.message)]) == 1      # said once, not per batch
    assert not torch.allclose(other.logits_after, pc.counterfactual(model, basis, images, set={0: 5.0}).logits_after)
    ranking = pc.rank_concepts(model, basis, images, target="predicted")
    assert torch.allclose(ranking.image_effects[ranking.concepts.index(0)],
                          pc.rank_concepts(model, basis, images, target="predicted", skip_tokens=1)
                          .image_effects[ranking.concepts.index(0)])


def test_skip_tokens_on_a_conv_layer_warns_that_it_is_not_used():
    model = SmallCNN().eval()
    with pytest.warns(UserWarning, match="applies to token layers only"):
        pc.extract(model, "features.3", torch.rand(4, 3, 8, 8), 2, skip_tokens=1, options={"n_init": 1})


class _WarnsOnce(SmallCNN):
    def forward(self, x):
        import warnings
        warnings.warn("the model's own warning", UserWarning)
        return super().forward(x)


def test_counterfactual_does_not_repeat_the_models_warnings_per_batch():
    import warnings

    model = _WarnsOnce().eval()
    images = torch.rand(6, 3, 8, 8)
    basis = random_basis(8, layer="features.3")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")      # Python's default: once per code location
        pc.counterfactual(model, basis, images, [0], batch_size=2)
    assert sum("the model's own warning" in str(w.message) for w in seen) == 1
