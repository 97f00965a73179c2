"""Streaming accumulators and chunk streams."""
import pytest
import torch

import pyconcepts as pc
from pyconcepts.reference import masked_moments as ref_moments
from pyconcepts.stats import (CompensatedSum, KeyedRowSample, StreamingCovariance, StreamingMoments,
                             iter_chunks)


def test_iter_chunks_forms_and_bad_input():
    x = torch.randn(10, 3)
    assert sum(c.shape[0] for c in iter_chunks(x, 4)) == 10
    assert len(list(iter_chunks([x[:4], x[4:]]))) == 2
    assert len(list(iter_chunks(lambda: (c for c in x.split(3))))) == 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    assert sum(c.shape[0] for c in iter_chunks(loader)) == 10
    with pytest.raises(ValueError, match="D = 4"):
        list(iter_chunks([x, torch.randn(2, 4)]))
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        list(iter_chunks([x, "oops"]))
    with pytest.raises(ValueError, match="empty stream"):
        list(iter_chunks([]))
    with pytest.raises(ValueError, match="empty stream"):
        list(iter_chunks(torch.zeros(0, 3)))
    with pytest.raises(TypeError, match="one-shot"):
        list(iter_chunks(c for c in [x]))


def test_covariance_merge_matches_float64_with_large_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=g, dtype=torch.float64) + 1e4
    a = StreamingCovariance(4)
    for c in x.split(777):
        a.update(c)
    b1, b2 = StreamingCovariance(4), StreamingCovariance(4)
    b1.update(x[:1234]); b2.update(x[1234:]); b1.merge(b2)
    ref = torch.cov(x.T, correction=0)
    for s in (a, b1):
        torch.testing.assert_close(s.mean, x.mean(0))
        torch.testing.assert_close(s.covariance, ref, rtol=1e-9, atol=1e-9)
    assert a.all_reduce() is a  # no process group: no-op


def test_streaming_moments_match_reference_and_merge():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 6, generator=g)
    w = torch.randn(3, 6, generator=g)
    b = torch.zeros(3)
    center = x.double().mean(0).float()
    whole = StreamingMoments(w, b, center)
    parts = [StreamingMoments(w, b, center) for _ in range(3)]
    for i, c in enumerate(x.split(1000)):
        whole.update(c)
        parts[i].update(c)
    parts[0].merge(parts[1]).merge(parts[2])
    ref = ref_moments(x, w, b, center=center)
    for m in (whole.moments(), parts[0].moments()):
        assert torch.equal(m.count, ref.count)
        torch.testing.assert_close(m.sum_xz, ref.sum_xz, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(whole.signal_vectors(), parts[0].signal_vectors(), rtol=1e-9, atol=1e-9)


def test_compensated_sum_is_exact_over_a_billion_rows():
    """10^9 rows as 15,259 chunks of 65,536 rows: the accumulated chunk moments must match
    the float64 reference (chunk moments x repeats, computed exactly) to 1e-6 relative."""
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(65536, 4, generator=g) * 3 + 50 for _ in range(4)]
    w = torch.randn(2, 4, generator=g)
    b = w @ torch.full((4,), 50.0)
    center = torch.full((4,), 50.0)
    per_chunk = [pc.ops.masked_moments(c, w, b, center=center) for c in chunks]
    acc = StreamingMoments(w, b, center)
    repeats = 1_000_000_000 // (65536 * 4) + 1  # 3,815 cycles of 4 chunks > 1e9 rows
    for _ in range(repeats):
        for m in per_chunk:
            acc.add_moments(m)
    total = acc.moments()
    assert int(acc.count.sum()) > 0 and repeats * 4 * 65536 >= 1_000_000_000
    # exact reference: integer-free float64 products of per-chunk sums by the repeat count
    for field in ("sum_z", "sum_z2", "sum_x", "sum_xz"):
        expect = sum(getattr(m, field) for m in per_chunk) * repeats
        got = getattr(total, field)
        rel = ((got - expect).abs() / expect.abs().clamp_min(1e-300)).max()
        assert float(rel) < 1e-6, (field, float(rel))
    # signal vectors do not drift with N: equal to those of one cycle
    one = StreamingMoments(w, b, center)
    for m in per_chunk:
        one.add_moments(m)
    torch.testing.assert_close(acc.signal_vectors(), one.signal_vectors(), rtol=1e-6, atol=1e-9)


def test_signal_vectors_analytic_case():
    """x = s a + noise-free offset: the signal vector of a filter with w.s = 1 is s exactly."""
    s = torch.tensor([0.6, 0.8, 0.0])
    a = torch.linspace(0, 5, 5001).repeat_interleave(2)
    sign = torch.tensor([1.0, -1.0]).repeat(5001)  # each a twice, +-1: zero covariance with a
    other = torch.tensor([0.0, 0.0, 1.0])
    x = a[:, None] * s + sign[:, None] * other + 7
    w = s[None, :]  # w.s = 1, w.other = 0
    bias = torch.tensor([float(w[0] @ torch.full((3,), 7.0)) + 2.5])
    got = pc.signal_vectors(x, w, bias)
    torch.testing.assert_close(got[0], s, rtol=1e-5, atol=1e-5)
    got_stream = pc.signal_vectors(list(x.split(999)), w, bias)
    torch.testing.assert_close(got_stream, got, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fewer than two rows"):
        pc.signal_vectors(x, w, torch.tensor([1e6]))


def test_compensated_sum_beats_naive():
    acc = CompensatedSum(torch.zeros(1))
    acc.add(torch.tensor([1e16], dtype=torch.float64))
    for _ in range(1000):
        acc.add(torch.tensor([1.0], dtype=torch.float64))
    assert float(acc.value()[0] - 1e16) == 1000.0


def test_batch_signal_vectors_equal_the_streamed_ones():
    """signal.masked_signal_vectors (one batch, autograd) and pc.signal_vectors (streamed,
    float64 moments) are the same estimator; a concept with < 2 rows is flagged, not NaN."""
    from pyconcepts.signal import masked_signal_vectors

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 12, generator=gen, dtype=torch.float64) + 3
    w = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    z = x @ w.T
    bias = z.quantile(0.7, dim=0)
    bias[3] = z[:, 3].max() - 1e-9  # fires on exactly one row
    rows = x.clone().requires_grad_(True)
    got, ok = masked_signal_vectors(rows, rows @ w.T, (x @ w.T) > bias)
    assert ok.tolist() == [True, True, True, False]
    streamed = pc.signal_vectors(x.float(), w[:3].float(), bias[:3].float())
    torch.testing.assert_close(got[:3].float(), streamed, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()
    got[:3].sum().backward()  # differentiable in the rows
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0


def _offer(sample, chunks):
    return sample.update_stream(chunks).rows()


def test_keyed_row_sample_is_uniform_and_the_same_for_any_chunking():
    x = torch.arange(5000, dtype=torch.float32)[:, None].repeat(1, 3)
    whole = _offer(KeyedRowSample(400, seed=5), [x])
    assert whole.shape == (400, 3)
    rows = whole[:, 0].long()
    assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == 400  # no repeats
    for size in (1, 7, 399, 401, 1234):
        assert torch.equal(_offer(KeyedRowSample(400, seed=5), x.split(size)), whole)
    # merge: the halves drawn apart, then combined, as one stream
    a = KeyedRowSample(400, seed=5)
    a.update(x[:2100], 0)
    b = KeyedRowSample(400, seed=5)
    b.update(x[2100:], 2100)
    assert torch.equal(a.merge(b).rows(), whole)
    # uniform: over 60 seeds every tenth of the rows gets about a tenth of the draws
    hits = torch.zeros(10)
    for seed in range(60):
        drawn = _offer(KeyedRowSample(400, seed=seed), x.split(777))[:, 0].long()
        hits += torch.bincount(drawn // 500, minlength=10)
    expected = 60 * 400 / 10
    assert float((hits - expected).abs().max()) < 5 * expected ** 0.5
    # fewer rows than the size: all of them, in order
    assert torch.equal(_offer(KeyedRowSample(400), x[:30].split(7)), x[:30])


def test_keyed_row_sample_keeps_global_row_order_whatever_the_offer_order():
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 2)
    whole = _offer(KeyedRowSample(100, seed=3), [x])
    a, b = KeyedRowSample(100, seed=3), KeyedRowSample(100, seed=3)
    a.update(x[:500], 0)
    b.update(x[500:], 500)
    assert torch.equal(b.merge(a).rows(), whole)  # the later rows' sample merged the earlier
    backwards = KeyedRowSample(2000, seed=3)  # room for every row: no trimming sorts them
    backwards.update(x[500:], 500)
    backwards.update(x[:500], 0)
    assert torch.equal(backwards.rows(), x)
    rows = backwards.rows()
    rows.zero_()  # a copy: the sample is unchanged
    assert torch.equal(backwards.rows(), x)


def test_keyed_row_sample_copies_rows_a_stream_overwrites():
    buffer = torch.zeros(50, 2)
    sample = KeyedRowSample(1000)
    for i in range(3):  # a loader refilling one buffer for every chunk
        buffer.fill_(float(i))
        sample.update(buffer, 50 * i)
    assert torch.equal(sample.rows()[:, 0], torch.arange(3.0).repeat_interleave(50))
    with pytest.raises(ValueError, match="size"):
        KeyedRowSample(0)
    with pytest.raises(ValueError, match="no rows"):
        KeyedRowSample(5).rows()
