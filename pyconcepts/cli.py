"""The ``pyconcepts`` command: extract, report, explain, intervene, bench, demo.

    pyconcepts demo [--json PATH] [--report-dir D] the built-in demo (offline, ~minutes on 2 cores);
                                                   writes its concept report to report/index.html
    pyconcepts extract --out basis.safetensors     concepts of a model's layer (the demo model
        [--model pkg.module:factory --weights W]   by default, or any importable factory)
        [--images images.pt] [--layer L] [-k K]
    pyconcepts report basis.safetensors            what a saved basis holds
    pyconcepts explain basis.safetensors           per image, the concepts behind the prediction
    pyconcepts intervene basis.safetensors --remove I   predictions with and without concept I
    pyconcepts bench                               time the extraction pipeline on the demo

Progress goes to stderr (text bars on a terminal, one line per stage otherwise); results go to stdout.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import List, Optional, Tuple

import torch

__all__ = ["main", "ProgressBar"]


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


def _load_model(spec: Optional[str], weights: Optional[str]):
    if spec is None:
        from .demo.run import load_model

        return load_model(weights) if weights else load_model()
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--model must be 'package.module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if weights:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu")
        model.load_state_dict(state)
    return model.eval()


def _load_images(path: Optional[str], n: int, seed: int) -> torch.Tensor:
    if path is None:
        from .datasets.shapes import make_shapes

        return make_shapes(n, seed=seed, watermark="random", watermark_rate=0.3, with_masks=False).images
    images = torch.load(path, map_location="cpu")
    if isinstance(images, dict):
        images = images.get("images")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise SystemExit(f"{path}: expected a (B, C, H, W) tensor (or a dict with 'images')")
    return images


def _cmd_demo(args) -> int:
    from .demo.run import print_demo, run_demo, write_json

    torch.set_num_threads(args.threads) if args.threads else None
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
    from .demo.model import DEMO_LAYER
    from .extraction import extract

    model = _load_model(args.model, args.weights)
    layer = args.layer or (DEMO_LAYER if args.model is None else None)
    if layer is None:
        raise SystemExit("--layer is required with --model")
    images = _load_images(args.images, args.n_images, args.seed)
    options = json.loads(args.options) if args.options else None
    bar = ProgressBar(enabled=not args.quiet)
    try:
        basis = extract(model, layer, images, args.concepts, seed=args.seed, refine=not args.no_refine,
                        ura=not args.no_ura, options=options, progress=bar,
                        model_id=args.model or "pyconcepts-demo-shapesnet")
    finally:
        bar.close()
    basis.save(args.out)
    print(f"wrote {basis} to {args.out}")
    return 0


def _cmd_report(args) -> int:
    from .basis import ConceptBasis

    basis = ConceptBasis.load(args.basis)
    print(f"{basis}")
    print(f"  method: {basis.metadata.get('method')}")
    print(f"  patches: {basis.metadata.get('n_patches')}  silent detectors: {basis.metadata.get('silent_detectors')}")
    gain = (basis.decoding * basis.encoding).sum(1)
    print(f"  {'concept':>7} {'margin':>9} {'|s|':>8} {'w.s':>6} {'cos(w,s)':>9}")
    for i in range(basis.n_concepts):
        w, s = basis.decoding[i], basis.encoding[i]
        cos = float(w @ s / (w.norm() * s.norm()))
        print(f"  {i:>7} {float(basis.margin[i]):>9.4f} {float(s.norm()):>8.3f} {float(gain[i]):>6.2f} {cos:>9.3f}")
    return 0


def _cmd_explain(args) -> int:
    from .attribution import contribution_maps
    from .basis import ConceptBasis

    basis = ConceptBasis.load(args.basis)
    model = _load_model(args.model, args.weights)
    images = _load_images(args.images, args.n_images, args.seed)[: args.n_images]
    with torch.no_grad():
        preds = model(images).argmax(1)
    head = getattr(model, "fc", None) if args.model is None else None
    maps = contribution_maps(model, basis, images, preds, head=head)
    totals = maps.sum((2, 3))
    for j in range(images.shape[0]):
        top = totals[j].argsort(descending=True)[: args.top]
        parts = ", ".join(f"concept {int(i)} ({float(totals[j, i]):+.2f})" for i in top)
        print(f"image {j}: predicted class {int(preds[j])}; top concepts: {parts}")
    return 0


def _cmd_intervene(args) -> int:
    from .basis import ConceptBasis
    from .interventions import counterfactual

    basis = ConceptBasis.load(args.basis)
    model = _load_model(args.model, args.weights)
    images = _load_images(args.images, args.n_images, args.seed)[: args.n_images]
    cf = counterfactual(model, basis, images, args.remove, layer=args.layer, direction=args.direction)
    print(f"removed concept(s) {args.remove} at {args.layer or basis.layer}: "
          f"{int(cf.changed.sum())}/{len(cf.changed)} predictions changed")
    for j in range(len(cf.changed)):
        mark = " *" if bool(cf.changed[j]) else ""
        print(f"  image {j}: {int(cf.pred_before[j])} -> {int(cf.pred_after[j])}{mark}")
    return 0


def _cmd_bench(args) -> int:
    from .demo.model import DEMO_LAYER
    from .demo.run import load_model
    from .extraction import extract

    model = load_model()
    images = _load_images(None, args.n_images, 0)
    rows = []
    for refine, ura in ((False, False), (True, False), (True, True)):
        t = time.time()
        extract(model, DEMO_LAYER, images, args.concepts, seed=0, refine=refine, ura=ura)
        rows.append((refine, ura, time.time() - t))
    print(f"extract on {args.n_images} demo images ({DEMO_LAYER}, K = {args.concepts}, {torch.get_num_threads()} threads)")
    for refine, ura, sec in rows:
        print(f"  refine={refine!s:<5} ura={ura!s:<5} {sec:7.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyconcepts", description="Concept direction pairs for vision networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, images=True):
        p.add_argument("--model", help="package.module:factory returning an nn.Module (default: the demo CNN)")
        p.add_argument("--weights", help="state dict (.safetensors or torch.save file) for --model")
        if images:
            p.add_argument("--images", help="a torch.save'd (B, C, H, W) tensor (default: demo images)")
            p.add_argument("--n-images", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="run the built-in demo and print its tables")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concepts", type=int, default=16)
    p.add_argument("--no-refine", action="store_true",
                   help="skip the gradient refinement of the detectors (on by default)")
    p.add_argument("--ura", action="store_true", help="add URA to the refinement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--report-dir", default="report", help="folder of the HTML concept report (default: report)")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML concept report")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("extract", help="extract concepts at a layer and save the basis")
    common(p)
    p.set_defaults(n_images=600)
    p.add_argument("--layer")
    p.add_argument("-k", "--concepts", type=int, default=12)
    p.add_argument("--out", required=True)
    p.add_argument("--options", help="JSON overrides of pyconcepts.extraction.DEFAULTS")
    p.add_argument("--no-refine", action="store_true")
    p.add_argument("--no-ura", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_extract)

    p = sub.add_parser("report", help="summarise a saved basis")
    p.add_argument("basis")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("explain", help="concepts behind each prediction")
    p.add_argument("basis")
    common(p)
    p.add_argument("--top", type=int, default=3)
    p.set_defaults(run=_cmd_explain)

    p = sub.add_parser("intervene", help="predictions with and without concepts")
    p.add_argument("basis")
    common(p)
    p.add_argument("--remove", type=int, nargs="+", required=True)
    p.add_argument("--layer")
    p.add_argument("--direction", choices=("encoding", "decoding"), default="encoding")
    p.set_defaults(run=_cmd_intervene)

    p = sub.add_parser("bench", help="time the extraction pipeline on the demo model")
    p.add_argument("--n-images", type=int, default=300)
    p.add_argument("--concepts", type=int, default=12)
    p.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, IndexError) as exc:
        print(f"pyconcepts {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
