"""``ConceptBasis``: the artifact of an extraction (METHOD.md sections 1-3).

One concept i is a pair of directions in a layer's activation space plus a threshold:

- ``decoding[i]`` (w_i) and ``bias[i]`` (b_i): the detector, concept present where
  ``w_i . x > b_i`` on the raw (uncentred) activation x;
- ``encoding[i]`` (s_i): the signal vector, the direction along which the concept moves x;
- ``mean`` (D,): the mean activation, the origin of the latent factors
  ``a_hat_i = (w_i . x - w_i . mean) / (w_i . s_i)``;
- ``absent_level`` (K,), optional: each concept's mean latent factor over the patches where it
  is not detected, the level a removal lowers it to (``pc.intervene(remove=...)``). Bases
  saved without it remove down to the mean (level 0).

Saved as safetensors: the tensors plus string metadata (format marker, version, layer,
model identity, method, creation settings as JSON). Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import secrets
import socket
import warnings
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

__all__ = ["ConceptBasis", "FORMAT_NAME", "FORMAT_VERSION", "model_fingerprint"]

FORMAT_NAME = "pyconcepts.ConceptBasis"
FORMAT_VERSION = 1
_TENSOR_NAMES = ("decoding", "bias", "encoding", "mean")
_OPTIONAL_TENSOR_NAMES = ("absent_level",)


def _as_float_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    value = value.detach().to(torch.float32)
    if not bool(torch.isfinite(value).all()):  # finite in float64, beyond float32
        raise ValueError(f"{name} has values beyond the float32 range (|v| > 3.4e38)")
    return value


class ConceptBasis:
    """Decoding directions W (K, D), biases b (K,), encoding directions S (K, D), mean (D,).

    ``layer`` and ``model_id`` say where the activations came from; ``metadata`` is a
    JSON-serialisable dict (method, creation settings, anything else worth keeping).
    """

    def __init__(
        self,
        decoding: torch.Tensor,
        bias: torch.Tensor,
        encoding: torch.Tensor,
        mean: torch.Tensor,
        *,
        layer: Optional[str] = None,
        model_id: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
        absent_level: Optional[torch.Tensor] = None,
    ):
        decoding = _as_float_tensor(decoding, "decoding")
        bias = _as_float_tensor(bias, "bias")
        encoding = _as_float_tensor(encoding, "encoding")
        mean = _as_float_tensor(mean, "mean")
        if decoding.dim() != 2 or decoding.shape[0] < 1 or decoding.shape[1] < 1:
            raise ValueError(f"decoding must be (K, D) with K, D >= 1, got {tuple(decoding.shape)}")
        k, d = decoding.shape
        if tuple(bias.shape) != (k,):
            raise ValueError(f"bias must have shape ({k},), got {tuple(bias.shape)}")
        if tuple(encoding.shape) != (k, d):
            raise ValueError(f"encoding must have shape ({k}, {d}), got {tuple(encoding.shape)}")
        if tuple(mean.shape) != (d,):
            raise ValueError(f"mean must have shape ({d},), got {tuple(mean.shape)}")
        if absent_level is not None:
            absent_level = _as_float_tensor(absent_level, "absent_level")
            if tuple(absent_level.shape) != (k,):
                raise ValueError(f"absent_level must have shape ({k},), got {tuple(absent_level.shape)}")
        devices = {t.device for t in (decoding, bias, encoding, mean)}
        if absent_level is not None:
            devices.add(absent_level.device)
        if len(devices) != 1:
            raise ValueError(f"decoding, bias, encoding and mean are on different devices: {devices}")
        gains = (decoding.double() * encoding.double()).sum(1)
        # relative to |w| |s|: a gain at rounding level is no better than 0
        floor = 1e-6 * decoding.double().norm(dim=1) * encoding.double().norm(dim=1)
        bad = (~(gains > floor)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ValueError(
                f"encoding row {i} has decoding[{i}] . encoding[{i}] = {float(gains[i]):.3g}: it must be > 0 (the "
                "latent factor divides by it; an extracted basis has 1), or the concept's edits are undefined "
                "or reversed")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a str or None, got {type(layer).__name__}")
        if model_id is not None and not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str or None, got {type(model_id).__name__}")
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
        except RecursionError:
            raise ValueError("metadata is nested too deeply to be saved") from None
        self.decoding = decoding.contiguous()
        self.bias = bias.contiguous()
        self.encoding = encoding.contiguous()
        self.mean = mean.contiguous()
        self.absent_level = None if absent_level is None else absent_level.contiguous()
        self.layer = layer
        self.model_id = model_id
        self.metadata = metadata

    # ------------------------------------------------------------------ properties
    @property
    def n_concepts(self) -> int:
        return self.decoding.shape[0]

    @property
    def dim(self) -> int:
        return self.decoding.shape[1]

    @property
    def device(self) -> torch.device:
        return self.decoding.device

    @property
    def margin(self) -> torch.Tensor:
        """1 / ||w_i||: each detector's margin (METHOD.md section 1)."""
        return 1.0 / self.decoding.norm(dim=1)

    def to(self, device: Union[str, torch.device]) -> "ConceptBasis":
        """A copy with every tensor on ``device``."""
        return ConceptBasis(
            self.decoding.to(device), self.bias.to(device), self.encoding.to(device),
            self.mean.to(device), layer=self.layer, model_id=self.model_id,
            metadata=self.metadata,
            absent_level=None if self.absent_level is None else self.absent_level.to(device),
        )

    def __repr__(self) -> str:
        where = f", layer={self.layer!r}" if self.layer else ""
        model = f", model_id={self.model_id!r}" if self.model_id else ""
        return f"ConceptBasis(n_concepts={self.n_concepts}, dim={self.dim}{where}{model})"

    # ------------------------------------------------------------------ use
    def _check_x(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have last dimension D = {self.dim}, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):  # NaN compares False: a silent "not detected"
            raise ValueError("x contains NaN or Inf")
        return x

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) detector pre-activations ``w_i . x - b_i`` on raw activations."""
        x = self._check_x(x)
        w = self.decoding.to(device=x.device, dtype=x.dtype)
        return x @ w.T - self.bias.to(device=x.device, dtype=x.dtype)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) bool: concept i detected where ``decoding[i] @ x > bias[i]`` (raw x)."""
        return self.scores(x) > 0

    def membership(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) soft detector output ``sigmoid(w_i . x - b_i)``."""
        return torch.sigmoid(self.scores(x))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) latent factors ``(w_i . x - w_i . mean) / (w_i . s_i)`` (METHOD.md s. 3)."""
        x = self._check_x(x)
        w = self.decoding.to(device=x.device, dtype=x.dtype)
        offset = (self.decoding @ self.mean).to(device=x.device, dtype=x.dtype)
        gain = (self.decoding * self.encoding).sum(dim=1).to(device=x.device, dtype=x.dtype)
        return (x @ w.T - offset) / gain

    # ------------------------------------------------------------------ provenance
    def record_model(self, model) -> None:
        """Record ``model_fingerprint(model)`` (architecture and weights) in the metadata, so
        that ``compatibility_problems`` can tell when the basis meets another model."""
        self.metadata["model_fingerprint"] = model_fingerprint(model)

    def compatibility_problems(self, *, layer: Optional[str] = None, width: Optional[int] = None,
                               model=None) -> List[str]:
        """Why this basis does not fit ``layer`` (its name), a layer of ``width`` channels, or
        ``model`` (compared with the recorded fingerprint); ``[]`` when it fits (or when the
        basis records nothing to compare)."""
        problems = []
        if layer is not None and self.layer is not None and layer != self.layer:
            problems.append(f"the basis was extracted at layer {self.layer!r}, not {layer!r}")
        if width is not None and width != self.dim:
            problems.append(f"the basis has width D = {self.dim} but the layer has {width} channels")
        recorded = self.metadata.get("model_fingerprint")
        if model is not None and isinstance(recorded, dict):
            current = model_fingerprint(model)
            if recorded.get("architecture") != current["architecture"]:
                problems.append(f"the basis was extracted from {self.model_id or 'another model'}, whose "
                                "parameter names or shapes differ from this model's")
            elif recorded.get("weights") != current["weights"]:
                problems.append(f"the basis was extracted from {self.model_id or 'a model'} with other "
                                "weights (same parameter names and shapes)")
        return problems

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the basis to ``path`` as safetensors, atomically: a temp file in the same
        directory, renamed over ``path``. The file gets the usual mode for new files (0666
        less the umask). A failure leaves ``path`` as it was and raises an error naming it;
        temp files of writers that were killed are removed by the next save to ``path``."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous().clone() for name in _TENSOR_NAMES}
        if self.absent_level is not None:
            tensors["absent_level"] = self.absent_level.detach().cpu().contiguous().clone()
        # the attributes can be changed after construction: check them as load will, so a file
        # that load refuses is never written
        try:
            type(self)(tensors["decoding"], tensors["bias"], tensors["encoding"], tensors["mean"],
                       layer=self.layer, model_id=self.model_id, metadata=self.metadata,
                       absent_level=tensors.get("absent_level"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot save the ConceptBasis to {path!r}: {exc}") from None
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "pyconcepts_version": _package_version(),
            "layer": json.dumps(self.layer),
            "model_id": json.dumps(self.model_id),
            "method": json.dumps(self.metadata.get("method")),
            "settings": json.dumps(self.metadata.get("settings")),
            "metadata": json.dumps(self.metadata),
        }
        header[_CHECKSUM_KEY] = _checksum(tensors, header)
        _remove_stale_temps(path)
        tmp = _temp_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot save a ConceptBasis to {path!r}: "
                          f"{exc.strerror}") from None
        try:
            save_file(tensors, tmp, metadata=header)
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors itself creates files 0600
            _flush_to_disk(tmp)  # the rename must not reach the disk before the contents
            os.replace(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            renamed = _naming_target(exc, path) if isinstance(exc, Exception) else exc
            if renamed is exc:
                raise
            raise renamed from exc

    @classmethod
    def load(
        cls, path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu"
    ) -> "ConceptBasis":
        """Read a basis written by ``save``. A missing, corrupt or foreign file raises
        ``FileNotFoundError`` / ``ValueError`` saying which."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ConceptBasis file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                header = handle.metadata() or {}
                names = set(handle.keys())
                if header.get("format") != FORMAT_NAME:
                    raise _Foreign(
                        f"{path!r} is a safetensors file but not a pyconcepts ConceptBasis "
                        f"(format marker {header.get('format')!r})"
                    )
                missing = [n for n in _TENSOR_NAMES if n not in names]
                if missing:
                    raise _Foreign(f"{path!r} lacks the tensor(s) {missing}")
                tensors = {n: handle.get_tensor(n) for n in _TENSOR_NAMES + _OPTIONAL_TENSOR_NAMES
                           if n in names}
        except _Foreign as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:  # safetensors raises its own error types for bad bytes
            raise ValueError(
                f"{path!r} is not a readable safetensors file (corrupt or truncated?): {exc}"
            ) from None
        try:
            version = int(header.get("format_version", "0"))
        except ValueError:
            version = 0
        if version < 1 or version > FORMAT_VERSION:
            raise ValueError(
                f"{path!r} has ConceptBasis format version {header.get('format_version')!r}; "
                f"this pyconcepts reads versions 1..{FORMAT_VERSION}"
            )
        recorded = header.get(_CHECKSUM_KEY)
        if recorded is not None and recorded != _checksum(tensors, header):
            raise ValueError(f"{path!r} is corrupt: its contents do not match the checksum written with them")
        try:
            layer = json.loads(header.get("layer", "null"))
            model_id = json.loads(header.get("model_id", "null"))
            metadata = json.loads(header.get("metadata", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path!r} has corrupt metadata: {exc}") from None
        except RecursionError:
            raise ValueError(f"{path!r} has corrupt metadata: nested too deeply") from None
        try:
            basis = cls(
                tensors["decoding"], tensors["bias"], tensors["encoding"], tensors["mean"],
                layer=layer, model_id=model_id, metadata=metadata,
                absent_level=tensors.get("absent_level"),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!r} holds an inconsistent ConceptBasis: {exc}") from None
        if basis.absent_level is None and str(metadata.get("method") or "").startswith("pyconcepts.extract"):
            warnings.warn(f"{path!r} was extracted by pyconcepts but records no absent levels (an older version "
                          "wrote it, or it was edited): removals lower its concepts to the layer's mean instead of "
                          "their level where they are not detected; extract it again for the levels", stacklevel=2)
        return basis.to(device) if torch.device(device).type != "cpu" else basis


def is_basis_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a regular safetensors file with the ConceptBasis format marker and
    tensors (its header only is read; the values are not checked). A pipe or a device is not
    opened."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return ((handle.metadata() or {}).get("format") == FORMAT_NAME
                    and set(_TENSOR_NAMES) <= set(handle.keys()))
    except Exception:  # not safetensors, unreadable or truncated
        return False


def _flush_to_disk(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def concept_index(i, k: int, name: str) -> int:
    """One concept index of a basis of ``k`` concepts (an int, a numpy int or a 0-d tensor;
    negative counts from the end), checked; errors name the argument ``name``."""
    if isinstance(i, bool):
        raise TypeError(f"{name}: concept index must be an int, got {i!r}")
    try:
        i = operator.index(i.item() if isinstance(i, torch.Tensor) and i.numel() == 1 else i)
    except TypeError:
        raise TypeError(f"{name}: concept index must be an int, got {i!r}") from None
    if not -k <= i < k:
        raise IndexError(f"{name}: concept index {i} is out of range for a basis of {k} concepts")
    return i % k


def concept_indices(concepts, k: int, name: str) -> List[int]:
    """``concepts``, one index or several (a list, a tensor, an array), checked with
    ``concept_index``; None gives none."""
    if concepts is None:
        return []
    one = isinstance(concepts, torch.Tensor) and concepts.dim() == 0
    if one or not isinstance(concepts, (torch.Tensor, Iterable)):
        concepts = [concepts]
    return [concept_index(i, k, name) for i in concepts]


def layer_to_apply(basis, layer: Optional[str]) -> str:
    """The layer a basis is applied at: ``layer``, or the one it records. Warns when ``layer``
    names another layer than the recorded one (same width passes every other check, so a
    basis from another layer would otherwise give answers without a word)."""
    recorded = getattr(basis, "layer", None)
    if layer is None:
        if recorded is None:
            raise ValueError("layer is needed: the basis does not record the layer it was extracted at")
        return recorded
    if recorded is not None and layer not in (recorded, "inner." + recorded):  # inner.: the report's wrapper
        warnings.warn(f"the basis was extracted at layer {recorded!r} and is applied at {layer!r}: its "
                      "directions read that layer's channels as if they were the other's", stacklevel=3)
    return layer


def skip_tokens_to_apply(basis, skip_tokens: Optional[int]) -> int:
    """The leading tokens of a token layer that are not patches: ``skip_tokens``, or the number
    the basis was extracted with (``metadata["skip_tokens"]``; 0 when it records none). Warns
    when a given number differs from the recorded one: the basis's rows would then mix a class
    token with the patches, or leave a patch out."""
    recorded = (getattr(basis, "metadata", None) or {}).get("skip_tokens")
    if skip_tokens is None:
        return int(recorded or 0)
    if recorded is not None and int(recorded) != int(skip_tokens):
        warnings.warn(f"the basis was extracted with skip_tokens={int(recorded)} and is applied with "
                      f"skip_tokens={int(skip_tokens)}: leave it out to use the recorded number", stacklevel=3)
    return int(skip_tokens)


def recorded_clamp(basis, clamp: Optional[bool]) -> Optional[bool]:
    """``clamp`` if given, else whether the basis's layer was non-negative on every activation
    it was extracted from (``metadata["nonnegative"]``), so that every batch is edited alike;
    None (decide from each batch) for a basis that does not record it."""
    if clamp is not None:
        return bool(clamp)
    recorded = (getattr(basis, "metadata", None) or {}).get("nonnegative")
    return None if recorded is None else bool(recorded)


class _Foreign(Exception):
    pass


_CHECKSUM_KEY = "checksum_blake2b"


def _checksum(tensors: Dict[str, torch.Tensor], header: Dict[str, str]) -> str:
    """blake2b of the tensors (names, dtypes, shapes, bytes) and of the header's other entries:
    a flipped byte anywhere in a saved basis shows at load (files saved without it load as
    they are)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for key in sorted(k for k in header if k != _CHECKSUM_KEY):
        digest.update(f"{key}={header[key]}\n".encode())
    return digest.hexdigest()


def model_fingerprint(model) -> Dict[str, str]:
    """Hashes of a model: ``architecture`` (parameter and buffer names, shapes and dtypes) and
    ``weights`` (their values, byte for byte). The class name is left out: a wrapper or a
    renamed class with the same tensors computes with the same layer. Hashing reads every
    weight once."""
    arch = hashlib.blake2b(digest_size=16)
    weights = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        arch.update(f";{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        weights.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return {"architecture": arch.hexdigest(), "weights": weights.hexdigest()}


# Temp files: ".<target name>.tmp-<host>-<pid>-<random>" next to the target, so a later save
# can tell the leftovers of a writer that was killed (same host, process gone) from a
# concurrent writer's file.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}")


def _remove_stale_temps(path: str) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.tmp-{_HOST}-"
    try:
        entries = os.listdir(directory)
    except OSError:
        return  # the save itself reports an unusable directory
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass  # another save removed it first


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists but belongs to someone else (or cannot be asked)
    return True


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _naming_target(exc: Exception, path: str) -> Exception:
    """exc, reworded to name the file being saved rather than the temp file."""
    if isinstance(exc, OSError):
        reason = exc.strerror or exc
        return OSError(exc.errno, f"cannot save a ConceptBasis to {path!r}: {reason}")
    try:
        return type(exc)(f"cannot save a ConceptBasis to {path!r}: {exc}")
    except Exception:  # an exception type with another constructor
        return exc


def _package_version() -> str:
    try:
        from . import __version__
    except ImportError:  # pragma: no cover
        return "unknown"
    return __version__
