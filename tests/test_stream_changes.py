"""A chunk stream must yield the same rows on every pass: DirectionalClustering reads it once
for its statistics and once per Lloyd pass, and raises, naming the pass, when a later pass
yields another number of rows or another D (plain, pruned and adaptive passes)."""
import pytest
import torch

import pyconcepts as pc


def _data(n=3000, d=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    lab = torch.randint(0, k, (n,), generator=g)
    return dirs[lab] * (2 + torch.rand(n, 1, generator=g)) + 0.3 * torch.randn(n, d, generator=g)


class ChangingStream:
    """A stream factory whose read number ``at`` (1 = the statistics pass) yields
    ``changed`` instead of ``x``, in chunks of ``chunk`` rows (``changed_chunk`` then)."""

    def __init__(self, x, changed, at, chunk=500, changed_chunk=None):
        self.x, self.changed, self.at = x, changed, at
        self.chunk, self.changed_chunk = chunk, changed_chunk or chunk
        self.reads = 0

    def __call__(self):
        self.reads += 1
        if self.reads == self.at:
            return iter(self.changed.split(self.changed_chunk))
        return iter(self.x.split(self.chunk))


def _fit(stream, **options):
    kwargs = dict(n_concepts=4, seed=0, max_iter=8, tol=0.0)
    return pc.DirectionalClustering(**{**kwargs, **options}).fit(stream)


@pytest.mark.parametrize("pruning", [False, True, "auto"])
@pytest.mark.parametrize("center", [False, True])
def test_fewer_rows_on_a_later_pass_raise_naming_the_pass(pruning, center):
    x = _data()
    # read 2 = Lloyd pass 1 (plain, or the full pass that builds the pruning bounds)
    with pytest.raises(ValueError, match="Lloyd pass 1 read 2990 rows of x, but the "
                                         "statistics pass read 3000"):
        _fit(ChangingStream(x, x[:-10], at=2), pruning=pruning, center=center)
    # a later pass (pruned, for pruning=True and often for "auto": the bounds then see a
    # short chunk before the pass ends)
    assert _fit(x, pruning=pruning, center=center).n_iter_ >= 3
    with pytest.raises(ValueError, match="Lloyd pass 3( read 2990 rows|: the chunks changed)"):
        _fit(ChangingStream(x, x[:-10], at=4), pruning=pruning, center=center)


@pytest.mark.parametrize("pruning", [False, True])
def test_more_rows_raise_before_the_pass_ends(pruning):
    x = _data()
    stream = ChangingStream(x, torch.cat([x, x]), at=3)
    with pytest.raises(ValueError, match="Lloyd pass 2 read more than 3000 rows"):
        _fit(stream, pruning=pruning)
    assert stream.reads == 3  # raised in the pass that changed


def test_another_width_or_no_rows_raise_naming_the_pass():
    x = _data()
    wider = torch.cat([x, x[:, :1]], dim=1)
    with pytest.raises(ValueError, match="Lloyd pass 2: chunk 0 of x has D = 9, expected D = 8"):
        _fit(ChangingStream(x, wider, at=3), pruning=False)
    with pytest.raises(ValueError, match="Lloyd pass 1: chunk 0 of x has D = 9"):
        _fit(ChangingStream(x, wider, at=2), pruning=True)
    with pytest.raises(ValueError, match="Lloyd pass 1: x is an empty stream"):
        _fit(ChangingStream(x, x[:0], at=2))


def test_the_same_rows_chunked_differently_are_fine_except_for_pruned_passes():
    x = _data()
    plain = _fit(x, pruning=False)
    rechunked = _fit(ChangingStream(x, x, at=3, changed_chunk=700), pruning=False)
    torch.testing.assert_close(rechunked.centroids_, plain.centroids_, rtol=0, atol=1e-6)
    assert rechunked.n_samples_ == 3000
    with pytest.raises(ValueError, match="Lloyd pass 3: the chunks changed between passes"):
        _fit(ChangingStream(x, x, at=4, changed_chunk=700), pruning=True)


def test_signal_moments_and_restarts_check_their_passes_too():
    x = _data()
    with pytest.raises(ValueError, match="Lloyd pass 3 read 2999 rows"):
        _fit(ChangingStream(x, x[1:], at=4), signal=True)
    # two restarts on all rows: the second restart's passes are checked as well (the
    # first restart is the single fit: the same seeds, the same passes)
    first = _fit(x, pruning=False).n_iter_
    stream = ChangingStream(x, x[1:], at=1 + first + 1)
    with pytest.raises(ValueError, match="Lloyd pass 1 read 2999 rows"):
        _fit(stream, n_init=2, pruning=False)



class _ShrinksAfter:
    """Yields x in chunks for the first ``full`` reads, then 100 rows fewer."""

    def __init__(self, x, full):
        self.x, self.full, self.reads = x, full, 0

    def __iter__(self):
        self.reads += 1
        rows = self.x if self.reads <= self.full else self.x[:-100]
        return iter(rows.split(1000))


def test_extract_directions_checks_every_pass():
    from pyconcepts.directions import extract_directions

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=g) + 4 * torch.eye(6)[torch.randint(0, 3, (3000,), generator=g)]
    clean = _ShrinksAfter(x, 10 ** 9)
    extract_directions(clean, 3, n_init=2, max_iter=5, decoder="discriminant")
    # read 1 (the decoder sample) is the reference the statistics pass is not checked against;
    # every later pass is checked, the last one (signal moments, absent levels) too
    for full in range(2, clean.reads):
        with pytest.raises(ValueError, match="read 2900 rows|2900|changed"):
            extract_directions(_ShrinksAfter(x, full), 3, n_init=2, max_iter=5, decoder="discriminant")
