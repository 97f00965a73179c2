"""Taps: read and replace the output of a named layer of any ``torch.nn.Module``.

A ``LayerTap`` turns a layer's output into *patch rows* (METHOD.md section 1): a conv map
B x C x H x W becomes (B*H*W) x C, a token map B x T x C becomes (B*T') x C (optionally
without the leading class/register tokens). It also splits the network at that layer: the
"before" part f- produces the activations, the "after" part f+ runs the rest of the network
on *edited* activations. The split uses forward hooks that replace the layer's output, so it
works for sequential CNNs, residual blocks and token models without touching model code.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["LayerTap", "resolve_layer", "iter_batches", "ActivationShape"]


@contextlib.contextmanager
def autograd_on(model: Optional[nn.Module] = None, what: str = "this call"):
    """Gradients on for the block, also under a caller's ``torch.no_grad()`` or
    ``torch.inference_mode()`` (tensors made under inference mode must be cloned before they
    enter the graph). A ``model`` whose parameters were made under inference mode cannot pass
    gradients: that is refused with a clear message."""
    if model is not None and any(p.is_inference() for p in model.parameters()):
        raise RuntimeError(
            f"{what} needs gradients through the model, but its parameters were created under "
            "torch.inference_mode(); build or load the model outside inference_mode")
    with torch.inference_mode(False), torch.enable_grad():
        yield


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The submodule called ``layer`` in ``model.named_modules()``; a clear error otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a str (a name from model.named_modules()), got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    hint = f"; close matches: {close}" if close else ""
    sample = names[:12]
    raise ValueError(
        f"layer {layer!r} does not exist in {type(model).__name__}{hint} "
        f"(the model has {len(names)} named modules, e.g. {sample})"
    )


def is_image_source(images) -> bool:
    """An image source of ``pyconcepts.images`` (``FolderImages``, ``TensorImages``, ...): it has
    ``batches(batch_size)`` and a length in images."""
    return not isinstance(images, torch.Tensor) and callable(getattr(images, "batches", None)) \
        and hasattr(images, "__len__")


def is_one_shot(images) -> bool:
    """An iterator that can be read only once (not a tensor, an image source or a re-iterable)."""
    if isinstance(images, torch.Tensor) or is_image_source(images):
        return False
    try:
        return iter(images) is images
    except TypeError:
        return False  # not iterable at all: iter_batches says so


def iter_batches(images, batch_size: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield image batches from a tensor (B, C, H, W), an image source of
    ``pyconcepts.images`` (read in batches of ``batch_size``) or an iterable of batches.

    Items of the iterable may be tensors or tuples/lists whose first item is the batch
    (as a ``DataLoader`` over ``(image, label)`` pairs yields). A tensor is cut into chunks
    of ``batch_size`` (default 64).
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"images must be a (B, C, H, W) tensor or an iterable of batches, got shape {tuple(images.shape)}"
            )
        step = batch_size or 64
        for start in range(0, images.shape[0], step):
            yield images[start:start + step]
        return
    if is_image_source(images):
        images = images.batches(batch_size or 64)
    try:
        iterator = iter(images)
    except TypeError:
        raise TypeError(
            f"images must be a tensor (B, C, H, W) or an iterable of batches, got {type(images).__name__}"
        ) from None
    for item in iterator:
        if isinstance(item, (tuple, list)):
            if not item:
                raise ValueError("images yielded an empty tuple; expected (batch, ...)")
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"images yielded a {type(item).__name__}; expected a tensor batch")
        if item.dim() == 3:  # a single image
            item = item.unsqueeze(0)
        if item.dim() != 4:
            raise ValueError(f"an image batch must be (B, C, H, W), got shape {tuple(item.shape)}")
        yield item


class ActivationShape:
    """How a layer output maps to patch rows: ``kind`` 'conv' (B,C,H,W) or 'tokens' (B,T,C)."""

    def __init__(self, kind: str, channels: int, grid: Tuple[int, ...], skip_tokens: int = 0):
        self.kind = kind
        self.channels = channels
        self.grid = grid  # (H, W) for conv maps, (T,) for token maps
        self.skip_tokens = skip_tokens

    @property
    def positions(self) -> int:
        """Patch rows per image."""
        if self.kind == "conv":
            return self.grid[0] * self.grid[1]
        return self.grid[0] - self.skip_tokens

    def __repr__(self) -> str:
        return f"ActivationShape({self.kind}, channels={self.channels}, grid={self.grid}, skip_tokens={self.skip_tokens})"


class _Replace(Exception):
    pass


class LayerTap:
    """Read, and optionally replace, the output of layer ``layer`` of ``model``.

    ``skip_tokens``: for token maps (B, T, C), the number of leading tokens (class and
    register tokens) that are not patches; they are left out of the rows and passed through
    unchanged when the layer's output is replaced. ``grid``: for token maps, optionally the
    (h, w) patch grid so that rows can be shown as maps (inferred as a square when possible).

    All collection runs in eval mode under ``torch.no_grad`` on the model's device, one
    batch at a time; the model's training flag is restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        skip_tokens: int = 0,
        grid: Optional[Tuple[int, int]] = None,
    ):
        self.module = resolve_layer(model, layer)
        self.model = model
        self.layer = layer
        if not isinstance(skip_tokens, int) or skip_tokens < 0:
            raise ValueError(f"skip_tokens must be a non-negative int, got {skip_tokens!r}")
        self.skip_tokens = skip_tokens
        self.token_grid = grid
        self.shape: Optional[ActivationShape] = None

    # ------------------------------------------------------------------ device, modes
    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")

    @contextlib.contextmanager
    def eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def frozen(self):
        """Parameters stop requiring grad (so f- builds no graph); restored afterwards."""
        # (parameters made under torch.inference_mode cannot change requires_grad outside it;
        # they build no graph there anyway)
        params = [p for p in self.model.parameters() if p.requires_grad and not p.is_inference()]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # ------------------------------------------------------------------ shapes
    def _describe(self, out) -> ActivationShape:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"layer {self.layer!r} returns a {type(out).__name__}, not a tensor; tap a layer "
                "whose output is a (B, C, H, W) or (B, T, C) tensor"
            )
        if out.dim() == 4:
            return ActivationShape("conv", out.shape[1], (out.shape[2], out.shape[3]))
        if out.dim() == 3:
            if self.skip_tokens >= out.shape[1]:
                raise ValueError(
                    f"skip_tokens={self.skip_tokens} leaves no tokens of layer {self.layer!r} (T = {out.shape[1]})"
                )
            return ActivationShape("tokens", out.shape[2], (out.shape[1],), self.skip_tokens)
        raise ValueError(
            f"layer {self.layer!r} outputs a tensor of rank {out.dim()} (shape {tuple(out.shape)}); "
            "only rank 4 (B, C, H, W) conv maps and rank 3 (B, T, C) token maps can be tapped"
        )

    def to_rows(self, out: torch.Tensor) -> torch.Tensor:
        """Layer output -> patch rows (B*positions, C)."""
        shape = self._describe(out)
        if shape.kind == "conv":
            return out.permute(0, 2, 3, 1).reshape(-1, shape.channels)
        return out[:, shape.skip_tokens:, :].reshape(-1, shape.channels)

    def from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Patch rows -> a tensor shaped like the layer output ``like`` (skipped tokens copied)."""
        shape = self._describe(like)
        b = like.shape[0]
        if shape.kind == "conv":
            h, w = shape.grid
            return rows.reshape(b, h, w, shape.channels).permute(0, 3, 1, 2)
        body = rows.reshape(b, -1, shape.channels)
        if shape.skip_tokens:
            return torch.cat([like[:, : shape.skip_tokens, :].to(body.dtype), body], dim=1)
        return body

    def rows_to_maps(self, values: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-row values (B*positions, K) -> per-image maps (B, K, h, w)."""
        if self.shape is None:
            raise RuntimeError("the tap has not seen the layer yet; run it on a batch first")
        k = values.shape[1]
        if self.shape.kind == "conv":
            h, w = self.shape.grid
        else:
            h, w = self._token_grid()
        return values.reshape(batch, h, w, k).permute(0, 3, 1, 2)

    def _token_grid(self) -> Tuple[int, int]:
        n = self.shape.positions
        if self.token_grid is not None:
            if self.token_grid[0] * self.token_grid[1] != n:
                raise ValueError(f"grid {self.token_grid} does not hold {n} tokens")
            return tuple(self.token_grid)
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(
                f"{n} patch tokens are not a square grid: leading class or register tokens are left out "
                "with skip_tokens=N (command line: --skip-tokens N), a non-square grid is given as grid=(h, w) "
                "(pyconcepts report: --options '{\"grid\": [h, w]}')"
            )
        return side, side

    # ------------------------------------------------------------------ running
    def _check_images(self, batch: torch.Tensor, offset: Optional[int] = None) -> torch.Tensor:
        """``batch`` checked (floating point, channels, finite) and moved to the model's device
        and dtype; ``offset``: the position of its first image among all, for the messages
        (None: positions within the batch)."""
        if isinstance(batch, torch.Tensor) and not batch.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {batch.dtype}"
                            + (" (uint8 pixels: divide by 255)" if batch.dtype == torch.uint8 else ""))
        expected = _input_channels(self.model)
        if expected is not None and batch.shape[1] != expected:
            hint = ("; read image files with pyconcepts.images.Preprocess(channels=" + str(expected) + ") "
                    "(FolderImages(..., preprocess=...)), as the CLI does" if expected in (1, 3) else "")
            raise ValueError(
                f"images have {batch.shape[1]} channels but the model's first layer expects {expected}{hint}"
            )
        if not bool(torch.isfinite(batch).all()):
            bad = [(offset or 0) + i for i in (~torch.isfinite(batch)).flatten(1).any(1).nonzero().flatten().tolist()]
            where = f"image(s) {bad[:5]}" if offset is not None else f"image(s) {bad[:5]} of this batch"
            raise ValueError(f"images contain NaN or Inf pixels ({where})")
        # images in another floating dtype than the model's weights (float64 arrays, a bf16 model)
        # are cast to it, as the model's first layer would need
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), batch.dtype)
        return batch.to(self.device, dtype=dtype)

    @contextlib.contextmanager
    def hook(self, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]):
        """Install ``fn(output) -> replacement or None`` on the layer for the duration (one
        forward pass of the model: a layer that runs twice in it is refused, since its patches
        would be two different activations)."""
        calls = [0]

        def _hook(module, inputs, output):
            calls[0] += 1
            if calls[0] > 1:
                raise ValueError(f"layer {self.layer!r} runs more than once in one forward pass of the model; "
                                 "tap a layer that runs once per image batch")
            self.shape = self._describe(output)
            return fn(output)

        handle = self.module.register_forward_hook(_hook)
        try:
            yield
        finally:
            handle.remove()

    def activations(self, batch: torch.Tensor, offset: Optional[int] = None) -> torch.Tensor:
        """The layer output for one image batch (no grad, eval mode). The rest of the network
        is not run: collection stops at the layer. ``offset``: as in ``_check_images``."""
        captured: List[torch.Tensor] = []

        def grab(out):
            captured.append(out.detach())
            raise _Replace()

        batch = self._check_images(batch, offset)
        with self.eval_mode(), torch.no_grad(), self.hook(grab):
            try:
                self.model(batch)
            except _Replace:
                pass
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} was not called by the model's forward")
        return captured[0]

    def rows(self, images, batch_size: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Stream patch rows (n, C), one image batch at a time (nothing is kept)."""
        for batch in iter_batches(images, batch_size):
            yield self.to_rows(self.activations(batch))

    def forward_with(self, batch: torch.Tensor, replace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run the whole model on ``batch`` with the layer's output ``out`` replaced by
        ``replace(out)``: f+(replace(f-(batch))). Gradients flow through ``replace`` when
        grad mode is on; model parameters do not require grad meanwhile."""
        batch = self._check_images(batch)
        with self.eval_mode(), self.frozen(), self.hook(replace):
            return self.model(batch)

    def forward_rows(self, batch: torch.Tensor, edit_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Like ``forward_with`` but ``edit_rows`` sees and returns patch rows (B*positions, C)."""
        def replace(out):
            return self.from_rows(edit_rows(self.to_rows(out)), out)

        return self.forward_with(batch, replace)


def _input_channels(model: nn.Module) -> Optional[int]:
    """In-channels of the model's first conv / patch-embedding layer, when there is one."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            return module.in_channels
        if isinstance(module, nn.Linear):
            return None  # a linear first layer: no channel convention to check
    return None
