"""Native ops against the plain-torch reference: random and edge-case shapes, dtypes,
layouts, thread counts, both SIMD paths, torch.library registration."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyconcepts as pc
from pyconcepts import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def unit_rows(k, d, gen=None):
    return F.normalize(torch.randn(k, d, generator=gen), dim=1)


def check_assign(x, c, index, best, second=None):
    """Kernel picks must be optimal up to fp32 rounding; cosines must match the reference."""
    sims = ref.cosine_similarities(x, c)  # float64, on the same (possibly rounded) values
    if x.shape[0] == 0:
        assert index.shape == (0,) and best.shape == (0,)
        return
    rbest, rindex = sims.max(dim=1)
    tol = 2e-5 * max(1.0, x.shape[1] ** 0.5 / 8)
    picked = sims.gather(1, index.view(-1, 1)).squeeze(1)
    assert index.dtype == torch.int64 and best.dtype == torch.float32
    assert ((index >= 0) & (index < c.shape[0])).all()
    assert (rbest - picked).max().item() <= tol, "kernel picked a clearly worse centroid"
    torch.testing.assert_close(best.double(), rbest, atol=tol, rtol=0)
    # Where the reference's best is clear of the runner-up, indices must agree exactly.
    if c.shape[0] > 1:
        top2 = sims.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 4 * tol
        assert torch.equal(index[clear], rindex[clear])
        if second is not None:
            torch.testing.assert_close(second.double(), top2[:, 1], atol=tol, rtol=0)
    elif second is not None:
        assert torch.isneginf(second).all()


# ------------------------------------------------------------------------- cosine_assign
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 300),
    d=st.integers(1, 80),
    k=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_cosine_assign_random_shapes(n, d, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype)
    c = unit_rows(k, d, gen)
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    check_assign(x, c, index, best, second)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (1, 7, 3), (241, 257, 33), (1000, 256, 256),
                                   (37, 3, 200), (600, 1024, 17)])
def test_cosine_assign_edge_shapes(n, d, k, dtype):
    x = torch.randn(n, d).to(dtype)
    c = unit_rows(k, d)
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    check_assign(x, c, index, best, second)


def test_cosine_assign_empty_input():
    index, best = pc.ops.cosine_assign(torch.empty(0, 5), unit_rows(3, 5))
    assert index.shape == (0,) and best.shape == (0,)


def test_cosine_assign_ties_go_to_lowest_index():
    d = 24
    base = unit_rows(4, d)
    c = torch.cat([base, base, base])  # every centroid appears three times (K = 12)
    x = torch.randn(500, d)
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    assert (index < 4).all(), "an exact tie must resolve to the first occurrence"
    torch.testing.assert_close(second, best)  # the duplicate ties with the best


def test_cosine_assign_zero_row_and_scale_invariance():
    c = unit_rows(20, 9)
    x = torch.randn(50, 9)
    x[3] = 0
    i1, s1 = pc.ops.cosine_assign(x, c)
    i2, s2 = pc.ops.cosine_assign(x * 1000.0, c)
    assert s1[3] == 0 and i1[3] == 0
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2)


def test_cosine_assign_strided_rows_read_in_place():
    big = torch.randn(300, 70)
    x = big[::3, 5:60]  # row stride 210, unit column stride: no copy needed
    assert x.stride(1) == 1
    c = unit_rows(13, 55)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pc.ops.CopyWarning)
        index, best = pc.ops.cosine_assign(x, c)
    check_assign(x, c, index, best)


def test_cosine_assign_transposed_input_is_copied_with_a_warning():
    xt = torch.randn(40, 300)
    x = xt.T  # (300, 40), column-major
    c = unit_rows(9, 40)
    with pytest.warns(pc.ops.CopyWarning, match="not row-contiguous"):
        index, best = pc.ops.cosine_assign(x, c)
    check_assign(x, c, index, best)


# ---------------------------------------------------------------------- spherical_update
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 400),
    d=st.integers(1, 70),
    k=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_spherical_update_random_shapes(n, d, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype)
    index = torch.randint(0, k, (n,), generator=gen)
    sums, counts = pc.ops.spherical_update(x, index, k)
    rsums, rcounts = ref.spherical_update(x, index, k)
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(sums, rsums, atol=1e-9, rtol=1e-12)


def test_spherical_update_int32_index_empty_clusters_and_strides():
    x = torch.randn(200, 90)[:, 3:80]
    index = torch.randint(0, 5, (200,), dtype=torch.int32)
    sums, counts = pc.ops.spherical_update(x, index, 9)
    rsums, rcounts = ref.spherical_update(x, index.long(), 9)
    assert torch.equal(counts, rcounts) and (counts[5:] == 0).all()
    torch.testing.assert_close(sums, rsums, atol=1e-9, rtol=1e-12)


# ------------------------------------------------------------------------ masked_moments
def check_moments(x, w, b, center=None):
    got = pc.ops.masked_moments(x, w, b, center=center)
    want = ref.masked_moments(x, w, b, center=center)
    assert got.count.dtype == torch.int64 and got.sum_x.dtype == torch.float64
    assert torch.equal(got.count, want.count)
    scale = float(x.float().abs().max()) if x.numel() else 1.0
    atol = 1e-5 * scale * scale * max(1, x.shape[0]) ** 0.5 * max(1, x.shape[1]) ** 0.5
    for name in ("sum_z", "sum_z2", "sum_x", "sum_xz"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=atol,
                                   rtol=1e-5, msg=name)


def margin_bias(x, w, quantile=0.6):
    """Thresholds placed between values of w.x, so fp32 rounding cannot flip any mask bit."""
    z = ref.masked_moments  # noqa: F841 (keeps the import explicit)
    zz = x.double() @ w.double().T
    if x.shape[0] == 0:
        return torch.zeros(w.shape[0])
    srt = zz.sort(dim=0).values
    pos = min(int(quantile * x.shape[0]), x.shape[0] - 1)
    lo = srt[max(pos - 1, 0)]
    hi = srt[pos]
    return ((lo + hi) / 2).float()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 300),
    d=st.integers(1, 60),
    k=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    centred=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_masked_moments_random_shapes(n, d, k, dtype, centred, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=gen) + 2.0).to(dtype)
    w = torch.randn(k, d, generator=gen)
    b = margin_bias(x.float(), w)
    center = x.float().mean(0) if (centred and n > 0) else None
    if n > 0:
        # skip draws where a row sits within rounding distance of a threshold
        z = x.double() @ w.double().T
        if ((z - b.double()).abs() < 1e-4 * (1 + z.abs())).any():
            return
    check_moments(x, w, b, center)


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (95, 17, 16), (97, 17, 17), (500, 256, 40),
                                   (193, 1, 3), (250, 300, 1)])
def test_masked_moments_edge_shapes(n, d, k):
    x = torch.randn(n, d) + 1.0
    w = torch.randn(k, d)
    b = margin_bias(x, w, 0.5)
    check_moments(x, w, b, center=x.mean(0))
    check_moments(x, w, b)


def test_masked_moments_centre_removes_cancellation():
    # Offset 1e4 with unit spread: raw second moments lose the covariance in fp32 products,
    # the shifted ones keep it.
    n, d = 4000, 8
    x = torch.randn(n, d) + 1e4
    w = F.normalize(torch.randn(3, d), dim=1)
    b = (x.double() @ w.double().T).median(0).values.float()
    m = pc.ops.masked_moments(x, w, b, center=x.mean(0))
    r = ref.masked_moments(x, w, b, center=x.mean(0))
    cov = m.sum_xz / m.count[:, None] - (m.sum_x / m.count[:, None]) * (m.sum_z / m.count)[:, None]
    rcov = r.sum_xz / r.count[:, None] - (r.sum_x / r.count[:, None]) * (r.sum_z / r.count)[:, None]
    torch.testing.assert_close(cov, rcov, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- layout and threading
def test_results_identical_for_one_and_two_threads():
    x = torch.randn(3001, 130)
    c = unit_rows(70, 130)
    a1 = pc.ops.cosine_assign(x, c, return_second=True, num_threads=1)
    a2 = pc.ops.cosine_assign(x, c, return_second=True, num_threads=2)
    assert all(torch.equal(p, q) for p, q in zip(a1, a2))
    idx = a1[0]
    u1 = pc.ops.spherical_update(x, idx, 70, num_threads=1)
    u2 = pc.ops.spherical_update(x, idx, 70, num_threads=2)
    assert all(torch.equal(p, q) for p, q in zip(u1, u2))
    b = torch.full((70,), 0.1)
    m1 = pc.ops.masked_moments(x, c, b, center=x.mean(0), num_threads=1)
    m2 = pc.ops.masked_moments(x, c, b, center=x.mean(0), num_threads=2)
    assert all(torch.equal(p, q) for p, q in zip(m1, m2))


def test_generic_simd_path_matches_reference():
    """The portable kernels (used on CPUs without AVX2) run in a subprocess."""
    code = (
        "import torch, torch.nn.functional as F, pyconcepts as pc\n"
        "from pyconcepts import reference as ref\n"
        "assert pc.ops.simd_level() == 'generic', pc.ops.simd_level()\n"
        "torch.manual_seed(1)\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    x = torch.randn(257, 45).to(dt); c = F.normalize(torch.randn(19, 45), dim=1)\n"
        "    i, s = pc.ops.cosine_assign(x, c)\n"
        "    ri, rs = ref.cosine_assign(x, c)\n"
        "    assert (s.double() - rs.double()).abs().max() < 1e-5\n"
        "    su, cu = pc.ops.spherical_update(x, ri, 19)\n"
        "    rsu, rcu = ref.spherical_update(x, ri, 19)\n"
        "    assert torch.equal(cu, rcu) and (su - rsu).abs().max() < 1e-9\n"
        "    m = pc.ops.masked_moments(x, c, torch.full((19,), 0.3))\n"
        "    r = ref.masked_moments(x, c, torch.full((19,), 0.3))\n"
        "    assert (m.sum_xz - r.sum_xz).abs().max() < 1e-3\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYCONCEPTS_SIMD="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("simd", ["generic", "native"])
def test_lane_reduction_breaks_exact_ties_to_the_lowest_index(simd):
    """Both lane reductions (the portable one and the branch-free AVX2 one): with every
    centroid duplicated the dot products tie exactly, and the lowest index must win with the
    second best equal to the best; zero rows get index 0 and cosine 0; K = 1 has no second.
    K below, at and not a multiple of the 16-lane strip."""
    code = (
        "import torch, torch.nn.functional as F, pyconcepts as pc\n"
        "torch.manual_seed(3)\n"
        "for k in (1, 5, 16, 37):\n"
        "    m = max(1, k // 2)\n"
        "    c = F.normalize(torch.randn(m, 24), dim=1)[torch.arange(k) % m].contiguous()\n"
        "    x = torch.randn(301, 24); x[::7] = 0\n"
        "    i, s, s2 = pc.ops.cosine_assign(x, c, return_second=True)\n"
        "    assert bool((i < m).all()), (k, i.max())\n"
        "    zero = torch.zeros(301, dtype=torch.bool); zero[::7] = True\n"
        "    assert bool((i[zero] == 0).all()) and bool((s[zero] == 0).all())\n"
        "    if k == 1:\n"
        "        assert bool(torch.isinf(s2).all())\n"
        "    else:\n"
        "        assert torch.equal(s2, s), k\n"
        "print(pc.ops.simd_level())\n"
    )
    env = dict(os.environ)
    env.pop("PYCONCEPTS_SIMD", None)
    if simd == "generic":
        env["PYCONCEPTS_SIMD"] = "generic"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (run.stdout.strip() == "generic") == (simd == "generic")


def test_ops_are_registered_with_torch_library():
    x = torch.randn(33, 10)
    c = unit_rows(5, 10)
    torch.library.opcheck(torch.ops.pyconcepts.cosine_assign.default, (x, c, True, True, 1, torch.arange(0, 33, 2), torch.zeros(10)),
                          test_utils=("test_schema", "test_faketensor"))
    idx = torch.randint(0, 5, (33,))
    torch.library.opcheck(torch.ops.pyconcepts.spherical_update.default, (x, idx, 5, 1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pyconcepts.masked_moments.default,
                          (x, c, torch.zeros(5), None, 1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pyconcepts.assign_update.default,
                          (x, c, True, False, 1, False, torch.zeros(10), True),
                          test_utils=("test_schema", "test_faketensor"))


def test_ops_work_under_torch_compile():
    x = torch.randn(64, 12)
    c = unit_rows(6, 12)

    def step(x, c):
        index, best = pc.ops.cosine_assign(x, c)
        return index, best * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    i1, b1 = compiled(x, c)
    i0, b0 = step(x, c)
    assert torch.equal(i0, i1) and torch.equal(b0, b1)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(10, 4)
    c = unit_rows(3, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pc.ops.cosine_assign(x.numpy(), c)
    with pytest.raises(TypeError, match="x must be float32"):
        pc.ops.cosine_assign(x.double(), c)
    with pytest.raises(TypeError, match="x must be float32"):
        pc.ops.cosine_assign(x.long(), c)
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        pc.ops.cosine_assign(x[0], c)
    with pytest.raises(ValueError, match="D = 0"):
        pc.ops.cosine_assign(torch.empty(3, 0), c[:, :0])
    with pytest.raises(ValueError, match="centroids has D = 5"):
        pc.ops.cosine_assign(x, unit_rows(3, 5))
    with pytest.raises(ValueError, match="K = 0"):
        pc.ops.cosine_assign(x, torch.empty(0, 4))
    with pytest.raises(ValueError, match="unit-norm"):
        pc.ops.cosine_assign(x, c * 2)
    with pytest.raises(ValueError, match="centroids contains NaN"):
        pc.ops.cosine_assign(x, torch.full((3, 4), float("nan")))
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        xb = x.clone()
        xb[7, 2] = bad_value
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            pc.ops.cosine_assign(xb, c)
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            pc.ops.spherical_update(xb, torch.zeros(10, dtype=torch.long), 3)
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            pc.ops.masked_moments(xb, c, torch.zeros(3))
    xh = x.half()
    xh[2, 1] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        pc.ops.cosine_assign(xh, c)


def test_bad_update_and_moment_arguments():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="outside"):
        pc.ops.spherical_update(x, torch.full((10,), 3), 3)
    with pytest.raises(ValueError, match="outside"):
        pc.ops.spherical_update(x, torch.full((10,), -1), 3)
    with pytest.raises(ValueError, match="index must have shape"):
        pc.ops.spherical_update(x, torch.zeros(9, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="index must be int64"):
        pc.ops.spherical_update(x, torch.zeros(10), 3)
    with pytest.raises(ValueError, match="n_clusters"):
        pc.ops.spherical_update(x, torch.zeros(10, dtype=torch.long), 0)
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="bias must have shape"):
        pc.ops.masked_moments(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="center must have shape"):
        pc.ops.masked_moments(x, w, torch.zeros(3), center=torch.zeros(5))
    with pytest.raises(ValueError, match="decoding has D = 5"):
        pc.ops.masked_moments(x, torch.randn(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="bias contains NaN"):
        pc.ops.masked_moments(x, w, torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="num_threads"):
        pc.ops.masked_moments(x, w, torch.zeros(3), num_threads=0)


# ------------------------------------------------------------------------- assign_update
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (9000, 37, 21), (20000, 64, 5), (300, 129, 70)])
def test_assign_update_matches_separate_ops_and_reference(n, d, k, dtype):
    x = torch.randn(n, d).to(dtype)
    c = unit_rows(k, d)
    index, best, second, sums, counts = pc.ops.assign_update(x, c, return_second=True)
    check_assign(x, c, index, best, second)
    rsums, rcounts = ref.spherical_update(x, index, k)  # by the kernel's own assignment
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(sums, rsums, atol=1e-9, rtol=1e-12)


def test_assign_update_identical_for_any_thread_count():
    x = torch.randn(30000, 40)  # several super-blocks of rows
    c = unit_rows(12, 40)
    one = pc.ops.assign_update(x, c, num_threads=1)
    two = pc.ops.assign_update(x, c, num_threads=2)
    three = pc.ops.assign_update(x, c, num_threads=3)
    for a, b, e in zip(one, two, three):
        assert torch.equal(a, b) and torch.equal(a, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize,centred", [(False, False), (True, False), (False, True)])
def test_assign_update_moments_match_reference(dtype, normalize, centred):
    x = (torch.randn(20000, 33) + (2.0 if centred else 0.0)).to(dtype)  # 3 super-blocks
    x[5] = 0  # a zero row: z = 0
    c = unit_rows(9, 33)
    center = x.float().mean(0) if centred else None
    index, best, sums, counts, sum_xz, sum_z = pc.ops.assign_update(
        x, c, normalize=normalize, center=center, return_moments=True)
    assert sum_xz.dtype == sum_z.dtype == torch.float64
    assert sum_xz.shape == (9, 33) and sum_z.shape == (9, 2)
    # by the kernel's own assignment (fp16 rows may tie differently in the reference)
    rows = x.double() - (center.double() if centred else 0)
    if normalize:
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = (rows * c.double()[index]).sum(1)
    want_xz = torch.zeros(9, 33, dtype=torch.float64).index_add_(0, index, rows * z[:, None])
    want_z = torch.zeros(9, 2, dtype=torch.float64).index_add_(0, index, torch.stack([z, z * z], 1))
    scale = float(want_xz.abs().max())
    torch.testing.assert_close(sum_xz, want_xz, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(sum_z, want_z, atol=1e-5 * float(want_z.abs().max()), rtol=0)
    if dtype == torch.float32 and not centred:  # the reference computes them the same way
        r = ref.assign_update(x, c, normalize=normalize, return_moments=True)
        assert torch.equal(r[0], index)
        torch.testing.assert_close(sum_xz, r[4], atol=1e-5 * scale, rtol=0)
    # the moments leave the rest untouched, and are identical for any thread count
    plain = pc.ops.assign_update(x, c, normalize=normalize, center=center)
    assert all(torch.equal(p, q) for p, q in zip(plain, (index, best, sums, counts)))
    one = pc.ops.assign_update(x, c, normalize=normalize, center=center, return_moments=True,
                               num_threads=1)
    assert all(torch.equal(p, q) for p, q in zip(one, (index, best, sums, counts, sum_xz, sum_z)))


def test_assign_update_rejects_nonfinite_rows():
    x = torch.randn(50, 6)
    x[10, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        pc.ops.assign_update(x, unit_rows(3, 6))


def test_cosine_assign_rows_and_group_max():
    x = torch.randn(700, 37)
    c = unit_rows(50, 37)  # groups of 16: 16, 16, 16, 2
    rows = torch.tensor([5, 699, 0, 5, 321, 17])
    got = pc.ops.cosine_assign(x, c, return_second=True, return_group_max=True, rows=rows)
    want = pc.ops.cosine_assign(x[rows], c, return_second=True, return_group_max=True)
    assert all(torch.equal(p, q) for p, q in zip(got, want))
    sims = ref.cosine_similarities(x[rows], c)
    expect = torch.stack([sims[:, g:g + 16].max(dim=1).values for g in range(0, 50, 16)], dim=1)
    assert got[3].shape == (6, 4)
    torch.testing.assert_close(got[3].double(), expect, atol=1e-5, rtol=0)
    # fused pass returns the same group maxima
    fused = pc.ops.assign_update(x, c, return_group_max=True)
    plain = pc.ops.cosine_assign(x, c, return_group_max=True)
    assert torch.equal(fused[2], plain[2])
    empty = pc.ops.cosine_assign(x, c, rows=torch.empty(0, dtype=torch.int64))
    assert empty[0].shape == (0,)
    with pytest.raises(ValueError, match="rows has values outside"):
        pc.ops.cosine_assign(x, c, rows=torch.tensor([700]))
    with pytest.raises(TypeError, match="rows must be int64"):
        pc.ops.cosine_assign(x, c, rows=torch.tensor([1], dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_update_normalised_sums(dtype):
    x = (torch.randn(5000, 33) * torch.rand(5000, 1) * 10).to(dtype)
    x[7] = 0  # a zero row adds nothing
    c = unit_rows(9, 33)
    index, best, sums, counts = pc.ops.assign_update(x, c, normalize=True)
    rindex, rbest, rsums, rcounts = ref.assign_update(x, c, normalize=True)
    clear = ref.cosine_similarities(x, c).topk(2, dim=1).values
    assert torch.equal(index[(clear[:, 0] - clear[:, 1]) > 1e-4], rindex[(clear[:, 0] - clear[:, 1]) > 1e-4])
    want, want_counts = ref.spherical_update(
        x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12), index, 9)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)
    # the spherical objective: sum of norms of unit-row sums = sum of cosines to the centroids
    torch.testing.assert_close((sums * c.double()).sum(), best.double().sum(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_is_subtracted_as_rows_are_read(dtype):
    x = (torch.randn(900, 41) + 3).to(dtype)
    c = unit_rows(30, 41)
    m = x.float().mean(0)
    got = pc.ops.cosine_assign(x, c, center=m, return_second=True)
    want = ref.cosine_assign(x.float(), c, center=m, return_second=True)
    check_assign(x.float() - m, c, got[0], got[1], got[2])
    torch.testing.assert_close(got[1].double(), want[1].double(), atol=1e-4, rtol=0)
    if dtype == torch.float32:  # bit-identical to assigning the centred copy
        same = pc.ops.cosine_assign(x - m, c, return_second=True)
        assert all(torch.equal(p, q) for p, q in zip(got, same))
        fused = pc.ops.assign_update(x, c, center=m)
        fused_copy = pc.ops.assign_update(x - m, c)
        assert all(torch.equal(p, q) for p, q in zip(fused, fused_copy))
    with pytest.raises(ValueError, match="center must have shape"):
        pc.ops.cosine_assign(x, c, center=torch.zeros(40))
    with pytest.raises(ValueError, match="center contains NaN"):
        pc.ops.assign_update(x, c, center=torch.full((41,), float("nan")))
