"""Streaming statistics: chunk streams, mean/covariance and signal-vector moments.

Every accumulator here has ``update`` (one chunk), ``merge`` (another accumulator, e.g. from a
worker) and ``all_reduce`` (sum over a ``torch.distributed`` process group when one is
initialised, otherwise a no-op). State is float64 sums with compensated (Kahan-Neumaier)
addition of the per-chunk sums, so the totals do not drift with the number of chunks: over
10^9 rows they match a float64 reference to far better than 1e-6 relative error.

``iter_chunks`` turns what users pass as "activations" into a validated stream of (n, D)
tensors: a tensor (split into row chunks), a list/tuple of tensors, a generator *factory*
(a callable returning a fresh iterator), a DataLoader or any other re-iterable.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from . import ops

__all__ = [
    "iter_chunks",
    "CompensatedSum",
    "StreamingCovariance",
    "StreamingMoments",
    "KeyedRowSample",
    "RankFailed",
    "fail_together",
    "shard_offset",
    "signal_from_moments",
    "DEFAULT_CHUNK_SIZE",
]

DEFAULT_CHUNK_SIZE = 65536

Activations = Union[torch.Tensor, Iterable[torch.Tensor], Callable[[], Iterator[torch.Tensor]]]


# ----------------------------------------------------------------------------- chunk streams
def _chunk_source(x: Activations, chunk_size: int) -> Iterator:
    if isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D (N, D), got shape {tuple(x.shape)}")
        return iter(x.split(chunk_size)) if x.shape[0] else iter([x])
    if callable(x) and not hasattr(x, "__iter__"):
        it = x()
        if not hasattr(it, "__next__"):
            it = iter(it)
        return it
    if not hasattr(x, "__iter__"):
        raise TypeError(
            "x must be a tensor (N, D), a re-iterable of (n, D) tensors or a callable "
            f"returning an iterator of them; got {type(x).__name__}"
        )
    it = iter(x)
    if it is x:
        raise TypeError(
            "x is a one-shot iterator (e.g. a generator); the algorithms read the stream "
            "several times, so pass a list, a DataLoader or a function returning a new generator"
        )
    return it


def iter_chunks(
    x: Activations, chunk_size: int = DEFAULT_CHUNK_SIZE, *, dim: Optional[int] = None
) -> Iterator[torch.Tensor]:
    """Yield validated (n, D) floating-point chunks of ``x``; empty chunks are skipped.

    Raises ``TypeError`` for non-tensor items and ``ValueError`` for chunks whose D differs
    from the first chunk's (or from ``dim``), for non-2-D chunks and for an empty stream.
    Non-finite values are caught by the native ops that read the chunks.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    seen_rows = False
    for position, item in enumerate(_chunk_source(x, chunk_size)):
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]  # DataLoader over a TensorDataset yields [tensor]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"chunk {position} of x is a {type(item).__name__}, not a torch.Tensor")
        if item.dim() != 2:
            raise ValueError(f"chunk {position} of x must be 2-D (n, D), got shape {tuple(item.shape)}")
        if not item.is_floating_point():
            raise TypeError(f"chunk {position} of x must be floating point, got {item.dtype}")
        if dim is None:
            dim = item.shape[1]
        elif item.shape[1] != dim:
            raise ValueError(f"chunk {position} of x has D = {item.shape[1]}, expected D = {dim}")
        if item.shape[0] == 0:
            continue
        if item.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            item = item.float()  # the kernels read fp32/fp16/bf16
        seen_rows = True
        yield item
    if not seen_rows:
        raise ValueError("x is an empty stream: it yielded no rows")


# ----------------------------------------------------------------------------- accumulators
class CompensatedSum:
    """A float64 tensor total with Neumaier compensation of the rounding of each addition."""

    def __init__(self, like: torch.Tensor):
        self.total = torch.zeros_like(like, dtype=torch.float64)
        self.compensation = torch.zeros_like(self.total)

    def add(self, value: torch.Tensor) -> None:
        value = value.to(torch.float64)
        t = self.total + value
        big = self.total.abs() >= value.abs()
        self.compensation += torch.where(big, (self.total - t) + value, (value - t) + self.total)
        self.total = t

    def value(self) -> torch.Tensor:
        return self.total + self.compensation

    def merge(self, other: "CompensatedSum") -> None:
        self.add(other.total)
        self.compensation += other.compensation


_LOCAL_ONLY = threading.local()


def distributed() -> bool:
    """True under an initialised torch.distributed process group, outside ``local_only``."""
    if getattr(_LOCAL_ONLY, "depth", 0):
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextmanager
def local_only():
    """Within the block this thread's statistics and clustering ignore the process group: for
    work every rank does on the same data (e.g. restarts on a sample all ranks hold), which
    must not be summed over ranks as if each held a shard."""
    _LOCAL_ONLY.depth = getattr(_LOCAL_ONLY, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL_ONLY.depth -= 1


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor in place over the process group (no-op without torch.distributed)."""
    if not distributed():
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def shard_offset(local_rows: int) -> int:
    """Global number of this rank's first row: the rows held by lower ranks (0 without
    torch.distributed). Every rank must call it."""
    if not distributed():
        return 0
    import torch.distributed as dist

    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([int(local_rows)], dtype=torch.int64))
    return int(sum(c.item() for c in counts[: dist.get_rank()]))


class RankFailed(RuntimeError):
    """Raised on the ranks that did not fail themselves when another rank failed."""


@contextmanager
def fail_together(where: str):
    """Run a rank's local work so that, under torch.distributed, all ranks raise if any does.

    A rank that raised alone (an empty shard, a NaN row found by its kernels, a read error)
    would leave the others waiting in the next collective until the process group's timeout.
    On leaving the block every rank takes part in one tiny all-reduce of "did I fail": the
    failing rank re-raises its own error, every other rank raises ``RankFailed``. Without
    torch.distributed an error simply propagates. Interrupts are not caught."""
    try:
        yield
    except Exception as exc:
        _agree_on_failure(exc, where)
        raise
    _agree_on_failure(None, where)


def _agree_on_failure(error: Optional[Exception], where: str) -> None:
    if not distributed():
        return
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    failed = int(flag.item())
    if error is None and failed:
        raise RankFailed(f"{failed} other rank(s) failed during {where}; see their errors")


class StreamingCovariance:
    """Count, mean and covariance of a stream of rows, merged by Chan's formulas.

    Each chunk contributes its own mean and centred scatter (computed in float64), so no
    cancellation occurs however large the offset of the data.
    """

    def __init__(self, dim: int, device: Union[str, torch.device] = "cpu", *,
                 with_covariance: bool = True):
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        # Without covariance only count and mean are kept: the D x D scatter costs a
        # float64 GEMM per chunk, as much as a Lloyd pass with K = D.
        self.with_covariance = with_covariance
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> "StreamingCovariance":
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (n, {self.dim}), got shape {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return self
        x64 = x.to(device=self.mean.device, dtype=torch.float64)
        if not bool(torch.isfinite(x64).all()):
            raise ValueError("x contains NaN or Inf")
        mean = x64.mean(0)
        if self.with_covariance:
            xc = x64 - mean
            self._combine(n, mean, xc.T @ xc)
        else:
            self._combine(n, mean, None)
        return self

    def _combine(self, n: int, mean: torch.Tensor, scatter: Optional[torch.Tensor]) -> None:
        total = self.count + n
        delta = mean - self.mean
        if scatter is not None:
            self.scatter += scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge D = {other.dim} into D = {self.dim}")
        if other.count:
            self._combine(other.count, other.mean.to(self.mean.device), other.scatter.to(self.mean.device))
        return self

    def all_reduce(self) -> "StreamingCovariance":
        """Combine over the process group: reduce raw sums about the local mean's consensus."""
        import torch.distributed as dist

        if not distributed():
            return self
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean.device)
        weighted = self.mean * self.count
        all_reduce_sum_(count, weighted)
        n = float(count.item())
        if n == 0:
            return self
        global_mean = weighted / n
        if self.with_covariance:
            delta = self.mean - global_mean
            self.scatter = self.scatter + torch.outer(delta, delta) * self.count
            all_reduce_sum_(self.scatter)
        self.count, self.mean = int(round(n)), global_mean
        return self

    @property
    def covariance(self) -> torch.Tensor:
        if not self.with_covariance:
            raise ValueError("this accumulator was created with with_covariance=False")
        if self.count < 2:
            raise ValueError("covariance needs at least two rows")
        return self.scatter / self.count


def signal_from_moments(count, sum_x, sum_z, sum_z2, sum_xz) -> torch.Tensor:
    """(K, D) float64 signal vectors s_i = Cov[x, z_i] / Var[z_i] from per-concept sums over
    the rows of concept i: counts (K,), sum x (K, D), sum z (K,), sum z^2 (K,), sum x z (K, D).
    NaN rows where there are fewer than two rows or z has no variance."""
    n = count.to(torch.float64)
    safe = n.clamp_min(1)
    mean_z = sum_z.to(torch.float64) / safe
    mean_x = sum_x.to(torch.float64) / safe[:, None]
    var_z = sum_z2.to(torch.float64) / safe - mean_z**2
    cov_xz = sum_xz.to(torch.float64) / safe[:, None] - mean_x * mean_z[:, None]
    ok = (n >= 2) & (var_z > 0)
    out = cov_xz / torch.where(ok, var_z, torch.ones_like(var_z))[:, None]
    out[~ok] = float("nan")
    return out


class StreamingMoments:
    """Accumulates ``ops.masked_moments`` over a stream: the signal-vector statistics.

    ``center`` (D,) should be close to the data mean (e.g. from ``StreamingCovariance``): the
    moments are of x - center, which keeps Cov = E[xz] - E[x]E[z] free of cancellation.
    """

    def __init__(
        self,
        decoding: torch.Tensor,
        bias: torch.Tensor,
        center: Optional[torch.Tensor] = None,
    ):
        if not isinstance(decoding, torch.Tensor) or decoding.dim() != 2:
            raise ValueError("decoding must be a (K, D) tensor")
        k, d = decoding.shape
        self.decoding = decoding.detach().to(torch.float32).contiguous()
        self.bias = bias.detach().to(device=decoding.device, dtype=torch.float32).contiguous()
        self.center = (
            None if center is None
            else center.detach().to(device=decoding.device, dtype=torch.float32).contiguous()
        )
        f64 = torch.zeros(k, d, dtype=torch.float64, device=decoding.device)
        self.count = torch.zeros(k, dtype=torch.int64, device=decoding.device)
        self._sum_z = CompensatedSum(f64[:, 0])
        self._sum_z2 = CompensatedSum(f64[:, 0])
        self._sum_x = CompensatedSum(f64)
        self._sum_xz = CompensatedSum(f64)

    def update(self, x: torch.Tensor) -> "StreamingMoments":
        """Add one chunk (n, D) of raw activations."""
        moments = ops.masked_moments(x, self.decoding.to(x.device), self.bias.to(x.device),
                                     center=None if self.center is None else self.center.to(x.device))
        return self.add_moments(moments)

    def add_moments(self, moments: ops.Moments) -> "StreamingMoments":
        """Add precomputed per-chunk moments (the output of ``ops.masked_moments``)."""
        device = self.count.device
        self.count += moments.count.to(device)
        self._sum_z.add(moments.sum_z.to(device))
        self._sum_z2.add(moments.sum_z2.to(device))
        self._sum_x.add(moments.sum_x.to(device))
        self._sum_xz.add(moments.sum_xz.to(device))
        return self

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        if other.decoding.shape != self.decoding.shape:
            raise ValueError("cannot merge moments of a different (K, D)")
        self.count += other.count.to(self.count.device)
        for mine, theirs in zip(self._sums(), other._sums()):
            mine.merge(theirs)
        return self

    def all_reduce(self) -> "StreamingMoments":
        """Sum the statistics over the process group (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not distributed():
            return self
        tensors = [self.count]
        for s in self._sums():
            s.total = s.value()
            s.compensation.zero_()
            tensors.append(s.total)
        all_reduce_sum_(*tensors)
        return self

    def _sums(self):
        return (self._sum_z, self._sum_z2, self._sum_x, self._sum_xz)

    def moments(self) -> ops.Moments:
        return ops.Moments(
            self.count.clone(), self._sum_z.value(), self._sum_z2.value(),
            self._sum_x.value(), self._sum_xz.value(),
        )

    def signal_vectors(self) -> torch.Tensor:
        """(K, D) float64 s_i = Cov_{P_i}[x, z_i] / Var_{P_i}[z_i] (METHOD.md section 3).

        A concept with fewer than two detected rows or zero variance of z gives a NaN row;
        callers decide what to do with it.
        """
        return signal_from_moments(self.count, self._sum_x.value(), self._sum_z.value(),
                                   self._sum_z2.value(), self._sum_xz.value())


# ----------------------------------------------------------------------------- row sampling
_MASK64 = (1 << 64) - 1


def _as_int64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN, _MIX1, _MIX2 = (_as_int64(0x9E3779B97F4A7C15), _as_int64(0xBF58476D1CE4E5B9),
                         _as_int64(0x94D049BB133111EB))


def _xor_shift_right_(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z ^= z >>> bits (a logical shift of the int64 bits; torch's >> is arithmetic)."""
    return z.bitwise_xor_(torch.bitwise_right_shift(z, bits).bitwise_and_((1 << (64 - bits)) - 1))


def _row_keys(seed: int, start: int, n: int) -> torch.Tensor:
    """Uniform float64 keys in [0, 1) of global rows start .. start + n - 1: a SplitMix64 hash
    of (seed, row number), so a row's key depends on its global number only, not on how the
    rows are chunked or sharded over ranks. (Not torch generators seeded per block: a CPU
    generator keeps only the low 32 bits of its seed, which made every seed draw alike.)"""
    z = torch.arange(start, start + n, dtype=torch.int64)
    z.mul_(_GOLDEN).add_(_as_int64(seed * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019))
    _xor_shift_right_(z, 30).mul_(_MIX1)
    _xor_shift_right_(z, 27).mul_(_MIX2)
    _xor_shift_right_(z, 31)
    return torch.bitwise_right_shift(z, 11).bitwise_and_((1 << 53) - 1).to(torch.float64).mul_(2.0 ** -53)


class KeyedRowSample:
    """Up to ``size`` rows drawn uniformly without replacement from a stream, in the same read
    as any other statistic (float32, on the CPU).

    Every row gets a random key from its global row number (``start`` passed to ``update``
    plus its position in the chunk) and the ``size`` largest keys win, so the sample is the
    same for any chunking; after ``all_reduce`` every rank holds the sample a single process
    would draw from all ranks' rows, given each rank's ``start`` counts the rows of the ranks
    before it. Only the rows of a chunk that can still win are copied to the host.
    """

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.seed = int(size), int(seed)
        self._rows: Optional[torch.Tensor] = None
        self._keys = torch.zeros(0, dtype=torch.float64)
        self._index = torch.zeros(0, dtype=torch.int64)  # global row numbers of the kept rows
        self._reduced = False

    def update(self, chunk: torch.Tensor, start: int) -> "KeyedRowSample":
        """Offer the rows of ``chunk`` (n, D), global row numbers start .. start + n - 1."""
        n = chunk.shape[0]
        if n == 0:
            return self
        keys = _row_keys(self.seed, start, n)
        index = torch.arange(start, start + n)
        keep = None
        if n > self.size:  # only rows among the chunk's `size` largest keys (ties kept)
            keep = keys >= torch.topk(keys, self.size).values[-1]
        if self._keys.numel() >= self.size:  # and only rows that beat a kept one (ties kept)
            beats = keys >= self._keys.min()
            keep = beats if keep is None else keep & beats
        if keep is None:
            # no copy needed here: _add copies the rows into its own buffer (a stream may
            # refill this chunk's memory for its next chunk)
            rows = chunk.to(device="cpu", dtype=torch.float32)
        else:
            sel = torch.nonzero(keep).flatten()
            if sel.numel() == 0:
                return self
            keys, index = keys[sel], index[sel]
            rows = chunk.index_select(0, sel.to(chunk.device)).to(device="cpu",
                                                                   dtype=torch.float32)
        self._add(rows, keys, index)
        return self

    def update_stream(self, chunks, start: int = 0) -> "KeyedRowSample":
        """Offer every chunk of ``chunks`` in turn, the first row being global row ``start``."""
        for chunk in chunks:
            self.update(chunk, start)
            start += chunk.shape[0]
        return self

    def merge(self, other: "KeyedRowSample") -> "KeyedRowSample":
        """Add another sample's rows (drawn with the same seed and size, disjoint rows)."""
        if other._rows is not None:
            self._add(other._rows[: other._keys.numel()], other._keys, other._index)
        return self

    def _add(self, rows, keys, index) -> None:
        """Keep the `size` largest keys of the kept and the new rows. The kept rows live in
        one buffer of at most `size` rows, in no particular order (``rows`` sorts them); new
        winners overwrite the losers' slots, so no second copy of the sample is ever held."""
        n_old, n_new = self._keys.numel(), keys.numel()
        total = n_old + n_new
        if total <= self.size:  # room for every row: append
            self._reserve(total, rows.shape[1])
            self._rows[n_old:total] = rows
            self._keys = torch.cat([self._keys, keys])
            self._index = torch.cat([self._index, index])
            return
        winners = torch.topk(torch.cat([self._keys, keys]), self.size).indices
        taken = winners[winners >= n_old] - n_old  # the new rows that win a slot
        kept_old = torch.zeros(n_old, dtype=torch.bool)
        kept_old[winners[winners < n_old]] = True
        # the losers' slots, then the empty ones: exactly as many as new winners
        free = torch.cat([torch.nonzero(~kept_old).flatten(), torch.arange(n_old, self.size)])
        self._reserve(self.size, rows.shape[1])
        self._rows[free] = rows[taken]
        self._keys = torch.cat([self._keys, self._keys.new_zeros(self.size - n_old)])
        self._index = torch.cat([self._index, self._index.new_zeros(self.size - n_old)])
        self._keys[free], self._index[free] = keys[taken], index[taken]

    def _reserve(self, n: int, d: int) -> None:
        """A buffer of at least n rows (grown by doubling, never beyond `size`)."""
        have = 0 if self._rows is None else self._rows.shape[0]
        if n <= have:
            return
        grown = torch.empty(min(self.size, max(n, 2 * have)), d, dtype=torch.float32)
        if have:
            grown[:have] = self._rows
        self._rows = grown

    def all_reduce(self) -> "KeyedRowSample":
        """Every rank ends with the global sample (no-op without torch.distributed, and after
        the first call); every rank must have offered at least one row."""
        if not distributed() or self._reduced:
            return self
        import torch.distributed as dist

        with fail_together("a row sample"):
            if self._rows is None:
                raise ValueError("every rank must hold at least one row")
        size, world = self.size, dist.get_world_size()
        # the global winners: every rank's own top keys, tagged with their global row numbers
        padded = torch.full((size,), -1.0, dtype=torch.float64)  # keys in [0, 1): -1 is no row
        padded[: self._keys.shape[0]] = self._keys
        gathered = [torch.empty(size, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, padded)
        every = torch.cat(gathered)
        top = torch.topk(every, min(size, int((every >= 0).sum()))).indices
        owner, position = top // size, top % size
        # rows in global row order, as the single process keeps them
        padded_index = torch.full((size,), -1, dtype=torch.int64)
        padded_index[: self._index.shape[0]] = self._index
        gathered_index = [torch.empty(size, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(gathered_index, padded_index)
        order = torch.cat(gathered_index)[top].argsort()
        owner, position = owner[order], position[order]
        out = torch.zeros(top.shape[0], self._rows.shape[1])
        mine = owner == dist.get_rank()
        out[mine] = self._rows[position[mine]]
        all_reduce_sum_(out)  # each row filled by its owner only
        self._rows = out
        self._keys = every[top][order]
        self._index = torch.cat(gathered_index)[top][order]
        self._reduced = True
        return self

    def rows(self) -> torch.Tensor:
        """The sampled rows (m, D) float32 on the CPU, in global row order (m <= size); a
        new tensor, so the caller may change it."""
        if self._rows is None:
            raise ValueError("no rows were offered to the sample")
        return self._rows[: self._keys.numel()][self._index.argsort()]
