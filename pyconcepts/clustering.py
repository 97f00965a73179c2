"""Directional clustering: spherical k-means over patch activations (METHOD.md section 2).

Every row is assigned to the unit centroid of largest cosine, each centroid becomes the
normalised sum of its members, repeat. It runs over a tensor or over a stream of chunks with
the native kernels (``ops.assign_update`` per chunk: one read of the data per Lloyd pass);
memory is bounded by the chunk size and K x D, never by N.

The objective is sum_p x_p . c_{l(p)} (= sum_p ||x_p|| cos): assignment and update each
increase it, so Lloyd iterations are monotone and stop when it improves by less than
``tol`` relative.
"""
from __future__ import annotations

import inspect
import math
import numbers
import os
import warnings
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from . import ops
from .stats import (DEFAULT_CHUNK_SIZE, KeyedRowSample, StreamingCovariance, all_reduce_sum_,
                    distributed, fail_together, iter_chunks, shard_offset,
                    signal_from_moments)

__all__ = ["DirectionalClustering", "NotFittedError", "whitening_matrix", "VMFMixture", "vmf_mixture_polish"]

# pruning="auto": pruned passes start once at most this share of the watched rows (every
# _WATCH_STRIDE-th row of every chunk) changed cluster in a pass. Measured (when the first
# chunk's rows were watched) on 300k x 256, K = 256, 10 passes, 2 threads (median of 2): a
# well separated mixture (benchmarks.kmeans --noise 0.3) takes 2.89 / 2.79 / 2.75 s at
# 0.05 / 0.1 / 0.2 (its pruned passes skip ~65% of the cosines); a heavily overlapping one
# (noise 1.0, 9-37% of the points move per pass) stays on plain passes at 0.05 and 0.1
# (3.65 / 3.56 s) but switches too early at 0.2 and loses (3.85 s).
_PRUNE_BELOW_MOVED = 0.1
_WATCH_STRIDE = 16
# ... and stop again after a pruned pass that computed more than this share of the cosines
# (real demo-CNN activations, D = K = 64: few points move, yet the pruned passes compute
# ~70% of the cosines and cost more than plain ones; at D = K = 256 on the separated mixture
# they compute 30-40% and take half the time).
_STOP_ABOVE_COMPUTED = 0.5
# A whitened fit whose rows (on this process) fit in this many bytes whitens them once, not
# once per Lloyd pass (a D x D GEMM per row per pass: ~1 s of a ResNet-18 layer3 extraction).
_WHITENED_COPY_BYTES = 256 << 20


def whitening_matrix(covariance: torch.Tensor, shrinkage: float = 1e-3) -> torch.Tensor:
    """Symmetric (ZCA) whitening (Sigma + shrinkage * mean(eig) I)^(-1/2), float64.

    The shrinkage keeps directions of (near) zero variance from being blown up: they stay
    (near) zero instead of turning noise into unit variance.
    """
    eigenvalues, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    eigenvalues = eigenvalues.clamp_min(0)
    floor = shrinkage * float(eigenvalues.mean().clamp_min(1e-300))
    return (vectors * (eigenvalues + floor).rsqrt()) @ vectors.T


class _NotFittedError(ValueError, AttributeError):
    """Raised by a method that needs a fitted model, before ``fit``. Without scikit-learn
    this class is ``pyconcepts.clustering.NotFittedError``; with it, scikit-learn's own
    ``sklearn.exceptions.NotFittedError`` (the same two bases) is used instead."""


_NotFittedError.__name__ = _NotFittedError.__qualname__ = "NotFittedError"
_not_fitted_error = None


def _not_fitted_error_type() -> type:
    """scikit-learn's NotFittedError when it is importable, else ours. Resolved on first
    use: importing scikit-learn takes about a second, so ``import pyconcepts`` does not."""
    global _not_fitted_error
    if _not_fitted_error is None:
        try:
            from sklearn.exceptions import NotFittedError
        except ImportError:
            NotFittedError = _NotFittedError
        _not_fitted_error = NotFittedError
    return _not_fitted_error


def __getattr__(name: str):
    if name == "NotFittedError":
        return _not_fitted_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_bool(value, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_real(value, name: str, *, finite: bool = True) -> None:
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
            or not value >= 0 or (finite and not math.isfinite(value))):
        kind = "a finite number >= 0" if finite else "a number >= 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _is_sparse(x) -> bool:
    return type(x).__module__.startswith("scipy.sparse")


def _is_array_like(x) -> bool:
    """numpy arrays and what converts to one (pandas frames, lists of rows), as opposed to
    a tensor or a stream of chunks (tensors, or DataLoader batches holding tensors)."""
    if isinstance(x, torch.Tensor):
        return False
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return True
    if isinstance(x, (list, tuple)) and len(x):
        first = x[0]
        if isinstance(first, (list, tuple)) and len(first):
            first = first[0]
        return not isinstance(first, torch.Tensor)
    return False


def _as_input(x) -> Tuple[object, bool]:
    """(x for the algorithms, whether results go back as numpy).

    Tensors and chunk streams pass through. A numpy array (or array-like: a list of rows, a
    pandas frame) becomes a CPU tensor sharing its memory when its dtype allows (float64
    rows are converted to float32 chunk by chunk, as for tensors); integer and boolean
    arrays are converted to float32, object arrays of numbers to float64; an array whose
    rows are not contiguous (Fortran order, a strided view) is copied once."""
    if _is_sparse(x):
        raise TypeError("x is a scipy sparse matrix; DirectionalClustering needs dense data "
                        "(x.toarray(), if it fits in memory)")
    if not _is_array_like(x):
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == 0:
            raise ValueError(f"x has 0 feature(s) (shape={tuple(x.shape)}) while a minimum "
                             "of 1 is required.")
        return x, False
    array = np.asarray(x)
    if array.dtype.kind == "c":
        raise ValueError("Complex data not supported: x is complex")
    if array.dtype.kind in "biu":
        array = array.astype(np.float32)
    elif array.dtype.kind != "f" or array.dtype.itemsize > 8:
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"x must hold numbers: {exc}") from None
    if array.ndim != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {array.shape}. Reshape your data "
                         "either using array.reshape(-1, 1) if your data has a single "
                         "feature or array.reshape(1, -1) if it contains a single sample.")
    if array.shape[1] == 0:
        raise ValueError(f"x has 0 feature(s) (shape={array.shape}) while a minimum of 1 is "
                         "required.")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.strides[1] != array.itemsize or array.strides[0] < array.strides[1] * array.shape[1]:
        # Fortran order or a strided view: the kernels read rows; one copy, not one per pass
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():  # read-only arrays: torch warns, but nothing writes to x
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array), True


def _global_sum_int(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    all_reduce_sum_(t)
    return int(t.item())


def _global_max_int(value: int, device) -> int:
    if not distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    if distributed():
        import torch.distributed as dist

        t = t.contiguous()
        dist.broadcast(t, src=0)
    return t


class DirectionalClustering:
    """Spherical k-means with k-means++ seeding on cosine, restarts and a streaming fit.

    Parameters
    ----------
    n_concepts: number of clusters K.
    seed: seeds the sample and the k-means++ draws; the same seed gives the same centroids
        whether ``x`` is a tensor or a stream of the same rows.
    center: subtract the mean activation before clustering (directions about the mean).
    whiten: also whiten by the activation covariance (``whitening_matrix``), so directions
        of large but concept-free variance do not dominate the cosines.
    whiten_shrinkage: eigenvalue floor of the whitening, relative to the mean eigenvalue.
    init: ``"k-means++"`` (default: D^2-style seeding on cosine over the sample, exact, by
        rejection against a reference distribution refreshed with blocked native calls:
        0.2 s for K = 1024 over 40960 sample rows) or ``"random"`` (K distinct non-zero
        sample rows, as faiss and scikit-learn's ``init="random"``), or a (K, D) tensor of
        starting centroids in the clustering coordinates (normalised; one start, n_init ignored).
    n_init: independent seedings; the one with the best objective is kept.
    max_iter, tol: Lloyd iterations cap; stop when the objective improves by < tol relative.
    init_sample_size: rows drawn (uniformly without replacement, keyed by global row number)
        for k-means++ seeding, in the same read as the statistics on one process (a second
        read under torch.distributed).
    chunk_size: rows per native call when ``x`` is one tensor.
    pruning: ``True`` runs exact pruned Lloyd passes (``pyconcepts.pruning.BoundedLloyd``:
        per-point angle bounds let most points skip most or all of their cosines; same labels
        as unpruned passes) at up to 12 + 4 * 16 bytes of bounds per point; ``False`` runs the
        fused unpruned pass (one read of the data per pass, no per-point state). ``"auto"`` (the
        default), on CPU when the bounds fit in ``pruning_memory`` bytes: plain passes while
        many points change cluster (then no bound holds and a pruned pass costs more than a
        plain one; watched on every 16th row), pruned passes once few do, and
        plain ones again if pruning stops paying. Every choice gives the same labels.
    pruning_memory: memory allowed for the bounds (default 1 GiB; judged on the largest
        shard under torch.distributed). When they need more, ``pruning="auto"`` runs plain
        passes and ``pruning=True`` keeps them in memory anyway, unless ``pruning_dir`` is
        given. ``"auto"`` also keeps the labels of every 16th row (0.5 byte per row).
    pruning_dir: a directory for bounds that exceed ``pruning_memory``: they are then kept in
        a scratch directory made there (removed after the fit), one file per chunk, read and
        written once per pruned pass, with only one chunk's bounds in memory. Measured by
        ``python -m benchmarks.kmeans_disk``: whether it pays depends on how the extra
        2 x bytes-per-point of I/O per pass compares with the cosines pruning saves.
    signal: also estimate each cluster's signal vector (METHOD.md section 3 with P_i = the
        cluster's members and z = c_i . v, v the row in clustering coordinates) from moments
        accumulated by every pass in the same read of the data (``ops.assign_update``
        ``return_moments``); no pruned passes then (they do not read every row).

    Attributes after ``fit``: ``centroids_`` (K, D) unit rows in the clustering coordinates
    (``transform(x)``), ``mean_`` (D,), ``transform_matrix_`` (D, D) or None, ``objective_``,
    ``n_iter_``, ``counts_`` (K,), ``n_samples_``, ``labels_`` (in-memory fit only),
    ``pass_stats_``: one ``pyconcepts.pruning.PassStats`` per Lloyd pass over the data (the
    share of the N x K cosines computed, points read and moved; an unpruned pass computes
    all of them; on the plain passes of ``pruning="auto"`` the moved points are counted on
    the watched rows only, every 16th). Under torch.distributed they count this rank's rows.
    With ``signal=True``: ``signal_vectors_`` (K, D) float32 in the raw coordinates of x,
    from the last pass (its clusters and z = its centroids . v; the final update after it
    moves the centroids little at convergence), NaN for a cluster with fewer than two
    members or no variance of z; ``signal_decoding_`` (K, D), the filters w_i in raw coordinates they pair with
    (w_i . s_i = 1): the last pass's centroids, mapped through the whitening if any.

    ``x`` may be a tensor, a numpy array or array-like (N, D), or a re-iterable stream of
    (n, D) tensor chunks that yields the same rows on every pass (a pass that yields another
    number of rows or another D raises a ValueError naming it). ``predict``, ``transform``,
    ``labels_``, ``fit_predict`` and ``fit_transform`` give numpy arrays for numpy input and
    tensors otherwise; the fitted attributes are tensors. The estimator follows
    scikit-learn's conventions without depending on it (``get_params``/``set_params``,
    ``clone``, pipelines, ``check_estimator``): parameters are stored as given and checked by
    ``fit``, and methods that need a fitted model raise ``NotFittedError`` before it.
    """

    def __init__(
        self,
        n_concepts: int,
        *,
        seed: int = 0,
        init: str = "k-means++",
        center: bool = True,
        whiten: bool = False,
        whiten_shrinkage: float = 1e-3,
        n_init: int = 1,
        max_iter: int = 100,
        tol: float = 1e-6,
        init_sample_size: Optional[int] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        num_threads: Optional[int] = None,
        pruning="auto",
        pruning_memory: int = 1 << 30,
        pruning_dir: Optional[str] = None,
        signal: bool = False,
    ):
        # stored as given (scikit-learn's convention: get_params returns what was set,
        # clone and set_params never fail); fit checks them before it reads any data
        self.n_concepts = n_concepts
        self.seed = seed
        self.init = init
        self.center = center
        self.whiten = whiten
        self.whiten_shrinkage = whiten_shrinkage
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.init_sample_size = init_sample_size
        self.chunk_size = chunk_size
        self.num_threads = num_threads
        self.pruning = pruning
        self.pruning_memory = pruning_memory
        self.pruning_dir = pruning_dir
        self.signal = signal

    def _validate_params(self) -> None:
        """Raise a ValueError (TypeError for pruning_dir) naming the first bad parameter."""
        _check_positive_int(self.n_concepts, "n_concepts")
        if isinstance(self.seed, (bool, np.bool_)) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if isinstance(self.init, torch.Tensor):
            init = self.init
            if init.dim() != 2 or init.shape[0] != self.n_concepts or not bool(torch.isfinite(init).all()):
                raise ValueError(f"init as a tensor must be finite (n_concepts, D), got {tuple(init.shape)}")
        elif not isinstance(self.init, str) or self.init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or a (n_concepts, D) tensor, got {self.init!r}")
        for name in ("center", "whiten", "signal"):
            _check_bool(getattr(self, name), name)
        _check_real(self.whiten_shrinkage, "whiten_shrinkage")
        _check_positive_int(self.n_init, "n_init")
        _check_positive_int(self.max_iter, "max_iter")
        _check_real(self.tol, "tol", finite=False)
        if self.init_sample_size is not None:
            _check_positive_int(self.init_sample_size, "init_sample_size")
        _check_positive_int(self.chunk_size, "chunk_size")
        if self.num_threads is not None:
            _check_positive_int(self.num_threads, "num_threads")
        if not (isinstance(self.pruning, bool)
                or (isinstance(self.pruning, str) and self.pruning == "auto")):
            raise ValueError(f"pruning must be True, False or 'auto', got {self.pruning!r}")
        memory = self.pruning_memory
        if (isinstance(memory, (bool, np.bool_)) or not isinstance(memory, numbers.Integral)
                or memory < 0):
            raise ValueError(f"pruning_memory must be an int >= 0 (bytes), got "
                             f"{self.pruning_memory!r}")
        if self.pruning_dir is not None and not isinstance(self.pruning_dir, (str, os.PathLike)):
            raise TypeError(f"pruning_dir must be a directory path or None, got "
                            f"{self.pruning_dir!r}")

    # ------------------------------------------------------------------ scikit-learn API
    # Duck-typed rather than inherited, so scikit-learn stays optional and is not imported.
    @classmethod
    def _get_param_names(cls) -> list:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters as set (no nested estimators: ``deep`` changes nothing)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> "DirectionalClustering":
        """Set constructor parameters; they are checked by the next ``fit``."""
        valid = self._get_param_names()
        for name in params:
            if name not in valid:
                raise ValueError(f"unknown parameter {name!r} for {type(self).__name__}; "
                                 f"valid parameters: {', '.join(valid)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        """The class and the parameters that differ from their defaults, as constructor
        arguments: ``DirectionalClustering(n_concepts=8, whiten=True)``."""
        defaults = {name: p.default
                    for name, p in inspect.signature(type(self).__init__).parameters.items()}
        shown = []
        for name, value in self.get_params().items():
            default = defaults[name]
            try:
                same = type(value) is type(default) and bool(value == default)
            except (TypeError, ValueError):  # e.g. an array: not the default
                same = False
            if default is inspect.Parameter.empty or not same:
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self):
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(estimator_type="clusterer", target_tags=TargetTags(required=False),
                    # transform computes in float32 whatever the input's precision
                    transformer_tags=TransformerTags(preserves_dtype=["float32"]),
                    input_tags=InputTags(allow_nan=False, sparse=False))

    def __sklearn_is_fitted__(self) -> bool:
        return "centroids_" in self.__dict__

    # ------------------------------------------------------------------ coordinates
    def _chunks(self, x, dim=None):
        return iter_chunks(x, self.chunk_size, dim=dim)

    def _pass_chunks(self, x, where: str):
        """The chunks of one more pass over ``x`` (``where`` names the pass in errors),
        checked against the statistics pass: the same D and the same number of rows on this
        process, counted from the chunk shapes (no device synchronisation). A stream whose
        passes differ would otherwise give centroids, counts and ``n_samples_`` of different
        data, silently."""
        expected, rows = self._local_rows, 0
        chunks = self._chunks(x, self.n_features_in_)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except (ValueError, TypeError) as exc:  # another D, no rows at all, not a tensor
                if type(exc) not in (ValueError, TypeError):
                    raise
                raise type(exc)(f"{where}: {exc}") from exc
            rows += chunk.shape[0]
            if rows > expected:
                raise ValueError(self._rows_changed_message(where, f"more than {expected}"))
            yield chunk
        if rows != expected:
            raise ValueError(self._rows_changed_message(where, str(rows)))

    def _rows_changed_message(self, where: str, rows: str) -> str:
        shard = " on this rank" if distributed() else ""
        return (f"{where} read {rows} rows of x{shard}, but the statistics pass read "
                f"{self._local_rows}: the stream changed between passes (every pass over x "
                "must yield the same rows)")

    def transform(self, x):
        """Map the rows of ``x`` (N, D) to the clustering coordinates (centred, optionally
        whitened), float32. A numpy array (or array-like) gives a numpy array, a tensor a
        tensor on its device. NaN/Inf rows, a D other than the fitted one and a model not
        fitted yet raise (ValueError, ``NotFittedError``)."""
        self._check_fitted()
        x, as_numpy = _as_input(x)
        self._check_rows(x, "transform")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf")
        out = self._transform(x).to(torch.float32)
        if not as_numpy:
            return out
        out = out.cpu().numpy()
        return out.copy() if np.may_share_memory(out, x.numpy()) else out

    def fit_transform(self, x, y=None):
        """``fit(x)`` then ``transform(x)``: ``x`` is a tensor or an array (N, D) here."""
        return self.fit(x).transform(x)

    def _transform(self, chunk: torch.Tensor) -> torch.Tensor:
        """``transform`` for rows already validated (or read by the kernels, which check
        them): float32 when centring or whitening, else ``chunk`` itself (and during a fit
        that reads a whitened copy, ``_whitened_copy``)."""
        if (self.mean_ is None and self.transform_matrix_ is None) or getattr(self, "_pretransformed", False):
            return chunk
        out = chunk.to(torch.float32)
        if self.mean_ is not None:
            out = out - self.mean_.to(out.device)
        if self.transform_matrix_ is not None:
            out = out @ self.transform_matrix_.to(out.device)
        return out.contiguous()

    def _check_fitted(self):
        if "centroids_" not in self.__dict__ and not hasattr(self, "_fitting"):
            raise _not_fitted_error_type()(
                f"This {type(self).__name__} instance is not fitted yet; call fit(x) first")

    def _check_rows(self, x, method: str) -> None:
        """A whole tensor given to ``method`` must be (N, D) with the fitted D."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{method} takes a tensor or an array (N, D), got "
                            f"{type(x).__name__}; map a stream chunk by chunk")
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D (N, D), got shape {tuple(x.shape)}. Reshape your "
                             "data either using array.reshape(-1, 1) if your data has a "
                             "single feature or array.reshape(1, -1) if it contains a single "
                             "sample.")
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, but {type(self).__name__} is "
                             f"expecting {self.n_features_in_} features as input")

    # ------------------------------------------------------------------ fit
    def fit(self, x, y=None) -> "DirectionalClustering":
        """Cluster ``x``: a tensor (N, D), a numpy array (or array-like) (N, D), or a
        re-iterable of (n, D) chunks. ``y`` is ignored."""
        self._validate_params()
        x, as_numpy = _as_input(x)
        self._fitting = True
        try:
            self._fit(x)
        finally:
            del self._fitting
        self._numpy_output = as_numpy
        return self

    @property
    def labels_(self):
        """(N,) nearest centroid of every row of the tensor (or array) given to ``fit``.

        Computed on first access (one assignment pass the fit itself does not need), from the
        fitted tensor, which is kept by reference: modify it in place before reading
        ``labels_`` and the labels follow the new values. Not defined after a fit on a stream
        (no per-row state is kept). A numpy array after a fit on one, else a tensor."""
        labels = self._label_tensor()
        return labels.numpy() if self.__dict__.get("_numpy_output") else labels

    def _label_tensor(self) -> torch.Tensor:
        if "_labels" not in self.__dict__:
            source = self.__dict__.get("_labels_source")
            if source is None:
                self._check_fitted()
                raise AttributeError("labels_ is defined after fit on a tensor only (a stream "
                                     "fit keeps no per-row state); use predict(x)")
            self._labels = self._predict(source)
            del self._labels_source
        return self._labels

    def __getstate__(self):
        # a pickled or copied model carries its labels, not the tensor it was fitted on
        state = self.__dict__.copy()
        if "_labels_source" in state:
            state["_labels"] = self._label_tensor()
            del state["_labels_source"]
        return state

    def _fit(self, x) -> None:
        self.__dict__.pop("_labels", None)
        self.__dict__.pop("_labels_source", None)
        # Pass 1: count, mean (and covariance when whitening), all chunk-validated, and on
        # one process the seeding sample (keyed by global row number, so it needs no count
        # first); under torch.distributed a rank's row numbers start after the earlier
        # ranks' rows, known only after this pass, so the sample takes a second one there.
        dim = None
        stats = None
        n_rows = 0
        sample = None if distributed() else KeyedRowSample(self._sample_size(), int(self.seed))
        with fail_together("the statistics pass"):  # e.g. this rank's shard is empty
            for chunk in self._chunks(x):
                if stats is None:
                    dim, device = chunk.shape[1], chunk.device
                    stats = StreamingCovariance(dim, device=device, with_covariance=self.whiten)
                # NaN/Inf: caught by StreamingCovariance here when centring, else by the
                # kernels of the first Lloyd pass (no extra read of the data just to check it)
                if self.center or self.whiten:
                    stats.update(chunk)
                if sample is not None:
                    sample.update(chunk, n_rows)
                n_rows += chunk.shape[0]
        self._local_rows = n_rows
        # Under torch.distributed every rank holds a shard: statistics and counts are global.
        if distributed():
            stats.all_reduce()
            n_rows = stats.count if (self.center or self.whiten) else _global_sum_int(n_rows, device)
        if self.n_concepts > n_rows:
            raise ValueError(f"n_concepts = {self.n_concepts} exceeds the number of rows "
                             f"(n_samples = {n_rows})")
        self.n_features_in_ = dim
        self.n_samples_ = n_rows
        self._data_device = device
        # the bounds' memory is per process: the largest shard decides, alike on every rank
        self._max_local_rows = _global_max_int(self._local_rows, device)
        self._check_pruning_dir(device)
        self.mean_ = stats.mean.to(torch.float32) if (self.center or self.whiten) else None
        self.covariance_ = stats.covariance if self.whiten and n_rows > 1 else None
        if self.whiten:
            if n_rows < 2:
                raise ValueError("whitening needs at least two rows")
            self.transform_matrix_ = whitening_matrix(
                stats.covariance, float(self.whiten_shrinkage)).to(torch.float32)
        else:
            self.transform_matrix_ = None

        generator = torch.Generator().manual_seed(int(self.seed))
        sample = self._seeding_sample(x, sample)
        # With much more data than the seeding sample, the restarts compete on the sample
        # (cheap: Lloyd to convergence on its rows) and only the winner runs on all rows;
        # otherwise every restart runs on all rows.
        on_sample = self.n_init > 1 and not isinstance(self.init, torch.Tensor) and n_rows > 4 * sample.shape[0]
        rows = self._whitened_copy(x)
        try:
            best = None
            for _ in range(1 if isinstance(self.init, torch.Tensor) else self.n_init):
                # every rank holds the same sample; rank 0's seeds are used by all regardless
                centroids = _broadcast_from_rank0(self._kmeans_pp(sample, generator))
                result = self._lloyd(sample if on_sample else rows, centroids, generator,
                                     in_memory=on_sample)
                if best is None or result[1] > best[1]:
                    best = result
            if on_sample:
                best = self._lloyd(rows, best[0], generator)
        finally:
            self._pretransformed = False
        self.centroids_, self.objective_, self.n_iter_, self.counts_, self.pass_stats_ = best[:5]
        if self.signal:
            self._set_signal_vectors(*best[5])
        if isinstance(x, torch.Tensor):
            self._labels_source = x  # labels_ is one more assignment pass: only when asked

    def _whitened_copy(self, x):
        """The rows the Lloyd passes read: with whitening and at most _WHITENED_COPY_BYTES of
        this process's rows, their whitened copy, made once (chunk list; ``_transform`` is the
        identity until the fit ends), instead of one whitening GEMM per chunk in every pass;
        else ``x`` itself. The same function transforms the rows either way: same results."""
        self._pretransformed = False
        if self.transform_matrix_ is None or self._local_rows * self.n_features_in_ * 4 > _WHITENED_COPY_BYTES:
            return x
        with fail_together("the whitening pass"):
            rows = [self._transform(chunk) for chunk in self._pass_chunks(x, "the whitening pass")]
        self._pretransformed = True
        return rows

    def _sample_size(self) -> int:
        return self.init_sample_size or max(10_000, 40 * self.n_concepts)

    def _seeding_sample(self, x, sample: Optional[KeyedRowSample]) -> torch.Tensor:
        """The seeding rows in clustering coordinates: uniformly drawn without replacement,
        the same for any chunking and any number of ranks. ``sample``: drawn during the
        statistics pass (one process), or None (distributed: drawn here, in one more pass)."""
        if sample is None:
            sample = KeyedRowSample(self._sample_size(), int(self.seed))
            start = shard_offset(self._local_rows)
            with fail_together("the seeding-sample pass"):
                sample.update_stream(self._pass_chunks(x, "the seeding-sample pass"), start)
        rows = self._transform(sample.all_reduce().rows())
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("x contains NaN or Inf rows")
        return rows

    def _kmeans_pp(self, sample: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """k-means++ on cosine distance 1 - cos over the sample (float32 unit rows).

        Exact D^2-style sampling without a pass over the sample per seed (that made K = 1024
        take tens of seconds): each new seed is drawn from a frozen reference distribution
        D_ref (the distances to the seeds chosen up to the last refresh) and accepted with
        probability D(x) / D_ref(x), D(x) <= D_ref(x) being its distance to all seeds so far.
        An accepted draw has probability proportional to D(x), as k-means++ asks. When draws
        start to be rejected, D_ref is refreshed for the new seeds in one blocked native
        cosine_assign call over the sample (GEMM rate instead of one matrix-vector product
        per seed).
        """
        rows = sample.to(torch.float64)  # a float32 norm overflows from 1e19 and underflows tiny rows
        norms = rows.norm(dim=1)
        # Zero rows (common after a ReLU) have no direction: never a seed.
        unit = (rows[norms > 0] / norms[norms > 0, None]).to(torch.float32).contiguous()
        k, m = self.n_concepts, unit.shape[0]
        if m < k:
            raise ValueError(
                f"only {m} rows of the seeding sample have a direction (non-zero rows), fewer "
                f"than n_concepts = {k}; raise init_sample_size or lower n_concepts"
            )
        if isinstance(self.init, torch.Tensor):
            if self.init.shape[1] != unit.shape[1]:
                raise ValueError(f"init has {self.init.shape[1]} columns, x has {unit.shape[1]}")
            start = self.init.to(device=unit.device, dtype=torch.float32)
            return (start / start.norm(dim=1, keepdim=True).clamp_min(1e-30)).contiguous()
        if self.init == "random":
            return unit[torch.randperm(m, generator=generator)[:k]]
        chosen = [int(torch.randint(0, m, (1,), generator=generator))]
        best_ref = torch.full((m,), -1.0)  # best cosine to the seeds before chosen[refreshed:]
        refreshed = 0
        cumulative = None
        rejected = 0
        while len(chosen) < k:
            if cumulative is None:  # refresh the reference distribution
                _, cos = ops.cosine_assign(unit, unit[chosen[refreshed:]],
                                           num_threads=self.num_threads)
                torch.maximum(best_ref, cos, out=best_ref)
                refreshed, rejected = len(chosen), 0
                cumulative = torch.cumsum((1.0 - best_ref.double()).clamp_min_(0), 0)
                if float(cumulative[-1]) <= 0:  # every sample row already at a seed
                    chosen.append(int(torch.randint(0, m, (1,), generator=generator)))
                    cumulative = None
                    continue
            u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cumulative[-1])
            i = min(int(torch.searchsorted(cumulative, torch.tensor([u], dtype=torch.float64))), m - 1)
            d_ref = 1.0 - float(best_ref[i])
            d_now = d_ref
            if refreshed < len(chosen):
                d_now = min(d_ref, 1.0 - float((unit[chosen[refreshed:]] @ unit[i]).max()))
            if float(torch.rand((), generator=generator, dtype=torch.float64)) * d_ref < d_now:
                chosen.append(i)
            else:
                rejected += 1
            # Acceptance falls as seeds accumulate since the refresh: refresh once rejections
            # outnumber the new seeds (and at least every 64 seeds, bounding the per-draw work).
            if rejected > len(chosen) - refreshed + 2 or len(chosen) - refreshed >= 64:
                cumulative = None
        return unit[chosen]

    def _lloyd(self, x, centroids: torch.Tensor, generator: torch.Generator, *,
               in_memory: bool = False):
        """Lloyd iterations from ``centroids``: (centroids, objective, n_iter, counts,
        pass_stats). ``in_memory``: ``x`` is one tensor already in clustering coordinates,
        held whole by every rank (the seeding sample; its passes are not logged)."""
        from .pruning import PassStats

        previous = -math.inf
        objective, counts = previous, None
        n_iter = 0
        log = []
        pruned = None  # (engine, sums, counts) of the current assignment when pruning
        use_pruning = not in_memory and self._use_pruning(centroids)  # True, False, "adaptive"
        adaptive = use_pruning == "adaptive"
        moments = None  # signal=True: (sums, counts, sum_xz, sum_z, centroids) of the last pass
        watched = None  # adaptive: the watched rows' labels in the last plain pass
        try:
            for n_iter in range(1, self.max_iter + 1):
                if in_memory:
                    *_, sums, counts = ops.assign_update(x, centroids,
                                                         num_threads=self.num_threads)
                elif use_pruning is True:
                    pruned = self._pruned_pass(x, centroids, pruned, f"Lloyd pass {n_iter}")
                    sums, counts = pruned[1].clone(), pruned[2].clone()
                    log.append(pruned[4])
                    if adaptive and self._pruning_stopped_paying(pruned[4]):
                        pruned[0].close()  # plain passes from now on
                        use_pruning, pruned, watched = False, None, None
                else:
                    sums, counts, watched_labels, pass_moments = self._lloyd_pass(
                        x, centroids, watch=use_pruning == "adaptive",
                        where=f"Lloyd pass {n_iter}")
                    if pass_moments is not None:
                        all_reduce_sum_(*pass_moments)
                        moments = (sums, counts, *pass_moments, centroids)
                    n = int(counts.sum())  # rows with NaN/Inf raise before this point
                    moved = None
                    if use_pruning == "adaptive":
                        if watched is not None and self._chunks_changed(watched, watched_labels):
                            # pruned passes need the same chunks every pass: plain ones it is
                            use_pruning, watched_labels = False, None
                        elif watched is not None:
                            moved = int((watched_labels != watched).sum())
                            if self._bounds_will_pay(moved, watched.numel(), n_iter):
                                # from the next pass on; same labels either way
                                use_pruning = True
                        watched = watched_labels
                    log.append(PassStats(n_points=n, n_clusters=self.n_concepts, n_read=n,
                                         n_full=n, n_moved=moved,
                                         n_cosines=n * self.n_concepts))
                if not in_memory:
                    # this rank's shard -> all rows (no-op on one process)
                    all_reduce_sum_(sums, counts)
                previous_centroids = centroids
                centroids, counts = self._update_centroids(sums, counts, centroids, generator)
                if pruned is not None:
                    pruned = (*pruned[:3], previous_centroids, None)
                objective = float(sums.norm(dim=1).sum())
                if objective - previous <= self.tol * abs(objective):
                    break
                previous = objective
        finally:
            if pruned is not None:
                pruned[0].close()  # the bounds, and their scratch directory if on disk
        return centroids, objective, n_iter, counts, log, moments

    def _use_pruning(self, centroids: torch.Tensor):
        """True, False, or "adaptive" (plain passes until few points move, then pruned)."""
        if self.signal:
            if self.pruning is True:
                raise ValueError("signal=True needs every row read on every pass: use "
                                 "pruning=False or 'auto'")
            return False
        if self.pruning != "auto":
            return bool(self.pruning)
        if self._data_device.type != "cpu":
            return False
        return "adaptive" if self.pruning_dir is not None or not self._bounds_on_disk() else False

    def _bounds_on_disk(self) -> bool:
        """Whether this process's bounds may exceed ``pruning_memory`` (then they go to
        ``pruning_dir``, or ``pruning="auto"`` runs plain passes). Judged on the largest
        shard, so every rank of a distributed fit decides alike."""
        from .pruning import BoundedLloyd

        bytes_per_row = BoundedLloyd(n_clusters=self.n_concepts).bytes_per_point
        return self._max_local_rows * bytes_per_row > self.pruning_memory

    def _check_pruning_dir(self, device) -> None:
        """A ``pruning_dir`` that cannot be used fails the fit before any Lloyd pass, on every
        rank together (one rank's bad path must not leave the others waiting)."""
        if self.pruning_dir is None or self.pruning is False or self.signal:
            return
        path = os.fspath(self.pruning_dir)
        usable = os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
        if _global_sum_int(0 if usable else 1, device):
            where = "" if not usable else " on another rank"
            raise ValueError(f"pruning_dir {path!r} is not a writable directory{where}")

    def _bounds_will_pay(self, moved: int, watched: int, n_iter: int) -> bool:
        """Adaptive pruning: switch once at most _PRUNE_BELOW_MOVED of the watched rows changed
        cluster in the last pass and at least 3 passes remain (the pass that builds the bounds
        costs ~15% more than a plain one; the bounds then need a couple of passes to pay).
        While many points move, the drift loosens every bound past use and a pruned pass
        costs more than a plain one. Counts are global, so every rank switches together."""
        moved = _global_sum_int(moved, torch.device("cpu"))
        watched = _global_sum_int(watched, torch.device("cpu"))
        return self.max_iter - n_iter >= 3 and moved <= _PRUNE_BELOW_MOVED * max(watched, 1)

    def _kernel_input(self, chunk: torch.Tensor):
        """(rows, center) for the native ops: a plain centring is done by the kernels as they
        read the rows (no centred copy of the chunk); whitening needs the transformed copy."""
        if self.transform_matrix_ is None and self.mean_ is not None:
            return chunk, self.mean_.to(chunk.device)
        return self._transform(chunk), None

    def _transformed_chunks(self, x, where: str):
        return (self._transform(chunk) for chunk in self._pass_chunks(x, where))

    @staticmethod
    def _chunks_changed(before: torch.Tensor, now: torch.Tensor) -> bool:
        """A stream that re-chunks between passes shows as a different number of watched
        rows; decided on every rank alike."""
        changed = int(before.numel() != now.numel())
        return _global_sum_int(changed, torch.device("cpu")) > 0

    @staticmethod
    def _pruning_stopped_paying(stats) -> bool:
        """Adaptive pruning: a pruned pass that still computed more than
        _STOP_ABOVE_COMPUTED of the cosines costs about what a plain pass does, or more (the
        gathered rows, the bounds upkeep); go back to plain passes. Not judged on the pass that
        builds the bounds (n_moved None). Global counts: every rank decides alike."""
        if stats.n_moved is None:
            return False
        cosines = _global_sum_int(stats.n_cosines, torch.device("cpu"))
        total = _global_sum_int(stats.n_points * stats.n_clusters, torch.device("cpu"))
        return cosines > _STOP_ABOVE_COMPUTED * max(total, 1)

    def _lloyd_pass(self, x, centroids: torch.Tensor, watch: bool = False,
                    where: str = "a Lloyd pass"):
        """One assignment + accumulation pass over the data: float64 sums (K, D), counts (K,),
        with ``watch`` the labels of every _WATCH_STRIDE-th row of every chunk, int32 on the
        CPU (else None) and, with ``signal``, the moments (sum_xz, sum_z) (else None).

        The fused native op reads every chunk once per pass.
        """
        total, watched = None, []
        with fail_together("a Lloyd pass"):  # e.g. NaN rows in this rank's shard
            for chunk in self._pass_chunks(x, where):
                xt, center = self._kernel_input(chunk)
                labels, _, *stats = ops.assign_update(
                    xt, centroids.to(xt.device), center=center, return_moments=bool(self.signal),
                    num_threads=self.num_threads,
                )
                if watch:  # spread-out rows: data sorted by cluster cannot mislead the switch
                    watched.append(labels[::_WATCH_STRIDE].to(device="cpu", dtype=torch.int32))
                if total is None:
                    total = stats
                else:  # on the chunks' device: one transfer per pass, not one per chunk
                    for acc, part in zip(total, stats):
                        acc += part
        total = [t.cpu() for t in total]
        moments = (total[2], total[3]) if self.signal else None
        watched = torch.cat(watched) if watch else None
        return total[0], total[1], watched, moments

    def _set_signal_vectors(self, sums, counts, sum_xz, sum_z, centroids) -> None:
        """s_i = Cov[v, z] / Var[z] within cluster i, mapped to raw coordinates: with v =
        (x - mean) T (T the symmetric whitening, identity without), Cov[x, z] = T^-1 Cov[v, z]
        and z = (T c_i) . (x - mean), so the raw filter is T c_i."""
        signal = signal_from_moments(counts, sums, sum_z[:, 0], sum_z[:, 1], sum_xz)
        decoding = centroids.to(torch.float64)
        if self.transform_matrix_ is not None:
            t = self.transform_matrix_.to(torch.float64)
            signal = torch.linalg.solve(t, signal.T).T
            decoding = decoding @ t
        self.signal_vectors_ = signal.to(torch.float32)
        self.signal_decoding_ = decoding.to(torch.float32)

    def _pruned_pass(self, x, centroids: torch.Tensor, state, where: str):
        """The same pass with exact pruning; ``state`` carries the engine, the sums and counts
        of the current assignment and the centroids they were assigned to."""
        from .pruning import BoundedLloyd, ChunksChanged

        if state is None:
            if self._data_device.type != "cpu":
                raise ValueError("pruning=True runs on CPU tensors only; use pruning=False on GPU")
            on_disk = self.pruning_dir is not None and self._bounds_on_disk()
            engine = None
            try:
                with fail_together("a Lloyd pass"):
                    engine = BoundedLloyd(n_clusters=self.n_concepts, num_threads=self.num_threads,
                                          storage_dir=self.pruning_dir if on_disk else None)
                    sums, counts, stats = engine.first_pass(self._cpu_chunks(x, where),
                                                            centroids)
            except BaseException:
                if engine is not None:
                    engine.close()  # not yet held by the caller: its scratch goes now
                raise
            return engine, sums, counts, None, stats
        engine, sums, counts, assigned_to, _ = state
        with fail_together("a Lloyd pass"):  # on failure, the caller's finally closes engine
            try:
                sums, counts, stats = engine.next_pass(self._cpu_chunks(x, where), assigned_to,
                                                       centroids, sums, counts)
            except ChunksChanged as exc:  # the same rows, chunked differently
                raise ValueError(f"{where}: {exc}") from exc
        return engine, sums, counts, None, stats

    def _cpu_chunks(self, x, where: str):
        for xt in self._transformed_chunks(x, where):
            if xt.device.type != "cpu":
                raise ValueError("pruning=True runs on CPU tensors only; use pruning=False on GPU")
            yield xt

    def _update_centroids(self, sums, counts, old, generator):
        """Normalised member sums; empty or degenerate clusters re-seeded by splitting the
        largest cluster in two (as faiss does): the two centroids are nudged apart along a
        random direction orthogonal to it."""
        norms = sums.norm(dim=1)
        degenerate = (counts == 0) | (norms <= 1e-12 * max(float(norms.max()), 1e-300))
        centroids = torch.where(
            degenerate[:, None], old.to(torch.float64), sums / norms.clamp_min(1e-300)[:, None]
        )
        counts = counts.clone()
        for empty in torch.nonzero(degenerate).flatten().tolist():
            big = int(torch.argmax(counts))
            direction = torch.randn(centroids.shape[1], generator=generator, dtype=torch.float64)
            direction -= (direction @ centroids[big]) * centroids[big]
            direction /= direction.norm().clamp_min(1e-30)
            base = centroids[big].clone()
            centroids[empty] = base + 1e-2 * direction
            centroids[big] = base - 1e-2 * direction
            centroids[empty] /= centroids[empty].norm()
            centroids[big] /= centroids[big].norm()
            counts[empty] = counts[big] // 2
            counts[big] -= counts[empty]
        return centroids.to(torch.float32), counts

    # ------------------------------------------------------------------ predict
    def predict(self, x):
        """(N,) int64 index of the nearest centroid (by cosine) of every row of ``x``: a
        tensor or a stream of chunks gives a tensor, a numpy array (or array-like) a numpy
        array."""
        self._check_fitted()
        x, as_numpy = _as_input(x)
        if isinstance(x, torch.Tensor):
            self._check_rows(x, "predict")
        labels = self._predict(x)
        return labels.cpu().numpy() if as_numpy else labels

    def _predict(self, x) -> torch.Tensor:
        out = []
        for chunk in self._chunks(x, self.n_features_in_):
            xt, center = self._kernel_input(chunk)
            index, _ = ops.cosine_assign(xt, self.centroids_.to(xt.device), center=center,
                                         num_threads=self.num_threads)
            out.append(index)
        return torch.cat(out)

    def fit_predict(self, x, y=None):
        """``fit(x)`` then the labels of its rows (``predict(x)``)."""
        return self.fit(x).predict(x)


# ---------------------------------------------------------------------- vMF mixture polish
class VMFMixture(NamedTuple):
    """A mixture of von Mises-Fisher distributions on the unit sphere with one concentration
    shared by its components: ``directions`` (K, D) float64 unit mean directions,
    ``log_prior`` (K,) float64 log mixing weights, ``concentration`` kappa, ``n_iter`` the EM
    iterations run. With one kappa the normalising constants C_D(kappa) are equal and cancel:
    a row's posterior over the components is softmax(log_prior + kappa cos(u, mu))."""

    directions: torch.Tensor
    log_prior: torch.Tensor
    concentration: float
    n_iter: int

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """(N, K) float32 log_prior_k + kappa cos(u_p, mu_k) (unnormalised log posteriors)."""
        return torch.addmm(self.log_prior.to(device=u.device, dtype=torch.float32)[None, :], _unit_rows(u),
                           self.directions.to(device=u.device, dtype=torch.float32).T, alpha=self.concentration)

    def predict(self, u: torch.Tensor) -> torch.Tensor:
        """(N,) int64 component of largest posterior (the MAP assignment) of each row of ``u``."""
        scores = self.scores(u)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("x contains NaN or Inf rows")
        return scores.argmax(1)


def _unit_rows(u: torch.Tensor) -> torch.Tensor:
    """Rows of ``u`` scaled to unit norm, float32 (a zero row stays zero)."""
    u = u.to(torch.float32)
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _shared_concentration(mean_resultant: float, dim: int) -> float:
    """Banerjee et al. (2005)'s approximation of the vMF maximum-likelihood kappa from the mean
    resultant length r in D dimensions: r (D - r^2) / (1 - r^2)."""
    r = min(max(mean_resultant, 1e-6), 1 - 1e-6)
    return r * (dim - r * r) / (1 - r * r)


def vmf_log_normaliser(kappa: float, dim: int) -> float:
    """log C_D(kappa), the log normalising constant of the vMF density on the unit sphere in
    D >= 3 dimensions: (D/2 - 1) log kappa - (D/2) log 2 pi - log I_{D/2-1}(kappa), with the
    Bessel function from Debye's uniform expansion with two correction terms (absolute error,
    kappa from 0.1 to 5000, against scipy: 0.1 at D = 3 and kappa < 1, 5e-4 at D = 3 and
    kappa >= 5, 3e-4 at D = 10, 2e-6 at D = 48). It serves the monotonicity check of
    ``vmf_mixture_polish``, which compares likelihoods of nearby concentrations."""
    nu = dim / 2 - 1
    t = math.sqrt(nu * nu + kappa * kappa)
    p = nu / t
    u1 = (3 * p - 5 * p ** 3) / 24
    u2 = (81 * p ** 2 - 462 * p ** 4 + 385 * p ** 6) / 1152
    log_bessel = (-0.5 * math.log(2 * math.pi * t) + t + nu * math.log(kappa / (nu + t))
                  + math.log1p(u1 / nu + u2 / nu ** 2))
    return nu * math.log(kappa) - (dim / 2) * math.log(2 * math.pi) - log_bessel


class _VMFState(NamedTuple):
    directions: torch.Tensor  # (K, D) float64 unit rows
    log_prior: torch.Tensor   # (K,) float64
    concentration: float


def _vmf_e_step(columns: torch.Tensor, state: _VMFState):
    """(posteriors (K, n) float32, log-likelihood of the rows) under ``state``; ``columns``: the
    unit rows as the columns of a (D, n) matrix. The (K, n) layout makes the reductions over
    the components elementwise operations on rows of n (over a last dimension of K they took
    several times as long); posteriors below e^-80 are set to e^-80 (float32 denormals slowed
    every operation on them)."""
    scores = torch.addmm(state.log_prior.to(torch.float32)[:, None], state.directions.to(torch.float32),
                         columns, alpha=state.concentration)
    log_post = torch.log_softmax(scores, 0)
    # log sum_k exp(score_k) = max score - max log posterior (both at the same k)
    log_norm = (scores.amax(0) - log_post.amax(0)).sum(dtype=torch.float64)
    loglik = float(log_norm) + columns.shape[1] * vmf_log_normaliser(state.concentration, columns.shape[0])
    return log_post.clamp_min_(-80.0).exp_(), loglik


def _vmf_m_step(columns: torch.Tensor, resp: torch.Tensor, previous: torch.Tensor) -> _VMFState:
    """The maximising parameters for the posteriors ``resp`` (K, n); a component without rows
    keeps its ``previous`` direction and gets the prior of half a row."""
    mass = resp.sum(1, dtype=torch.float64).clamp_min(0.5)
    resultant = (resp @ columns.T).to(torch.float64)
    length = resultant.norm(dim=1)
    directions = torch.where((length > 0)[:, None], resultant / length.clamp_min(1e-300)[:, None], previous)
    kappa = _shared_concentration(float(length.sum()) / columns.shape[1], columns.shape[0])
    return _VMFState(directions, torch.log(mass / mass.sum()), kappa)


def _extrapolate(s0: _VMFState, s1: _VMFState, s2: _VMFState, alpha: float) -> _VMFState:
    """SQUAREM's point s0 - 2 alpha r + alpha^2 v (r = s1 - s0, v = s2 - 2 s1 + s0), projected
    back to unit directions, normalised priors and a positive concentration."""
    def point(a, b, c):
        return a - 2 * alpha * (b - a) + alpha ** 2 * (c - 2 * b + a)

    directions = point(s0.directions, s1.directions, s2.directions)
    log_prior = point(s0.log_prior, s1.log_prior, s2.log_prior)
    kappa = point(s0.concentration, s1.concentration, s2.concentration)
    return _VMFState(directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300),
                     log_prior - torch.logsumexp(log_prior, 0), max(kappa, 1e-6))


def _step_size(s0: _VMFState, s1: _VMFState, s2: _VMFState) -> float:
    """SQUAREM's alpha = -||r|| / ||v|| (at most -1: alpha = -1 is two plain EM steps)."""
    r = torch.cat([(s1.directions - s0.directions).flatten(), s1.log_prior - s0.log_prior])
    v = torch.cat([(s2.directions - 2 * s1.directions + s0.directions).flatten(),
                   s2.log_prior - 2 * s1.log_prior + s0.log_prior])
    return min(-float(r.norm() / v.norm().clamp_min(1e-300)), -1.0)


def _change(a: _VMFState, b: _VMFState) -> float:
    return max(float((a.directions - b.directions).abs().max()), float((a.log_prior - b.log_prior).abs().max()))


def vmf_mixture_polish(u: torch.Tensor, centroids: torch.Tensor, *, max_iter: int = 300,
                       tol: float = 1e-5) -> VMFMixture:
    """EM of a von Mises-Fisher mixture with one shared concentration, started from the hard
    assignment of the rows ``u`` (n, D) to the unit ``centroids`` (K, D) of a spherical k-means.

    Spherical k-means is the kappa -> infinity limit of this EM: each row counts fully for one
    cluster, so the rows near a boundary switch sides with small changes of the centroids and
    a fit stops in whichever of many nearby local optima its seeding led to. The soft EM weighs
    those rows by their posterior, which smooths these optima away: run to convergence it ends
    at the same fixed point from different k-means solutions of the same rows more often.
    M-step: mu_k = normalised sum_p r_pk u_p / ||u_p||, prior_k = mean_p r_pk, kappa from the
    pooled mean resultant length sum_k ||sum_p r_pk u_p / ||u_p|| || / n
    (``_shared_concentration``); E-step: r_p = softmax(log prior + kappa cos(u_p, mu)) (with one
    kappa the normalising constants cancel). A component that holds no row keeps its direction
    and a prior of half a row.

    Plain EM crawls (on real layers 70-130 iterations to settle), so the iterations are
    accelerated by SQUAREM (Varadhan & Roland 2008: two EM steps, an extrapolation along
    them, one EM step from there), kept monotone: an extrapolated point whose log-likelihood is
    below the first EM step's is replaced by the second EM step. Stops once an EM step changes
    no direction coordinate or log prior by more than ``tol``, or after ``max_iter`` EM steps.
    D < 3: plain EM steps (no likelihood for the safeguard). Deterministic; the rows and the
    posteriors are float32, the parameters float64.
    """
    if u.dim() != 2 or centroids.dim() != 2 or u.shape[1] != centroids.shape[1]:
        raise ValueError(f"u (n, D) and centroids (K, D) must share D, got {tuple(u.shape)} and "
                         f"{tuple(centroids.shape)}")
    if u.shape[0] == 0:
        raise ValueError("u is empty: the polish needs rows")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    k, dim = centroids.shape[0], u.shape[1]
    unit = _unit_rows(u).T.contiguous()  # (D, n): see _vmf_e_step
    start = centroids.to(device=u.device, dtype=torch.float64)
    start = start / start.norm(dim=1, keepdim=True).clamp_min(1e-300)
    nearest = (start.to(torch.float32) @ unit).argmax(0)
    hard = torch.nn.functional.one_hot(nearest, k).T.to(torch.float32)
    state = _vmf_m_step(unit, hard, start)
    steps = 1
    accelerate = dim >= 3
    while steps < max_iter:
        resp, _ = _vmf_e_step(unit, state)
        first = _vmf_m_step(unit, resp, state.directions)
        steps += 1
        settled = _change(first, state) < tol
        if settled or not accelerate or steps + 2 > max_iter:
            state = first
            if settled:
                break
            continue
        resp, first_loglik = _vmf_e_step(unit, first)
        second = _vmf_m_step(unit, resp, first.directions)
        steps += 1
        point = _extrapolate(state, first, second, _step_size(state, first, second))
        resp, loglik = _vmf_e_step(unit, point)
        if loglik < first_loglik:  # the extrapolation overshot: keep the plain EM steps
            point = second
            resp, _ = _vmf_e_step(unit, point)
        state = _vmf_m_step(unit, resp, point.directions)
        steps += 1
    return VMFMixture(state.directions, state.log_prior, state.concentration, steps)
