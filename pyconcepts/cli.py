"""The ``pyconcepts`` command: extract, report, explain, intervene, bench, demo.

    pyconcepts demo [--json PATH] [--report-dir D] the built-in demo (offline, ~minutes on 2 cores);
                                                   writes its concept report to report/index.html
    pyconcepts extract --model my_model.py:make --weights w.safetensors --images photos/ \\
        --layer NAME -k K --out basis.safetensors
    pyconcepts report basis.safetensors --model ... --weights ... --images photos/ --out report/
    pyconcepts explain basis.safetensors --model ... --images ...     concepts behind each prediction
    pyconcepts intervene basis.safetensors --model ... --images ... --remove I   predictions without concept I
    pyconcepts bench                               time the extraction pipeline on the demo

Without ``--model`` every command uses the built-in demo network and generated demo images; a
basis extracted from another model is refused then, with the ``--model`` it came from.
``--model`` imports and runs Python code (a file path or module name and a factory in it).
``--images`` is a folder of image files (class subfolders optional) or a tensor file (.pt,
.npy, .safetensors). A user mistake ends with one line on stderr and exit code 2 (``--debug``
shows the traceback). Progress goes to stderr (text bars on a terminal, one line per stage
otherwise; ``--quiet`` turns it off, for every command); results go to stdout. ``torchrun --nproc_per_node=N -m pyconcepts extract ...``
shards the images across ranks (gloo) and rank 0 writes the basis.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import sys
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["main", "ProgressBar", "UserError", "load_model", "select_output", "selecting_output",
           "call_with_output"]


class ProgressBar:
    """A ``progress(stage, done, total)`` callback drawing one text bar per stage on stderr.

    When the stream is not a terminal (a CI log), carriage-return bars would pile up into one
    unreadable line, so it writes one line per stage instead, when the stage ends (or when the
    next one starts), with the stage's duration."""

    def __init__(self, stream=None, width: int = 30, enabled: bool = True, interactive: Optional[bool] = None):
        self.stream = stream or sys.stderr
        self.width, self.enabled = width, enabled
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.stage: Optional[str] = None
        self.last = 0.0
        self.stage_start = 0.0
        self.stage_done: Optional[Tuple[int, Optional[int]]] = None
        self.reported = False

    def __call__(self, stage: str, done: int, total: Optional[int]) -> None:
        if not self.enabled:
            return
        if not self.interactive:
            self._line(stage, done, total)
            return
        now = time.time()
        finished = total is not None and done >= total
        if stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage = stage
        elif not finished and now - self.last < 0.1:
            return
        self.last = now
        if total:
            filled = int(self.width * min(done, total) / total)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r  {stage:<16} [{bar}] {done}/{total}")
        else:
            self.stream.write(f"\r  {stage:<16} {done}")
        self.stream.flush()

    def _line(self, stage: str, done: int, total: Optional[int]) -> None:
        now = time.time()
        if stage != self.stage:
            self._finish_line(now)
            self.stage, self.stage_start, self.reported = stage, now, False
        self.stage_done = (done, total)
        if total is not None and done >= total and not self.reported:
            self._finish_line(now)

    def _finish_line(self, now: float) -> None:
        if self.stage is None or self.reported or self.stage_done is None:
            return
        done, total = self.stage_done
        count = f"{done}/{total}" if total else f"{done}"
        self.stream.write(f"  {self.stage}: {count} ({now - self.stage_start:.1f} s)\n")
        self.stream.flush()
        self.reported = True

    def close(self) -> None:
        if self.enabled and self.stage is not None:
            if self.interactive:
                self.stream.write("\n")
            else:
                self._finish_line(time.time())
            self.stream.flush()
        self.stage = None


# ------------------------------------------------------------------------------ errors
class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (torch's run over several), at most 400 characters."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


# ------------------------------------------------------------------------ model loading
def _import_factory_module(module_part: str, spec: str, option: str = "--model"):
    """The module named by the part of ``spec`` before the colon: a ``.py`` file or a module name
    (the working directory is importable)."""
    import importlib.util

    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = os.path.abspath(module_part)
        if not os.path.isfile(path):
            raise UserError(f"{option} {spec}: no such file {module_part!r}")
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # so that the file can import its neighbours
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"{option} {spec}: cannot import {module_part!r} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"{option} {spec}: importing {module_part} raised "
                            f"{type(exc).__name__}: {_one_line(exc)}") from exc
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        if exc.name and (module_part == exc.name or module_part.startswith(exc.name + ".")):
            raise UserError(f"{option} {spec}: no module named {module_part!r} in the working directory "
                            "or the installed packages (for a file, give path/to/file.py:factory)") from exc
        raise UserError(f"{option} {spec}: importing {module_part} raised ModuleNotFoundError: "
                        f"{_one_line(exc)}") from exc
    except Exception as exc:
        raise UserError(f"{option} {spec}: importing {module_part} raised "
                        f"{type(exc).__name__}: {_one_line(exc)}") from exc


def _build_model(spec: str) -> torch.nn.Module:
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UserError(f"--model must be path/to/file.py:factory, package.module:factory, "
                        f"torchvision:NAME or timm:NAME, got {spec!r}")
    if module_part == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise UserError(f"--model {spec} needs torchvision, which is not installed") from None
        try:
            return torchvision.models.get_model(attr, weights=None)  # never downloads: weights=None
        except ValueError as exc:
            raise UserError(f"--model {spec}: {_one_line(exc)}") from exc
    if module_part == "timm":
        try:
            import timm
        except ImportError:
            raise UserError(f"--model {spec} needs timm, which is not installed") from None
        try:
            return timm.create_model(attr, pretrained=False)  # never downloads: pretrained=False
        except RuntimeError as exc:
            raise UserError(f"--model {spec}: {_one_line(exc)}") from exc
    module = _import_factory_module(module_part, spec)
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        hint = f" (it defines: {', '.join(defined[:12])})" if defined else ""
        raise UserError(f"--model {spec}: {os.path.basename(module_part)} has no {attr!r}{hint}")
    factory = getattr(module, attr)
    if isinstance(factory, torch.nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except Exception as exc:
            raise UserError(f"--model {spec}: {attr}() raised {type(exc).__name__}: {_one_line(exc)}") from exc
    else:
        raise UserError(f"--model {spec}: {attr} is a {type(factory).__name__}, not a factory or a module")
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"--model {spec}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "weights")


def _read_state_dict(path: str, allow_pickle: bool) -> dict:
    """A state dict from a .safetensors file or a torch.save file (read with weights_only
    unless ``allow_pickle``), unwrapped from the usual checkpoint dicts."""
    import pickle

    if not os.path.exists(path):
        raise UserError(f"--weights: no such file {path!r}")
    if os.path.isdir(path):
        raise UserError(f"--weights: {path!r} is a folder; give the weights file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own error types for bad bytes
            raise UserError(f"--weights: {path!r} is not a readable safetensors file: {_one_line(exc)}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        with open(path, "rb") as handle:
            head = handle.read(4)
        if not head.startswith(b"PK") and not head[:1] == b"\x80":  # neither a torch zip nor a pickle
            raise UserError(f"--weights: {path!r} is not a weights file (.safetensors or a torch.save "
                            "state dict)") from exc
        if allow_pickle:
            raise UserError(f"--weights: cannot read {path!r}: {_one_line(exc)}") from exc
        raise UserError(f"--weights: {path!r} holds more than tensors (a pickle); pass --allow-pickle "
                        "only if you trust the file (unpickling runs code)") from exc
    except Exception as exc:
        raise UserError(f"--weights: cannot read {path!r} as safetensors or a torch.save file: "
                        f"{_one_line(exc)}") from exc
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in _STATE_KEYS:
            inner = state.get(key)
            if isinstance(inner, torch.nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights: {path!r} does not hold a state dict (name -> tensor)")
    return state


def _load_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """``model.load_state_dict(state)`` with a one-line summary of what does not match."""
    own = model.state_dict()
    if own and state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel / DDP
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing from the file", missing), ("not in the model", unexpected),
                             ("with other shapes (file vs model)", shapes)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise UserError(f"--weights {path} does not fit the model ({len(own)} tensors): " + "; ".join(parts))
    model.load_state_dict(state)


def load_model(spec: Optional[str], weights: Optional[str], *, allow_pickle: bool = False) -> torch.nn.Module:
    """The model the command line names (the demo network without ``spec``), in eval mode,
    with ``weights`` loaded. Raises ``UserError`` with one line for every mistake."""
    if spec is None:
        from .demo.model import ShapesNet
        from .demo.run import WEIGHTS_PATH

        model = ShapesNet()
        path = weights or WEIGHTS_PATH
        _load_state(model, _read_state_dict(path, allow_pickle), path)
        return model.eval()
    model = _build_model(spec)
    if weights:
        _load_state(model, _read_state_dict(weights, allow_pickle), weights)
    elif any(True for _ in model.parameters()):
        print(f"pyconcepts: warning: no --weights: {spec} runs with the weights its factory gave it "
              "(random ones, unless the factory loads trained weights)", file=sys.stderr)
    return model.eval()


# ----------------------------------------------------------------------- model outputs
def parse_output(text: Optional[str]):
    """``--output``: an int index, a key, or ``file.py:function`` (a function of the model's
    output returning its class scores; this runs that file) (``None``: the model returns the
    logits)."""
    if text is None:
        return None
    stripped = text.strip()
    try:
        return int(stripped)
    except ValueError:
        pass
    path, sep, name = stripped.rpartition(":")
    if sep and path.endswith(".py") and name:
        fn = _load_callable(stripped, "--output")
        try:   # the basis records this name (it cannot keep the function)
            fn.__pyconcepts_spec__ = stripped
        except (AttributeError, TypeError):
            pass
        return fn
    return stripped


def _output_of(args, basis):
    """``--output``, or else the one the basis was extracted with (``metadata['output']``)."""
    from .outputs import output_or_recorded

    return output_or_recorded(parse_output(args.output), basis)


def select_output(out, output):
    """The logits in what a model returned (``pyconcepts.outputs.select_output``), with
    ``UserError``s that speak of ``--output``."""
    from collections.abc import Mapping

    from .outputs import select_output as select

    if output is None and not isinstance(out, torch.Tensor):
        if isinstance(out, Mapping):
            raise UserError(f"the model returns a mapping with keys {list(out)[:8]}; pass --output KEY "
                            "to pick the logits")
        if isinstance(out, (tuple, list)):
            raise UserError(f"the model returns a {type(out).__name__} of {len(out)}; pass --output INDEX "
                            f"(0..{len(out) - 1}) to pick the logits")
        raise UserError(f"the model returns a {type(out).__name__}, not a tensor; pass --output to pick the logits")
    try:
        return select(out, output)
    except (ValueError, TypeError) as exc:
        raise UserError(_one_line(exc).replace("output=", "--output ")) from exc


@contextlib.contextmanager
def selecting_output(model: torch.nn.Module, output):
    """Within the block, ``model(x)`` returns ``select_output(model(x), output)`` (a forward
    hook on the model itself, so layer names do not change). Nothing is installed for None."""
    if output is None:
        yield model
        return
    handle = model.register_forward_hook(lambda module, inputs, out: select_output(out, output))
    try:
        yield model
    finally:
        handle.remove()


def call_with_output(fn, *args, model: torch.nn.Module, output, **kwargs):
    """``fn(*args, **kwargs)`` with the model's logits selected by ``output``: passed on as
    ``output=`` when ``fn`` takes it, else through ``selecting_output``."""
    if output is not None:
        try:
            takes = "output" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            return fn(*args, output=output, **kwargs)
    with selecting_output(model, output):
        return fn(*args, **kwargs)


class _Probe:
    """One image through the model: the layer's width and kind, the number of outputs.

    ``needs_scores``: whether the command reads the class scores. When it does not (extract
    without URA) and no ``--output`` is given, the model may return anything (``n_outputs`` is
    then None); a given ``--output`` is checked either way, as ``pc.extract`` does.
    ``why_scores`` says, in the error of a model whose output needs ``--output``, what reads it."""

    def __init__(self, model, layer: str, source, output, skip_tokens: int = 0, *,
                 needs_scores: bool = True, why_scores: str = ""):
        from .taps import LayerTap

        tap = LayerTap(model, layer, skip_tokens=skip_tokens)
        first = next(iter(source.batches(1)))
        name = source.names[0]
        seen = {}

        def keep(out):
            seen["out"] = out  # and return None: the layer's output is left as it is

        with tap.eval_mode(), torch.no_grad(), tap.hook(keep):
            try:
                batch = tap._check_images(first)
                out = model(batch)
            except UserError:
                raise
            except ValueError as exc:
                raise UserError(f"{_one_line(exc)} (first image {name!r})") from exc
            except Exception as exc:
                raise UserError(f"the model fails on the first image ({name!r}, input shape "
                                f"{tuple(first.shape[1:])}): {type(exc).__name__}: {_one_line(exc)}") from exc
        if "out" not in seen:
            raise UserError(f"layer {layer!r} is not called by the model's forward")
        self.width = int(tap.shape.channels)
        self.kind = tap.shape.kind
        self.positions = int(tap.shape.positions)
        self.input_shape = tuple(first.shape[1:])
        self.n_outputs: Optional[int] = None
        if not needs_scores and output is None:
            return
        try:
            logits = select_output(out, output)
        except UserError as exc:
            if output is None and why_scores:
                raise UserError(f"{exc} ({why_scores})") from exc
            raise
        from .outputs import read_scores

        # read as every command reads it (one logit per image is a yes / no output: 2 classes)
        try:
            self.n_outputs = int(read_scores(logits, None, "logits").shape[1])
        except (ValueError, TypeError) as exc:
            raise UserError(str(exc).replace("output=", "--output ")) from exc


# ------------------------------------------------------------------------ image inputs
def _size_arg(text: str):
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
            return (h, w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None


def _stats_arg(text: str):
    if text.lower() == "imagenet":
        return text.lower()
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'imagenet' or comma-separated numbers, got {text!r}") from None


def _int_range(low: int, high: Optional[int] = None, note: str = ""):
    """An argparse type: a whole number in [low, high] (``note`` says why, in the message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}{note}, got {value}")
        return value

    return parse


_positive_int = _int_range(1)
_at_least_two = _int_range(2, note=" (the demo compares concepts)")
_seed = _int_range(0, 2 ** 63 - 1)
_threads = _int_range(0, note=" (0: torch's choice)")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _strength(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (a negative strength would add the concept; "
                                         f"pc.intervene(amplify={{i: factor}}) raises a concept), got {text!r}")
    return value


def _amplify_pair(text: str) -> Tuple[int, float]:
    index, sep, factor = text.partition("=")
    try:
        i = int(index)
    except ValueError:
        i = None
    if not sep or i is None:
        raise argparse.ArgumentTypeError(f"expected CONCEPT=FACTOR such as 3=2, got {text!r}")
    value = _finite_float(factor)
    if value < 0:
        raise argparse.ArgumentTypeError(f"the factor must be >= 0 (0 removes the concept), got {text!r}")
    return i, value


def _load_callable(spec: str, option: str):
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UserError(f"{option} must be path/to/file.py:function or module:function, got {spec!r}")
    module = _import_factory_module(module_part, spec, option)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{option} {spec}: {module_part} has no function {attr!r}")
    return fn


def _preprocess(args, channels: int = 3):
    from .images import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    mean = IMAGENET_MEAN if args.mean == "imagenet" else args.mean
    std = IMAGENET_STD if args.std == "imagenet" else args.std
    transform = _load_callable(args.transform, "--transform") if args.transform else None
    if transform is not None and (args.resize or args.crop or mean or std):
        raise UserError("--transform replaces --resize, --crop, --mean and --std; give one or the other")
    try:
        return Preprocess(resize=args.resize, crop=args.crop, mean=mean, std=std, channels=channels,
                          transform=transform)
    except (ValueError, TypeError) as exc:
        text = _one_line(exc)
        # name the flag: Preprocess names its own arguments (mean, std, resize, crop)
        flag = next((f for f in ("mean", "std", "resize", "crop", "transform") if text.startswith(f + " ")), None)
        raise UserError(f"--{flag}: {text}" if flag else text) from exc


def _demo_images(n: int, seed: int):
    from .datasets.shapes import CLASSES, make_shapes
    from .images import TensorImages

    data = make_shapes(n, seed=seed, watermark="random", watermark_rate=0.3, with_masks=False)
    return TensorImages(data.images, names=[f"demo image {i}" for i in range(n)], labels=data.labels,
                        class_names=list(CLASSES))


_PREPROCESS_FLAGS = ("resize", "crop", "mean", "std", "transform")


def _preprocess_record(args) -> dict:
    """The preprocessing flags as a basis records them (JSON: sizes as lists)."""
    return {f: (list(v) if isinstance(v, tuple) else v) for f in _PREPROCESS_FLAGS
            for v in [getattr(args, f, None)]}


def _flag_text(record: dict) -> str:
    parts = []
    for f in _PREPROCESS_FLAGS:
        v = record.get(f)
        if v is None:
            continue
        if isinstance(v, list):
            v = "x".join(str(x) for x in v) if f in ("resize", "crop") else ",".join(f"{x:g}" for x in v)
        parts.append(f"--{f} {v}")
    return " ".join(parts) or "none"


def _same_preprocessing(a: dict, b: dict) -> bool:
    """Whether two recorded preprocessings prepare images alike (crop N is N x N; 'imagenet'
    is its numbers)."""
    from .images import IMAGENET_MEAN, IMAGENET_STD

    def norm(record):
        out = {}
        for f in _PREPROCESS_FLAGS:
            v = record.get(f)
            if f == "crop" and isinstance(v, int):
                v = [v, v]
            if f in ("mean", "std") and v == "imagenet":
                v = list(IMAGENET_MEAN if f == "mean" else IMAGENET_STD)
            if f in ("mean", "std") and isinstance(v, list):
                v = [round(float(x), 6) for x in v]
            out[f] = list(v) if isinstance(v, tuple) else v
        return out
    return norm(a) == norm(b)


def _preprocess_as_extracted(args, basis) -> None:
    """Without any preprocessing flag, use what the basis was extracted with (and say so), but
    never a recorded --transform (code named in a file is not run unless the user names it);
    with flags that differ from it, warn: the concepts were found on images prepared that way."""
    recorded = (basis.metadata or {}).get("preprocess") if basis is not None else None
    if recorded is None or args.images is None:
        return
    given = _preprocess_record(args)
    if all(v is None for v in given.values()):
        if recorded.get("transform") is not None:
            _warn(f"the basis was extracted from images prepared with --transform {recorded['transform']}: give it "
                  "again to prepare these alike (a transform recorded in a basis is not run by default)")
        elif any(v is not None for v in recorded.values()):
            for f in _PREPROCESS_FLAGS:
                v = recorded.get(f)
                setattr(args, f, tuple(v) if isinstance(v, list) and f in ("resize", "crop") else v)
            _warn(f"no preprocessing given: using the basis's, {_flag_text(recorded)}")
    elif not _same_preprocessing(given, recorded):
        _warn(f"the basis was extracted from images prepared with {_flag_text(recorded)}, these with "
              f"{_flag_text(given)}: its concepts may not read them alike")


def _check_input_shape(probe, basis) -> None:
    recorded = (basis.metadata or {}).get("input_shape") if basis is not None else None
    if recorded is not None and list(probe.input_shape) != list(recorded):
        _warn(f"the images reach the model as {'x'.join(map(str, probe.input_shape))}, the basis was extracted "
              f"from {'x'.join(map(str, recorded))}: unless the network is fully convolutional, a layer's "
              "patches then see the picture at another scale or place (give --resize / --crop as at extraction)")


def _open_source(args, model, default_count: int, basis=None):
    """The image source of ``--images`` (``--limit`` images spread evenly over it) or generated
    demo images. With a ``basis``, the preprocessing defaults to the one it records."""
    _preprocess_as_extracted(args, basis)
    if args.images is None:
        if args.model is not None:
            raise UserError("--images is required with --model (the generated demo images only fit the demo network)")
        return _demo_images(args.limit or default_count, args.seed)
    from .images import open_images
    from .taps import _input_channels

    channels = 1 if _input_channels(model) == 1 else 3
    try:
        source = open_images(args.images, preprocess=_preprocess(args, channels), allow_pickle=args.allow_pickle)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(f"--images: {_one_line(exc)}") from exc
    except (ValueError, TypeError) as exc:
        raise UserError(f"--images: {_one_line(exc)}") from exc
    skipped = getattr(source, "skipped", None)
    if skipped:
        name, why = skipped[0]
        _warn(f"skipped {len(skipped)} unreadable file(s) in {args.images} (first: {name}: {why})")
    if args.limit and args.limit < len(source):
        from .images import spread_indices

        source = source.select(spread_indices(len(source), args.limit))
    return source


def _warn(message: str) -> None:
    print(f"pyconcepts: warning: {message}", file=sys.stderr)


_shown_warnings: set = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """pyconcepts' own warnings as one line; others (the user's model, its libraries) with
    their origin, as Python prints them. Each text once per command: a warning raised per
    batch (how the outputs are read) would otherwise repeat whenever a stage resets the
    warning filters."""
    key = (category, str(message))
    if key in _shown_warnings:
        return
    _shown_warnings.add(key)
    package = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(str(filename)).startswith(package + os.sep):
        _warn(str(message))
    else:
        print(f"{filename}:{lineno}: {category.__name__}: {message}", file=sys.stderr)


# ---------------------------------------------------------------------- other checks
def _check_out_file(path: str, flag: str = "--out", example: str = "basis.safetensors") -> None:
    """--out of extract (or another flag's file): a file in an existing, writable folder
    (checked before any work)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; give a file name such as "
                        f"{os.path.join(path, example)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path!r}: the folder {folder!r} is not writable")
    if flag == "--out" and os.path.exists(path):
        from .basis import is_basis_file

        # a basis is replaced (a re-run); anything else may be the user's own file (the weights,
        # the model's source, the images)
        if not is_basis_file(path):
            raise UserError(f"--out {path!r} exists and is not a pyconcepts basis: extract replaces only basis "
                            "files; give another name, or delete it first")
    if flag == "--out" and not path.endswith(".safetensors"):
        _warn(f"--out {path!r} will be a safetensors file (pc.ConceptBasis.load reads it), whatever its name says")


def _check_out_folder(path: str, images: Optional[str] = None, flag: str = "--out") -> None:
    """--out of report: a folder that exists or can be made in an existing, writable folder,
    not one with a report's file names that no report wrote, nor inside the --images folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file; the report needs a folder")
    try:
        from .report.folder import check_report_folder
    except ImportError:   # no report package: said when the report is asked for
        check_report_folder = None
    if check_report_folder is not None:
        try:
            check_report_folder(path, images if images and os.path.isdir(images) else None, name=flag)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(target):
        raise UserError(f"{flag} {path!r}: the folder {target!r} does not exist")
    if not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path!r}: the folder {target!r} is not writable")


def _parse_options(text: Optional[str], known=None, option: str = "--options") -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{option} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from exc
    if not isinstance(value, dict):
        raise UserError(f"{option} must be a JSON object such as '{{\"n_init\": 3}}', got {text!r}")
    if known is not None:
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise UserError(f"{option}: unknown option(s) {unknown}; known: {', '.join(sorted(known))}")
    return value


def _load_basis(path: str):
    from .basis import ConceptBasis

    try:
        return ConceptBasis.load(path)
    except FileNotFoundError as exc:
        raise UserError(f"no basis file at {path!r}") from exc
    except ValueError as exc:
        raise UserError(_one_line(exc)) from exc


def _check_model_given(args, basis) -> None:
    """Without --model the commands run the demo network: a basis that records another model
    (its model_id, or a fingerprint of other parameter names and shapes) stops here, before
    any work, with the --model (and --weights) it was extracted with."""
    if args.model is not None or args.allow_mismatch:
        return
    from .demo.model import DEMO_MODEL_ID, ShapesNet

    model_id = basis.model_id
    if model_id == DEMO_MODEL_ID:
        return
    if model_id is None:  # a basis made in Python without model_id: its fingerprint, if any, tells
        from .basis import model_fingerprint

        recorded = basis.metadata.get("model_fingerprint")
        if not isinstance(recorded, dict) or \
                recorded.get("architecture") == model_fingerprint(ShapesNet())["architecture"]:
            return
    source = f"from {model_id}" if model_id else "from another model than the demo network"
    if model_id and ":" in model_id:  # a --model spec (file.py:factory, module:factory, torchvision:NAME)
        fix = f"pass --model {model_id}"
    else:
        fix = "pass --model with that network (path/to/file.py:factory)"
    weights = basis.metadata.get("weights", "unknown")
    if weights == "unknown":  # a basis that does not say which weights it came with
        fix += " (and its --weights)"
    elif weights:
        fix += f" --weights {weights}"
    raise UserError(f"{args.basis} was extracted {source}; {fix} (without --model the commands run the "
                    "demo network)")


def _check_basis_fits(basis, model, probe: "_Probe", layer: str, allow_mismatch: bool) -> None:
    problems = basis.compatibility_problems(layer=layer, width=probe.width, model=model)
    if not problems:
        return
    message = "; ".join(problems)
    if allow_mismatch and probe.width == basis.dim:
        _warn(f"{message} (applied anyway: --allow-mismatch)")
        return
    hint = "" if probe.width != basis.dim else " (--allow-mismatch applies it anyway)"
    raise UserError(message + hint)


def _model_setup(args, layer_from_basis=None):
    """Model, layer name, image source and probe for every command that runs the model."""
    model = load_model(args.model, args.weights, allow_pickle=args.allow_pickle)
    layer = args.layer or layer_from_basis
    if layer is None:
        if args.model is not None:
            raise UserError("--layer is required with --model (a name from model.named_modules())")
        from .demo.model import DEMO_LAYER

        layer = DEMO_LAYER
    from .taps import resolve_layer

    try:
        resolve_layer(model, layer)
    except ValueError as exc:
        where = "--layer" if args.layer else f"the basis's layer (from {args.basis})"
        if args.model is None and not args.layer:  # the hint first: the layer list runs long
            where += (": without --model the commands run the demo network; pass the --model the basis "
                      "was extracted from")
        raise UserError(f"{where}: {_one_line(exc)}") from exc
    return model, layer


class _SourceView:
    """An image source with other class names: the model's output classes, when the folder's
    subfolders do not name them (its labels then mean nothing to the model and are dropped)."""

    def __init__(self, source, class_names: Optional[List[str]]):
        self.source, self.class_names = source, class_names
        self.names, self.concept_masks = source.names, getattr(source, "concept_masks", None)
        self.labels = source.labels if class_names == source.class_names else None

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, batch_size: int = 64):
        return self.source.batches(batch_size)

    def display(self, indices):
        return self.source.display(indices)


def _class_namer(args, source, n_outputs: int):
    names = _output_class_names(args, source, n_outputs)
    if names is None and source.class_names and len(source.class_names) != n_outputs:
        # e.g. an --output function that returns a score per position of a sequence or map
        _warn(f"--images has {len(source.class_names)} class subfolders but the model's output"
              f"{' (after --output)' if args.output else ''} has {n_outputs} classes: the classes are shown by "
              "index; if the output holds a score per position (a sequence or a map), reduce it to one score per "
              "image (or per class) with --output file.py:function")
    return (lambda i: names[i]) if names else (lambda i: f"class {i}")


def _output_class_names(args, source, n_outputs: int) -> Optional[List[str]]:
    """Names of the model's output classes: --classes, the demo's, or the folder's class
    subfolders when there are as many as outputs (torchvision ImageFolder order); else None."""
    names = None
    if args.classes:
        if args.classes.lstrip().startswith("["):  # an inline JSON list
            text = args.classes
        else:
            try:
                with open(args.classes, encoding="utf-8-sig") as handle:  # (a byte-order mark is no name)
                    text = handle.read()
            except OSError as exc:
                raise UserError(f"--classes: cannot read {args.classes!r}: {exc.strerror}") from exc
        try:
            names = [str(v) for v in json.loads(text)] if text.lstrip().startswith("[") else \
                [line.strip() for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"--classes: {args.classes!r} is not a JSON list: {exc.msg}") from exc
        if len(names) != n_outputs:
            raise UserError(f"--classes names {len(names)} classes but the model has {n_outputs} outputs")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UserError(f"--classes names {twice[0]!r} more than once: each output needs its own name")
    elif args.model is None:
        from .datasets.shapes import CLASSES

        names = list(CLASSES)
    elif source.class_names and len(source.class_names) == n_outputs:
        names = list(source.class_names)
    return names


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")



def _check_folder_classes(args, source, preds: torch.Tensor, n_outputs: int) -> Optional[str]:
    """Warn when the class subfolders of --images and the model's predictions agree less often
    than chance: the folders' sorted order (without --classes) or the order of --classes (its
    names matched to the folders' names) is then probably not the model's output order, or the
    preprocessing is not the model's, and every class name printed is wrong. Returns the
    warning (None when there is none)."""
    if args.model is None or source.labels is None or preds.numel() == 0 or not source.class_names:
        return None
    n = preds.numel()
    folders = source.labels[:n].long().cpu()
    preds = preds.cpu().long()
    if args.classes:
        # the folders whose name --classes gives: their images' true output is that name's index
        # names matched loosely ("Non_Face", "non-face" and "nonface" are one name)
        loose = lambda name: re.sub(r"[^0-9a-z]", "", str(name).casefold())  # noqa: E731
        index = {loose(name): i for i, name in enumerate(_output_class_names(args, source, n_outputs))}
        # (a label outside the folders reads the trailing -1: not named)
        to_output = torch.tensor([index.get(loose(name), -1) for name in source.class_names] + [-1])
        folders = to_output[torch.where((folders >= 0) & (folders < len(source.class_names)), folders, -1)]
        keep = folders >= 0
        if not bool(keep.any()):
            return None
        preds, folders, n = preds[keep], folders[keep], int(keep.sum())
        named_by = ", named by --classes,"
        fix = "--classes is probably not in the model's output order"
    else:
        if len(source.class_names) != n_outputs:
            return None
        named_by = ""
        fix = (f"the folders' sorted order ({', '.join(source.class_names[:4])}"
               f"{', ...' if n_outputs > 4 else ''}) is probably not the model's output order (name the outputs "
               "with --classes)")
    matches = int((preds == folders).sum())
    agree = matches / n
    # below chance on enough images, or so far below it that chance would rarely give as few
    # matches (two classes, 7 images, none matching: p = 1/128). Chance: the agreement of the
    # predictions with the folders if they were unrelated, from how often each class is
    # predicted and how many images each folder holds (a model that predicts one class more
    # often agrees less often by chance: 1 / classes would flag a correct order)
    predicted_share = torch.bincount(preds, minlength=n_outputs)[:n_outputs].double() / n
    folder_share = torch.bincount(folders, minlength=n_outputs)[:n_outputs].double() / n
    p_chance = float((predicted_share * folder_share).sum())
    if agree < p_chance and _binomial_cdf(matches, n, p_chance) < 0.01:
        message = (f"the model's predictions{named_by} match the class subfolders of --images on only "
                   f"{100 * agree:.0f}% of the images (chance: {100 * p_chance:.0f}%): {fix}, or the preprocessing "
                   "is not the model's")
        _warn(message)
        return message
    # above chance, some classes can still be named in the wrong order (three of seven swapped
    # leave 70% agreeing): the folder -> output assignment that the predictions fit best
    names = _output_class_names(args, source, n_outputs)
    if names is None:
        return None
    # the confusion over the classes that occur (as a folder or a prediction) only: its size
    # follows the images, not the outputs (21,841 outputs would make a 3.8 GB square)
    inside = (folders >= 0) & (folders < n_outputs)
    ids = torch.unique(torch.cat([folders[inside], preds[inside]]))
    m = ids.numel()
    confusion = torch.zeros(m, m, dtype=torch.long)
    confusion.index_put_((torch.searchsorted(ids, folders[inside]), torch.searchsorted(ids, preds[inside])),
                         torch.ones_like(preds[inside]), accumulate=True)
    # a folder is taken for another output only on at least 3 of its images: with many classes
    # and an image or two each, pairing every misread image with its folder would look like a
    # reordering of a model that is merely wrong sometimes
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    confusion[off_diagonal & (confusion < _MIN_REORDER_IMAGES)] = 0
    needed = max(8, 0.1 * n)  # (few images: the order cannot be judged)
    # no assignment can beat every folder going to its most predicted output: when even that
    # gains too little, the assignment is not needed (the usual case, a right order)
    if int(confusion.max(dim=1).values.sum()) - matches < needed:
        return None
    # only folders with images and predicted outputs take part (the rest pair up at zero)
    folder_ids = torch.nonzero(confusion.sum(dim=1) > 0).flatten()
    output_ids = torch.nonzero(confusion.sum(dim=0) > 0).flatten()
    from .metrics import linear_sum_assignment

    sub_rows, sub_cols = linear_sum_assignment(-confusion[folder_ids][:, output_ids].double().numpy())
    rows, cols = folder_ids[torch.as_tensor(sub_rows)], output_ids[torch.as_tensor(sub_cols)]
    best = int(confusion[rows, cols].sum())
    rows, cols = ids[rows], ids[cols]  # back to output indices
    moved = [(int(f), int(o)) for f, o in zip(rows, cols) if f != o]
    if moved and best - matches >= needed:
        pairs = "; ".join(f"the {names[f]!r} images are predicted as output {o} (now named {names[o]!r})"
                          for f, o in moved[:6]) + ("; ..." if len(moved) > 6 else "")
        message = (f"the model's predictions{named_by} match the class subfolders of --images on {100 * agree:.0f}% "
                   f"of the images, but on {100 * best / n:.0f}% with some outputs named in another order: {pairs}. "
                   f"{fix[0].upper()}{fix[1:]} for those classes, or the model confuses them")
        _warn(message)
        return message
    return None


_MIN_REORDER_IMAGES = 3
_ORDER_CHECK_IMAGES = 1024  # the report's images the class-order check reads


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no overflow for large n)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            + j * math.log(p) + (n - j) * math.log1p(-p) for j in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _true_name(source, j: int) -> Optional[str]:
    if source.labels is None:
        return None
    label = int(source.labels[j])
    if source.class_names and 0 <= label < len(source.class_names):
        return source.class_names[label]
    return f"class {label}" if label >= 0 else None


def _skip_tokens(args, basis=None) -> int:
    if getattr(args, "skip_tokens", None) is not None:
        return args.skip_tokens
    return int((basis.metadata.get("skip_tokens") if basis is not None else 0) or 0)


def _distributed():
    """(rank, world size), initialising a gloo process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------- commands
def _cmd_demo(args) -> int:
    from .demo.run import print_demo, run_demo, write_json

    # the outputs are checked before the run, not after it
    if args.json:
        _check_out_file(args.json, "--json", "demo.json")
    if not args.no_report:
        _check_out_folder(args.report_dir, flag="--report-dir")
    if args.threads:
        if args.threads > (os.cpu_count() or 1):
            _warn(f"--threads {args.threads} is more than the {os.cpu_count()} cores: threads that wait on each "
                  "other make the demo slower")
        torch.set_num_threads(args.threads)
    bar = ProgressBar(enabled=not args.quiet)
    try:
        res = run_demo(seed=args.seed, n_concepts=args.concepts, refine=not args.no_refine or args.ura,
                       ura=args.ura, progress=bar, report_dir=None if args.no_report else args.report_dir)
    finally:
        bar.close()
    print_demo(res)
    if args.json:
        write_json(res, args.json)
        print(f"\n  figures written to {args.json}")
    return 0



def _cmd_extract(args) -> int:
    from .extraction import DEFAULTS

    ks = sorted(set(args.concepts))
    sweep = len(ks) > 1
    if sweep and "{k}" not in args.out:
        raise UserError(f"several -k values ({', '.join(map(str, ks))}) write one basis each: --out must contain "
                        "{k}, e.g. --out basis-k{k}.safetensors")
    outs = {k: args.out.replace("{k}", str(k)) for k in ks}
    for path in outs.values():
        _check_out_file(path)
    options = _parse_options(args.options, DEFAULTS)
    rank, world = _distributed()
    if args.stability and world > 1:
        raise UserError("--stability runs in one process: run it without torchrun")
    if sweep and world > 1:
        raise UserError("several -k values are compared by the split-half check, which runs in one process: "
                        "run it without torchrun")
    splits = args.stability or (3 if sweep else None)
    model, layer = _model_setup(args)
    source = _open_source(args, model, default_count=600)
    total = len(source)
    if world > 1:
        if total < world:
            raise UserError(f"--images has {total} image(s) for {world} ranks")
        source = source.subset(rank * total // world, (rank + 1) * total // world)
    output = parse_output(args.output)
    refine = args.refine and not args.no_refine
    ura = not args.no_ura
    # as in pc.extract: only the refinement's URA reads the class scores
    probe = _Probe(model, layer, source, output, args.skip_tokens or 0, needs_scores=refine and ura,
                   why_scores="--refine reads the class scores for URA; --no-ura refines without them")
    # a token layer that is no square grid: pc.extract warns (the warning shows as ours)
    if splits and total < 2:
        raise UserError(f"{'--stability' if args.stability else 'several -k values'} split the images into "
                        f"halves: --images has {total} image(s)")
    if args.groups and not splits:
        raise UserError("--groups keeps related images in one half of the split-half check: give --stability "
                        "(or several -k values) with it")
    groups = _image_groups(args.groups, source) if args.groups else None
    for k in ks:
        if k > total * probe.positions:  # all ranks' images together
            raise UserError(f"-k {k} exceeds the {total * probe.positions} patches of {total} image(s) at {layer!r}")
        if splits and k > (total // 2) * probe.positions:
            raise UserError(f"-k {k} exceeds the {(total // 2) * probe.positions} patches of a half of the split-half "
                            f"check ({total // 2} image(s) at {layer!r}): use more images or fewer concepts")
    if ks[-1] > probe.width:
        _warn(f"-k {ks[-1]} exceeds the {probe.width} channels of {layer!r}: the concepts' directions "
              "cannot all be independent, and many will overlap")
    batch_size = args.batch_size or int(options.get("batch_size", DEFAULTS["batch_size"]))
    rows = []
    for k in ks:
        if sweep and not args.quiet:
            print(f"K = {k}:", file=sys.stderr)
        started = time.perf_counter()
        basis = _extract_basis(args, k, model, layer, source, probe, options, output, refine, ura, batch_size,
                               rank, world, total)
        check = _split_half_check(args, model, basis, source, batch_size, splits, groups) if splits else None
        if rank == 0:
            basis.save(outs[k])
            print(f"wrote {basis} from {total} images ({probe.width} channels at {layer}) to {outs[k]}")
        rows.append((k, check, time.perf_counter() - started))
    if sweep:
        _print_sweep(rows, outs)
    if world > 1:  # leave together: a rank tearing gloo down while another still talks aborts
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _extract_basis(args, k, model, layer, source, probe, options, output, refine, ura, batch_size, rank, world,
                   total):
    """``pc.extract`` of K concepts as the command line sets it up, with the metadata it records."""
    from .demo.model import DEMO_MODEL_ID
    from .extraction import extract
    from .images import BatchStream

    bar = ProgressBar(enabled=not args.quiet and rank == 0)
    try:
        basis = call_with_output(
            extract, model, layer, BatchStream(source, batch_size), k, seed=args.seed,
            refine=refine, ura=ura, options=options or None,
            progress=bar,
            model_id=args.model or DEMO_MODEL_ID, skip_tokens=args.skip_tokens or 0,
            model=model, output=output)
    finally:
        bar.close()
    if world > 1:  # n_patches counted this rank's shard
        import torch.distributed as dist

        n_patches = torch.tensor([int(basis.metadata.get("n_patches") or 0)], dtype=torch.int64)
        dist.all_reduce(n_patches)
        basis.metadata["n_patches"] = int(n_patches)
    basis.metadata.update({"n_images": total, "images": os.path.abspath(args.images) if args.images else "demo",
                           "weights": os.path.abspath(args.weights) if args.weights else None,
                           "output": output if not callable(output) else None,
                           "input_shape": list(probe.input_shape), "preprocess": _preprocess_record(args)})
    return basis


def _split_half_check(args, model, basis, source, batch_size, splits, groups=None):
    """``pc.concept_stability`` of the basis on the command's images, recorded in the basis
    and summarised in one line."""
    from .images import BatchStream
    from .stability import LOW_HALVES_JACCARD, VANISHED_JACCARD, concept_stability

    bar = ProgressBar(enabled=not args.quiet)
    try:
        check = concept_stability(model, basis, BatchStream(source, batch_size), splits=splits,
                                  seed=args.seed, progress=bar, groups=groups)
    finally:
        bar.close()
    check.record(basis)
    low = check.unstable()
    told = f"{splits} random split" + ("s" if splits > 1 else "")
    print(f"split-half check ({told}): the halves' concepts overlap each other at Jaccard "
          f"{check.half_with_half:.2f} on average; {len(low)} of {basis.n_concepts} concepts come back below "
          f"{LOW_HALVES_JACCARD:g} on average, or below {VANISHED_JACCARD:g} in some half"
          + (f": {', '.join(map(str, low))}" if low else ""))
    return check


def _image_groups(pattern: str, source) -> List[str]:
    """--groups: each image's group, the first group of ``pattern`` (else its whole match)
    searched in the image's file name (relative to --images); an image it does not match is a
    group of its own."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--groups {pattern!r} is not a regular expression: {exc}") from None
    names = getattr(source, "names", None)
    if names is None or getattr(source, "root", None) is None:
        raise UserError("--groups reads the images' file names: give --images a folder")
    groups, matched = [], 0
    for name in names:
        found = regex.search(name.replace(os.sep, "/"))
        if found is None:
            groups.append("\0" + name)  # (no file name starts with a NUL: its own group)
            continue
        matched += 1
        groups.append(found.group(1) if regex.groups and found.group(1) is not None else found.group(0))
    if matched == 0:
        raise UserError(f"--groups {pattern!r} matches none of the {len(names)} file names (first: {names[0]!r})")
    print(f"--groups: {len(set(groups))} groups of the {len(names)} images ({len(names) - matched} in a group of "
          "their own)")
    return groups


def _print_sweep(rows, outs) -> None:
    """The table of a -k sweep, and the largest K whose halves agree at STABLE_HALF_WITH_HALF."""
    from .stability import STABLE_HALF_WITH_HALF

    print("\nconcepts that other images give back, per K (split-half check; halves agree: the mean over the "
          "splits, and their range):")
    print(f"  {'K':>4}  {'halves agree':>18}  {'unstable':>9}  {'seconds':>7}  basis")
    for k, check, seconds in rows:
        low = len(check.unstable())
        per_split = [c.mean_jaccard for c in check.between_halves]
        spread = f" ({min(per_split):.2f}-{max(per_split):.2f})" if len(per_split) > 1 else ""
        print(f"  {k:>4}  {f'{check.half_with_half:.2f}{spread}':>18}  {f'{low} of {k}':>9}  {seconds:>7.1f}  "
              f"{outs[k]}")
    good = [k for k, check, _ in rows if check.half_with_half >= STABLE_HALF_WITH_HALF]
    if good:
        print(f"the largest K whose halves agree at Jaccard >= {STABLE_HALF_WITH_HALF:g}: {good[-1]} ({outs[good[-1]]})")
    else:
        print(f"no K here has halves that agree at Jaccard >= {STABLE_HALF_WITH_HALF:g}: try fewer concepts or "
              "more images")


def _print_summary(basis) -> None:
    from .directions import LOW_CONCEPT_AGREEMENT
    from .stability import LOW_HALVES_JACCARD, VANISHED_JACCARD, unstable_concepts

    print(f"{basis}")
    print(f"  method: {basis.metadata.get('method')}")
    print(f"  patches: {basis.metadata.get('n_patches')}  silent detectors: {basis.metadata.get('silent_detectors')}")
    gain = (basis.decoding * basis.encoding).sum(1)
    agreement = basis.metadata.get("concept_agreement")
    if agreement is not None and len(agreement) != basis.n_concepts:
        agreement = None
    halves = basis.metadata.get("halves_jaccard")
    if halves is not None and len(halves) != basis.n_concepts:
        halves = None
    lowest = basis.metadata.get("halves_lowest")
    if halves is None or lowest is None or len(lowest) != basis.n_concepts:
        lowest = [None] * basis.n_concepts
    unstable = set(unstable_concepts(halves, lowest)) if halves is not None else set()
    print(f"  {'concept':>7} {'margin':>9} {'|s|':>8} {'w.s':>6} {'cos(w,s)':>9}"
          + (f" {'restarts agree':>15}" if agreement is not None else "")
          + (f" {'halves mean / lowest':>22}" if halves is not None else ""))

    def marked(value, low, width):
        return f" {value:>{width}.2f}" + (" !" if value < low else "  ")

    def halves_cell(i):
        if halves[i] is None:
            return f" {'-':>20}  "
        text = f"{halves[i]:.2f} / " + ("-" if lowest[i] is None else f"{lowest[i]:.2f}")
        return f" {text:>20}" + (" !" if i in unstable else "  ")

    for i in range(basis.n_concepts):
        w, s = basis.decoding[i], basis.encoding[i]
        cos = float(w @ s / (w.norm() * s.norm()))
        print(f"  {i:>7} {float(basis.margin[i]):>9.4f} {float(s.norm()):>8.3f} {float(gain[i]):>6.2f} {cos:>9.3f}"
              + ("" if agreement is None else marked(agreement[i], LOW_CONCEPT_AGREEMENT, 13))
              + ("" if halves is None else halves_cell(i)))
    if agreement is not None:
        print("  restarts agree: overlap of the concept's cluster with its partners in the near-best k-means "
              f"restarts; ! (below {LOW_CONCEPT_AGREEMENT:g}): another seed may not give it back")
    if halves is not None:
        print("  halves: Jaccard of the concept's detections with its partners in extractions on random halves of "
              "the images (extract --stability), mean / in the half that gave it back worst; ! (mean below "
              f"{LOW_HALVES_JACCARD:g} or lowest below {VANISHED_JACCARD:g}): other images change it. The halves' "
              f"concepts overlap each other at {float(basis.metadata.get('halves_mean_jaccard') or 0):.2f} on average")


def _cmd_report(args) -> int:
    basis = _load_basis(args.basis)
    if args.out is None:
        if args.model or args.images or args.weights:
            raise UserError("--out is required to write the HTML report (only `pyconcepts report BASIS` with "
                            "no other option prints a text summary of the basis)")
        _print_summary(basis)
        return 0
    _check_model_given(args, basis)
    _check_out_folder(args.out, args.images)
    report_options = _parse_options(args.options)
    try:
        from .report import write_report
    except ImportError as exc:
        if getattr(exc, "name", None) in ("pyconcepts.report", __package__ + ".report"):
            raise UserError("this pyconcepts has no HTML report (the pyconcepts.report package is missing)") from exc
        raise
    model, layer = _model_setup(args, basis.layer)
    source = _open_source(args, model, default_count=200, basis=basis)
    output = _output_of(args, basis)
    probe = _Probe(model, layer, source, output, _skip_tokens(args, basis))
    _check_input_shape(probe, basis)
    _check_basis_fits(basis, model, probe, layer, args.allow_mismatch)
    names = _output_class_names(args, source, probe.n_outputs)
    if names and names == source.class_names and hasattr(source, "select"):
        # the folders name the outputs: whether the model agrees with them, on up to 1,024 of the
        # images (one forward pass, small beside the report's; a wrong order of some of many
        # classes shows only with several images a class)
        from .images import spread_indices
        from .outputs import read_scores

        sample = source.select(spread_indices(len(source), _ORDER_CHECK_IMAGES))
        with torch.no_grad():
            preds = torch.cat([read_scores(select_output(model(b), output), None, "auto").argmax(-1)
                               for b in sample.batches(args.batch_size or 64)])
        warning = _check_folder_classes(args, sample, preds, probe.n_outputs)
        if warning:  # also in the page: whoever opens the report later sees the class names in doubt
            report_options["warnings"] = ["Class names: " + warning + ". Every class name below may be wrong."]
    if names != source.class_names:
        source = _SourceView(source, names)
    report_options.setdefault("skip_tokens", _skip_tokens(args, basis))
    report_options.setdefault("batch_size", args.batch_size or 64)
    report_options.setdefault("seed", args.seed)
    bar = ProgressBar(enabled=not args.quiet)
    try:
        result = write_report(args.out, basis, model, layer, source, output=output, progress=bar, **report_options)
    finally:
        bar.close()
    index = result if isinstance(result, (str, os.PathLike)) else os.path.join(args.out, "index.html")
    print(f"wrote the report of {basis.n_concepts} concepts on {len(source)} images to {index}")
    return 0


def _check_concepts(indices: Sequence[int], k: int, option: str) -> List[int]:
    for i in indices:
        if not 0 <= i < k:
            raise UserError(f"{option} {i}: the basis has {k} concepts, numbered 0 to {k - 1}")
    return list(dict.fromkeys(indices))  # each once, in the order given


def _cmd_explain(args) -> int:
    basis = _load_basis(args.basis)
    _check_model_given(args, basis)
    model, layer = _model_setup(args, basis.layer)
    source = _open_source(args, model, default_count=16, basis=basis)
    output = _output_of(args, basis)
    skip = _skip_tokens(args, basis)
    probe = _Probe(model, layer, source, output, skip)
    _check_input_shape(probe, basis)
    _check_basis_fits(basis, model, probe, layer, args.allow_mismatch)
    class_name = _class_namer(args, source, probe.n_outputs)
    top = min(args.top, basis.n_concepts)
    # measured removals cost one forward pass per concept and image: the default where that is
    # affordable (the first-order estimate named another top concept than the measurement in
    # half the RNet's images, and in two thirds of a document-orientation classifier's)
    exact = args.exact or (not args.first_order and basis.n_concepts * len(source) <= _EXACT_BUDGET)
    how = ("measured (one forward pass per concept" + ("; --first-order estimates it)" if not args.exact else ")")
           if exact else "estimated to first order" + ("" if args.first_order else
                                                        f", since concepts x images exceeds {_EXACT_BUDGET}")
           + " (an estimate that can name other concepts than the measurement; --exact measures it, one forward "
           "pass per concept)")
    print(f"{_count(len(source), 'image')}; concepts of {args.basis} at {layer}; per concept, how much removing "
          f"it (pyconcepts intervene --remove) lowers the predicted class's log-odds log(p/(1-p)), {how}")
    # the lines on stdout show the progress on a terminal; redirected, a bar on stderr does
    bar = ProgressBar(enabled=not args.quiet and not _is_terminal(sys.stdout))
    try:
        all_preds = _explain_batches(args, model, basis, layer, source, output, skip, top, class_name, bar,
                                     exact)
    finally:
        bar.close()
    _check_folder_classes(args, source, torch.cat(all_preds), probe.n_outputs)
    return 0


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# explain measures removals by default while concepts x images stays at or below this
_EXACT_BUDGET = 4096


def _measured_removals(model, basis, batch, layer, skip, output) -> torch.Tensor:
    """(B, K) drop of each image's predicted-class log-odds when each concept is removed,
    measured by ``pc.rank_concepts(target="predicted")`` (the removal ``intervene`` makes, one
    forward pass per concept)."""
    from .interventions import rank_concepts

    ranking = call_with_output(rank_concepts, model, basis, batch, target="predicted", layer=layer,
                               skip_tokens=skip, model=model, output=output)
    totals = torch.empty(batch.shape[0], basis.n_concepts)
    totals[:, torch.tensor(ranking.concepts)] = ranking.image_effects.T.float()
    return totals


def _log_odds_of(output):
    """An output selector giving every class's log-odds log(p / (1 - p)) from the class scores
    that ``output`` selects (probabilities read as log-probabilities)."""
    from .interventions import every_log_odds
    from .outputs import read_scores

    def select(out):
        return every_log_odds(read_scores(select_output(out, output), None, "auto"))
    return select


def _explain_batches(args, model, basis, layer, source, output, skip, top, class_name, bar, exact):
    from .attribution import contribution_totals
    from .outputs import read_scores

    j, all_preds = 0, []
    for batch in source.batches(args.batch_size or 32):
        with torch.no_grad():
            out = model(batch)
        # logits; a model ending in probabilities gives log-probabilities (the same softmax)
        logits = read_scores(select_output(out, output), None, "auto").float()
        probs = logits.softmax(-1)
        preds = logits.argmax(-1)
        all_preds.append(preds)
        if exact:
            totals = _measured_removals(model, basis, batch, layer, skip, output)
        else:  # the same drop to first order: the removal's change of the layer . d log-odds / dx
            totals = call_with_output(contribution_totals, model, basis, batch, preds, layer=layer,
                                      skip_tokens=skip, model=model, output=_log_odds_of(output))
        for b in range(batch.shape[0]):
            order = totals[b].argsort(descending=True)[:top]
            parts = ", ".join(f"concept {int(i)} {float(totals[b, i]):+.3f}" for i in order)
            truth = _true_name(source, j)
            truth = f", true {truth}" if truth else ""
            print(f"{source.names[j]}: predicted {class_name(int(preds[b]))} "
                  f"(p {float(probs[b, preds[b]]):.3f}{truth}); {parts}")
            j += 1
        bar("images", j, len(source))
    return all_preds


class _ReportingBatches:
    """A re-iterable of batches that calls ``progress(stage, images done, total)`` after each
    batch was used (for functions that take batches but no progress callback)."""

    def __init__(self, batches, total: int, progress, stage: str):
        self.batches, self.total, self.progress, self.stage = batches, total, progress, stage

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        done = 0
        for batch in self.batches:
            yield batch
            done += int(batch.shape[0])
            self.progress(self.stage, done, self.total)


def _cmd_intervene(args) -> int:
    from .images import BatchStream
    from .interventions import counterfactual

    basis = _load_basis(args.basis)
    _check_model_given(args, basis)
    remove = _check_concepts(args.remove, basis.n_concepts, "--remove")
    amplify = dict(args.amplify)
    _check_concepts(list(amplify), basis.n_concepts, "--amplify")
    if not remove and not amplify:
        raise UserError("nothing to do: give --remove I [I ...] and/or --amplify I=FACTOR [I=FACTOR ...]")
    both = sorted(set(remove) & set(amplify))
    if both:
        raise UserError(f"concept {both[0]} is both removed and amplified: give it to one of --remove, --amplify")
    if len(amplify) != len(args.amplify):
        raise UserError("--amplify names a concept twice")
    if args.strength > 1:
        _warn(f"--strength {args.strength:g} pushes the concepts below their level where they are not detected: "
              "an anti-concept, beyond what removing them does (the changes can exceed the concepts' own effect)")
    if args.layer and basis.layer and args.layer != basis.layer and not args.allow_mismatch:
        raise UserError(f"the basis was extracted at layer {basis.layer!r}, not {args.layer!r} "
                        "(--allow-mismatch applies it anyway)")
    model, layer = _model_setup(args, basis.layer)
    source = _open_source(args, model, default_count=16, basis=basis)
    output = _output_of(args, basis)
    skip = _skip_tokens(args, basis)
    probe = _Probe(model, layer, source, output, skip)
    _check_input_shape(probe, basis)
    _check_basis_fits(basis, model, probe, args.layer or basis.layer or layer, args.allow_mismatch)
    class_name = _class_namer(args, source, probe.n_outputs)
    bar = ProgressBar(enabled=not args.quiet)
    try:
        batches = _ReportingBatches(BatchStream(source, args.batch_size or 32), len(source), bar, "images")
        cf = call_with_output(counterfactual, model, basis, batches, remove,
                              layer=layer, strength=args.strength, direction=args.direction,
                              membership=args.membership, skip_tokens=skip, model=model, output=output,
                              amplify=amplify)
    finally:
        bar.close()
    rows = torch.arange(cf.logits_before.shape[0])
    before, after = cf.pred_before, cf.pred_after
    dp = cf.probs_after[rows, before] - cf.probs_before[rows, before]
    from .interventions import log_odds
    dlogit = log_odds(cf.logits_after, before) - log_odds(cf.logits_before, before)
    changed = int(cf.changed.sum())
    edits = []
    if remove:
        edits.append(f"removed concept(s) {', '.join(str(i) for i in remove)} (strength {args.strength:g})")
    if amplify:
        edits.append("amplified " + ", ".join(f"concept {i} x{c:g}" for i, c in amplify.items()))
    print(f"{' and '.join(edits)} at {layer} (along the {args.direction}, membership {args.membership}) "
          f"on {_count(len(source), 'image')}: {_count(changed, 'prediction')} changed; predicted class's probability "
          f"{float(dp.mean()):+.3f} on average (log-odds {float(dlogit.mean()):+.3f})")
    for j in range(len(source)):
        mark = "  CHANGED" if bool(cf.changed[j]) else ""
        b, a = int(before[j]), int(after[j])
        print(f"{source.names[j]}: {class_name(b)} (p {float(cf.probs_before[j, b]):.3f}) -> "
              f"{class_name(a)} (p {float(cf.probs_after[j, a]):.3f}); p({class_name(b)}) {float(dp[j]):+.3f}, "
              f"log-odds {float(dlogit[j]):+.3f}{mark}")
    _check_folder_classes(args, source, before, probe.n_outputs)
    return 0


def _cmd_bench(args) -> int:
    from .demo.model import DEMO_LAYER
    from .demo.run import load_model as load_demo_model
    from .extraction import extract

    model = load_demo_model()
    images = _demo_images(args.n_images, 0).images
    rows = []
    for refine, ura in ((False, False), (True, False), (True, True)):
        t = time.time()
        extract(model, DEMO_LAYER, images, args.concepts, seed=0, refine=refine, ura=ura)
        rows.append((refine, ura, time.time() - t))
    print(f"extract on {args.n_images} demo images ({DEMO_LAYER}, K = {args.concepts}, {torch.get_num_threads()} threads)")
    for refine, ura, sec in rows:
        print(f"  refine={refine!s:<5} ura={ura!s:<5} {sec:7.2f} s")
    return 0


# ------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MODEL_HELP = ("the network: path/to/file.py:factory or package.module:factory (the working directory is "
              "importable; THIS IMPORTS AND RUNS THAT CODE), torchvision:NAME or timm:NAME when those are "
              "installed (no download: give --weights), default: the demo CNN")


QUIET_HELP = "no progress output on stderr (bars, or one line per stage); warnings and errors still show"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyconcepts", description="Concept direction pairs for vision networks.",
                     epilog="--model imports and runs Python code: use it only with code you trust.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # the flags every command takes, before or after its name (SUPPRESS: the main parser's
    # default stands unless the flag is given after the command's name)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)

    def model_options(p):
        g = p.add_argument_group("model")
        g.add_argument("--model", help=MODEL_HELP)
        g.add_argument("--weights", help="state dict for --model: .safetensors, or a torch.save file read with "
                                         "weights_only (pickles need --allow-pickle)")
        g.add_argument("--output", help="which output holds the logits when the model returns a tuple or a "
                                        "dict: an index or a key; or file.py:function, a function of the model's "
                                        "output returning (B, C) class scores or one logit per image (a detector's "
                                        "pooled map, say; THIS RUNS THAT FILE) (extract reads the logits only "
                                        "with --refine)")
        g.add_argument("--allow-pickle", action="store_true",
                       help="read --weights / --images files that hold pickled objects (runs code in them)")
        g.add_argument("--seed", type=_seed, default=0)

    def image_options(p, default_count):
        g = p.add_argument_group("images")
        g.add_argument("--images", help="a folder of image files (jpg, png, webp, ...; class subfolders give "
                                        "class names) or a tensor file (.pt, .npy, .safetensors: (N, C, H, W), "
                                        "uint8 or float); default: generated demo images (demo network only)")
        g.add_argument("--limit", "--n-images", dest="limit", type=_positive_int,
                       help=f"use N images of --images spread evenly over its sorted files, so every class "
                            f"folder is sampled (default: all), or N generated demo images (default {default_count})")
        g.add_argument("--resize", type=_size_arg, help="N: shorter side to N (aspect kept); HxW: exactly")
        g.add_argument("--crop", type=_size_arg, help="centre crop, N or HxW")
        g.add_argument("--mean", type=_stats_arg, help="per-channel mean to subtract after scaling to [0, 1] "
                                                       "(e.g. 0.485,0.456,0.406 or 'imagenet')")
        g.add_argument("--std", type=_stats_arg, help="per-channel std to divide by (or 'imagenet')")
        g.add_argument("--transform", help="path/to/file.py:function or module:function taking a PIL image and "
                                           "returning a (C, H, W) tensor, instead of --resize/--crop/--mean/--std")
        g.add_argument("--batch-size", type=_positive_int, default=None,
                       help="images per forward pass (default 64 for extract, 32 otherwise)")

    def basis_options(p):
        p.add_argument("basis", help="a basis written by pyconcepts extract")
        p.add_argument("--allow-mismatch", action="store_true",
                       help="apply the basis even if it was extracted from another layer or model "
                            "(same width only)")
        p.add_argument("--skip-tokens", type=int, default=None,
                       help="leading tokens of a token layer that are not patches (default: as extracted)")

    p = sub.add_parser("demo", help="run the built-in demo and print its tables", parents=[common])
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--concepts", type=_at_least_two, default=16)
    p.add_argument("--no-refine", action="store_true",
                   help="skip the gradient refinement of the detectors (on by default)")
    p.add_argument("--ura", action="store_true", help="add URA to the refinement")
    p.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--report-dir", default="report", help="folder of the HTML concept report (default: report)")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML concept report")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("extract", help="extract concepts at a layer and save the basis", parents=[common],
                       epilog="--model imports and runs Python code. Under torchrun the images are split "
                              "across ranks; rank 0 writes --out.")
    model_options(p)
    image_options(p, 600)
    p.add_argument("--layer", help="the layer's name in model.named_modules() (required with --model)")
    p.add_argument("-k", "--concepts", type=_positive_int, nargs="+", default=[12], metavar="K",
                   help="number of concepts (default 12); several values (-k 8 12 16) extract one basis each, "
                        "run the split-half check on each and print which K other images give back")
    p.add_argument("--out", required=True, help="the basis file to write (.safetensors; with several -k values "
                                                 "a name containing {k}); its folder must exist")
    p.add_argument("--options", help="JSON object overriding pyconcepts.extraction.DEFAULTS")
    p.add_argument("--skip-tokens", type=int, default=0,
                   help="leading tokens (class, registers) of a token layer that are not patches")
    p.add_argument("--refine", action="store_true",
                   help="refine the detectors by the paper's losses with Uncertainty Region Alignment "
                        "through the rest of the network (slower; off by default)")
    p.add_argument("--no-refine", action="store_true", help="no refinement (the default)")
    p.add_argument("--no-ura", action="store_true", help="with --refine: refine without URA")
    p.add_argument("--stability", type=_positive_int, nargs="?", const=3, default=None, metavar="SPLITS",
                   help="also split the images into two random halves SPLITS times (default 3), extract on each "
                        "half and record, per concept, how well the halves give it back (pc.concept_stability; "
                        "2 x SPLITS more extractions, each on half of the images)")
    p.add_argument("--groups", metavar="REGEX",
                   help="with --stability or several -k: images whose file names (relative to --images, with /) "
                        "give the same match of REGEX (its first group, if it has one) stay in one half, e.g. "
                        "'^([^/]+/[^_]+)_' for crops named photo_1.png, photo_2.png")
    p.set_defaults(run=_cmd_extract)

    p = sub.add_parser("report", help="an HTML report of a basis (without --out: a text summary)",
                       parents=[common], epilog="--model imports and runs Python code.")
    basis_options(p)
    model_options(p)
    image_options(p, 200)
    p.add_argument("--layer", help=argparse.SUPPRESS)
    p.add_argument("--out", help="folder to write index.html into (made if missing; its parent must exist)")
    p.add_argument("--options", help="JSON object of report options (top, maps, rcav, influence_images, ...)")
    p.add_argument("--classes", help="class names of the model's outputs: a text file, one per line, or a JSON list")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("explain", help="per image, the prediction and the concepts behind it", parents=[common],
                       epilog="--model imports and runs Python code.")
    basis_options(p)
    model_options(p)
    image_options(p, 16)
    p.add_argument("--layer", help=argparse.SUPPRESS)
    p.add_argument("--top", type=_positive_int, default=3, help="concepts listed per image (default 3)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true",
                     help="measure each removal (one forward pass per concept and image; the default when "
                          f"concepts x images <= {_EXACT_BUDGET})")
    how.add_argument("--first-order", action="store_true",
                     help="estimate each removal to first order from one backward pass (the default above that)")
    p.add_argument("--classes", help="class names of the model's outputs: a text file, one per line, or a JSON list")
    p.set_defaults(run=_cmd_explain)

    p = sub.add_parser("intervene", help="predictions with and without concepts", parents=[common],
                       epilog="--model imports and runs Python code.")
    basis_options(p)
    model_options(p)
    image_options(p, 16)
    p.add_argument("--remove", type=int, nargs="+", default=[], metavar="I",
                   help="concept(s) to remove, 0 to K-1")
    p.add_argument("--amplify", type=_amplify_pair, nargs="+", default=[], metavar="I=FACTOR",
                   help="concept(s) to raise where they are above their level where not detected: that excess "
                        "times FACTOR (2 doubles it, 0 removes it); edited jointly with --remove")
    p.add_argument("--strength", type=_strength, default=1.0,
                   help="how much of each concept to take out (1: its excess over its level where it is "
                        "not detected; default 1; above 1 pushes it below that level, past a removal)")
    p.add_argument("--membership", choices=("all", "soft", "hard"), default="all",
                   help="where: every patch (all, the default), or weighted by the detector (soft: its "
                        "sigmoid; hard: where it fires)")
    p.add_argument("--layer", help="apply at this layer (default: the basis's layer; another one needs --allow-mismatch)")
    p.add_argument("--direction", choices=("encoding", "decoding"), default="encoding")
    p.add_argument("--classes", help="class names of the model's outputs: a text file, one per line, or a JSON list")
    p.set_defaults(run=_cmd_intervene)

    p = sub.add_parser("bench", help="time the extraction pipeline on the demo model", parents=[common])
    p.add_argument("--n-images", type=_positive_int, default=300)
    p.add_argument("--concepts", type=_positive_int, default=12)
    p.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    try:
        with warnings.catch_warnings():
            # the library's warnings (UserWarning) as the command's own one-line warnings
            warnings.showwarning = _show_warning
            _shown_warnings.clear()
            code = int(args.run(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader went away (`pyconcepts explain ... | head`): stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"pyconcepts {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, (UserError, ValueError, TypeError, FileNotFoundError, IndexError,
                            NotADirectoryError, PermissionError)):
            message = _one_line(exc)
        else:
            message = f"{type(exc).__name__}: {_one_line(exc)}"
        print(f"pyconcepts {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
