"""compare_bases and the split-half check (pyconcepts.stability)."""
import math

import pytest
import torch
from torch import nn

import pyconcepts as pc
from pyconcepts.basis import ConceptBasis
from pyconcepts.stability import compare_bases, concept_stability
from pyconcepts.synthetic import SyntheticModel
from pyconcepts.taps import LayerTap


def _basis(k=4, d=6, seed=0, layer="body"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g)
    s = w / (w * w).sum(1, keepdim=True)
    return ConceptBasis(w, torch.zeros(k), s, torch.zeros(d), layer=layer)


def _permuted(basis, perm):
    return ConceptBasis(basis.decoding[perm], basis.bias[perm], basis.encoding[perm], basis.mean, layer=basis.layer)


def test_a_basis_matches_itself_and_any_permutation_of_itself():
    a = _basis()
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    same = compare_bases(a, a, x)
    assert torch.equal(same.partner, torch.arange(4))
    assert torch.allclose(same.jaccard, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(same.decoding_cosine, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(same.rate_a, same.rate_b)
    perm = torch.tensor([2, 0, 3, 1])
    other = compare_bases(a, _permuted(a, perm), x)
    # concept i of a is concept j of b where perm[j] == i
    assert torch.equal(perm[other.partner], torch.arange(4))
    assert other.mean_jaccard == pytest.approx(1.0)


def test_jaccard_is_that_of_the_detection_sets_and_streams_like_a_tensor():
    a, b = _basis(seed=0), _basis(seed=3)
    x = torch.randn(2000, 6, generator=torch.Generator().manual_seed(2))
    out = compare_bases(a, b, x)
    da, db = a.detect(x), b.detect(x)
    for i in range(4):
        j = int(out.partner[i])
        inter = (da[:, i] & db[:, j]).sum()
        union = (da[:, i] | db[:, j]).sum()
        assert float(out.jaccard[i]) == pytest.approx(float(inter) / float(union))
    # the pairing maximises the summed Jaccard: no swap of two partners does better
    inter = da.T.float() @ db.float()
    union = da.sum(0)[:, None] + db.sum(0)[None] - inter
    jac = inter / union
    for i in range(4):
        for k in range(i + 1, 4):
            p, q = int(out.partner[i]), int(out.partner[k])
            assert float(jac[i, p] + jac[k, q]) >= float(jac[i, q] + jac[k, p]) - 1e-9
    chunks = compare_bases(a, b, [x[:700], x[700:1500], x[1500:]], chunk_size=300)
    assert torch.equal(chunks.partner, out.partner) and torch.allclose(chunks.jaccard, out.jaccard)


def test_a_concept_without_partner_gets_minus_one():
    a, b = _basis(k=4), _basis(k=2, seed=5)
    out = compare_bases(a, b, torch.randn(300, 6))
    assert int((out.partner == -1).sum()) == 2
    lone = out.partner == -1
    assert torch.all(out.jaccard[lone] == 0) and torch.all(torch.isnan(out.decoding_cosine[lone]))


def test_a_concept_absent_from_the_rows_has_no_jaccard():
    a = _basis()
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(3))
    x = x[~a.detect(x)[:, 2]]  # concept 2 never fires on these rows
    out = compare_bases(a, a, x)
    assert math.isnan(float(out.jaccard[2])) and float(out.rate_a[2]) == 0.0
    assert out.mean_jaccard == pytest.approx(1.0)  # a basis matches itself
    with pytest.warns(UserWarning, match="layer 'body' and b at 'other'"):
        compare_bases(a, _basis(layer="other"), x)


def test_compare_bases_rejects_bad_input():
    a = _basis()
    with pytest.raises(TypeError, match="b must be a ConceptBasis"):
        compare_bases(a, a.decoding, torch.randn(5, 6))
    with pytest.raises(ValueError, match="different layers"):
        compare_bases(a, _basis(d=5), torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"x must be \(N, 6\)"):
        compare_bases(a, a, torch.randn(5, 7))
    with pytest.raises(ValueError, match="NaN or Inf"):
        compare_bases(a, a, torch.full((5, 6), math.nan))
    with pytest.raises(ValueError, match="empty"):
        compare_bases(a, a, torch.zeros(0, 6))


class Rows(nn.Module):
    """A 'network' whose layer output is its input: images (B, D, H, W) are patch rows."""

    def __init__(self):
        super().__init__()
        self.body = nn.Identity()
        self.head = nn.Linear(1, 2)

    def forward(self, x):
        return self.head(self.body(x).mean((1, 2, 3))[:, None])


def _images(rows: torch.Tensor, side: int = 6) -> torch.Tensor:
    n = rows.shape[0] // (side * side)
    return rows[: n * side * side].reshape(n, side, side, -1).permute(0, 3, 1, 2).contiguous()


def test_split_half_check_tells_planted_concepts_from_arbitrary_ones():
    model = Rows().eval()
    planted = _images(SyntheticModel(dim=16, n_concepts=3, n_distractors=2, seed=0).sample(7200).x)
    noise = _images(torch.randn(7200, 16, generator=torch.Generator().manual_seed(0)))
    checks = {}
    for name, images in (("planted", planted), ("noise", noise)):
        k = 3 if name == "planted" else 8
        basis = pc.extract(model, "body", images, k, options={"n_init": 4})
        checks[name] = concept_stability(model, basis, images, splits=1)
    good, bad = checks["planted"], checks["noise"]
    assert good.n_images == (100, 100)
    assert float(good.jaccard.min()) > 0.9 and good.unstable() == []
    # spherical clusters of isotropic noise are drawn anew by every sample of it
    assert float(bad.jaccard.mean()) < float(good.jaccard.min()) - 0.1
    # the streamed comparison is compare_bases on all rows
    rows = LayerTap(model, "body").to_rows(planted)
    direct = compare_bases(good.halves[0], good.halves[1], rows)
    assert torch.allclose(direct.jaccard, good.between_halves[0].jaccard)
    assert good.half_with_half == pytest.approx(direct.mean_jaccard)
    basis = pc.extract(model, "body", planted, 3, options={"n_init": 4})
    to_a = compare_bases(basis, good.halves[0], rows)
    assert torch.allclose(to_a.jaccard, good.to_halves[0].jaccard)


def test_split_half_check_is_seeded_records_and_reads_batches():
    model = Rows().eval()
    images = _images(SyntheticModel(dim=16, n_concepts=3, n_distractors=2, seed=1).sample(3600).x)
    basis = pc.extract(model, "body", images, 3, options={"n_init": 3})
    one = concept_stability(model, basis, images, seed=4, splits=2)
    two = concept_stability(model, basis, [images[i:i + 7] for i in range(0, len(images), 7)], seed=4, splits=2)
    assert torch.allclose(one.jaccard, two.jaccard)  # the same halves from batches as from a tensor
    from pyconcepts.images import TensorImages

    three = concept_stability(model, basis, TensorImages(images), seed=4, splits=2)  # and from an image source
    assert torch.allclose(one.jaccard, three.jaccard)
    assert len(one.to_halves) == 4 and len(one.between_halves) == 2 and len(one.halves) == 4
    per_half = torch.stack([c.jaccard for c in one.to_halves])
    assert torch.allclose(one.jaccard, per_half.mean(0)) and torch.equal(one.lowest, per_half.min(0).values)
    assert one.half_with_half == pytest.approx(sum(c.mean_jaccard for c in one.between_halves) / 2)
    seen = []
    concept_stability(model, basis, images, splits=1, progress=lambda stage, done, total: seen.append(stage))
    assert any(s.startswith("half A") for s in seen) and any(s.startswith("half B") for s in seen)
    assert "comparing" in seen
    one.record(basis)
    assert basis.metadata["halves_jaccard"] == [round(float(v), 4) for v in one.jaccard]
    assert basis.metadata["halves_images"] == [50, 50] and basis.metadata["halves_splits"] == 2
    with pytest.raises(ValueError, match="basis has 2 concepts, this check 3"):
        one.record(_basis(k=2))
    assert "ConceptStability(3 concepts" in repr(one)


def test_groups_keep_their_images_in_one_half():
    from pyconcepts.stability import _group_ids, _random_half

    group_of = _group_ids([f"line{i // 2}" for i in range(21)], 21)   # pairs, and one single
    g = torch.Generator().manual_seed(0)
    draws = [_random_half(21, group_of, g) for _ in range(6)]
    for member in draws:
        assert 0 < int(member.sum()) < 21 and abs(int(member.sum()) - 10.5) <= 1.5
        for k in range(11):
            assert member[group_of == k].all() or (~member[group_of == k]).all()
    assert len({tuple(m.tolist()) for m in draws}) > 1
    # through the check: halves of whole groups of 10 images
    model = Rows().eval()
    images = _images(SyntheticModel(dim=16, n_concepts=3, n_distractors=2, seed=1).sample(3600).x)
    basis = pc.extract(model, "body", images, 3, options={"n_init": 3})
    check = concept_stability(model, basis, images, splits=1, groups=torch.arange(100) // 10)
    check.record(basis)
    sizes = basis.metadata["halves_images"]
    assert sum(sizes) == 100 and all(size % 10 == 0 for size in sizes)
    with pytest.raises(ValueError, match="groups has 99 labels but images has 100"):
        concept_stability(model, basis, images, groups=list(range(99)))
    with pytest.raises(ValueError, match="every image in one group"):
        concept_stability(model, basis, images, groups=[0] * 100)
    with pytest.warns(UserWarning, match="holds .* images: a group this large"):
        with pytest.warns(UserWarning, match="makes 2 groups"):
            concept_stability(model, basis, images, splits=1, groups=[0] * 95 + [1] * 5)
    with pytest.raises(TypeError, match="hashable"):
        concept_stability(model, basis, images, groups=[[i] for i in range(100)])


def test_split_half_check_rejects_bad_input():
    model = Rows().eval()
    images = torch.randn(4, 6, 3, 3)
    basis = _basis(k=2, layer="body")
    with pytest.raises(TypeError, match="re-iterable"):
        concept_stability(model, basis, iter([images]))
    with pytest.raises(ValueError, match="at least 2"):
        concept_stability(model, basis, images[:1])
    with pytest.raises(ValueError, match="records no layer"):
        concept_stability(model, _basis(k=2, layer=None), images)
    with pytest.raises(ValueError, match="splits must be a positive int"):
        concept_stability(model, basis, images, splits=0)
    # 2 images a half, 18 patches: 19 concepts cannot be drawn there, said before any extraction
    stages = []
    with pytest.raises(ValueError, match="a half of the split-half check holds 2 image.*18 patches.*19 concepts"):
        concept_stability(model, _basis(k=19, layer="body"), images, progress=lambda *a: stages.append(a))
    assert stages == []
    from torch.utils.data import DataLoader, TensorDataset

    with pytest.raises(ValueError, match="shuffles"):
        concept_stability(model, basis, DataLoader(TensorDataset(images), batch_size=2, shuffle=True))
    # the layer is checked before any extraction: a basis of another width
    with pytest.raises(ValueError, match="does not fit layer 'body'.*width D = 5"):
        concept_stability(model, _basis(k=2, d=5, layer="body"), images)
    with pytest.warns(UserWarning, match="so few that the halves will redraw most concepts") as said:
        concept_stability(model, basis, images, splits=1)
    # said once, of the halves (each half's extraction would say it again of its own rows)
    assert not [w for w in said if "per concept): fewer than" in str(w.message)]
    with pytest.raises(TypeError, match="basis must be a ConceptBasis"):
        concept_stability(model, "basis.safetensors", images)
