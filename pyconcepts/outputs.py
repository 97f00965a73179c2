"""Reading class scores out of a model's output (``output=`` of extract, URA, interventions,
attribution).

Models often return more than class scores: a tuple ``(boxes, logits)``, a dict
``{"logits": ..., "aux": ...}``, an object with a ``.logits`` attribute. ``output`` says
which part holds the class scores:

- ``None``: the output itself (a tensor);
- an ``int``: that item of a tuple or list;
- a ``str``: that key of a dict (or attribute of an object);
- a callable: ``output(model_output) -> tensor``.

The selected tensor must be ``(B, C)`` with ``C >= 2`` class scores, finite, floating point:
either logits or probabilities (rows of non-negative numbers summing to 1); or one score per
image, ``(B,)`` or ``(B, 1)``, read as the logit of a yes / no output: two classes, "no" at 0
and "yes" at the score (a probability must be turned into its logit first). ``scores_kind``
tells the two apart; ``as_logits`` turns probabilities into log-probabilities (the same
softmax), so every consumer can work in logits.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Union

import torch

__all__ = ["OutputSpec", "check_output_spec", "select_output", "scores_kind", "as_logits", "as_is",
           "read_scores", "KINDS", "output_or_recorded", "OutputWarning"]

OutputSpec = Union[None, int, str, Callable[[Any], torch.Tensor]]
KINDS = ("auto", "logits", "probs")


class OutputWarning(UserWarning):
    """The model's output may not be read as the user means it (probabilities that underflowed,
    one score per image that looks like a probability): figures computed from it can be off."""


def check_output_spec(output: OutputSpec) -> OutputSpec:
    """``output`` itself when it is None, an int, a str or a callable; a TypeError otherwise."""
    if output is None or callable(output) or isinstance(output, str):
        return output
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    raise TypeError(
        f"output must be None, an int (tuple index), a str (dict key) or a callable, got {output!r}"
    )


class _Recorded:
    """The output a basis was extracted with (its ``metadata['output']``, an index or a key),
    applied to a model output that is not a tensor already."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, value):
        return value if isinstance(value, torch.Tensor) else select_output(value, self.spec)

    def __repr__(self) -> str:
        return f"{self.spec!r} (recorded in the basis)"


def as_is(value):
    """``output=as_is``: the model's output is its class scores already (for a model wrapped
    to return them; no recorded output of the basis is applied)."""
    return value


def output_or_recorded(output: OutputSpec, basis) -> OutputSpec:
    """``output`` when given; else the one ``basis`` was extracted with
    (``basis.metadata['output']``, an index or a key) for models whose output is not a tensor;
    else None."""
    if output is not None:
        return check_output_spec(output)
    meta = getattr(basis, "metadata", None) or {}
    if meta.get("output_callable"):
        warnings.warn(f"the basis was extracted with output={meta['output_callable']} (a function, which a basis "
                      "does not keep): pass it again (command line: --output) if the model's output is not its "
                      "class scores", stacklevel=3)
    recorded = meta.get("output")
    if isinstance(recorded, (int, str)) and not isinstance(recorded, bool):
        return _Recorded(recorded)
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value.keys())[:10]}"
    if isinstance(value, (tuple, list)):
        parts = ", ".join(_describe(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in value[:6])
        return f"a {type(value).__name__} of {len(value)} items ({parts})"
    return f"a {type(value).__name__}"


def select_output(value: Any, output: OutputSpec) -> torch.Tensor:
    """The part of a model's output ``value`` named by ``output`` (see the module docstring);
    a ValueError or TypeError naming ``output`` when it selects nothing or not a tensor."""
    output = check_output_spec(output)
    if output is None:
        selected = value
    elif callable(output):
        try:
            selected = output(value)
        except Exception as exc:
            raise ValueError(f"output={output!r} failed on the model's output ({_describe(value)}): {exc}") from exc
    elif isinstance(output, int):
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"output={output} indexes a tuple, but the model returns {_describe(value)}")
        if not -len(value) <= output < len(value):
            raise ValueError(f"output={output} is out of range: the model returns {_describe(value)}")
        selected = value[output]
    else:
        if isinstance(value, Mapping):
            if output not in value:
                raise ValueError(f"output={output!r} is not a key of the model's output ({_describe(value)})")
            selected = value[output]
        elif hasattr(value, output):
            selected = getattr(value, output)
        else:
            raise ValueError(f"output={output!r} selects nothing: the model returns {_describe(value)}")
    if not isinstance(selected, torch.Tensor):
        hint = "" if output is not None else "; pass output= (an index, a key or a callable) to pick the class scores"
        raise TypeError(
            f"the model's output{'' if output is None else f' selected by output={output!r}'} is "
            f"{_describe(selected)}, not a tensor of class scores{hint}"
        )
    return selected


def _check_scores(scores: torch.Tensor, output: OutputSpec) -> None:
    where = "the model's output" if output is None else f"the model's output selected by output={output!r}"
    if not scores.is_floating_point():
        raise TypeError(f"{where} has dtype {scores.dtype}; class logits or probabilities must be floating point")
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"{where} has shape {tuple(scores.shape)}; expected (B, C) logits or probabilities "
            "of C >= 2 classes, or one logit per image, (B,) or (B, 1) (pass output= to pick them from a "
            "tuple or dict, or a callable that pools a score map into them)"
        )
    if not bool(torch.isfinite(scores.detach()).all()):
        raise ValueError(f"{where} contains NaN or Inf")


def scores_kind(scores: torch.Tensor) -> str:
    """'probs' when every row is non-negative and sums to 1 (within 1e-3), else 'logits'."""
    s = scores.detach().float()
    if bool((s >= 0).all()) and bool(((s.sum(-1) - 1).abs() <= 1e-3).all()):
        return "probs"
    return "logits"


def as_logits(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits with the same softmax: log-probabilities for 'probs'.

    A probability below the smallest normal number of its dtype (one the model's softmax let
    underflow) is read as that number, so its log is finite (float32: -87.3) and its gradient
    stays finite; this caps the log-odds the model's output can show, and a warning says so.
    """
    if kind == "probs":
        tiny = torch.finfo(scores.dtype).tiny
        if bool((scores.detach() < tiny).any()):
            warnings.warn(
                f"the model outputs probabilities and some of them underflowed below {tiny:.3g} "
                f"(0 in the model's softmax): they are read as {tiny:.3g}, which caps the log-odds at "
                f"about {-math.log(tiny):.1f} and makes their gradients 0; for exact figures give a model "
                "that returns the logits before its softmax", OutputWarning, stacklevel=2)
        return scores.float().clamp_min(tiny).log()
    return scores


def read_scores(value: Any, output: OutputSpec, kind: str = "auto") -> torch.Tensor:
    """Class logits (B, C) from a model's output: select, check, and turn probabilities into
    log-probabilities (``kind``: 'auto' decides per call with ``scores_kind``)."""
    if kind not in KINDS:
        raise ValueError(f"outputs must be one of {KINDS}, got {kind!r}")
    scores = select_output(value, output)
    if scores.is_floating_point() and (scores.dim() == 1 or (scores.dim() == 2 and scores.shape[1] == 1)):
        # one score per image: the logit of a yes / no output, as two classes (no: 0, yes: z)
        z = scores.reshape(-1, 1)
        if z.shape[0] > 1 and bool(((z.detach() >= 0) & (z.detach() <= 1)).all()):
            warnings.warn("the model gives one score per image and every one lies in [0, 1]: it is read as a "
                          "logit; if it is a probability (a sigmoid output), return its logit instead "
                          "(output=lambda y: torch.logit(y, eps=1e-6))", OutputWarning, stacklevel=2)
        scores = torch.cat([torch.zeros_like(z), z], 1)
        _check_scores(scores, output)
        return scores
    _check_scores(scores, output)
    if kind == "auto":
        kind = scores_kind(scores)
    return as_logits(scores, kind)
