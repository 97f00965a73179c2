"""output=: class scores from models that return tuples, dicts or probabilities, and the
errors for outputs, layers and specs that cannot be used (raised before any clustering)."""
import math

import pytest
import torch
from torch import nn

import pyconcepts as pc
from pyconcepts import extraction
from pyconcepts.outputs import read_scores, scores_kind, select_output
from _toy_models import SmallCNN

torch.manual_seed(0)
OPTS = {"refine_steps": 3, "joint_steps": 2, "ura_images": 8, "ura_batch": 4, "n_init": 1}


class TupleNet(nn.Module):
    """Returns (boxes, class scores, landmarks) like a face detector."""

    def __init__(self, probabilities=False):
        super().__init__()
        self.body = SmallCNN()
        self.probabilities = probabilities

    def forward(self, x):
        logits = self.body(x)
        scores = logits.softmax(1) if self.probabilities else logits
        return torch.zeros(x.shape[0], 4), scores, torch.zeros(x.shape[0], 10)


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = SmallCNN()

    def forward(self, x):
        return {"logits": self.body(x), "map": torch.zeros(x.shape[0], 2, 3, 3)}


class MapNet(nn.Module):
    """Class scores as a (B, 2, h, w) map, not (B, C)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.features(x))


class FlatLayerNet(nn.Module):
    """Its 'flat' layer outputs (B, C): not a patch map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.flat(self.conv(x)))


@pytest.fixture
def no_clustering(monkeypatch):
    """Fail the test if extract reaches the clustering stage."""
    def boom(*args, **kwargs):
        raise AssertionError("clustering ran before the bad input was reported")
    monkeypatch.setattr(extraction, "extract_directions", boom)


def test_select_output_by_index_key_attribute_and_callable():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert select_output((a, b), 1) is b
    assert select_output([a, b], -1) is b
    assert select_output({"logits": a}, "logits") is a

    class Out:
        logits = a
    assert select_output(Out(), "logits") is a
    assert select_output((a, b), lambda o: o[0]) is a
    assert select_output(a, None) is a


@pytest.mark.parametrize("value, output, error, match", [
    ((torch.zeros(2, 3),), 3, ValueError, "out of range"),
    (torch.zeros(2, 3), 0, ValueError, "indexes a tuple"),
    ({"a": torch.zeros(2, 3)}, "logits", ValueError, "not a key"),
    (object(), "logits", ValueError, "selects nothing"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), None, TypeError, "pass output="),
    ((torch.zeros(2, 3),), lambda o: o[5], ValueError, "failed"),
    ((torch.zeros(2, 3),), 1.5, TypeError, "output must be"),
    ((torch.zeros(2, 3),), True, TypeError, "output must be"),
])
def test_select_output_errors_name_the_argument(value, output, error, match):
    with pytest.raises(error, match=match):
        select_output(value, output)


@pytest.mark.parametrize("scores, error, match", [
    (torch.zeros(4, 2, 3, 3), ValueError, r"shape \(4, 2, 3, 3\)"),
    (torch.zeros(4, 0), ValueError, "C >= 2"),
    (torch.tensor([1.0, float("inf")]), ValueError, "Inf"),
    (torch.zeros(4, 3, dtype=torch.long), TypeError, "dtype"),
    (torch.tensor([[0.0, float("nan")]]), ValueError, "NaN"),
])
def test_scores_that_are_not_logits_or_probabilities_are_refused(scores, error, match):
    with pytest.raises(error, match=match):
        read_scores(scores, None)


def test_probabilities_become_log_probabilities_with_the_same_softmax():
    logits = torch.randn(5, 4)
    p = logits.softmax(1)
    assert scores_kind(p) == "probs" and scores_kind(logits) == "logits"
    assert torch.allclose(read_scores(p, None).softmax(1), p, atol=1e-6)
    assert torch.equal(read_scores(logits, None), logits)


def test_confident_probabilities_keep_their_log_odds_and_underflow_is_warned_of():
    import warnings

    logits = torch.tensor([[0.0, 53.9], [0.0, -40.0], [1.0, 2.0]], requires_grad=True)
    p = logits.softmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no underflow here: no warning
        read = read_scores(p, None)
    odds = read[:, 1] - read[:, 0]
    assert torch.allclose(odds, torch.tensor([53.9, -40.0, 1.0]), rtol=1e-4)
    odds[0].backward()                          # the gradient of a confident image is not cut
    assert float(logits.grad.abs().sum()) > 0.5
    # a softmax that underflowed to 0: read as the smallest normal number, with a warning
    zero = torch.tensor([[0.0, 1.0]])
    with pytest.warns(UserWarning, match="underflowed"):
        capped = read_scores(zero, None)
    assert torch.isfinite(capped).all() and float(capped[0, 1] - capped[0, 0]) == pytest.approx(87.3, abs=0.1)


class _DenseMap(nn.Module):
    """A detector: a per-pixel probability map (B, 1, H, W), no class scores."""

    def __init__(self):
        super().__init__()
        self.body = SmallCNN().features
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.body(x)))


def _pooled_logit(y):
    return torch.logit(y.mean((1, 2, 3)), eps=1e-6)


def test_one_score_per_image_is_a_yes_no_logit():
    z = torch.tensor([2.0, -1.0, 0.5])
    for shaped in (z, z[:, None]):
        assert torch.equal(read_scores(shaped, None), torch.stack([torch.zeros(3), z], 1))
    with pytest.warns(UserWarning, match="lies in \\[0, 1\\]: it is read as a logit"):   # a sigmoid's output?
        read_scores(torch.tensor([0.2, 0.9, 0.7]), None)
    # a detector's map pooled by a callable: extract, rank, remove
    torch.manual_seed(0)
    model = _DenseMap().eval()
    images = torch.rand(24, 3, 16, 16)
    basis = pc.extract(model, "body.3", images, 3, output=_pooled_logit, options={"n_init": 2})
    assert basis.metadata["output_callable"] == "_pooled_logit" and basis.metadata["output"] is None
    cf = pc.counterfactual(model, basis, images, [0], output=_pooled_logit)
    assert cf.logits_before.shape == (24, 2) and torch.equal(cf.logits_before[:, 0], torch.zeros(24))
    assert torch.allclose(cf.logits_before[:, 1], _pooled_logit(model(images)).detach(), atol=1e-5)
    ranking = pc.rank_concepts(model, basis, images, target=1, output=_pooled_logit)
    assert len(ranking.concepts) == 3
    # later calls without it: told what to pass again (the map itself is no class scores)
    with pytest.warns(UserWarning, match="extracted with output=_pooled_logit"):
        with pytest.raises(ValueError, match=r"one logit per image"):
            pc.counterfactual(model, basis, images, [0])


@pytest.mark.parametrize("probabilities", [False, True])
def test_extract_reads_class_scores_from_a_tuple(probabilities):
    model = TupleNet(probabilities).eval()
    basis = pc.extract(model, "body.features.3", torch.rand(16, 3, 8, 8), 2, seed=0, options=OPTS,
                       output=1)
    assert basis.decoding.shape == (2, 8)
    assert basis.metadata["extract_settings"]["outputs"] == ("probs" if probabilities else "logits")


def test_extract_reads_a_dict_key():
    basis = pc.extract(DictNet().eval(), "body.features.3", torch.rand(16, 3, 8, 8), 2, seed=0,
                       options=OPTS, output="logits")
    assert basis.decoding.shape == (2, 8)


@pytest.mark.parametrize("model, layer, kwargs, error, match", [
    (TupleNet(), "body.features.3", {}, TypeError, "pass output="),
    (TupleNet(), "body.features.3", {"output": 5}, ValueError, "out of range"),
    (DictNet(), "body.features.3", {"output": "probs"}, ValueError, "not a key"),
    (DictNet(), "body.features.3", {"output": "map"}, ValueError, r"shape \(2, 2, 3, 3\)"),
    (MapNet(), "features.1", {}, ValueError, "expected \\(B, C\\)"),
    (FlatLayerNet(), "flat", {}, ValueError, "rank 2"),
    (TupleNet(), "body.features.3", {"output": 0.5}, TypeError, "output must be"),
])
def test_bad_outputs_and_layers_fail_before_clustering(no_clustering, model, layer, kwargs, error, match):
    with pytest.raises(error, match=match):
        pc.extract(model.eval(), layer, torch.rand(16, 3, 8, 8), 2, seed=0, options=OPTS, refine=True,
                   **kwargs)


def test_output_is_not_read_when_ura_is_off():
    # without URA nothing reads the class scores: a tuple-returning backbone is fine
    basis = pc.extract(TupleNet().eval(), "body.features.3", torch.rand(16, 3, 8, 8), 2, seed=0,
                       ura=False, options=OPTS)
    assert basis.decoding.shape == (2, 8)


def test_ura_pool_is_a_seeded_sample_of_the_whole_stream():
    model = SmallCNN().eval()
    tap = pc.LayerTap(model, "features.3")
    # class-sorted data: 64 images of one kind then 64 of another (told apart by a constant)
    x = torch.cat([torch.zeros(64, 3, 8, 8), torch.ones(64, 3, 8, 8)]) + 0.01 * torch.rand(128, 3, 8, 8)
    pools = []
    for seed in (0, 0, 1):
        src = extraction._PatchSource(tap, x, 16, 10**6, 32, None, seed=seed)
        pools.append(torch.cat(src.pool))
    first = pools[0]
    assert first.shape == (32, 3, 8, 8)
    second_half = (first.mean((1, 2, 3)) > 0.5).sum()
    assert 8 <= second_half <= 24              # both halves are in the pool
    assert torch.equal(pools[0], pools[1])     # same seed, same pool
    assert not torch.equal(pools[0], pools[2])
    # every pooled image is one of the inputs, none twice
    idx = [int(torch.nonzero((x - img).abs().flatten(1).amax(1) == 0)[0]) for img in first]
    assert len(set(idx)) == 32 and idx == sorted(idx)


def test_counterfactual_and_attribution_read_the_selected_output():
    model = TupleNet(probabilities=True).eval()
    x = torch.rand(5, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 8, generator=g)
    basis = pc.ConceptBasis(w, torch.zeros(2), w / (w * w).sum(1, keepdim=True), torch.zeros(8),
                            layer="body.features.3")
    cf = pc.counterfactual(model, basis, x, [0], output=1)
    with torch.no_grad():
        p = model(x)[1]
    assert torch.allclose(cf.probs_before, p, atol=1e-5)
    with pytest.raises(TypeError, match="pass output="):
        pc.counterfactual(model, basis, x, [0])
    maps = pc.contribution_maps(model, basis, x, 0, output=1)
    assert maps.shape == (5, 2, 4, 4) and torch.isfinite(maps).all()
    res = pc.rcav(model, basis, x, output=1, n_permutations=2)
    assert res.scores.shape == (2, 3)
    with pytest.raises(ValueError, match="not a key"):
        pc.rcav(DictNet().eval(), pc.ConceptBasis(w, torch.zeros(2), w, torch.zeros(8), layer="body.features.3"),
                x, output="nope", n_permutations=2)


def test_a_basis_remembers_the_output_it_was_extracted_with():
    model = TupleNet().eval()
    images = torch.rand(8, 3, 8, 8)
    basis = pc.extract(model, "body.features.3", images, 2, seed=0, output=1, options={"n_init": 1})
    assert basis.metadata["output"] == 1
    # the API's later calls default to it ...
    cf = pc.counterfactual(model, basis, images, [0])
    with torch.no_grad():
        assert torch.allclose(cf.logits_before, model(images)[1])
    ranking = pc.rank_concepts(model, basis, images, target=0)
    assert sorted(ranking.concepts) == [0, 1]
    maps = pc.contribution_maps(model, basis, images, 0, method="gradient")
    assert maps.shape[:2] == (8, 2)
    # ... a model that returns the scores themselves passes through it
    plain = model.body
    plain_basis = pc.ConceptBasis(basis.decoding, basis.bias, basis.encoding, basis.mean, layer="features.3",
                                  metadata={"output": 1})
    assert torch.allclose(pc.counterfactual(plain, plain_basis, images, [0]).logits_before, plain(images))
    # and a basis without it still asks for output=
    bare = pc.ConceptBasis(basis.decoding, basis.bias, basis.encoding, basis.mean, layer="body.features.3")
    with pytest.raises(TypeError, match="output="):
        pc.counterfactual(model, bare, images, [0])
