"""Every CPU code path this machine runs (PYCONCEPTS_SIMD=generic|avx2|avx512) against the
plain-torch reference, and the promises between paths: avx2 and avx512 give bit-identical
outputs (labels, cosines, float64 sums, moments, pruned-pass state); each path is
independent of the thread count; the generic path (no fused multiply-add) agrees with them
to fp32 rounding (cosines within 1e-5, labels equal wherever the top-2 gap exceeds that).
Paths the CPU or this build lacks are skipped with the reason; forcing one fails the import
with a message that names it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyconcepts as pc
from pyconcepts import reference as ref

ALL_PATHS = ("generic", "avx2", "avx512", "amx")
AVAILABLE = pc.ops.simd_paths()

# Runs in a subprocess with PYCONCEPTS_SIMD set; saves every output to argv[1].
_WORKER = r"""
import sys, torch, torch.nn.functional as F, pyconcepts as pc
from pyconcepts.pruning import _drift_angles
out = {"path": pc.ops.simd_path()}
g = torch.Generator().manual_seed(7)
# D and K off the 8/16 grids, N off every block size (6-row tiles, 24-row passes)
x32 = torch.randn(1003, 45, generator=g)
x32[5] = 0.0
c = F.normalize(torch.randn(37, 45, generator=g), dim=1)
center = 0.1 * torch.randn(45, generator=g)
rows = torch.randint(0, 1003, (301,), generator=g)
for name, dt in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
    x = x32.to(dt)
    for th in (1, 2):
        key = f"{name}_t{th}"
        out["assign_" + key] = pc.ops.cosine_assign(x, c, return_second=True,
                                                    return_group_max=True, num_threads=th)
        out["assign_rows_center_" + key] = pc.ops.cosine_assign(
            x, c, return_second=True, rows=rows, center=center, num_threads=th)
        out["update_" + key] = pc.ops.assign_update(x, c, return_second=True, normalize=True,
                                                    return_moments=True, num_threads=th)
        out["update_center_" + key] = pc.ops.assign_update(x, c, center=center, num_threads=th)
        out["moments_" + key] = tuple(pc.ops.masked_moments(x, c, torch.full((37,), 0.1),
                                                            center=center, num_threads=th))
        out["spherical_" + key] = pc.ops.spherical_update(x, out["assign_" + key][0], 37,
                                                          num_threads=th)
        out["plain_" + key] = pc.ops.cosine_assign(x, c, center=center, num_threads=th)
# many clearly assigned rows (what the int16 screen certifies), some at extreme scales
gm = torch.Generator().manual_seed(11)
cm = F.normalize(torch.randn(256, 64, generator=gm), dim=1)
xm = cm[torch.randint(0, 256, (2000,), generator=gm)] + 0.05 * torch.randn(2000, 64, generator=gm)
xm[:100] *= 1e-18
xm[100:200] *= 1e15
xm[200:210] = 0.0
out["mixture"] = pc.ops.cosine_assign(xm, cm) + pc.ops.assign_update(xm, cm, normalize=True,
                                                                     return_moments=True)
out["single_centroid"] = pc.ops.cosine_assign(xm, cm[:1])
# exact ties: every centroid twice, the lowest index must win
dup = c[torch.arange(34) % 17].contiguous()
out["ties"] = pc.ops.cosine_assign(x32, dup, return_second=True)
# pruned passes over drifting centroids (K = 70: several groups, last strip partial)
xp = torch.randn(3000, 40, generator=g)
cp = F.normalize(torch.randn(70, 40, generator=g), dim=1)
for th in (1, 2):
    labels = torch.zeros(3000, dtype=torch.int64)
    lo = torch.full((3000,), 4.0)
    up = torch.zeros(3000, pc.ops.pruned_pass_groups(70, 1))
    drift = torch.zeros(70, dtype=torch.float64)
    cc = cp.clone()
    gg = torch.Generator().manual_seed(3)
    passes = []
    for it in range(4):
        stats = pc.ops.pruned_pass(xp, cc, labels, lo, up, drift, normalize=True,
                                   num_threads=th)
        passes.append((labels.clone(), lo.clone(), up.clone()) + tuple(stats)
                      + (pc.ops.cosine_assign(xp, cc, num_threads=th)[0], cc.clone()))
        new = F.normalize(cc + 0.02 * torch.randn(70, 40, generator=gg), dim=1)
        drift = _drift_angles(cc, new)
        cc = new
    out[f"pruned_t{th}"] = passes
out["screen_counts"] = torch.tensor(pc._C.screen_counts())
torch.save(out, sys.argv[1])
"""


def _skip_reason(path: str) -> str:
    if path == "amx":
        have = pc.ops.cpu_features().get("amx-tile", False)
        return ("this build has no AMX kernels" if have
                else "this CPU lacks AMX (and this build has no AMX kernels)")
    return f"this CPU lacks the {path} path (it runs {', '.join(AVAILABLE)})"


def _run(path: str, tmp_path_factory, screen: str = "off") -> dict:
    target = tmp_path_factory.mktemp(f"simd_{path}_{screen}") / "out.pt"
    env = dict(os.environ, PYCONCEPTS_SIMD=path, PYCONCEPTS_SCREEN=screen)
    run = subprocess.run([sys.executable, "-c", _WORKER, str(target)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return torch.load(target, weights_only=False)


@pytest.fixture(scope="module")
def path_outputs(tmp_path_factory):
    cache: dict = {}

    def get(path: str, screen: str = "off") -> dict:
        if (path, screen) not in cache:
            cache[path, screen] = _run(path, tmp_path_factory, screen)
        return cache[path, screen]

    return get


def _inputs():
    g = torch.Generator().manual_seed(7)
    x32 = torch.randn(1003, 45, generator=g)
    x32[5] = 0.0
    c = F.normalize(torch.randn(37, 45, generator=g), dim=1)
    center = 0.1 * torch.randn(45, generator=g)
    rows = torch.randint(0, 1003, (301,), generator=g)
    return x32, c, center, rows


def _labels_agree(index, best, x, c, tol=1e-5):
    """Labels equal the float64 reference's wherever its top-2 gap exceeds tol."""
    sims = ref.cosine_similarities(x, c)
    top = sims.topk(2, dim=1).values
    clear = (top[:, 0] - top[:, 1]) > tol
    assert torch.equal(index[clear], sims.argmax(dim=1)[clear])
    assert (best.double() - top[:, 0]).abs().max() < tol


@pytest.mark.parametrize("path", ALL_PATHS)
def test_path_matches_reference(path, path_outputs):
    if path not in AVAILABLE:
        pytest.skip(_skip_reason(path))
    out = path_outputs(path)
    assert out["path"] == path
    x32, c, center, rows = _inputs()
    for name, dt in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        x = x32.to(dt)
        xd = x.double()
        for th in (1, 2):
            key = f"{name}_t{th}"
            index, best, second, group_max = out["assign_" + key]
            _labels_agree(index, best, xd, c)
            sims = ref.cosine_similarities(xd, c)
            assert (second.double() - sims.topk(2, dim=1).values[:, 1]).abs().max() < 1e-5
            padded = torch.cat([sims, sims.new_full((1003, 48 - 37), -2.0)], dim=1)
            assert (group_max.double() - padded.view(1003, 3, 16).amax(2)).abs().max() < 1e-5
            i2, b2, _ = out["assign_rows_center_" + key]
            _labels_agree(i2, b2, xd[rows] - center.double(), c)
            i3, b3, _, sums, counts, sum_xz, sum_z = out["update_" + key]
            assert torch.equal(i3, index)
            r = ref.assign_update(x, c, normalize=True, return_moments=True)
            # sums by the kernel's labels (the reference's may differ on near-ties)
            rs, rc = ref.spherical_update(xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-12),
                                          i3, 37)
            assert torch.equal(counts, rc) and (sums - rs).abs().max() < 1e-5  # fp32 norms
            if torch.equal(i3, r[0]):
                assert (sum_xz - r[4]).abs().max() < 1e-3
                assert (sum_z - r[5]).abs().max() < 1e-3
            moments = out["moments_" + key]
            rm = ref.masked_moments(x, c, torch.full((37,), 0.1), center=center)
            assert (moments[2] - rm.sum_z2).abs().max() < 1e-2
            assert (moments[4] - rm.sum_xz).abs().max() < 1e-2
            su, cu = out["spherical_" + key]
            rsu, rcu = ref.spherical_update(x, index, 37)
            assert torch.equal(cu, rcu) and (su - rsu).abs().max() < 1e-9
    # ties to the lowest index: the second best equals the best
    i, s, s2 = out["ties"]
    assert bool((i < 17).all()) and torch.equal(s, s2)
    # pruned passes: labels identical to the same path's cosine_assign after every pass
    for passes in (out["pruned_t1"], out["pruned_t2"]):
        for p in passes:
            assert torch.equal(p[0], p[-2])


@pytest.mark.parametrize("path", ALL_PATHS)
def test_path_is_independent_of_thread_count(path, path_outputs):
    if path not in AVAILABLE:
        pytest.skip(_skip_reason(path))
    out = path_outputs(path)
    for key in [k for k in out if k.endswith("_t1")]:
        flat_a, flat_b = _flatten(out[key]), _flatten(out[key[:-1] + "2"])
        assert len(flat_a) == len(flat_b)
        assert all(torch.equal(p, q) for p, q in zip(flat_a, flat_b)), key


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []


def test_fma_paths_are_bit_identical(path_outputs):
    """avx2 and avx512 form every sum in the same order: identical bits, not just labels."""
    fma_paths = [p for p in ("avx2", "avx512") if p in AVAILABLE]
    if len(fma_paths) < 2:
        pytest.skip(f"needs avx2 and avx512; this CPU runs {', '.join(AVAILABLE)}")
    a, b = path_outputs(fma_paths[0]), path_outputs(fma_paths[1])
    for key in a:
        if key in ("path", "screen_counts"):
            continue
        ta, tb = _flatten(a[key]), _flatten(b[key])
        assert len(ta) == len(tb) and ta, key
        for p, q in zip(ta, tb):
            assert torch.equal(p, q), key


def test_generic_path_within_rounding_of_fma_paths(path_outputs):
    """No fused multiply-add on the generic path: cosines within 1e-5 of the FMA paths',
    labels equal wherever the top-2 gap exceeds that bound."""
    others = [p for p in ("avx512", "avx2") if p in AVAILABLE]
    if not others:
        pytest.skip("this CPU runs only the generic path")
    g, f = path_outputs("generic"), path_outputs(others[0])
    for key in [k for k in g if k.startswith("assign_") and "rows" not in k]:
        gi, gb, gs, _ = g[key]
        fi, fb, fs, _ = f[key]
        assert (gb - fb).abs().max() < 1e-5
        clear = (fb - fs) > 2e-5
        assert torch.equal(gi[clear], fi[clear]), key


@pytest.mark.parametrize("value", ["amx", "avx1024"])
def test_forcing_a_missing_or_unknown_path_fails_the_import_clearly(value):
    if value in AVAILABLE:
        pytest.skip(f"this machine runs {value}")
    env = dict(os.environ, PYCONCEPTS_SIMD=value)
    run = subprocess.run([sys.executable, "-c", "import pyconcepts"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stderr  # an exception, not a crash (signal)
    assert "ImportError" in run.stderr and f"PYCONCEPTS_SIMD={value}" in run.stderr
    assert "paths it runs: generic" in run.stderr or "paths this CPU runs: generic" in run.stderr


def test_default_path_is_the_best_available():
    env = dict(os.environ)
    env.pop("PYCONCEPTS_SIMD", None)
    run = subprocess.run([sys.executable, "-c", "import pyconcepts as pc; print(pc.ops.simd_path())"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == AVAILABLE[-1]


@pytest.mark.parametrize("screen,feature", [("int16", "avx512vnni"), ("bf16", "avx512bf16")])
def test_low_precision_screen_gives_the_fp32_path_bits(screen, feature, path_outputs):
    """PYCONCEPTS_SCREEN=int16|bf16: rows whose low-precision scores leave one (int16) or a
    few (bf16) candidates inside the proven error window skip the fp32 sweep; labels,
    cosines, sums and moments must still be those of the fp32 path, bit for bit (zero rows,
    rows scaled by 1e-18 and 1e15, K = 1, fp16/bf16 input, a centre)."""
    if "avx512" not in AVAILABLE or not pc.ops.cpu_features().get(feature):
        pytest.skip(f"the {screen} screen needs the avx512 path and {feature}")
    plain, screened = path_outputs("avx512"), path_outputs("avx512", screen)
    certified, screened_rows = screened["screen_counts"].tolist()
    assert screened_rows > 0 and certified > 0.5 * screened_rows, (certified, screened_rows)
    for key in plain:
        if key in ("path", "screen_counts"):
            continue
        ta, tb = _flatten(plain[key]), _flatten(screened[key])
        assert len(ta) == len(tb) and ta, key
        for p, q in zip(ta, tb):
            assert torch.equal(p, q), key


def test_unknown_or_unavailable_screen_fails_the_import_clearly():
    env = dict(os.environ, PYCONCEPTS_SCREEN="int4")
    run = subprocess.run([sys.executable, "-c", "import pyconcepts"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1 and "PYCONCEPTS_SCREEN=int4" in run.stderr, run.stderr
    for screen in ("int16", "bf16"):
        env = dict(os.environ, PYCONCEPTS_SCREEN=screen, PYCONCEPTS_SIMD="generic")
        run = subprocess.run([sys.executable, "-c", "import pyconcepts"], env=env,
                             capture_output=True, text=True)
        assert run.returncode == 1 and "needs the avx512 path" in run.stderr, run.stderr
