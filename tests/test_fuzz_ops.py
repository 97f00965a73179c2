"""Fuzzing the op boundary: arbitrary shapes, strides, dtypes, magnitudes (1e-40 .. 1e38)
and index values through both ``pyconcepts.ops`` and ``torch.ops.pyconcepts``.

The property: valid input gives the float64 reference's result (pyconcepts/reference.py);
invalid input (non-finite values, values beyond float32, indices out of range, wrong
dtypes, shapes or layouts for the registered ops) raises ValueError or TypeError. A crash,
a hang, a silently wrong answer or an error for valid input fails the test.

Examples are derandomised so CI sees the same ones every run; set
PYCONCEPTS_FUZZ_EXAMPLES to run more (and random) examples locally.
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyconcepts as pc  # noqa: E402
from pyconcepts import reference as ref  # noqa: E402

_EXTRA = int(os.environ.get("PYCONCEPTS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_EXTRA or 40,
    deadline=None,
    derandomize=not _EXTRA,
    database=None,
    suppress_health_check=list(HealthCheck),
)
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F32_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------- strategies
@st.composite
def activations(draw, n_max=24, d_max=40, allow_nonfinite=True):
    """x (N, D) of any dtype the kernels read, magnitude 10^e for e in [-40, 38], in one
    of several layouts, sometimes holding NaN/Inf (or values its dtype cannot hold)."""
    n = draw(st.integers(0, n_max))
    d = draw(st.integers(1, d_max))
    dtype = draw(st.sampled_from(X_DTYPES))
    exponent = draw(st.integers(-40, 38))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen, dtype=torch.float64)
    # per-row spread of two decades, plus some exact zero rows
    base *= 10.0 ** torch.empty(n, 1, dtype=torch.float64).uniform_(-1, 1, generator=gen)
    if n and draw(st.booleans()):
        base[torch.rand(n, generator=gen) < 0.2] = 0
    x = (base * 10.0 ** exponent).to(dtype)
    if allow_nonfinite and n and draw(st.integers(0, 9)) == 0:
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
    layout = draw(st.sampled_from(["contiguous", "row_gap", "column_step", "transposed",
                                   "broadcast"]))
    if layout == "row_gap":  # rows apart in a wider buffer: read in place
        wide = torch.zeros(n, d + 3, dtype=dtype)
        wide[:, :d] = x
        x = wide[:, :d]
    elif layout == "column_step":  # elements of a row not adjacent: pc.ops copies
        wide = torch.zeros(n, 2 * d, dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "broadcast" and n:
        x = x[:1].expand(n, d)
    return x


def unit_centroids(gen, k, d, dtype=torch.float32):
    return F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def finite(t) -> bool:
    return bool(torch.isfinite(t).all())


def f32_finite(t) -> bool:
    return finite(t) and finite(t.to(torch.float32))


def reads_in_place(x) -> bool:
    """The registered ops take x as it is; the layouts they refuse pc.ops copies."""
    return x.shape[0] <= 1 or ((x.stride(1) == 1 or x.shape[1] == 1) and x.stride(0) >= x.shape[1])


def call(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pc.ops.CopyWarning)
        return fn(*args, **kwargs)


def expect(valid: bool, fn, *args, **kwargs):
    """fn's result when the input is valid, None when it (rightly) raised."""
    if valid:
        return call(fn, *args, **kwargs)
    with pytest.raises((ValueError, TypeError)):
        call(fn, *args, **kwargs)
    return None


# -------------------------------------------------------------------- result comparisons
def cos_tol(d):
    # fp32 dot products of D terms (and the row norm) against float64
    return 4 * (d + 16) * 2.0**-24 + 1e-6


def check_assignment(x, c, index, best, second=None, center=None):
    """Labels are the reference's up to near-ties; cosines match within fp32 rounding."""
    xd = x.double() if center is None else x.double() - center.double()
    if xd.shape[0] == 0:
        assert index.shape == (0,) and best.shape == (0,)
        return
    sims = ref.cosine_similarities(xd, c)
    tol = cos_tol(x.shape[1])
    rbest = sims.max(dim=1).values
    assert ((best.double() - rbest).abs() <= tol).all(), "cosine differs from the reference"
    chosen = sims.gather(1, index[:, None]).squeeze(1)
    assert (chosen >= rbest - 2 * tol).all(), "label is not (nearly) the best"
    if second is not None:
        if c.shape[0] == 1:
            assert torch.isneginf(second).all()
        else:
            rsecond = sims.topk(2, dim=1).values[:, 1]
            assert ((second.double() - rsecond).abs() <= 2 * tol).all()


def assert_scaled_close(got, want, scale, rtol, what):
    """|got - want| <= rtol * scale elementwise: relative to the magnitude of the terms
    summed (sums may cancel), so any input magnitude is judged alike."""
    got, want, scale = got.double(), want.double(), scale.double()
    assert torch.isfinite(got).all(), f"{what} is not finite"
    bad = (got - want).abs() > rtol * scale + 1e-300
    assert not bool(bad.any()), f"{what} differs from the reference"


# --------------------------------------------------------------------------- the tests
@FUZZ
@given(x=activations(), data=st.data())
def test_fuzz_cosine_assign(x, data):
    n, d = x.shape
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k = data.draw(st.integers(1, 20))
    c_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    c = unit_centroids(gen, k, d, c_dtype)
    rows = None
    if data.draw(st.booleans()):
        rows = torch.randint(-2, n + 2, (data.draw(st.integers(0, 8)),), generator=gen)
    rows_ok = rows is None or bool(((rows >= 0) & (rows < n)).all())
    center = None
    if data.draw(st.booleans()):
        center = torch.randn(d, dtype=torch.float64, generator=gen) * 10.0 ** data.draw(
            st.integers(-40, 300))
    center_ok = center is None or f32_finite(center)
    # the rows assigned, as the kernel reads them: x - center formed in float32
    picked = (x if rows is None else x[rows]) if rows_ok else None
    read = None
    if rows_ok and center_ok:
        read = picked.float() - center.float() if center is not None else picked
    valid = rows_ok and center_ok and finite(read)
    second_flag = data.draw(st.booleans())
    out = expect(valid, pc.ops.cosine_assign, x, c, return_second=second_flag, rows=rows,
                 center=center, num_threads=data.draw(st.integers(1, 3)))
    if out is not None:
        check_assignment(read, c, out[0], out[1], out[2] if second_flag else None)

    # the registered op: exact dtypes and an in-place layout or an error; non-finite rows
    # are counted in `bad` (pc.ops raises on them)
    if data.draw(st.booleans()) and center is not None and center_ok:
        center = center.float()
    if data.draw(st.booleans()):
        c = c.float()
    structural = rows_ok and center_ok and reads_in_place(x) and c.dtype == torch.float32 \
        and (center is None or center.dtype == torch.float32)
    got = expect(structural, torch.ops.pyconcepts.cosine_assign, x, c, second_flag, False,
                 2, rows, center)
    if got is not None:
        index, best, second, _, bad = got
        assert int(bad[1]) == 0
        if finite(read):
            assert int(bad[0]) == 0
            check_assignment(read, c, index, best, second if second_flag else None)
        else:
            assert int(bad[0]) > 0


@FUZZ
@given(x=activations(), data=st.data())
def test_fuzz_assign_update(x, data):
    n, d = x.shape
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k = data.draw(st.integers(1, 12))
    c = unit_centroids(gen, k, d)
    normalize = data.draw(st.booleans())
    moments = data.draw(st.booleans())
    valid = finite(x)
    out = expect(valid, pc.ops.assign_update, x, c, normalize=normalize,
                 return_moments=moments, num_threads=data.draw(st.integers(1, 3)))
    if out is None:
        return
    index, best, sums, counts = out[:4]
    check_assignment(x, c, index, best)
    rows = x.double()
    if normalize:
        rows = rows / ref._row_norms(rows)
    want, want_counts = ref.spherical_update(rows, index, k)
    assert torch.equal(counts, want_counts)
    scale, _ = ref.spherical_update(rows.abs(), index, k)
    assert_scaled_close(sums, want, scale, 1e-6, "sums")
    if moments:
        z = (rows * c.double()[index]).sum(dim=1)
        want_xz, _ = ref.spherical_update(rows * z[:, None], index, k)
        scale_xz, _ = ref.spherical_update(rows.abs() * z.abs()[:, None] + rows.abs() * rows.norm(dim=1, keepdim=True) * cos_tol(d), index, k)
        assert_scaled_close(out[4], want_xz, scale_xz, 1e-5, "sum_xz")


@FUZZ
@given(x=activations(), data=st.data())
def test_fuzz_spherical_update(x, data):
    n, d = x.shape
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k = data.draw(st.integers(1, 12))
    index = torch.randint(0, k, (n,), generator=gen)
    if n and data.draw(st.integers(0, 4)) == 0:
        index[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([-1, k, 2**40]))
    index_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]))
    index = index.to(index_dtype) if index_dtype == torch.int64 or bool((index.abs() < 2**31).all()) else index
    valid = finite(x) and bool(((index >= 0) & (index < k)).all())
    out = expect(valid, pc.ops.spherical_update, x, index, k,
                 num_threads=data.draw(st.integers(1, 3)))
    if out is not None:
        want, want_counts = ref.spherical_update(x, index, k)
        assert torch.equal(out[1], want_counts)
        scale, _ = ref.spherical_update(x.double().abs(), index, k)
        assert_scaled_close(out[0], want, scale, 1e-7, "sums")
    # registered op: int64 indices and an in-place layout only; bad values are counted
    structural = index.dtype == torch.int64 and reads_in_place(x)
    got = expect(structural, torch.ops.pyconcepts.spherical_update, x, index, k, 2)
    if got is not None:
        in_range = int(((index >= 0) & (index < k)).sum())
        assert int(got[1].sum()) == in_range
        assert int(got[2][1]) == n - in_range
        assert (int(got[2][0]) > 0) == (not finite(x))


@FUZZ
@given(x=activations(n_max=40), data=st.data())
def test_fuzz_masked_moments(x, data):
    n, d = x.shape
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k = data.draw(st.integers(1, 6))
    w = torch.randn(k, d, generator=gen, dtype=torch.float64) * 10.0 ** data.draw(
        st.integers(-30, 30))
    w_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    w = w.to(torch.float32).to(w_dtype)
    center = None
    if data.draw(st.booleans()) and finite(x):
        # a centre of the data's own scale (as a mean would be)
        center = (x.double().mean(0) if n else torch.zeros(d, dtype=torch.float64)).float()
    x64 = x.double()
    z = x64 @ w.double().T if n else torch.zeros(0, k, dtype=torch.float64)
    # thresholds in the widest gap between the rows' z values, so that fp32 rounding of z
    # (relative to |w| |x|) cannot flip a mask
    bias = torch.zeros(k, dtype=torch.float64)
    scale_z = (w.double().norm(dim=1) * (x64.norm(dim=1).max() if n else 0.0)).clamp_min(1e-300)
    for i in range(k):
        if n == 0 or not finite(z[:, i]):
            continue
        vals = torch.sort(z[:, i]).values
        cuts = torch.cat([vals[:1] - scale_z[i], vals, vals[-1:] + scale_z[i]])
        gaps = cuts[1:] - cuts[:-1]
        j = int(gaps.argmax())
        bias[i] = (cuts[j] + cuts[j + 1]) / 2
        hypothesis.assume(float(gaps[j]) > 1e-3 * float(scale_z[i]))
    bias = bias.clamp(-F32_MAX, F32_MAX).float()
    valid = finite(x) and f32_finite(w) and finite(bias)
    out = expect(valid, pc.ops.masked_moments, x, w, bias, center=center,
                 num_threads=data.draw(st.integers(1, 3)))
    if out is None:
        return
    r = ref.masked_moments(x, w.float(), bias, center=center)
    assert torch.equal(out.count, r.count)
    xc = x64 if center is None else x64 - center.double()
    zc = xc @ w.float().double().T
    mask = (z > bias.double()).double()
    tol = cos_tol(d)
    zscale = (w.float().double().norm(dim=1) * xc.norm(dim=1, keepdim=True))  # (N, K)
    assert_scaled_close(out.sum_z, r.sum_z, (mask * zscale).sum(0), tol, "sum_z")
    assert_scaled_close(out.sum_z2, r.sum_z2, (mask * zscale * zscale).sum(0), 2 * tol, "sum_z2")
    assert_scaled_close(out.sum_x, r.sum_x, mask.T @ xc.abs(), 1e-6, "sum_x")
    assert_scaled_close(out.sum_xz, r.sum_xz, (mask * zscale).T @ xc.abs(), 2 * tol, "sum_xz")


@FUZZ
@given(x=activations(), data=st.data())
def test_fuzz_pruned_pass(x, data):
    n, d = x.shape
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k = data.draw(st.integers(1, 40))
    c = unit_centroids(gen, k, d)
    spg = data.draw(st.sampled_from([1, 2, 3, 2**31, 2**60, 2**60 + 1, 2**62]))
    groups = pc.ops.pruned_pass_groups(k, spg)
    labels = torch.randint(0, k, (n,), generator=gen)
    if n and data.draw(st.integers(0, 4)) == 0:
        labels[0] = data.draw(st.sampled_from([-1, k, 2**50]))
    before = labels.clone()
    theta_lo = torch.full((n,), 4.0)  # certify nothing: every row is read
    theta_up = torch.zeros(n, groups)
    drift = torch.zeros(k, dtype=torch.float64)
    normalize = data.draw(st.booleans())
    labels_ok = bool(((labels >= 0) & (labels < k)).all())
    valid = finite(x) and labels_ok
    out = expect(valid, pc.ops.pruned_pass, x, c, labels, theta_lo, theta_up, drift,
                 strips_per_group=spg, normalize=normalize,
                 num_threads=data.draw(st.integers(1, 3)))
    if out is None:
        return
    sum_corr, count_corr, _ = out
    plain_index, plain_best = call(pc.ops.cosine_assign, x, c)
    assert torch.equal(labels, plain_index)  # bit-exact, as documented
    check_assignment(x, c, labels, plain_best)
    rows = x.double()
    if normalize:
        rows = rows / ref._row_norms(rows)
    moved = labels != before
    add, add_c = ref.spherical_update(rows[moved], labels[moved], k)
    sub, sub_c = ref.spherical_update(rows[moved], before[moved], k)
    assert torch.equal(count_corr, add_c - sub_c)
    scale = ref.spherical_update(rows[moved].abs(), labels[moved], k)[0] + \
        ref.spherical_update(rows[moved].abs(), before[moved], k)[0]
    assert_scaled_close(sum_corr, add - sub, scale, 1e-6, "sum_corr")


# ------------------------------------------------ hostile arguments to the registered ops
def _hostile_tensor(data, gen, shape, dtype):
    """A tensor like the one expected, or one with a wrong dtype, rank, length or layout."""
    kind = data.draw(st.sampled_from(["ok", "ok", "dtype", "short", "long", "rank", "strided"]))
    shape = list(shape)
    if kind == "dtype":
        dtype = data.draw(st.sampled_from([torch.float64, torch.float32, torch.int32,
                                           torch.int64, torch.float16, torch.uint8]))
    elif kind in ("short", "long") and shape:
        i = data.draw(st.integers(0, len(shape) - 1))
        step = data.draw(st.integers(1, 3))
        shape[i] = max(0, shape[i] - step) if kind == "short" else shape[i] + step
    elif kind == "rank":
        shape = shape + [1] if data.draw(st.booleans()) else shape[:-1]
    if dtype.is_floating_point:
        t = torch.randn(*shape, generator=gen).to(dtype)
    else:
        t = torch.randint(0, 3, tuple(shape), generator=gen).to(dtype)
    if kind == "strided" and t.dim() >= 1 and t.numel() > 1:
        t = torch.stack([t, t], dim=-1)[..., 0]  # last-dimension stride 2
    return t


@FUZZ
@given(data=st.data())
def test_fuzz_registered_ops_reject_bad_arguments(data):
    """torch.ops.pyconcepts.* with wrong dtypes, lengths, ranks, layouts, thread counts,
    group counts and eps: a ValueError/TypeError (or RuntimeError from torch's own schema
    checks) or a result, never a crash. Results of calls that passed are checked against
    the unchecked, well-formed call."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    n, d, k = data.draw(st.integers(0, 12)), data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
    x = torch.randn(n, d, generator=gen)
    c = unit_centroids(gen, k, d)
    threads = data.draw(st.sampled_from([1, 2, 0, -1, 2**31, 2**62]))
    op = data.draw(st.sampled_from(["cosine_assign", "spherical_update", "masked_moments",
                                    "assign_update", "pruned_pass"]))
    errors = (ValueError, TypeError, RuntimeError)
    try:
        if op == "cosine_assign":
            rows = _hostile_tensor(data, gen, [data.draw(st.integers(0, 5))], torch.int64) \
                if data.draw(st.booleans()) else None
            if rows is not None and rows.dtype == torch.int64 and rows.numel():
                rows = rows * data.draw(st.sampled_from([1, 10**12, -1]))
            center = _hostile_tensor(data, gen, [d], torch.float32) if data.draw(st.booleans()) else None
            torch.ops.pyconcepts.cosine_assign(
                _hostile_tensor(data, gen, [n, d], torch.float32),
                _hostile_tensor(data, gen, [k, d], torch.float32), True, True, threads, rows,
                center)
        elif op == "spherical_update":
            idx = _hostile_tensor(data, gen, [n], torch.int64)
            torch.ops.pyconcepts.spherical_update(
                _hostile_tensor(data, gen, [n, d], torch.float32), idx,
                data.draw(st.sampled_from([k, 0, -1, 2**31])), threads)
        elif op == "masked_moments":
            torch.ops.pyconcepts.masked_moments(
                _hostile_tensor(data, gen, [n, d], torch.float32),
                _hostile_tensor(data, gen, [k, d], torch.float32),
                _hostile_tensor(data, gen, [k], torch.float32),
                _hostile_tensor(data, gen, [d], torch.float32) if data.draw(st.booleans()) else None,
                threads)
        elif op == "assign_update":
            torch.ops.pyconcepts.assign_update(
                _hostile_tensor(data, gen, [n, d], torch.float32),
                _hostile_tensor(data, gen, [k, d], torch.float32), True, True, threads,
                data.draw(st.booleans()),
                _hostile_tensor(data, gen, [d], torch.float32) if data.draw(st.booleans()) else None,
                data.draw(st.booleans()))
        else:
            spg = data.draw(st.sampled_from([1, 2, 0, -5, 2**60, 2**60 + 1, 2**63 - 1]))
            groups = pc.ops.pruned_pass_groups(k, max(spg, 1))
            labels = _hostile_tensor(data, gen, [n], torch.int64)
            if labels.dtype == torch.int64 and labels.numel():
                labels = labels * data.draw(st.sampled_from([1, 10**12, -1]))
            drift = _hostile_tensor(data, gen, [k], torch.float64).abs() \
                if data.draw(st.booleans()) else torch.zeros(k, dtype=torch.float64)
            eps = data.draw(st.sampled_from([pc.ops.pruned_pass_eps(d), 1e-9, 0.0, -1.0, 0.7,
                                             math.nan]))
            torch.ops.pyconcepts.pruned_pass(
                _hostile_tensor(data, gen, [n, d], torch.float32),
                _hostile_tensor(data, gen, [k, d], torch.float32), labels,
                _hostile_tensor(data, gen, [n], torch.float32),
                _hostile_tensor(data, gen, [n, groups], torch.float32), drift, spg, eps,
                data.draw(st.booleans()), threads)
    except errors:
        pass


def test_fuzz_torch_compile_reaches_the_checks():
    """torch.compile calls the registered op: its checks hold there too."""
    x = torch.randn(50, 8)
    c = F.normalize(torch.randn(4, 8), dim=1)

    def f(a, b, rows):
        return torch.ops.pyconcepts.cosine_assign(a, b, False, False, 2, rows, None)[0]

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, c, torch.tensor([3, 1])), pc.ops.cosine_assign(x, c)[0][[3, 1]])
    with pytest.raises(ValueError, match="rows has values outside"):
        compiled(x, c, torch.tensor([10**12]))
