"""Two ranks (gloo, CPU) holding halves of the rows reach the single-process clustering."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyconcepts as pc


def _data():
    gen = torch.Generator().manual_seed(5)
    centres = torch.nn.functional.normalize(torch.randn(6, 12, generator=gen), dim=1)
    which = torch.randint(0, 6, (4000,), generator=gen)
    return centres[which] + 0.3 * torch.randn(4000, 12, generator=gen) + 0.2


def _worker(rank, world, init_file, out_file, pruning):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = _data()
        shard = list(x[:2300].split(1000)) if rank == 0 else list(x[2300:].split(1000))
        km = pc.DirectionalClustering(n_concepts=8, seed=3, max_iter=12, tol=0.0, pruning=pruning,
                                      chunk_size=1000).fit(shard)
        if rank == 0:
            torch.save({"centroids": km.centroids_, "n": km.n_samples_, "mean": km.mean_}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pruning", [False, True])
def test_two_ranks_match_one_process(pruning):
    x = _data()
    single = pc.DirectionalClustering(n_concepts=8, seed=3, max_iter=12, tol=0.0, pruning=pruning,
                                      chunk_size=1000).fit(list(x.split(1000)))
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, init_file, out_file, pruning), nprocs=2, join=True)
        got = torch.load(out_file)
    assert got["n"] == 4000
    torch.testing.assert_close(got["mean"], single.mean_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["centroids"], single.centroids_, rtol=0, atol=1e-5)
