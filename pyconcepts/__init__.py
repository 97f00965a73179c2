"""pyconcepts: encoding-decoding concept direction pairs for vision networks.

``import pyconcepts as pc`` gives the public API (see README.md). Submodules are imported
on first use, so ``import pyconcepts`` stays cheap and each layer loads only what it needs.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from . import ops  # noqa: E402  (native ops are the base layer; import them eagerly)

# public name -> submodule that defines it
_LAZY = {
    # statistics and algorithms
    "StreamingMoments": "stats",
    "DirectionalClustering": "clustering",
    "NotFittedError": "clustering",
    "signal_vectors": "signal",
    "extract_directions": "directions",
    "ConceptBasis": "basis",
    # model side
    "LayerTap": "taps",
    "extract": "extraction",
    "intervene": "interventions",
    "correct": "interventions",
    "counterfactual": "interventions",
    "restore_corrections": "interventions",
    "rank_concepts": "interventions",
    "contribution_maps": "attribution",
    "contribution_totals": "attribution",
    "rcav": "attribution",
    "compare_bases": "stability",
    "concept_stability": "stability",
}

_SUBMODULES = {
    "reference", "stats", "clustering", "pruning", "signal", "detectors", "directions", "basis",
    "synthetic", "metrics", "taps", "ura", "extraction", "interventions", "attribution",
    "datasets", "demo", "cli", "images", "outputs", "stability",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'pyconcepts' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = ["ops", "__version__", *_LAZY]
