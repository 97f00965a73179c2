"""DirectionalClustering(pruning=True) reaches exactly what the unpruned fit reaches."""
import pytest
import torch
import torch.nn.functional as F

import pyconcepts as pc


def mixture(n, d, k, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    which = torch.randint(0, k, (n,), generator=gen)
    return centres[which] + noise * torch.randn(n, d, generator=gen) + 0.5


@pytest.mark.parametrize("seed,center", [(0, True), (1, False)])
def test_pruned_fit_equals_unpruned_fit(seed, center):
    x = mixture(6000, 20, 12, 0.4, seed)
    chunks = list(x.split(2500))
    kwargs = dict(n_concepts=16, seed=seed, center=center, max_iter=15, tol=0.0, chunk_size=2500)
    plain = pc.DirectionalClustering(pruning=False, **kwargs).fit(x)
    pruned = pc.DirectionalClustering(pruning=True, **kwargs).fit(chunks)
    assert plain.n_iter_ == pruned.n_iter_ == 15
    torch.testing.assert_close(plain.centroids_, pruned.centroids_, rtol=0, atol=1e-6)
    assert torch.equal(plain.predict(x), pruned.predict(x))
    assert pruned.objective_ == pytest.approx(plain.objective_, rel=1e-9)
    # the pass log: one entry per pass over all rows, every cosine for the unpruned passes,
    # fewer once the pruned passes' bounds hold (this mixture is well clustered)
    assert len(plain.pass_stats_) == len(pruned.pass_stats_) == 15
    assert all(s.distance_fraction == 1.0 and s.n_points == 6000 for s in plain.pass_stats_)
    assert pruned.pass_stats_[0].distance_fraction == 1.0
    assert min(s.distance_fraction for s in pruned.pass_stats_[1:]) < 0.5


def test_auto_pruning_respects_memory_budget_and_iterations():
    x = mixture(3000, 8, 4, 0.4, 0)
    km = pc.DirectionalClustering(n_concepts=4, max_iter=50).fit(x)
    c = km.centroids_
    assert km._use_pruning(c) == "adaptive"  # small data on CPU: prune once few points move
    assert not pc.DirectionalClustering(n_concepts=4, max_iter=50, pruning_memory=1000).fit(x)._use_pruning(c)
    assert not pc.DirectionalClustering(n_concepts=4, pruning=False).fit(x)._use_pruning(c)
    with pytest.raises(ValueError, match="pruning must be"):
        pc.DirectionalClustering(n_concepts=4, pruning="yes")


def test_restarts_on_the_sample_when_data_is_large():
    # N > 4 x the seeding sample: restarts compete on the sample, the winner runs on all rows
    x = mixture(8000, 10, 5, 0.05, 4)
    km = pc.DirectionalClustering(n_concepts=5, seed=0, n_init=6, init_sample_size=500,
                                  max_iter=30).fit(x)
    one = pc.DirectionalClustering(n_concepts=5, seed=0, n_init=1, init_sample_size=500,
                                   max_iter=30).fit(x)
    assert torch.allclose(km.centroids_.norm(dim=1), torch.ones(5), atol=1e-5)
    assert km.objective_ >= one.objective_ - 1e-6 * abs(one.objective_)
    assert km.counts_.sum() == 8000


def test_zero_rows_are_never_seeds():
    # ReLU activations hold all-zero rows; they have no direction and must not become centroids
    x = mixture(3000, 8, 4, 0.2, 2).relu()
    x[::3] = 0
    km = pc.DirectionalClustering(n_concepts=6, seed=0, center=False, max_iter=20).fit(x)
    assert torch.allclose(km.centroids_.norm(dim=1), torch.ones(6), atol=1e-5)
    with pytest.raises(ValueError, match="non-zero rows"):
        pc.DirectionalClustering(n_concepts=3, center=False).fit(torch.zeros(50, 4))


def test_random_init_option():
    x = mixture(3000, 8, 4, 0.1, 1)
    km = pc.DirectionalClustering(n_concepts=4, seed=0, init="random", max_iter=30).fit(x)
    again = pc.DirectionalClustering(n_concepts=4, seed=0, init="random", max_iter=30).fit(x)
    assert torch.equal(km.centroids_, again.centroids_)
    assert km.get_params()["init"] == "random"
    with pytest.raises(ValueError, match="init must be"):
        pc.DirectionalClustering(n_concepts=4, init="kmeans")


def test_auto_switches_to_pruned_passes_once_few_points_move():
    x = mixture(8000, 24, 16, 0.3, 5)
    kwargs = dict(n_concepts=24, seed=1, center=True, max_iter=25, tol=0.0, chunk_size=3000)
    plain = pc.DirectionalClustering(pruning=False, **kwargs).fit(x)
    auto = pc.DirectionalClustering(**kwargs).fit(x)
    torch.testing.assert_close(plain.centroids_, auto.centroids_, rtol=0, atol=1e-6)
    assert torch.equal(plain.labels_, auto.labels_)
    fractions = [s.distance_fraction for s in auto.pass_stats_]
    moved = [s.n_moved for s in auto.pass_stats_]
    first_pruned = next(i for i, f in enumerate(fractions) if f < 1.0)
    # plain passes first (they report moved rows of the watched chunk from the second on),
    # then the switch: the bounds pass, then passes that skip cosines
    assert first_pruned >= 2 and moved[0] is None and moved[1] is not None
    assert min(fractions[first_pruned:]) < 0.5
    # heavy overlap: >10% of the points still move in the pass that could switch (the 2nd of
    # 5: 3 must remain), so auto stays on plain passes
    noisy = pc.DirectionalClustering(n_concepts=24, seed=1, max_iter=5, tol=0.0).fit(
        mixture(8000, 24, 16, 3.0, 5))
    assert all(s.distance_fraction == 1.0 for s in noisy.pass_stats_)
    assert noisy.pass_stats_[1].n_moved > 0.1 * 8000 / 16  # of the watched rows: every 16th


def test_auto_watches_rows_spread_over_all_chunks():
    # rows sorted by cluster: the first chunk alone would see one cluster and few moves
    x = mixture(6000, 10, 6, 0.5, 3)
    x = x[torch.argsort(x[:, 0])]
    km = pc.DirectionalClustering(n_concepts=6, seed=0, chunk_size=1000, max_iter=3).fit(x)
    *_, watched, _ = km._lloyd_pass(x, km.centroids_, watch=True)
    expected = torch.cat([km.predict(chunk)[::16] for chunk in x.split(1000)])
    assert watched.dtype == torch.int32 and torch.equal(watched.long(), expected)
    assert watched.numel() == 6 * 63  # ceil(1000 / 16) rows of each of the 6 chunks


def test_auto_goes_back_to_plain_passes_when_pruning_stops_paying(monkeypatch):
    import pyconcepts.clustering as clustering

    # every pruned pass "costs too much": one pruned pass after the bounds pass, then plain
    monkeypatch.setattr(clustering, "_STOP_ABOVE_COMPUTED", 0.0)
    x = mixture(8000, 24, 16, 0.3, 5)
    kwargs = dict(n_concepts=24, seed=1, max_iter=25, tol=0.0)
    auto = pc.DirectionalClustering(**kwargs).fit(x)
    plain = pc.DirectionalClustering(pruning=False, **kwargs).fit(x)
    torch.testing.assert_close(plain.centroids_, auto.centroids_, rtol=0, atol=1e-6)
    fractions = [s.distance_fraction for s in auto.pass_stats_]
    pruned = [i for i, f in enumerate(fractions) if f < 1.0]
    assert len(pruned) == 1 and pruned[0] + 1 < len(fractions)
    assert auto.pass_stats_[pruned[0] - 1].n_moved is None  # the pass that built the bounds
    assert all(f == 1.0 for f in fractions[pruned[0] + 1:])


def test_bounds_over_the_memory_budget_go_to_pruning_dir(tmp_path):
    x = mixture(8000, 24, 16, 0.3, 5)
    chunks = list(x.split(3000))
    kwargs = dict(n_concepts=24, seed=1, max_iter=20, tol=0.0, chunk_size=3000)
    plain = pc.DirectionalClustering(pruning=False, **kwargs).fit(x)
    # no room in memory and no directory: plain passes
    nodir = pc.DirectionalClustering(pruning_memory=0, **kwargs).fit(x)
    assert all(s.distance_fraction == 1.0 for s in nodir.pass_stats_)
    # no room in memory, a directory: pruned passes with the bounds on disk, same result
    for pruning in ("auto", True):
        disk = pc.DirectionalClustering(pruning=pruning, pruning_memory=0, pruning_dir=tmp_path,
                                        **kwargs).fit(chunks)
        torch.testing.assert_close(plain.centroids_, disk.centroids_, rtol=0, atol=1e-6)
        assert min(s.distance_fraction for s in disk.pass_stats_) < 0.5
        assert list(tmp_path.iterdir()) == []  # scratch removed after the fit
    assert disk.get_params()["pruning_dir"] == tmp_path
    with pytest.raises(ValueError, match="pruning_dir must be"):
        pc.DirectionalClustering(n_concepts=4, pruning_dir=3)


def test_pruning_scratch_is_removed_when_the_fit_fails(tmp_path):
    x = mixture(6000, 12, 8, 0.3, 2)

    class Shrinking:  # the stream loses rows after the first passes: the fit must fail
        passes = 0

        def __iter__(self):  # passes 1, 2: statistics and seeding sample; 3: bounds pass
            Shrinking.passes += 1
            return iter(list(x.split(2000)) if Shrinking.passes < 4 else [x[:2000]])

    km = pc.DirectionalClustering(n_concepts=8, pruning=True, pruning_memory=0,
                                  pruning_dir=str(tmp_path), max_iter=20, tol=0.0)
    with pytest.raises(ValueError, match="chunks changed"):
        km.fit(Shrinking())
    assert list(tmp_path.iterdir()) == []
