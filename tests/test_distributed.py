"""Two ranks (gloo, CPU) holding halves of the rows reach the single-process clustering."""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyconcepts as pc
from pyconcepts.detectors import sample_rows


def _data():
    gen = torch.Generator().manual_seed(5)
    centres = torch.nn.functional.normalize(torch.randn(6, 12, generator=gen), dim=1)
    which = torch.randint(0, 6, (4000,), generator=gen)
    return centres[which] + 0.3 * torch.randn(4000, 12, generator=gen) + 0.2


def _rank_main(rank, world, init_file, out_file, body, args):
    torch.set_num_threads(1)
    # a collective that one rank skips fails after the timeout instead of hanging the test
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(body(rank, *args), out_file + str(rank))
    finally:
        try:  # leave together: gloo torn down under a rank still talking aborts it
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _spawn_two(worker, args, out_file):
    """mp.spawn on two ranks. A rank that aborts (SIGABRT) in the gloo teardown after both
    ranks saved their results (seen rarely on a loaded machine) does not fail the test; any
    other failure does."""
    try:
        mp.spawn(worker, args=args, nprocs=2, join=True)
    except mp.ProcessExitedException as exc:
        saved = all(os.path.exists(out_file + str(r)) for r in range(2))
        if exc.signal_name != "SIGABRT" or not saved:
            raise


def _on_two_ranks(body, *args):
    """Runs body(rank, *args) on two gloo ranks; returns what each returned."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        _spawn_two(_rank_main, (2, init_file, out_file, body, args), out_file)
        return [torch.load(out_file + str(r)) for r in range(2)]


def _fit_shard(rank, options):
    x = _data()
    shard = list(x[:2300].split(1000)) if rank == 0 else list(x[2300:].split(1000))
    options = dict(options)
    if isinstance(options.get("pruning_dir"), list):  # one directory per rank
        options["pruning_dir"] = options["pruning_dir"][rank]
    try:
        km = pc.DirectionalClustering(n_concepts=8, seed=3, max_iter=12, tol=0.0,
                                      chunk_size=1000, **options).fit(shard)
        return {"centroids": km.centroids_, "n": km.n_samples_, "mean": km.mean_,
                "computed": [s.distance_fraction for s in km.pass_stats_]}
    except ValueError as exc:
        return {"error": str(exc)}


def _run_two_ranks(options):
    return _on_two_ranks(_fit_shard, options)


@pytest.mark.parametrize("options", ["plain", "pruned", "bounds on disk"])
def test_two_ranks_match_one_process(options, tmp_path):
    kwargs = {"plain": dict(pruning=False), "pruned": dict(pruning=True),
              "bounds on disk": dict(pruning="auto", pruning_memory=0,
                                     pruning_dir=str(tmp_path))}[options]
    if options == "plain":  # a seeding sample of 300 of the 4000 rows: the ranks must agree
        kwargs["init_sample_size"] = 300                     # on which rows it holds
    x = _data()
    single = pc.DirectionalClustering(n_concepts=8, seed=3, max_iter=12, tol=0.0,
                                      chunk_size=1000, **kwargs).fit(list(x.split(1000)))
    got = _run_two_ranks(kwargs)
    for rank in got:
        assert rank["n"] == 4000
        torch.testing.assert_close(rank["mean"], single.mean_, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rank["centroids"], single.centroids_, rtol=0, atol=1e-5)
    # both ranks took the same pass decisions (pruned or not) as the single process
    assert [c < 1 for c in got[0]["computed"]] == [c < 1 for c in got[1]["computed"]]
    if options != "plain":
        assert min(got[0]["computed"]) < 1.0
    assert list(tmp_path.iterdir()) == []  # every rank removed its scratch


def test_a_bad_pruning_dir_on_one_rank_fails_every_rank(tmp_path):
    got = _run_two_ranks(dict(pruning="auto", pruning_memory=0,
                              pruning_dir=[str(tmp_path), str(tmp_path / "missing")]))
    assert "pruning_dir" in got[0]["error"] and "another rank" in got[0]["error"]
    assert "pruning_dir" in got[1]["error"] and "missing" in got[1]["error"]


class _FailingRead:
    """A chunk stream whose reads fail from the `fail_from`-th on (a disk error, say)."""

    def __init__(self, chunks, fail_from):
        self.chunks, self.fail_from, self.reads = chunks, fail_from, 0

    def __call__(self):
        self.reads += 1
        if self.reads >= self.fail_from:
            raise OSError("disk read failed on this rank")
        return iter(self.chunks)


def _fit_failing_shard(rank, case, scratch):
    x = _data()
    shard = x[:2000] if rank == 0 else x[2000:]
    if rank == 1 and case == "empty shard":
        shard = x[:0]
    if rank == 1 and case.startswith("nan row"):
        shard = shard.clone()
        shard[1500, 3] = float("nan")  # outside the seeding sample: the kernels find it
    stream = list(shard.split(1000)) if shard.shape[0] else [shard]
    if rank == 1 and case == "read error in the seeding pass":
        stream = _FailingRead(stream, fail_from=2)  # the statistics pass reads fine
    pruned = case == "nan row, pruned"
    km = pc.DirectionalClustering(n_concepts=8, seed=3, max_iter=5, center=False,
                                  init_sample_size=100, chunk_size=1000, pruning=pruned,
                                  pruning_memory=0, pruning_dir=scratch[rank])
    try:
        km.fit(stream)
        return None, []
    except Exception as exc:  # the scratch must be gone while the traceback still lives
        return f"{type(exc).__name__}: {exc}", os.listdir(scratch[rank])


@pytest.mark.parametrize("case", ["empty shard", "nan row", "nan row, pruned",
                                  "read error in the seeding pass"])
def test_a_rank_that_fails_alone_stops_every_rank(case, tmp_path):
    # without the agreement the healthy rank waits in its next all-reduce until the timeout
    scratch = [str(tmp_path / "0"), str(tmp_path / "1")]
    for path in scratch:
        os.mkdir(path)
    got = _on_two_ranks(_fit_failing_shard, case, scratch)
    assert got[0][0].startswith("RankFailed") and "other rank" in got[0][0], got
    expected = {"empty shard": "empty stream", "read error in the seeding pass": "disk read"}
    assert expected.get(case, "NaN") in got[1][0], got
    assert got[0][1] == [] and got[1][1] == []  # both ranks' pruning scratch removed


def _fail_on_rank_1(rank):
    from pyconcepts.stats import fail_together

    try:
        with fail_together("the test block"):
            if rank == 1:
                raise KeyError("rank 1's own error")
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def test_fail_together_raises_on_every_rank():
    got = _on_two_ranks(_fail_on_rank_1)
    assert got[0].startswith("RankFailed") and "the test block" in got[0]
    assert got[1] == "KeyError: \"rank 1's own error\""


def _concept_data():
    from pyconcepts.synthetic import SyntheticModel

    sm = SyntheticModel(dim=16, n_concepts=3, n_distractors=2, seed=0)
    return sm, sm.sample(6000, torch.Generator().manual_seed(1))


def _extract_worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, data = _concept_data()
        shard = data.x[:2500] if rank == 0 else data.x[2500:]
        chunks = list(shard.split(1000))
        # a decoder sample smaller than the data: which rows it holds must not depend on ranks
        basis = pc.extract_directions(chunks, n_concepts=3, seed=0, n_init=4, chunk_size=1000,
                                      decoder_sample=1500)
        sample = sample_rows(chunks, 1500, seed=7, chunk_size=1000)
        torch.save({"decoding": basis.decoding, "bias": basis.bias, "encoding": basis.encoding,
                    "sample": sample}, out_file + str(rank))
    finally:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def test_extract_directions_on_two_ranks():
    # every statistic (clustering, class sums, threshold histograms, moments) and every
    # sample (logistic filters) is global: both ranks hold the same basis, and it finds the
    # concepts as the single process does
    from pyconcepts.metrics import detector_iou, match_directions

    sm, data = _concept_data()
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        _spawn_two(_extract_worker, (2, init_file, out_file), out_file)
        got = [torch.load(out_file + str(r)) for r in range(2)]
    for key in ("decoding", "bias", "encoding", "sample"):
        assert torch.equal(got[0][key], got[1][key]), key
    # the sample a single process draws, row for row
    assert torch.equal(got[0]["sample"], sample_rows(list(data.x.split(600)), 1500, seed=7))
    single = pc.extract_directions(list(data.x.split(1000)), n_concepts=3, seed=0, n_init=4,
                                   chunk_size=1000, decoder_sample=1500)
    torch.testing.assert_close(got[0]["decoding"], single.decoding, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[0]["encoding"], single.encoding, atol=1e-3, rtol=1e-3)
    for basis in (got[0], {"decoding": single.decoding, "bias": single.bias,
                           "encoding": single.encoding}):
        enc = match_directions(basis["encoding"], sm.encoding)
        assert float(enc["cosine"].min()) > 0.95
        detected = data.x @ basis["decoding"].T > basis["bias"]
        iou = detector_iou(detected[:, enc["truth_index"]], data.presence)
        assert float(iou.min()) > 0.9


_STREAM_CHANGES = ["seeding-sample pass", "plain Lloyd pass", "pruned Lloyd pass"]


def _fit_changing_shards(rank):
    # per case, rank 1's stream yields 5 rows fewer on one read (1 = the statistics pass;
    # under torch.distributed read 2 draws the seeding sample, then one read per Lloyd pass);
    # the cases run one after the other in the same process group
    x = _data()
    shard = x[:2000] if rank == 0 else x[2000:]
    got = {}
    for case in _STREAM_CHANGES:
        at = {"seeding-sample pass": 2, "plain Lloyd pass": 3, "pruned Lloyd pass": 4}[case]
        reads = []

        def stream():
            reads.append(1)
            rows = shard[:-5] if rank == 1 and len(reads) == at else shard
            return iter(rows.split(1000))

        km = pc.DirectionalClustering(n_concepts=8, seed=3, max_iter=5, tol=0.0,
                                      init_sample_size=100, pruning=case == "pruned Lloyd pass")
        try:
            km.fit(stream)
            got[case] = None
        except Exception as exc:
            got[case] = f"{type(exc).__name__}: {exc}"
    return got


def test_a_stream_that_changes_on_one_rank_stops_every_rank():
    got = _on_two_ranks(_fit_changing_shards)
    expected = {
        "seeding-sample pass": "ValueError: the seeding-sample pass read 1995 rows of x on this "
                               "rank, but the statistics pass read 2000",
        "plain Lloyd pass": "ValueError: Lloyd pass 1 read 1995 rows of x on this rank",
        # the bounds of the pruned pass see the short chunk before the pass ends
        "pruned Lloyd pass": "ValueError: Lloyd pass 2: the chunks changed between passes",
    }
    for case in _STREAM_CHANGES:
        assert got[0][case] is not None and got[0][case].startswith("RankFailed"), got
        assert got[1][case] is not None and got[1][case].startswith(expected[case]), got
