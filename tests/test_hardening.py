"""Hostile and extreme input, one reproduced failure per test: the native boundary checks,
float32-safe norms at extreme magnitudes, and the persistence corner cases."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pyconcepts as pc
from pyconcepts import ConceptBasis
from pyconcepts import reference as ref


def unit_rows(k, d):
    return F.normalize(torch.randn(k, d), dim=1)


def cold_state(n, k, spg):
    groups = pc.ops.pruned_pass_groups(k, spg)
    return (torch.zeros(n, dtype=torch.int64), torch.full((n,), 4.0), torch.zeros(n, groups))


# ----------------------------------------------------------------- the native boundary
@pytest.mark.parametrize("spg", [2**60, 2**60 + 1, 2**62, 2**63 - 1])
def test_pruned_pass_huge_strips_per_group_is_one_group(spg):
    x, c = torch.randn(300, 24), unit_rows(40, 24)
    labels, lo, up = cold_state(300, 40, spg)
    assert up.shape == (300, 1)
    pc.ops.pruned_pass(x, c, labels, lo, up, torch.zeros(40, dtype=torch.float64),
                       strips_per_group=spg)
    assert torch.equal(labels, pc.ops.cosine_assign(x, c)[0])
    # the registered op takes the same path
    labels2, lo2, up2 = cold_state(300, 40, spg)
    torch.ops.pyconcepts.pruned_pass(x, c, labels2, lo2, up2, torch.zeros(40, dtype=torch.float64),
                                     spg, pc.ops.pruned_pass_eps(24), False, 2)
    assert torch.equal(labels2, labels)


def test_registered_ops_check_what_the_kernels_index():
    x, c = torch.randn(100, 8), unit_rows(5, 8)
    ops = torch.ops.pyconcepts
    labels, lo, up = cold_state(100, 5, 1)
    drift, eps = torch.zeros(5, dtype=torch.float64), pc.ops.pruned_pass_eps(8)
    cases = [
        (ValueError, "rows has values outside",
         lambda: ops.cosine_assign(x, c, False, False, 2, torch.tensor([10**12]), None)),
        (ValueError, "rows has values outside",
         lambda: ops.cosine_assign(x, c, False, False, 2, torch.tensor([-1]), None)),
        (TypeError, "rows must be int64",
         lambda: ops.cosine_assign(x, c, False, False, 2, torch.tensor([1], dtype=torch.int32), None)),
        (ValueError, "theta_lo must have shape",
         lambda: ops.pruned_pass(x, c, labels, lo[:3], up, drift, 1, eps, False, 2)),
        (ValueError, "theta_up must have shape",
         lambda: ops.pruned_pass(x, c, labels, lo, up[:, :0], drift, 1, eps, False, 2)),
        (TypeError, "labels must be int64",
         lambda: ops.pruned_pass(x, c, labels.int(), lo, up, drift, 1, eps, False, 2)),
        (ValueError, "drift must have shape",
         lambda: ops.pruned_pass(x, c, labels, lo, up, drift[:2], 1, eps, False, 2)),
        (ValueError, "drift must hold finite angles",
         lambda: ops.pruned_pass(x, c, labels, lo, up, -drift - 1, 1, eps, False, 2)),
        (ValueError, "eps must be in",
         lambda: ops.pruned_pass(x, c, labels, lo, up, drift, 1, 1e-9, False, 2)),
        (ValueError, "unit-norm rows",
         lambda: ops.pruned_pass(x, 2 * c, labels, lo, up, drift, 1, eps, False, 2)),
        (ValueError, "strips_per_group must be >= 1",
         lambda: ops.pruned_pass(x, c, labels, lo, up, drift, 0, eps, False, 2)),
        (TypeError, "index must be int64",
         lambda: ops.spherical_update(x, torch.zeros(100, dtype=torch.int32), 5, 2)),
        (ValueError, "index must have shape",
         lambda: ops.spherical_update(x, torch.zeros(7, dtype=torch.int64), 5, 2)),
        (ValueError, "n_clusters must be in",
         lambda: ops.spherical_update(x, torch.zeros(100, dtype=torch.int64), 0, 2)),
        (ValueError, "has D = 4 columns",
         lambda: ops.assign_update(x, c[:, :4].contiguous(), False, False, 2)),
        (ValueError, "bias must have shape",
         lambda: ops.masked_moments(x, c, torch.zeros(2), None, 2)),
        (TypeError, "center must be float32",
         lambda: ops.masked_moments(x, c, torch.zeros(5), torch.zeros(8, dtype=torch.float64), 2)),
        (ValueError, "center contains NaN or Inf",
         lambda: ops.cosine_assign(x, c, False, False, 2, None, torch.full((8,), float("inf")))),
        (ValueError, "decoding contains NaN or Inf",
         lambda: ops.masked_moments(x, c * float("nan"), torch.zeros(5), None, 2)),
        (ValueError, "contiguous rows",
         lambda: ops.cosine_assign(torch.randn(100, 16)[:, ::2], c, False, False, 2, None, None)),
        (TypeError, "x must be float32, float16 or bfloat16",
         lambda: ops.cosine_assign(x.double(), c, False, False, 2, None, None)),
        (TypeError, "centroids must be float32",
         lambda: ops.cosine_assign(x, c.double(), False, False, 2, None, None)),
        (ValueError, "x must be 2-D",
         lambda: ops.cosine_assign(x[None], c, False, False, 2, None, None)),
        (ValueError, "num_threads must be in",
         lambda: ops.cosine_assign(x, c, False, False, 2**31, None, None)),
        (ValueError, "num_threads must be in",
         lambda: ops.spherical_update(x, torch.zeros(100, dtype=torch.int64), 5, 0)),
    ]
    for error, message, fn in cases:
        with pytest.raises(error, match=message):
            fn()


def test_num_threads_error_is_plain():
    x, c = torch.randn(10, 4), unit_rows(2, 4)
    with pytest.raises(ValueError) as info:
        pc.ops.cosine_assign(x, c, num_threads=2**31)
    assert "0x" not in str(info.value) and "Invoked with" not in str(info.value)
    with pytest.raises(ValueError):
        pc.ops.cosine_assign(x, c, num_threads=True)


def test_float64_parameters_beyond_float32_are_refused():
    x, c = torch.randn(20, 8), unit_rows(3, 8)
    huge = torch.full((8,), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match="center has values beyond the float32 range"):
        pc.ops.cosine_assign(x, c, center=huge)
    with pytest.raises(ValueError, match="bias has values beyond the float32 range"):
        pc.ops.masked_moments(x, c, torch.full((3,), -1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="decoding has values beyond the float32 range"):
        pc.ops.masked_moments(x, c.double() * 1e300, torch.zeros(3))
    with pytest.raises(ValueError, match="beyond the float32 range"):
        ConceptBasis(c.double() * 1e300, torch.zeros(3), c, torch.zeros(8))


def test_x_minus_center_overflow_is_named():
    x = torch.full((4, 8), 3e38)
    with pytest.raises(ValueError, match="x - center leaves the float32 range"):
        pc.ops.cosine_assign(x, unit_rows(3, 8), center=torch.full((8,), -3e38))


# --------------------------------------------------------------------- extreme magnitudes
SCALES = [1e-40, 1e-30, 1e-13, 1e19, 1e20, 1e30, 3e37]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_assign_any_finite_magnitude(scale, dtype):
    x = (torch.randn(500, 24, dtype=torch.float64) * scale).to(dtype)
    c = unit_rows(9, 24)
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    sims = ref.cosine_similarities(x, c)
    top2 = sims.topk(2, dim=1).values
    torch.testing.assert_close(best.double(), top2[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(second.double(), top2[:, 1], atol=1e-5, rtol=0)
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(index[clear], sims.argmax(dim=1)[clear])


def test_rows_near_float32_max_get_the_right_labels():
    x = torch.rand(2000, 16) * 3e38  # squared norms far beyond float32
    c = unit_rows(7, 16)
    index = pc.ops.cosine_assign(x, c)[0]
    sims = ref.cosine_similarities(x, c)
    top2 = sims.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(index[clear], sims.argmax(dim=1)[clear])


@pytest.mark.parametrize("scale", [1e-40, 1e-20, 1e20, 3e37])
@pytest.mark.parametrize("normalize", [False, True])
def test_assign_update_and_pruned_pass_any_magnitude(scale, normalize):
    x = (torch.randn(700, 20, dtype=torch.float64) * scale).float()
    c = unit_rows(6, 20)
    index, best, sums, counts, sum_xz, sum_z = pc.ops.assign_update(
        x, c, normalize=normalize, return_moments=True)
    rows = x.double()
    if normalize:
        rows = rows / rows.norm(dim=1, keepdim=True)
    want, _ = ref.spherical_update(rows, index, 6)
    scale_sums, _ = ref.spherical_update(rows.abs(), index, 6)
    assert ((sums - want).abs() <= 1e-6 * scale_sums).all()
    z = (rows * c.double()[index]).sum(dim=1)
    want_z, _ = ref.spherical_update(torch.stack([z, z * z], dim=1), index, 6)
    scale_z, _ = ref.spherical_update(torch.stack([z.abs(), z * z], dim=1), index, 6)
    assert ((sum_z - want_z).abs() <= 1e-5 * scale_z).all()
    labels, lo, up = cold_state(700, 6, 1)
    sum_corr, count_corr, _ = pc.ops.pruned_pass(
        x, c, labels, lo, up, torch.zeros(6, dtype=torch.float64), normalize=normalize)
    assert torch.equal(labels, index)
    # all rows moved from cluster 0: the corrections are the sums, minus everything at 0
    moved = labels != 0
    add, _ = ref.spherical_update(rows[moved], labels[moved], 6)
    add[0] -= rows[moved].sum(0)
    assert ((sum_corr - add).abs() <= 1e-6 * (scale_sums + rows.abs().sum(0))).all()


@pytest.mark.parametrize("scale,w_scale", [(1e-40, 1.0), (1e-30, 1e-30), (1e20, 1.0),
                                           (3e37, 1e-30), (1.0, 1e30)])
def test_masked_moments_any_magnitude(scale, w_scale):
    x = (torch.randn(1000, 16, dtype=torch.float64) * scale).float()
    w = (torch.randn(4, 16, dtype=torch.float64) * w_scale).float()
    b = (torch.randn(4, dtype=torch.float64) * 0.3 * scale * w_scale).float()
    center = (x.double().mean(0)).float()
    got = pc.ops.masked_moments(x, w, b, center=center)
    want = ref.masked_moments(x, w, b, center=center)
    assert torch.equal(got.count, want.count)
    for name in ("sum_z", "sum_z2", "sum_x", "sum_xz"):
        g, r = getattr(got, name), getattr(want, name)
        assert torch.isfinite(g).all()
        assert float((g - r).abs().max()) <= 1e-5 * float(r.abs().max())


def test_tiny_rows_are_not_divided_by_1e_minus_12():
    x = torch.randn(50, 8) * 1e-14
    c = unit_rows(3, 8)
    best = pc.ops.cosine_assign(x, c)[1]
    assert (best.abs() > 1e-3).any()  # true cosines, not dot / 1e-12 ~ 1e-2 of them
    sums = pc.ops.assign_update(x, c, normalize=True)[2]
    assert float(sums.norm(dim=1).sum()) > 1.0  # unit rows summed, not zeros


def test_extract_directions_without_spread_says_so():
    from pyconcepts.directions import extract_directions

    for x in (torch.ones(300, 6), torch.randn(300, 6) * 1e-40):
        with pytest.raises(ValueError, match="no spread to whiten"):
            extract_directions(x, 2, n_init=1, max_iter=3)


# ---------------------------------------------------------------------------- persistence
def _basis(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 5, generator=g)
    return ConceptBasis(w, torch.zeros(3), w.clone(), torch.zeros(5), metadata={"method": "t"})


def test_load_deeply_nested_metadata_is_value_error(tmp_path):
    from safetensors.torch import save_file

    b = _basis()
    path = tmp_path / "deep.safetensors"
    tensors = {n: getattr(b, n).contiguous() for n in ("decoding", "bias", "encoding", "mean")}
    save_file(tensors, str(path), metadata={
        "format": "pyconcepts.ConceptBasis", "format_version": "1",
        "metadata": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ValueError, match="corrupt metadata"):
        ConceptBasis.load(path)
    deep = {}
    cur = deep
    for _ in range(100_000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(ValueError, match="nested too deeply"):
        ConceptBasis(b.decoding, b.bias, b.encoding, b.mean, metadata=deep)


def test_failed_save_names_the_target(tmp_path, monkeypatch):
    import safetensors.torch as st

    path = tmp_path / "b.safetensors"

    def full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError) as info:
        _basis().save(path)
    assert str(path) in str(info.value) and ".tmp" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_saved_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _basis().save(tmp_path / "a.safetensors")
        os.umask(0o077)
        _basis().save(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b.safetensors").st_mode & 0o777 == 0o600


def test_killed_writer_leftovers_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "b.safetensors"
    # a writer killed with SIGKILL in the middle of its save
    script = textwrap.dedent(f"""
        import os, signal, torch
        import safetensors.torch as st
        from pyconcepts import ConceptBasis
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        st.save_file = die
        w = torch.randn(3, 5)
        ConceptBasis(w, torch.zeros(3), w, torch.zeros(5)).save({str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert len(leftovers) == 1
    _basis().save(path)
    assert os.listdir(tmp_path) == ["b.safetensors"]
    # a live writer's temp file is left alone
    from pyconcepts import basis as basis_module

    live = tmp_path / f".b.safetensors.tmp-{basis_module._HOST}-{os.getpid()}-x"
    live.touch()
    _basis().save(path)
    assert live.exists()


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-30])
def test_clustering_is_scale_free_for_finite_rows(scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) + 3 * torch.eye(8)[torch.randint(0, 4, (2000,), generator=g)]
    ref = pc.DirectionalClustering(4, seed=0, n_init=2).fit(x)
    scaled = pc.DirectionalClustering(4, seed=0, n_init=2).fit(x * scale)
    assert torch.equal(scaled.predict(x * scale), ref.predict(x))
    assert torch.allclose(scaled.centroids_, ref.centroids_, atol=1e-5)
