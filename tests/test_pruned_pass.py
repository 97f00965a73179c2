"""ops.pruned_pass against cosine_assign (labels bit-exact) and the dense reference (bounds
valid, sum corrections), over edge shapes, dtypes, ties, chains of moving centroids,
thread counts, the portable SIMD path and bad input."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyconcepts as pc
from pyconcepts import reference as ref
from pyconcepts.pruning import _drift_angles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def unit_rows(k, d, gen=None):
    return F.normalize(torch.randn(k, d, generator=gen), dim=1)


def clustered(n, d, k, noise, gen):
    centres = unit_rows(k, d, gen)
    which = torch.randint(0, k, (n,), generator=gen)
    return centres[which] + noise * torch.randn(n, d, generator=gen)


def cold_state(n, k, spg):
    """Bounds that certify nothing: every row is read and every group evaluated."""
    groups = pc.ops.pruned_pass_groups(k, spg)
    return (torch.zeros(n, dtype=torch.int64), torch.full((n,), 4.0),
            torch.zeros(n, groups))


def check_pass(x, c, before, labels, theta_lo, theta_up, sum_corr, count_corr, spg,
               normalize):
    """Labels exactly those of cosine_assign; bounds valid; corrections those of the moves."""
    if x.shape[0]:
        assert torch.equal(labels, pc.ops.cosine_assign(x, c)[0])
    rlabels, own, group_angle, rsum, rcount = ref.pruned_pass(
        x, c, before, strips_per_group=spg, normalize=normalize)
    agree = labels == rlabels
    if x.shape[0] and c.shape[0] > 1:  # fp64 and fp32 argmax may differ only on near-ties
        sims = ref.cosine_similarities(x, c)
        top2 = sims.topk(2, dim=1).values
        assert agree[(top2[:, 0] - top2[:, 1]) > 1e-4].all()
    if bool(agree.all()):
        assert torch.equal(count_corr, rcount)
        # unit rows: the kernel scales by its fp32 norm, the reference by the float64 one
        tol = 1e-6 if normalize else 1e-9
        torch.testing.assert_close(sum_corr, rsum, atol=tol, rtol=tol)
        eps = pc.ops.pruned_pass_eps(x.shape[1])
        # theta_lo bounds the own angle with the kernel's rounding folded in; theta_up
        # bounds the angle to every other member of each group from below.
        shifted = torch.acos((torch.cos(own) - 2 * eps).clamp(-1, 1))
        assert (theta_lo.double() >= shifted).all()
        assert (theta_up.double() <= group_angle).all()
    assert int(count_corr.sum()) == 0


@pytest.mark.parametrize("n,d,k,spg", [
    (0, 5, 3, 1), (1, 1, 1, 1), (1, 7, 20, 1), (37, 3, 17, 1), (300, 33, 16, 1),
    (300, 24, 40, 2), (257, 64, 70, 3), (50, 9, 1, 1),
])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_cold_pass_matches_full_assignment(n, d, k, spg, dtype, normalize):
    gen = torch.Generator().manual_seed(n * 7 + d * 3 + k)
    x = (torch.randn(n, d, generator=gen) * 3).to(dtype)
    c = unit_rows(k, d, gen)
    labels, lo, up = cold_state(n, k, spg)
    before = labels.clone()
    sum_corr, count_corr, stats = pc.ops.pruned_pass(
        x, c, labels, lo, up, torch.zeros(k, dtype=torch.float64), strips_per_group=spg,
        normalize=normalize)
    check_pass(x, c, before, labels, lo, up, sum_corr, count_corr, spg, normalize)
    assert stats.tolist()[0] == n  # all rows read
    assert stats.tolist()[2] == n  # every group evaluated
    assert stats.tolist()[3] == int((before != labels).sum())


@pytest.mark.parametrize("seed,d,k,spg,noise,dtype,normalize", [
    (0, 16, 40, 1, 0.3, torch.float32, False),
    (1, 31, 23, 1, 0.6, torch.float16, True),
    (2, 48, 90, 2, 0.2, torch.bfloat16, False),
    (3, 8, 5, 1, 1.0, torch.float32, True),
])
def test_chain_of_moving_centroids(seed, d, k, spg, noise, dtype, normalize):
    """Many passes with centroids that move by small, large and zero steps: every pass
    gives cosine_assign's labels and valid bounds, and the corrected sums stay exact."""
    gen = torch.Generator().manual_seed(seed)
    x = clustered(2500, d, k, noise, gen).to(dtype)
    c = unit_rows(k, d, gen)
    labels, lo, up = cold_state(x.shape[0], k, spg)
    zero = torch.zeros(k, dtype=torch.float64)
    rows = F.normalize(x.double(), dim=1) if normalize else x.double()
    sums = torch.zeros(k, d, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.int64)
    sums[0], counts[0] = rows.sum(0), x.shape[0]  # the cold state's labels are all 0
    drift = zero
    read = []
    for step in [0.0, 0.3, 0.05, 0.0, 0.01, 0.002, 1.0, 0.001, 0.0, 0.02, 0.0005]:
        before = labels.clone()
        sum_corr, count_corr, stats = pc.ops.pruned_pass(
            x, c, labels, lo, up, drift, strips_per_group=spg, normalize=normalize)
        check_pass(x, c, before, labels, lo, up, sum_corr, count_corr, spg, normalize)
        sums += sum_corr
        counts += count_corr
        read.append(stats.tolist()[0])
        fresh, fresh_counts = ref.spherical_update(rows, labels, k)
        assert torch.equal(counts, fresh_counts)
        tol = 1e-6 if normalize else 1e-8
        torch.testing.assert_close(sums, fresh, atol=tol, rtol=tol)
        new_c = F.normalize(c + step * torch.randn(k, d, generator=gen), dim=1)
        if step == 0.0:
            new_c = c
        drift = _drift_angles(c, new_c)
        c = new_c
    assert read[0] == x.shape[0]
    assert read[4] < x.shape[0], f"zero drift after a pass must certify rows: {read}"


def test_zero_drift_certifies_every_clear_row_without_reading():
    gen = torch.Generator().manual_seed(5)
    x = clustered(3000, 32, 12, 0.1, gen)
    c = unit_rows(12, 32, gen)
    labels, lo, up = cold_state(3000, 12, 1)
    zero = torch.zeros(12, dtype=torch.float64)
    pc.ops.pruned_pass(x, c, labels, lo, up, zero)
    before = (labels.clone(), lo.clone(), up.clone())
    sum_corr, count_corr, stats = pc.ops.pruned_pass(x, c, labels, lo, up, zero)
    # K = 12 is one group, so a row is certified when its own angle clears the runner-up
    assert stats.tolist()[0] < 50 and stats.tolist()[3] == 0
    assert torch.equal(labels, before[0])
    assert not sum_corr.any() and not count_corr.any()
    # certified rows are not read: a NaN planted in one of them goes unnoticed
    certified = (lo < up.min(dim=1).values).nonzero()[0, 0]
    x[certified, 0] = float("nan")
    pc.ops.pruned_pass(x, c, labels, lo, up, zero)


def test_exact_ties_resolve_to_lowest_index():
    gen = torch.Generator().manual_seed(3)
    base = unit_rows(5, 24, gen)
    c = torch.cat([base, base, base, base])  # K = 20, each centroid four times
    x = torch.randn(400, 24, generator=gen).to(torch.float16)
    labels, lo, up = cold_state(400, 20, 1)
    zero = torch.zeros(20, dtype=torch.float64)
    for _ in range(3):
        before = labels.clone()
        sum_corr, count_corr, _ = pc.ops.pruned_pass(x, c, labels, lo, up, zero)
        check_pass(x, c, before, labels, lo, up, sum_corr, count_corr, 1, False)
        assert (labels < 5).all()


def test_zero_and_huge_rows():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(60, 10, generator=gen)
    x[3] = 0
    x[7] *= 1e30
    c = unit_rows(33, 10, gen)
    labels, lo, up = cold_state(60, 33, 1)
    zero = torch.zeros(33, dtype=torch.float64)
    for _ in range(2):
        pc.ops.pruned_pass(x, c, labels, lo, up, zero)
        assert torch.equal(labels, pc.ops.cosine_assign(x, c)[0])
    assert labels[3] == 0


def test_identical_for_one_and_two_threads():
    gen = torch.Generator().manual_seed(6)
    x = clustered(9000, 24, 40, 0.4, gen)  # several super-blocks of rows
    c0 = unit_rows(40, 24, gen)
    c1 = F.normalize(c0 + 0.05 * torch.randn(40, 24, generator=gen), dim=1)
    drift = _drift_angles(c0, c1)
    results = []
    for threads in (1, 2):
        labels, lo, up = cold_state(9000, 40, 1)
        zero = torch.zeros(40, dtype=torch.float64)
        pc.ops.pruned_pass(x, c0, labels, lo, up, zero, num_threads=threads)
        out = pc.ops.pruned_pass(x, c1, labels, lo, up, drift, normalize=True,
                                 num_threads=threads)
        results.append((labels, lo, up) + out)
    assert results[0][5][3] > 0, "the second pass should move some rows"
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_generic_simd_path_gives_exact_labels():
    """The portable GEMM tile (no FMA) must also give cosine_assign's labels bit-exactly."""
    code = (
        "import torch, torch.nn.functional as F, pyconcepts as pc\n"
        "from pyconcepts.pruning import _drift_angles\n"
        "assert pc.ops.simd_level() == 'generic'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(1000, 37, generator=g); c = F.normalize(torch.randn(50, 37, generator=g), dim=1)\n"
        "labels = torch.zeros(1000, dtype=torch.int64); lo = torch.full((1000,), 4.0)\n"
        "up = torch.zeros(1000, pc.ops.pruned_pass_groups(50, 1)); drift = torch.zeros(50, dtype=torch.float64)\n"
        "for _ in range(4):\n"
        "    pc.ops.pruned_pass(x, c, labels, lo, up, drift)\n"
        "    assert torch.equal(labels, pc.ops.cosine_assign(x, c)[0])\n"
        "    new = F.normalize(c + 0.02 * torch.randn(50, 37, generator=g), dim=1)\n"
        "    drift = _drift_angles(c, new); c = new\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYCONCEPTS_SIMD="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_registered_with_torch_library():
    x = torch.randn(33, 10)
    c = unit_rows(20, 10)
    labels, lo, up = cold_state(33, 20, 1)
    torch.library.opcheck(
        torch.ops.pyconcepts.pruned_pass.default,
        (x, c, labels, lo, up, torch.zeros(20, dtype=torch.float64), 1,
         pc.ops.pruned_pass_eps(10), False, 1),
        test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(10, 4)
    c = unit_rows(3, 4)
    zero = torch.zeros(3, dtype=torch.float64)

    def call(**kw):
        labels, lo, up = cold_state(10, 3, 1)
        args = dict(x=x, centroids=c, labels=labels, theta_lo=lo, theta_up=up, drift=zero)
        args.update(kw)
        return pc.ops.pruned_pass(**args)

    with pytest.raises(TypeError, match="labels must be torch.int64"):
        call(labels=torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="labels must have shape"):
        call(labels=torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels has values outside"):
        call(labels=torch.full((10,), 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        call(labels=[0] * 10)
    with pytest.raises(TypeError, match="theta_lo must be torch.float32"):
        call(theta_lo=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="theta_up must have shape"):
        call(theta_up=torch.zeros(10, 2))
    with pytest.raises(ValueError, match="theta_up must be contiguous"):
        c40 = unit_rows(40, 4)  # 3 groups
        call(centroids=c40, drift=torch.zeros(40, dtype=torch.float64),
             theta_up=torch.zeros(3, 10).T)
    with pytest.raises(TypeError, match="drift must be float64"):
        call(drift=torch.zeros(3))
    with pytest.raises(ValueError, match="drift must have shape"):
        call(drift=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="drift must hold finite"):
        call(drift=torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="drift must hold finite"):
        call(drift=torch.tensor([0.0, math.nan, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="unit-norm rows to"):
        call(centroids=c * 1.0001)
    with pytest.raises(ValueError, match="centroids has D = 5"):
        call(centroids=unit_rows(3, 5))
    with pytest.raises(ValueError, match="strips_per_group must be a positive int"):
        call(strips_per_group=0)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        call(normalize=1)
    with pytest.raises(TypeError, match="x must be float32"):
        call(x=torch.zeros(10, 4, dtype=torch.int32))
    bad = x.clone()
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or Inf in 1 row"):
        call(x=bad)


@pytest.mark.cuda
def test_cuda_tensors_are_rejected():
    labels, lo, up = cold_state(10, 3, 1)
    with pytest.raises(ValueError, match="CPU tensors only"):
        pc.ops.pruned_pass(torch.randn(10, 4, device="cuda"), unit_rows(3, 4).cuda(), labels,
                           lo, up, torch.zeros(3, dtype=torch.float64))
