"""DirectionalClustering: spherical k-means over tensors and chunk streams."""
import math

import pytest
import torch

import pyconcepts as pc


def _blobs(n=3000, d=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    lab = torch.randint(0, k, (n,), generator=g)
    x = dirs[lab] * (2 + torch.rand(n, 1, generator=g)) + 0.15 * torch.randn(n, d, generator=g)
    return x, lab, dirs


def test_recovers_directions_and_labels():
    x, lab, dirs = _blobs()
    km = pc.DirectionalClustering(n_concepts=4, seed=0, center=False, n_init=3).fit(x)
    assert km.centroids_.shape == (4, 8)
    torch.testing.assert_close(km.centroids_.norm(dim=1), torch.ones(4), rtol=1e-5, atol=1e-5)
    cos = (km.centroids_ @ dirs.T).max(0).values
    assert float(cos.min()) > 0.99
    pred = km.predict(x)
    assert pred.dtype == torch.int64 and pred.shape == (3000,)
    assert torch.equal(pred, km.labels_)
    # clusters are a relabelling of the truth
    assert len({(int(a), int(b)) for a, b in zip(pred, lab)}) == 4
    assert km.n_iter_ >= 1 and km.objective_ > 0


def test_same_seed_same_centroids_for_tensor_list_and_factory():
    x, _, _ = _blobs(n=2500)
    kw = dict(n_concepts=4, seed=3, whiten=True, n_init=2, chunk_size=1000)
    a = pc.DirectionalClustering(**kw).fit(x)
    b = pc.DirectionalClustering(**kw).fit(list(x.split(700)))
    c = pc.DirectionalClustering(**kw).fit(lambda: iter(x.split(333)))
    torch.testing.assert_close(a.centroids_, b.centroids_, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.centroids_, c.centroids_, rtol=0, atol=1e-6)
    assert not hasattr(b, "labels_")  # stream fit keeps no per-row state
    d = pc.DirectionalClustering(**{**kw, "seed": 4}).fit(x)
    assert d.get_params()["seed"] == 4


def test_restarts_keep_best_objective():
    x, _, _ = _blobs(n=2000, k=6)
    one = [pc.DirectionalClustering(6, seed=s, center=False, n_init=1).fit(x).objective_ for s in range(3)]
    best = pc.DirectionalClustering(6, seed=0, center=False, n_init=3).fit(x).objective_
    assert best >= one[0] - 1e-6 * abs(one[0])


def test_empty_cluster_is_reseeded_by_splitting():
    # 3 distinct points repeated, K = 5: some clusters start or become empty
    x = torch.eye(3).repeat(50, 1)
    km = pc.DirectionalClustering(5, seed=0, center=False).fit(x)
    assert torch.isfinite(km.centroids_).all()
    torch.testing.assert_close(km.centroids_.norm(dim=1), torch.ones(5), rtol=1e-5, atol=1e-5)
    assert int(km.counts_.sum()) == 150
    km2 = pc.DirectionalClustering(2, center=False)
    sums = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    cents, counts = km2._update_centroids(sums, torch.tensor([10, 0]), torch.eye(2), torch.Generator().manual_seed(0))
    assert int(counts[1]) == 5 and float((cents[0] @ cents[1])) > 0.99 and not torch.equal(cents[0], cents[1])


def test_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="n_concepts"):  # parameters are checked by fit
        pc.DirectionalClustering(0).fit(x)
    with pytest.raises(ValueError, match="exceeds"):
        pc.DirectionalClustering(11).fit(x)
    bad = x.clone(); bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pc.DirectionalClustering(2).fit(bad)
    with pytest.raises(ValueError, match="NaN"):
        pc.DirectionalClustering(2, center=False).fit([x, bad])
    with pytest.raises(ValueError, match="D = 4"):
        pc.DirectionalClustering(2).fit([x, torch.randn(5, 4)])
    with pytest.raises(ValueError, match="empty stream"):
        pc.DirectionalClustering(2).fit([])
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        pc.DirectionalClustering(2).fit([x, [1, 2, 3]])
    with pytest.raises(pc.NotFittedError, match="not fitted"):
        pc.DirectionalClustering(2).predict(x)


def _kmeans_pp_law(rows: torch.Tensor, k: int) -> dict:
    """Exact probability of every ordered seed sequence under k-means++ on 1 - cos."""
    import itertools

    m = rows.shape[0]
    cos = (rows @ rows.T).double()
    law = {}
    for seq in itertools.permutations(range(m), k):
        p = 1.0 / m
        for t in range(1, k):
            dist = (1 - cos[list(seq[:t])].max(0).values).clamp_min(0)
            p *= float(dist[seq[t]] / dist.sum())
        if p > 0:
            law[seq] = p
    return law


def test_kmeans_pp_draws_follow_the_d2_law():
    # Four unit rows, three seeds: the third draw goes through the accept/reject path (its
    # reference distribution only knows the first seed), so a sampler that skipped the
    # correction, or drew seeds uniformly, lands far from the exact law.
    rows = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0, 0.0], [0.9, 0.45, 0.0], [0.0, 1.0, 0.0], [0.2, 0.1, 1.0]]), dim=1)
    law = _kmeans_pp_law(rows, 3)
    km = pc.DirectionalClustering(3, center=False)
    trials = 3000
    found = {}
    for s in range(trials):
        seeds = km._kmeans_pp(rows, torch.Generator().manual_seed(s))
        seq = tuple(int((rows @ c).argmax()) for c in seeds)
        found[seq] = found.get(seq, 0) + 1
    assert set(found) <= set(law)
    tv = 0.5 * sum(abs(found.get(seq, 0) / trials - p) for seq, p in law.items())
    # sampling noise of the total variation over 24 outcomes at 3000 trials: ~0.03
    assert tv < 0.06, tv
    uniform = 1.0 / 24
    assert 0.5 * sum(abs(p - uniform) for p in law.values()) + 0.5 * uniform * (24 - len(law)) > 0.15


def test_kmeans_pp_seeds_are_distinct_and_skip_zero_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=g)
    x[::3] = 0  # rows with no direction
    km = pc.DirectionalClustering(300, center=False, init_sample_size=3000)
    seeds = km._kmeans_pp(x, torch.Generator().manual_seed(1))
    assert seeds.shape == (300, 16)
    torch.testing.assert_close(seeds.norm(dim=1), torch.ones(300))
    assert torch.unique(seeds, dim=0).shape[0] == 300


def test_labels_are_computed_for_the_last_fitted_tensor():
    x, _, _ = _blobs(n=1200)
    km = pc.DirectionalClustering(4, seed=0, center=False).fit(x)
    km.fit(x[:500])
    assert km.labels_.shape == (500,)
    assert torch.equal(km.labels_, km.predict(x[:500]))
    km.fit(list(x.split(400)))
    assert not hasattr(km, "labels_")


@pytest.mark.parametrize("whiten", [False, True])
def test_signal_vectors_from_the_last_pass(whiten):
    x, _, _ = _blobs(n=4000, d=8, k=4, seed=3)
    x = x + torch.tensor([3.0, -1, 0, 0, 2, 0, 0, 1])  # an offset the centring must remove
    km = pc.DirectionalClustering(4, seed=0, whiten=whiten, max_iter=60, tol=0.0,
                                  signal=True, chunk_size=1500).fit(x)
    # converged: the last pass assigned with the final centroids, so the reference can use them
    w = km.signal_decoding_.double()
    labels = km.labels_
    v = x.double() - x.double().mean(0)
    for i in range(4):
        members = v[labels == i]
        z = members @ w[i]
        cov = ((members - members.mean(0)) * (z - z.mean())[:, None]).mean(0)
        want = cov / z.var(unbiased=False)
        torch.testing.assert_close(km.signal_vectors_[i].double(), want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close((w * km.signal_vectors_.double()).sum(1), torch.ones(4, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    if not whiten:
        torch.testing.assert_close(km.signal_decoding_, km.centroids_, atol=1e-5, rtol=0)
    # the stream fit reads each chunk once per pass and gets the same moments
    stream = pc.DirectionalClustering(4, seed=0, whiten=whiten, max_iter=60, tol=0.0,
                                      signal=True).fit(list(x.split(1500)))
    torch.testing.assert_close(stream.signal_vectors_, km.signal_vectors_, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="signal=True"):
        pc.DirectionalClustering(4, signal=True, pruning=True).fit(x)


def test_pickled_model_carries_labels_not_the_data_and_set_params_validates():
    import pickle

    x, _, _ = _blobs(n=1000)
    km = pc.DirectionalClustering(4, seed=0, center=False).fit(x)
    blob = pickle.dumps(km)
    assert len(blob) < x.numel() * 4  # not the 1000 x 8 float32 training tensor
    back = pickle.loads(blob)
    assert torch.equal(back.labels_, km.predict(x))
    with pytest.raises(ValueError, match="pruning must be"):
        km.set_params(pruning="yes").fit(x)
    with pytest.raises(ValueError, match="unknown parameter"):
        km.set_params(colour=1)
    with pytest.raises(ValueError, match="signal must be True or False"):
        km.set_params(pruning=False, signal=1).fit(x)


@pytest.mark.parametrize("center", [False, True])
def test_stream_fit_reads_the_data_once_before_its_lloyd_passes(center):
    x, _, _ = _blobs(n=4000)
    reads = []

    def stream():
        reads.append(1)
        return iter(x.split(900))

    km = pc.DirectionalClustering(4, seed=1, center=center, max_iter=4, tol=0.0,
                                  pruning=False).fit(stream)
    # statistics, row count and seeding sample in one read, then one read per Lloyd pass
    assert len(reads) == 1 + km.n_iter_
    tensor_fit = pc.DirectionalClustering(4, seed=1, center=center, max_iter=4, tol=0.0,
                                          pruning=False).fit(x)
    torch.testing.assert_close(km.centroids_, tensor_fit.centroids_, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- vMF mixture polish
def _matched_min_cosine(a, b):
    from pyconcepts.metrics import linear_sum_assignment

    sim = (a.double() @ b.double().T).numpy()
    rows, cols = linear_sum_assignment(-sim)
    return float(sim[rows, cols].min())


def test_vmf_polish_step_matches_a_hand_computation():
    from pyconcepts.clustering import vmf_mixture_polish

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 5, generator=g) + torch.tensor([1.0, 0, 0, 0, 0])
    c = torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=1)
    # by hand, float64: the M-step of the hard assignment, then one EM step
    u = torch.nn.functional.normalize(x.double(), dim=1)
    n, d = u.shape

    def m_step(r):
        s = r.T @ u
        rbar = float(s.norm(dim=1).sum()) / n
        kappa = rbar * (d - rbar ** 2) / (1 - rbar ** 2)  # Banerjee et al.'s approximation
        return s / s.norm(dim=1, keepdim=True), torch.log(r.sum(0) / n), kappa

    mu, log_prior, kappa = m_step(torch.nn.functional.one_hot((u @ c.double().T).argmax(1), 3).double())
    r = torch.softmax(log_prior + kappa * (u @ mu.T), 1)
    mu, log_prior, kappa = m_step(r)
    out = vmf_mixture_polish(x, c, max_iter=2)
    assert out.n_iter == 2
    torch.testing.assert_close(out.directions, mu, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.log_prior, log_prior, rtol=0, atol=1e-5)
    assert out.concentration == pytest.approx(kappa, rel=1e-5)
    # the MAP assignment: argmax of log prior + kappa cos
    expected = (log_prior + kappa * (u @ mu.T)).argmax(1)
    assert float((out.predict(x) == expected).double().mean()) > 0.995


def test_vmf_log_normaliser_is_the_closed_form_in_three_dimensions():
    from pyconcepts.clustering import vmf_log_normaliser

    # C_3(kappa) = kappa / (4 pi sinh kappa)
    for kappa in (0.5, 2.0, 10.0, 84.0, 700.0):
        exact = math.log(kappa) - math.log(4 * math.pi) - (kappa + math.log1p(-math.exp(-2 * kappa)) - math.log(2))
        assert vmf_log_normaliser(kappa, 3) == pytest.approx(exact, abs=0.1 if kappa < 5 else 5e-4)
    scipy_special = pytest.importorskip("scipy.special", reason="scipy checks the higher dimensions")
    for dim in (10, 48, 256):
        for kappa in (5.0, 84.0, 700.0):
            nu = dim / 2 - 1
            exact = (nu * math.log(kappa) - dim / 2 * math.log(2 * math.pi)
                     - (math.log(scipy_special.ive(nu, kappa)) + kappa))
            assert vmf_log_normaliser(kappa, dim) == pytest.approx(exact, abs=3e-4 if dim < 48 else 2e-6)


def test_vmf_polish_makes_seeds_agree_where_kmeans_does_not():
    from pyconcepts.clustering import vmf_mixture_polish

    # four overlapping blobs on the 2-sphere: each k-means seed stops in a different local
    # optimum (the rows at the boundaries), the EM fixed point is the same from all of them
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 3, generator=g)
    x = centres[torch.randint(4, (2000,), generator=g)] + 0.9 * torch.randn(2000, 3, generator=g)
    fits = [pc.DirectionalClustering(4, seed=s, center=False, n_init=1).fit(x).centroids_ for s in range(4)]
    polished = [vmf_mixture_polish(x, c) for c in fits]
    assert min(_matched_min_cosine(fits[0], f) for f in fits[1:]) < 0.999
    assert min(_matched_min_cosine(polished[0].directions, p.directions) for p in polished[1:]) > 0.99999
    again = vmf_mixture_polish(x, fits[1])
    assert torch.equal(again.directions, polished[1].directions)  # deterministic
    assert again.n_iter < 300  # converged before the cap


def test_vmf_polish_edge_cases_and_bad_input():
    from pyconcepts.clustering import vmf_mixture_polish

    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    one = vmf_mixture_polish(x, torch.eye(4)[:1])  # K = 1: the mean direction
    torch.testing.assert_close(one.directions[0], torch.nn.functional.normalize(
        torch.nn.functional.normalize(x.double(), dim=1).sum(0), dim=0), rtol=0, atol=1e-6)
    # a centroid no row is nearest to: kept, with the prior of half a row
    far = torch.cat([torch.eye(4)[:2], -torch.ones(1, 4) / 2])
    near = x.abs() + 0.1
    out = vmf_mixture_polish(near, far, max_iter=1)
    torch.testing.assert_close(out.directions[2], far[2].double())
    assert out.log_prior[2] == pytest.approx(math.log(0.5 / 50.5))
    assert torch.isfinite(vmf_mixture_polish(near, far).directions).all()
    with pytest.raises(ValueError, match="share D"):
        vmf_mixture_polish(x, torch.eye(3))
    with pytest.raises(ValueError, match="empty"):
        vmf_mixture_polish(x[:0], torch.eye(4))
    with pytest.raises(ValueError, match="max_iter"):
        vmf_mixture_polish(x, torch.eye(4), max_iter=0)
    bad = x.clone(); bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        one.predict(bad)
