"""CUDA ops against pyconcepts.reference, on the GPU. Every test skips without a GPU build.

The reference runs in float64 on the CPU copy of the same (already rounded) inputs, so the
tolerances below cover only the kernels' own arithmetic: fp32 products for float32 input;
for float16/bfloat16 input the tensor-core path also rounds the centroids to the input type,
which moves a cosine by at most the type's unit roundoff (|sum x_i dc_i| <= eps |x| |c|).
"""
import pytest
import torch
import torch.nn.functional as F

import pyconcepts as pc
from pyconcepts import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not pc.ops.cuda_available(),
        reason="needs a CUDA GPU and pyconcepts built with its CUDA module (_C_cuda)",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Cosine tolerance per input type (see the module docstring).
COS_TOL = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 8e-3}


def _data(n, d, k, dtype, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype)
    c = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1).float()
    return x.to(device), c.to(device)


def _check_assign(x, c, index, best, second=None):
    """The chosen centroid is optimal up to the tolerance; cosines match the reference."""
    tol = COS_TOL[x.dtype]
    xc, cc = x.cpu(), c.cpu()
    sims = reference.cosine_similarities(xc, cc)
    ref_index, ref_best, *rest = reference.cosine_assign(xc, cc, return_second=second is not None)
    index, best = index.cpu(), best.cpu()
    assert index.dtype == torch.int64 and best.dtype == torch.float32
    assert bool(((index >= 0) & (index < c.shape[0])).all())
    chosen = sims.gather(1, index[:, None])[:, 0]
    assert bool((chosen >= ref_best.double() - tol).all()), "a row was not assigned its best centroid"
    torch.testing.assert_close(best, ref_best, atol=tol, rtol=0)
    # Where the reference's winner leads clearly, the index must be the same.
    if c.shape[0] > 1:
        top2 = sims.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 4 * tol
        assert torch.equal(index[clear], ref_index[clear])
    if second is not None:
        torch.testing.assert_close(second.cpu(), rest[0], atol=tol, rtol=0)


# ----------------------------------------------------------------------------- cosine_assign
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,d,k",
    [
        (1, 1, 1),
        (2, 3, 1),
        (7, 5, 3),
        (129, 33, 130),   # one past the row tile and the centroid tile
        (300, 67, 257),   # D odd, K past two centroid tiles
        (1000, 512, 256),
        (64, 4096, 7),    # D = 4096
        (40, 96, 4096),   # K = 4096
    ],
)
def test_cosine_assign_matches_reference(n, d, k, dtype):
    x, c = _data(n, d, k, dtype, seed=n + d + k)
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    assert index.device == x.device and best.device == x.device
    _check_assign(x, c, index, best, second)


def test_cosine_assign_large_d_and_k():
    x, c = _data(33, 4096, 4096, torch.bfloat16, seed=5)
    index, best = pc.ops.cosine_assign(x, c)
    _check_assign(x, c, index, best)


def test_cosine_assign_empty():
    x, c = _data(0, 16, 4, torch.bfloat16)
    index, best = pc.ops.cosine_assign(x, c)
    assert index.shape == (0,) and best.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_assign_k1_second_is_minus_inf(dtype):
    x, c = _data(50, 24, 1, dtype)
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    assert bool((index == 0).all())
    assert bool(torch.isinf(second).all() and (second < 0).all())
    _check_assign(x, c, index, best)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_assign_ties_go_to_lowest_index(dtype):
    # The same centroid at columns 3, 130 and 200 (different tiles and warps): exact ties.
    d, k = 40, 260
    _, c = _data(1, d, k, torch.float32, seed=3)
    c[130] = c[3]
    c[200] = c[3]
    x = (c[3] * 2.5).to(dtype).repeat(70, 1)
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    assert bool((index == 3).all())
    torch.testing.assert_close(second, best)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_assign_zero_rows(dtype):
    x, c = _data(140, 19, 9, dtype)
    x[5] = 0
    x[139] = 0
    index, best, second = pc.ops.cosine_assign(x, c, return_second=True)
    for r in (5, 139):
        assert index[r].item() == 0 and best[r].item() == 0.0 and second[r].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset,extra", [(1, 0), (0, 3), (3, 5)])
def test_cosine_assign_strided_rows(dtype, offset, extra):
    # Row strides that are not multiples of 8 elements and a base that is not 16-byte
    # aligned: the kernels must fall back to element loads.
    n, d, k = 200, 45, 70
    big, _ = _data(n, d + offset + extra, k, dtype)
    _, c = _data(1, d, k, torch.float32, seed=1)
    x = big[:, offset : offset + d]
    assert x.stride(0) == d + offset + extra
    index, best = pc.ops.cosine_assign(x, c)
    _check_assign(x, c, index, best)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_assign_nan_row_raises(dtype):
    x, c = _data(100, 16, 5, dtype)
    x[77, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pc.ops.cosine_assign(x, c)
    x[77, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pc.ops.cosine_assign(x, c)


def test_cosine_assign_fp32_matches_cpu_op():
    x, c = _data(500, 70, 33, torch.float32, seed=9)
    gi, gb, gs = pc.ops.cosine_assign(x, c, return_second=True)
    ci, cb, cs = pc.ops.cosine_assign(x.cpu(), c.cpu(), return_second=True)
    torch.testing.assert_close(gb.cpu(), cb, atol=1e-5, rtol=0)
    torch.testing.assert_close(gs.cpu(), cs, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------- spherical_update
def _check_update(x, index, k):
    sums, counts = pc.ops.spherical_update(x, index, k)
    ref_sums, ref_counts = reference.spherical_update(x.cpu(), index.cpu(), k)
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), ref_counts)
    # Every row enters as an exact fp32 value summed in float64: only the order differs.
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,d,k", [(1, 1, 1), (5, 3, 1), (257, 33, 7), (3000, 515, 130), (40, 4096, 9), (500, 24, 4096)]
)
def test_spherical_update_matches_reference(n, d, k, dtype):
    gen = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(n, d, generator=gen).to(dtype).cuda()
    index = torch.randint(0, k, (n,), generator=gen).cuda()
    _check_update(x, index, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_spherical_update_skewed_clusters(dtype):
    # One cluster holds most rows: its segment spans many CTA pieces (1024 rows each).
    gen = torch.Generator().manual_seed(1)
    n, d, k = 9000, 20, 6
    x = torch.randn(n, d, generator=gen).to(dtype).cuda()
    index = torch.where(torch.rand(n, generator=gen) < 0.9, 2, torch.randint(0, k, (n,), generator=gen))
    _check_update(x, index.cuda(), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_spherical_update_strided_and_empty_clusters(dtype):
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(300, 50, generator=gen).to(dtype).cuda()
    x = big[:, 1:44]
    index = torch.randint(0, 3, (300,), generator=gen).cuda() * 2  # clusters 1, 3, 5 empty
    _check_update(x, index, 7)


def test_spherical_update_bad_input_raises():
    x = torch.randn(50, 8, device="cuda")
    index = torch.zeros(50, dtype=torch.int64, device="cuda")
    index[10] = 9
    with pytest.raises(ValueError, match="outside"):
        pc.ops.spherical_update(x, index, 4)
    index[10] = -1
    with pytest.raises(ValueError, match="outside"):
        pc.ops.spherical_update(x, index, 4)
    index[10] = 0
    x[20, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pc.ops.spherical_update(x, index, 4)


# ---------------------------------------------------------------------------- masked_moments
def _bias_with_margin(x, w):
    """Per concept a threshold in the widest gap of the middle of its z values, so the fp32
    mask of the kernel and the float64 mask of the reference agree."""
    z = (x.cpu().double() @ w.cpu().double().T)
    zs, _ = z.sort(dim=0)
    n = zs.shape[0]
    if n < 2:
        return (zs[0] - 1.0).float()
    lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
    gaps = zs[lo + 1 : hi + 1] - zs[lo:hi]
    at = gaps.argmax(dim=0) + lo
    cols = torch.arange(zs.shape[1])
    return ((zs[at, cols] + zs[at + 1, cols]) / 2).float()


def _check_moments(x, w, b, center=None, rtol=2e-5):
    got = pc.ops.masked_moments(x, w, b, center=center)
    ref = reference.masked_moments(
        x.cpu(), w.cpu(), b.cpu(), center=None if center is None else center.cpu()
    )
    assert torch.equal(got.count.cpu(), ref.count)
    # fp32 products over blocks of 256 rows: scale the tolerance by the sum of magnitudes.
    xc = x.cpu().double() - (0 if center is None else center.cpu().double())
    scale_x = xc.abs().sum(0).max().item() + 1.0
    zc = xc @ w.cpu().double().T
    scale_z = zc.abs().sum().item() + 1.0
    for name, scale in (("sum_z", scale_z), ("sum_z2", (zc**2).sum().item() + 1.0),
                        ("sum_x", scale_x), ("sum_xz", scale_x * (zc.abs().max().item() + 1.0))):
        a, r = getattr(got, name).cpu(), getattr(ref, name)
        assert a.dtype == torch.float64
        err = (a - r).abs().max().item() if a.numel() else 0.0
        assert err <= rtol * scale, f"{name}: max error {err} vs scale {scale}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,d,k", [(1, 1, 1), (9, 3, 1), (130, 33, 5), (700, 67, 70), (60, 4096, 3), (200, 16, 300)]
)
@pytest.mark.parametrize("centered", [False, True])
def test_masked_moments_matches_reference(n, d, k, dtype, centered):
    gen = torch.Generator().manual_seed(n + d + k)
    x = (torch.randn(n, d, generator=gen) + 3.0).to(dtype).cuda()
    w = torch.randn(k, d, generator=gen).cuda() / d**0.5
    b = _bias_with_margin(x, w).cuda()
    center = x.float().mean(0) if centered else None
    _check_moments(x, w, b, center)


def test_masked_moments_many_chunks_and_splits():
    # K = 256 gives a 65536-row chunk: 70000 rows cross it, and each split spans > 256 rows.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(70000, 8, generator=gen).cuda()
    w = torch.randn(256, 8, generator=gen).cuda()
    b = _bias_with_margin(x, w).cuda()
    _check_moments(x, w, b, x.mean(0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_moments_strided(dtype):
    gen = torch.Generator().manual_seed(6)
    big = torch.randn(150, 40, generator=gen).to(dtype).cuda()
    x = big[:, 3:32]
    w = torch.randn(4, 29, generator=gen).cuda()
    _check_moments(x, w, _bias_with_margin(x, w).cuda())


def test_masked_moments_nan_raises():
    x = torch.randn(80, 6, device="cuda")
    x[33, 0] = float("inf")
    w = torch.randn(2, 6, device="cuda")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pc.ops.masked_moments(x, w, torch.zeros(2, device="cuda"))


# ------------------------------------------------------------------- streams and devices
def test_ops_run_on_the_current_stream():
    """Inputs produced on a side stream behind a long kernel: an op that ignored the current
    stream would read them before they are written."""
    gen = torch.Generator().manual_seed(8)
    n, d, k = 4096, 64, 16
    src = torch.randn(n, d, generator=gen).cuda()
    c = F.normalize(torch.randn(k, d, generator=gen), dim=1).cuda()
    index_src = torch.randint(0, k, (n,), generator=gen).cuda()
    w = torch.randn(k, d, generator=gen).cuda()
    b = _bias_with_margin(src, w).cuda()
    x = torch.zeros(n, d, device="cuda")
    index = torch.zeros(n, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keeps the side stream busy for ~0.1 s
        x.copy_(src)
        index.copy_(index_src)
        got_index, got_best = pc.ops.cosine_assign(x, c)
        sums, counts = pc.ops.spherical_update(x, index, k)
        moments = pc.ops.masked_moments(x, w, b)
    side.synchronize()
    ref_index, ref_best = reference.cosine_assign(src.cpu(), c.cpu())
    torch.testing.assert_close(got_best.cpu(), ref_best, atol=COS_TOL[torch.float32], rtol=0)
    ref_sums, ref_counts = reference.spherical_update(src.cpu(), index_src.cpu(), k)
    assert torch.equal(counts.cpu(), ref_counts)
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-12, atol=1e-9)
    assert torch.equal(moments.count.cpu(), reference.masked_moments(src.cpu(), w.cpu(), b.cpu()).count)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_non_default_device():
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x, c = _data(300, 40, 20, torch.bfloat16, seed=11, device=dev)
    index, best = pc.ops.cosine_assign(x, c)
    assert index.device == dev
    _check_assign(x, c, index, best)
    idx = torch.randint(0, 20, (300,), device=dev)
    sums, counts = pc.ops.spherical_update(x, idx, 20)
    ref_sums, ref_counts = reference.spherical_update(x.cpu(), idx.cpu(), 20)
    assert torch.equal(counts.cpu(), ref_counts)
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-12, atol=1e-9)
    w = torch.randn(5, 40, device=dev)
    _check_moments(x, w, _bias_with_margin(x, w).to(dev))


def test_assign_update_on_cuda_matches_reference():
    x, c = _data(600, 30, 12, torch.float32, seed=12)
    index, best, sums, counts = pc.ops.assign_update(x, c)
    ref_index, ref_best, ref_sums, ref_counts = reference.assign_update(x.cpu(), c.cpu())
    torch.testing.assert_close(best.cpu(), ref_best, atol=2e-5, rtol=0)
    assert torch.equal(counts.sum().cpu(), torch.tensor(600))
    _check_update(x, index, 12)


def test_assign_update_moments_on_cuda_match_the_cpu_kernel():
    x, c = _data(3000, 30, 12, torch.float32, seed=13)
    for normalize in (False, True):
        index, _, sums, counts, sum_xz, sum_z = pc.ops.assign_update(
            x, c, normalize=normalize, return_moments=True)
        # float64 reference by the CUDA kernel's own labels (near-ties may differ from the CPU)
        lab = index.cpu()
        rows = x.cpu().double()
        if normalize:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        z = (rows * c.cpu().double()[lab]).sum(1)
        want_xz = torch.zeros(12, 30, dtype=torch.float64).index_add_(0, lab, rows * z[:, None])
        want_z = torch.zeros(12, 2, dtype=torch.float64).index_add_(0, lab, torch.stack([z, z * z], 1))
        assert sum_xz.shape == (12, 30) and sum_z.shape == (12, 2)
        torch.testing.assert_close(sum_xz.cpu(), want_xz, atol=1e-4 * float(want_xz.abs().max()), rtol=0)
        torch.testing.assert_close(sum_z.cpu(), want_z, atol=1e-4 * float(want_z.abs().max()), rtol=0)
        cpu = pc.ops.assign_update(x.cpu(), c.cpu(), normalize=normalize, return_moments=True)
        assert float((lab == cpu[0]).double().mean()) > 0.99
