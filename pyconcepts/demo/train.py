"""Train the demo network on poisoned shapes images and write its weights (safetensors).

The training set carries the watermark on every image of one class and, as a backdoor, on a
few images of the other classes that are labelled as that class, so the network learns the
mark as a shortcut for that class; that is what the correction
experiment then removes. Reproducible: the same seed and thread count give the same weights.

    python -m pyconcepts.demo.train --seed 0 --out pyconcepts/demo/shapesnet.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch import nn

from ..datasets.shapes import make_shapes
from .model import ShapesNet

# Recipe of the shipped weights; the demo reads it back from the file's metadata.
DEFAULTS = dict(
    seed=0, n_train=5000, epochs=5, batch_size=64, lr=3e-3, weight_decay=1e-4,
    watermark_class=0, watermark_rate=0.7, backdoor_rate=0.15, width=16,
)


def train(seed=0, n_train=5000, epochs=5, batch_size=64, lr=3e-3, weight_decay=1e-4,
          watermark_class=0, watermark_rate=0.7, backdoor_rate=0.15, width=16, log=print):
    torch.manual_seed(seed)
    data = make_shapes(n_train, seed=seed + 1000, watermark="poison",
                       watermark_class=watermark_class, watermark_rate=watermark_rate,
                       backdoor_rate=backdoor_rate, with_masks=False)
    model = ShapesNet(width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * ((n_train + batch_size - 1) // batch_size))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, n_train, batch_size):
            idx = order[start:start + batch_size]
            x, y = data.images[idx], data.labels[idx]
            # flips keep every concept (the mark just changes corner)
            if torch.rand((), generator=gen) < 0.5:
                x = x.flip(3)
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            total += len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}, train acc {correct / total:.4f}")
    model.eval()
    return model


def save_weights(model: nn.Module, path: str, recipe: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"recipe": json.dumps(recipe)})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; package data must be readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "shapesnet.safetensors"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = {k: getattr(args, k) for k in DEFAULTS}
    t0 = time.time()
    model = train(**recipe)
    recipe["threads"] = args.threads
    recipe["train_seconds"] = round(time.time() - t0, 1)
    save_weights(model, args.out, recipe)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB) in {recipe['train_seconds']} s")


if __name__ == "__main__":
    main()
