"""DirectionalClustering(pruning=True) reaches exactly what the unpruned fit reaches."""
import os

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
        pc.DirectionalClustering(n_concepts=4, pruning="yes").fit(x)


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
        pc.DirectionalClustering(n_concepts=4, init="kmeans").fit(x)


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
    # rows sorted by cluster, one cluster per chunk: the first chunk alone would see one
    # cluster; the watched rows (every 16th of every chunk) see all of them
    gen = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(6, 10, generator=gen), dim=1)
    which = torch.arange(6).repeat_interleave(1000)
    x = centres[which] + 0.1 * torch.randn(6000, 10, generator=gen)
    km = pc.DirectionalClustering(n_concepts=6, seed=0, chunk_size=1000, max_iter=3).fit(x)
    *_, watched, _ = km._lloyd_pass(x, km.centroids_, watch=True)
    expected = torch.cat([km.predict(chunk)[::16] for chunk in x.split(1000)])
    assert watched.dtype == torch.int32 and torch.equal(watched.long(), expected)
    assert watched.numel() == 6 * 63  # ceil(1000 / 16) rows of each of the 6 chunks
    assert watched.unique().numel() == 6 and km.predict(x[:1000]).unique().numel() == 1


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


def _spy_on_disk_bounds(monkeypatch):
    """Records the scratch files the on-disk bounds write (and that they exist then)."""
    import pyconcepts.pruning as pruning

    written = []
    original = pruning._DiskBounds.put

    def put(self, j, bounds):
        original(self, j, bounds)
        assert os.path.getsize(self._file(j)) > 0
        written.append(self._file(j))

    monkeypatch.setattr(pruning._DiskBounds, "put", put)
    return written


def test_bounds_over_the_memory_budget_go_to_pruning_dir(tmp_path, monkeypatch):
    written = _spy_on_disk_bounds(monkeypatch)
    x = mixture(8000, 24, 16, 0.3, 5)
    chunks = list(x.split(3000))
    kwargs = dict(n_concepts=24, seed=1, max_iter=20, tol=0.0, chunk_size=3000)
    plain = pc.DirectionalClustering(pruning=False, **kwargs).fit(x)
    # no room in memory and no directory: plain passes
    nodir = pc.DirectionalClustering(pruning_memory=0, **kwargs).fit(x)
    assert all(s.distance_fraction == 1.0 for s in nodir.pass_stats_)
    # room in memory: the bounds stay there even with a directory
    pc.DirectionalClustering(pruning=True, pruning_dir=tmp_path, **kwargs).fit(chunks)
    assert written == []
    # no room in memory, a directory: pruned passes with the bounds on disk, same result
    for pruning in ("auto", True):
        disk = pc.DirectionalClustering(pruning=pruning, pruning_memory=0, pruning_dir=tmp_path,
                                        **kwargs).fit(chunks)
        torch.testing.assert_close(plain.centroids_, disk.centroids_, rtol=0, atol=1e-6)
        assert min(s.distance_fraction for s in disk.pass_stats_) < 0.5
        assert written and all(str(tmp_path) in f for f in written)
        assert list(tmp_path.iterdir()) == []  # scratch removed after the fit
        written.clear()
    assert disk.get_params()["pruning_dir"] == tmp_path


def test_a_bad_pruning_dir_fails_before_the_lloyd_passes(tmp_path):
    x = mixture(3000, 8, 4, 0.3, 0)
    passes = []

    def stream():
        passes.append(1)
        return iter(x.split(1000))

    km = pc.DirectionalClustering(n_concepts=4, pruning_dir=tmp_path / "missing", max_iter=20)
    with pytest.raises(ValueError, match="pruning_dir .*missing.* is not a writable directory"):
        km.fit(stream)
    assert len(passes) == 1  # found after the statistics pass, before seeding and Lloyd
    with pytest.raises(TypeError, match="pruning_dir must be"):
        pc.DirectionalClustering(n_concepts=4, pruning_dir=3).fit(torch.randn(20, 3))


@pytest.mark.parametrize("fail_on_pass", [3, 4])  # 3: the pass that builds the bounds
def test_pruning_scratch_is_removed_when_the_fit_fails(tmp_path, monkeypatch, fail_on_pass):
    written = _spy_on_disk_bounds(monkeypatch)
    x = mixture(6000, 12, 8, 0.3, 2)

    class Failing:  # passes 1, 2: statistics and seeding sample; 3: bounds pass; 4: pruned
        passes = 0

        def __iter__(self):
            Failing.passes += 1
            for i, chunk in enumerate(x.split(2000)):
                if Failing.passes == fail_on_pass and i == 2:
                    raise OSError("the disk went away")
                yield chunk

    km = pc.DirectionalClustering(n_concepts=8, pruning=True, pruning_memory=0,
                                  pruning_dir=str(tmp_path), max_iter=20, tol=0.0)
    with pytest.raises(OSError, match="went away") as info:
        km.fit(Failing())
    assert written  # the bounds were on disk when it failed
    assert info.value is not None and list(tmp_path.iterdir()) == []  # gone, traceback alive


def test_auto_on_a_stream_that_rechunks_stays_on_plain_passes():
    x = mixture(6000, 12, 8, 0.2, 2)

    class Rechunking:  # the same rows, cut differently on every pass
        passes = 0

        def __iter__(self):
            Rechunking.passes += 1
            return iter(x.split(1000 + 7 * Rechunking.passes))

    km = pc.DirectionalClustering(n_concepts=8, seed=0, max_iter=15, tol=0.0).fit(Rechunking())
    plain = pc.DirectionalClustering(n_concepts=8, seed=0, max_iter=15, tol=0.0,
                                     pruning=False).fit(x)
    assert all(s.distance_fraction == 1.0 for s in km.pass_stats_)
    torch.testing.assert_close(km.centroids_, plain.centroids_, rtol=0, atol=1e-6)
