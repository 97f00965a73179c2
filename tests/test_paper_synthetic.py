"""The paper's synthetic experiment (METHOD.md section 6) through ``pc.extract``: 2-pixel
images, average pooling + linear network, extraction at the input."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import pyconcepts as pc
from pyconcepts.metrics import detector_iou, match_directions
from pyconcepts.synthetic import SyntheticModel

PAIRS = [(0, 1), (1, 2), (0, 2)]  # class c holds one pixel of each concept of its pair


def make_images(seed, per_class=1000):
    sm = SyntheticModel(dim=16, n_concepts=3, n_distractors=2, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    pool = sm.sample(per_class * 8, g)
    concept = pool.presence.float().argmax(1)
    free = {i: (concept == i).nonzero().flatten().tolist() for i in range(3)}
    images, labels, presence = [], [], []
    for c, (i, j) in enumerate(PAIRS):
        for _ in range(per_class):
            a, b = free[i].pop(), free[j].pop()
            if torch.rand((), generator=g) < 0.5:
                a, b = b, a
            images.append(torch.stack([pool.x[a], pool.x[b]], 1)[:, None, :])  # (16, 1, 2)
            presence.append(torch.stack([pool.presence[a], pool.presence[b]]))
            labels.append(c)
    return sm, torch.stack(images), torch.tensor(labels), torch.stack(presence)


def train_network(images, labels, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        input=nn.Identity(), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(16, 3)))
    # pooling has no parameters: train the linear layer on the pooled inputs (the same
    # network, one small GEMM per step instead of a pass over every image)
    pooled = model.flatten(model.pool(images))
    opt = torch.optim.Adam(model.fc.parameters(), 0.05)
    for _ in range(300):
        loss = nn.functional.cross_entropy(model.fc(pooled), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run(seed):
    sm, images, labels, presence = make_images(seed)
    model = train_network(images, labels, seed)
    basis = pc.extract(model, "input", images, 3, seed=seed)
    x = images.permute(0, 2, 3, 1).reshape(-1, 16)
    enc = match_directions(basis.encoding, sm.encoding)
    iou = detector_iou(basis.detect(x)[:, enc["truth_index"]], presence.reshape(-1, 3))
    return iou, enc["cosine"]


SEEDS = (0, 1, 2, 5, 6, 8)  # 5, 6, 8: encoding cosine 0.88-0.93 with the discriminant filters


@pytest.fixture(scope="module")
def results():
    # Every tensor here is tiny (6000 x 16): one intra-op thread is as fast, and on a shared
    # machine two threads wait on each other at every op (measured: 131 s vs 13 s, load 5).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {seed: run(seed) for seed in SEEDS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_every_detector_iou_at_least_095(results):
    # issue target >= 0.92, aim >= 0.95 (paper: 0.96 / 0.92 / 0.96); measured with refinement +
    # URA: min 0.967-0.977 per seed over seeds 0-9
    for seed, (iou, _) in results.items():
        assert float(iou.min()) >= 0.95, (seed, iou.tolist())


def test_clustering_finds_the_three_concepts_on_seed_9():
    # seed 9 split one concept in two and merged the other two (IoU 0.34 / 0.33) with 3
    # k-means restarts: the bad optimum has a 10% lower objective and about 1/3 of the
    # seedings land in it; 10 restarts find the right one
    sm, images, _, presence = make_images(9)
    x = images.permute(0, 2, 3, 1).reshape(-1, 16)
    basis = pc.extract_directions(x, 3, seed=9)
    enc = match_directions(basis.encoding, sm.encoding)
    iou = detector_iou(basis.detect(x)[:, enc["truth_index"]], presence.reshape(-1, 3))
    assert float(iou.min()) >= 0.95, iou.tolist()


@pytest.mark.slow
def test_encoding_cosine_at_least_095(results):
    # the target on every seed run; measured min 0.982-0.996 per seed over seeds 0-9
    # with the logistic filters (0.876-0.977 with the discriminant ones + alternation)
    for seed, (_, cos) in results.items():
        assert float(cos.min()) >= 0.95, (seed, cos.tolist())
