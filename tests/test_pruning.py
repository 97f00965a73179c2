"""Pruned Lloyd passes give exactly the labels of unpruned passes, and skip work."""
import pytest
import torch
import torch.nn.functional as F

import pyconcepts as pc
from pyconcepts.pruning import BoundedLloyd


def directional_mixture(n, d, k, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    which = torch.randint(0, k, (n,), generator=gen)
    scale = 1 + torch.rand(n, 1, generator=gen)
    return (centres[which] + noise * torch.randn(n, d, generator=gen)) * scale


def normalise_sums(sums, counts, previous):
    new = F.normalize(sums.float(), dim=1)
    return torch.where((counts > 0)[:, None], new, previous)


# min_skip: the last pass must skip at least this fraction of the cosines an unpruned pass
# computes (well-separated data prunes well; noisy data keeps more points near boundaries).
@pytest.mark.parametrize("seed,noise,k,normalize,min_skip", [
    (0, 0.3, 10, False, 0.5), (1, 0.8, 25, True, 0.3), (2, 1.5, 7, False, 0.2),
    (3, 0.5, 40, True, 0.3),
])
def test_pruned_passes_equal_unpruned_passes(seed, noise, k, normalize, min_skip):
    x = directional_mixture(12000, 24, k, noise, seed)
    chunks = list(x.split(5000))  # uneven chunks: 5000, 5000, 2000
    init = F.normalize(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]], dim=1)

    # unpruned reference Lloyd
    c = init.clone()
    plain_labels = []
    for _ in range(12):
        index, _, sums, counts = pc.ops.assign_update(x, c, normalize=normalize)
        plain_labels.append(index)
        c = normalise_sums(sums, counts, c)

    engine = BoundedLloyd(n_clusters=k, n_groups=4, normalize=normalize)
    c = init.clone()
    sums, counts, stats = engine.first_pass(chunks, c)
    assert torch.equal(engine.labels(), plain_labels[0])
    skipped = []
    for it in range(1, 12):
        new_c = normalise_sums(sums, counts, c)
        sums, counts, stats = engine.next_pass(chunks, c, new_c, sums, counts)
        c = new_c
        assert torch.equal(engine.labels(), plain_labels[it]), f"labels differ at pass {it}"
        skipped.append(1 - stats.distance_fraction)
        # the corrected sums equal a fresh accumulation by the current labels
        rows = F.normalize(x, dim=1) if normalize else x
        fresh, fresh_counts = pc.ops.spherical_update(rows, engine.labels(), k)
        assert torch.equal(counts, fresh_counts)
        torch.testing.assert_close(sums, fresh, rtol=1e-6, atol=1e-6)
    assert skipped[-1] > min_skip, f"the bounds pruned too little: {skipped}"


def test_pruned_pass_detects_changed_chunks():
    x = directional_mixture(3000, 8, 4, 0.5, 0)
    engine = BoundedLloyd(n_clusters=4)
    c = F.normalize(x[:4], dim=1)
    sums, counts, _ = engine.first_pass([x], c)
    with pytest.raises(ValueError, match="chunks changed"):
        engine.next_pass([x[:100]], c, c, sums, counts)
    with pytest.raises(ValueError, match="empty"):
        BoundedLloyd(n_clusters=4).first_pass([], c)


def test_pruned_passes_half_precision_chunks_many_groups_two_threads():
    x = directional_mixture(6000, 40, 70, 0.2, 7).to(torch.bfloat16)
    chunks = list(x.split(2500))
    k = 70
    init = F.normalize(x[:k].float(), dim=1)
    c = init.clone()
    plain = []
    for _ in range(10):
        index, _, s, n = pc.ops.assign_update(x, c)
        plain.append(index)
        c = normalise_sums(s, n, c)
    engine = BoundedLloyd(n_clusters=k, n_groups=2, num_threads=2)  # 3 strips per group
    c = init.clone()
    sums, counts, _ = engine.first_pass(chunks, c)
    fractions = []
    for it in range(1, 10):
        new_c = normalise_sums(sums, counts, c)
        sums, counts, stats = engine.next_pass(chunks, c, new_c, sums, counts)
        c = new_c
        assert torch.equal(engine.labels(), plain[it]), f"labels differ at pass {it}"
        fractions.append(stats.skipped_fraction)
    assert max(fractions) > 0, fractions  # some rows certified without being read


def test_pruned_passes_need_unit_centroids():
    x = directional_mixture(200, 8, 4, 0.5, 0)
    with pytest.raises(ValueError, match="unit-norm rows"):
        BoundedLloyd(n_clusters=4).first_pass([x], F.normalize(x[:4], dim=1) * 1.001)


@pytest.mark.parametrize("full_pass_fraction", [0.8, 0.0])
def test_bounds_on_disk_equal_bounds_in_memory(tmp_path, monkeypatch, full_pass_fraction):
    import pyconcepts.pruning as pruning

    # 0.0: every other pass is a full pass rebuilding the bounds in place (and counting moves)
    monkeypatch.setattr(pruning, "_FULL_PASS_FRACTION", full_pass_fraction)
    x = directional_mixture(9000, 16, 12, 0.4, 3)
    chunks = list(x.split(4000))
    init = F.normalize(x[:12], dim=1)
    runs = {}
    for where in ("memory", "disk"):
        engine = BoundedLloyd(n_clusters=12, n_groups=3,
                              storage_dir=str(tmp_path) if where == "disk" else None)
        c = init.clone()
        sums, counts, _ = engine.first_pass(chunks, c)
        log = []
        for _ in range(8):
            new_c = normalise_sums(sums, counts, c)
            sums, counts, stats = engine.next_pass(chunks, c, new_c, sums, counts)
            c = new_c
            log.append((engine.labels(), sums.clone(), counts.clone(), stats))
        if where == "disk":
            files = sorted(p.name for p in tmp_path.glob("pyconcepts-bounds-*/*"))
            assert files == ["chunk000000.bounds", "chunk000001.bounds", "chunk000002.bounds"]
            # label (8) + own bound (4) + 3 group bounds (4 each) per point, nothing else
            assert sum(p.stat().st_size for p in tmp_path.glob("*/*")) == 9000 * engine.bytes_per_point
            engine.close()
            assert list(tmp_path.iterdir()) == []  # the scratch directory is gone
        runs[where] = log
    for (la, sa, ca, st_a), (lb, sb, cb, st_b) in zip(runs["memory"], runs["disk"]):
        assert torch.equal(la, lb) and torch.equal(sa, sb) and torch.equal(ca, cb)
        assert st_a == st_b
    if full_pass_fraction == 0.0:  # the in-place full passes counted moved points on disk too
        assert any(s.n_read == s.n_points and s.n_moved for *_, s in runs["disk"])


def test_bounds_on_disk_errors(tmp_path):
    x = directional_mixture(3000, 8, 4, 0.5, 0)
    c = F.normalize(x[:4], dim=1)
    with pytest.raises(ValueError, match="storage_dir .* is not a writable directory"):
        BoundedLloyd(n_clusters=4, storage_dir=str(tmp_path / "missing"))
    engine = BoundedLloyd(n_clusters=4, storage_dir=str(tmp_path))
    sums, counts, _ = engine.first_pass([x], c)
    (path,) = list(tmp_path.glob("*/chunk000000.bounds"))
    path.write_bytes(path.read_bytes()[:100])  # the scratch file cut short behind our back
    with pytest.raises(RuntimeError, match="truncated"):
        engine.next_pass([x], c, c, sums, counts)
    del engine  # collected: the scratch directory goes with it
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_rebuild_pass_detects_a_lost_chunk(tmp_path, monkeypatch, on_disk):
    import pyconcepts.pruning as pruning

    monkeypatch.setattr(pruning, "_FULL_PASS_FRACTION", 0.0)  # pass 2 rebuilds in place
    x = directional_mixture(9000, 8, 4, 0.5, 0)
    chunks = list(x.split(3000))
    c = F.normalize(x[:4], dim=1)
    engine = BoundedLloyd(n_clusters=4, storage_dir=str(tmp_path) if on_disk else None)
    sums, counts, _ = engine.first_pass(chunks, c)
    sums, counts, _ = engine.next_pass(chunks, c, c, sums, counts)  # pruned
    with pytest.raises(ValueError, match="fewer chunks"):
        engine.next_pass(chunks[:2], c, c, sums, counts)  # the rebuild sees 2 of 3 chunks


def test_bounds_on_disk_under_a_float64_default_dtype(tmp_path):
    x = directional_mixture(3000, 8, 4, 0.5, 0)
    c = F.normalize(x[:4], dim=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        engine = BoundedLloyd(n_clusters=4, storage_dir=str(tmp_path))
        sums, counts, _ = engine.first_pass([x], c)
        engine.next_pass([x], c, c, sums, counts)
        memory = BoundedLloyd(n_clusters=4)
        memory.first_pass([x], c)
        assert torch.equal(engine.labels(), memory.labels())
    finally:
        torch.set_default_dtype(default)
        engine.close()
