"""The command line as a user meets it: their model file, a folder of photos, and every mistake
answered with one line on stderr, a non-zero exit code and no traceback."""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pyconcepts as pc
from pyconcepts.basis import ConceptBasis
from pyconcepts.cli import UserError, main

Image = pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")

MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, classes=2, c=8):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Linear(c, classes)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))


    class TwoOutputs(Net):
        def forward(self, x):
            f = self.features(x).mean((2, 3))
            return {"embedding": f, "logits": self.fc(f)}


    def make(seed=0):
        torch.manual_seed(seed)
        return Net()


    class Probabilities(Net):
        def forward(self, x):
            return super().forward(x).softmax(-1)


    def make_probs():
        torch.manual_seed(0)
        return Probabilities()


    def make_wide():
        torch.manual_seed(0)
        return Net(c=12)


    def make_dict():
        torch.manual_seed(0)
        return TwoOutputs()


    def broken():
        raise RuntimeError("the factory failed on purpose")


    class Noisy(Net):
        def forward(self, x):
            import warnings
            warnings.warn("a warning of the user's model")
            return super().forward(x)


    def make_noisy():
        torch.manual_seed(0)
        return Noisy()
''')

FAST = json.dumps({"n_init": 1, "max_iter": 20, "refine_steps": 3, "joint_steps": 1, "ura_images": 4,
                   "ura_batch": 4})


def _photos(folder, per_class=6, size=16):
    rng = np.random.default_rng(0)
    for cls, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = colour
            Image.fromarray(a).save(os.path.join(folder, cls, f"{i}.{'png' if i % 2 else 'jpg'}"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's working directory: model file, weights, photos and an extracted basis."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("user")
    (root / "model.py").write_text(MODEL_SRC)
    sys.path.insert(0, str(root))
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cli_test_model", root / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    save_file(mod.make().state_dict(), str(root / "w.safetensors"))
    save_file(mod.make(seed=1).state_dict(), str(root / "other.safetensors"))
    _photos(str(root / "photos"))
    (root / "empty").mkdir()
    rc = main(["extract", "--model", str(root / "model.py") + ":make", "--weights", str(root / "w.safetensors"),
               "--images", str(root / "photos"), "--layer", "features.3", "-k", "3",
               "--out", str(root / "basis.safetensors"), "--options", FAST, "--quiet"])
    assert rc == 0
    return root


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _model_args(ws, factory="make", weights="w.safetensors"):
    args = ["--model", f"{ws / 'model.py'}:{factory}"]
    return args + (["--weights", ws / weights] if weights else [])


def test_extract_from_a_folder_records_layer_width_and_model(ws):
    basis = ConceptBasis.load(ws / "basis.safetensors")
    assert basis.layer == "features.3" and basis.dim == 8 and basis.n_concepts == 3
    assert basis.metadata["n_images"] == 12 and basis.metadata["n_patches"] == 12 * 64
    assert set(basis.metadata["model_fingerprint"]) == {"architecture", "weights"}


def test_extract_warns_of_an_out_name_and_a_k_that_mislead(ws, capsys, tmp_path):
    rc, _, err = _run(capsys, "extract", *_model_args(ws), "--images", ws / "photos", "--layer", "features.3",
                      "-k", "10", "--out", tmp_path / "basis.pt", "--options", FAST, "--quiet")
    assert rc == 0 and "will be a safetensors file" in err
    assert "-k 10 exceeds the 8 channels" in err
    assert ConceptBasis.load(tmp_path / "basis.pt").n_concepts == 10


def test_extract_replaces_a_basis_but_no_other_file(ws, capsys, tmp_path):
    import shutil

    shutil.copy(ws / "w.safetensors", tmp_path / "w.safetensors")
    (tmp_path / "notes.txt").write_text("mine")
    common = ["extract", "--model", f"{ws / 'model.py'}:make", "--weights", tmp_path / "w.safetensors",
              "--images", ws / "photos", "--layer", "features.3", "-k", "2", "--options", FAST, "--quiet"]
    weights = (tmp_path / "w.safetensors").read_bytes()
    # safetensors with the basis's format marker but not its tensors: still the user's file
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "marked.safetensors"), metadata={"format": "pyconcepts.ConceptBasis"})
    os.mkfifo(tmp_path / "pipe.safetensors")      # opening it would wait for a writer forever
    rc, _, err = _run(capsys, *common, "--out", tmp_path / "pipe.safetensors")
    assert rc == 2 and "exists and is not a pyconcepts basis" in err
    for mine in ("w.safetensors", "notes.txt", "marked.safetensors"):   # its own weights, any file that is no basis
        before = (tmp_path / mine).read_bytes()
        rc, _, err = _run(capsys, *common, "--out", tmp_path / mine)
        assert rc == 2 and "exists and is not a pyconcepts basis" in err
        assert (tmp_path / mine).read_bytes() == before
    # a basis is replaced: a re-run with other settings
    rc, _, err = _run(capsys, *common, "--out", tmp_path / "b.safetensors")
    assert rc == 0, err
    rc, _, err = _run(capsys, *common[:-5], "-k", "3", "--options", FAST, "--quiet", "--out", tmp_path / "b.safetensors")
    assert rc == 0 and ConceptBasis.load(tmp_path / "b.safetensors").n_concepts == 3
    assert (tmp_path / "w.safetensors").read_bytes() == weights


def test_extract_with_stability_records_the_split_half_check(ws, capsys, tmp_path):
    out = tmp_path / "checked.safetensors"
    rc, printed, _ = _run(capsys, "extract", *_model_args(ws), "--images", ws / "photos", "--layer", "features.3",
                          "-k", "3", "--out", out, "--options", FAST, "--quiet", "--stability", "2")
    assert rc == 0 and "split-half check" in printed
    basis = ConceptBasis.load(out)
    assert len(basis.metadata["halves_jaccard"]) == 3 and basis.metadata["halves_images"] == [6, 6]
    assert basis.metadata["halves_splits"] == 2
    assert all(v is None or 0.0 <= v <= 1.0 for v in basis.metadata["halves_jaccard"])
    assert all(v is None or 0.0 <= v <= 1.0 for v in basis.metadata["halves_lowest"])
    rc, summary, _ = _run(capsys, "report", out)
    assert rc == 0 and "halves mean / lowest" in summary and "random halves of the images" in summary
    rc, _, err = _run(capsys, "extract", *_model_args(ws), "--images", ws / "photos", "--layer", "features.3",
                      "-k", "3", "--out", tmp_path / "one.safetensors", "--limit", "1", "--stability")
    assert rc == 2 and "--images has 1 image(s)" in err and not (tmp_path / "one.safetensors").exists()


def test_extract_with_several_k_compares_them_by_the_split_half_check(ws, capsys, tmp_path):
    from pyconcepts.stability import STABLE_HALF_WITH_HALF

    common = ["extract", *_model_args(ws), "--images", ws / "photos", "--layer", "features.3", "--options", FAST,
              "--quiet", "--stability", "1"]
    rc, _, err = _run(capsys, *common, "-k", "2", "3", "--out", tmp_path / "basis.safetensors")
    assert rc == 2 and "--out must contain {k}" in err and not list(tmp_path.iterdir())
    rc, printed, err = _run(capsys, *common, "-k", "3", "2", "3", "--out", tmp_path / "b-k{k}.safetensors")
    assert rc == 0, err
    agree = {}
    for k in (2, 3):
        basis = ConceptBasis.load(tmp_path / f"b-k{k}.safetensors")
        assert basis.n_concepts == k and basis.metadata["halves_splits"] == 1
        agree[k] = basis.metadata["halves_mean_jaccard"]
    table = printed.split("per K (split-half check")[1].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["2", "3"]           # ascending, each K once
    for line, k in zip(table[2:4], (2, 3)):
        assert float(line.split()[1]) == pytest.approx(agree[k], abs=0.006)
        assert line.rstrip().endswith(f"b-k{k}.safetensors")
    good = [k for k in (2, 3) if agree[k] >= STABLE_HALF_WITH_HALF]
    if good:
        assert f"the largest K whose halves agree at Jaccard >= 0.7: {good[-1]} " in printed
    else:
        assert "no K here has halves that agree" in printed
    # a K that a half's patches cannot hold (6 images a half, 64 patches each) is refused before any work
    rc, _, err = _run(capsys, *common, "-k", "2", "400", "--out", tmp_path / "c-k{k}.safetensors")
    assert rc == 2 and "-k 400 exceeds the 384 patches of a half" in err
    assert not list(tmp_path.glob("c-k*"))
    # one K: {k} in the name is filled in
    rc, _, err = _run(capsys, *common, "-k", "2", "--out", tmp_path / "one-k{k}.safetensors")
    assert rc == 0 and (tmp_path / "one-k2.safetensors").exists() and "per K" not in err


def test_extract_groups_images_by_file_name_for_the_split_half_check(ws, capsys, tmp_path):
    common = ["extract", *_model_args(ws), "--images", ws / "photos", "--layer", "features.3", "-k", "2",
              "--options", FAST, "--quiet", "--out", tmp_path / "b.safetensors"]
    # the class folder as the group: two groups, so every split puts one class in each half
    rc, printed, err = _run(capsys, *common, "--stability", "2", "--groups", "^([^/]+)/")
    assert rc == 0, err
    assert "--groups: 2 groups of the 12 images (0 in a group of their own)" in printed
    assert "groups makes 2 groups" in err
    assert ConceptBasis.load(tmp_path / "b.safetensors").metadata["halves_images"] == [6, 6]
    for extra, said in ((["--stability", "--groups", "^zebra"], "matches none of the 12 file names"),
                        (["--stability", "--groups", "(unclosed"], "is not a regular expression"),
                        (["--groups", "^([^/]+)/"], "give --stability")):
        rc, _, err = _run(capsys, *common[:-1], tmp_path / "c.safetensors", *extra)
        assert rc == 2 and said in err and not (tmp_path / "c.safetensors").exists()


def test_explain_speaks_file_and_class_names(ws, capsys):
    rc, out, err = _run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + 12  # a header, then every image (not only the first 16 or so)
    assert lines[1].startswith(os.path.join("cat", "0.jpg") + ": predicted ")
    assert "true cat" in lines[1] and "concept " in lines[1]
    # two outputs and two class subfolders: the predictions are named after the subfolders
    assert all((" predicted cat " in line) or (" predicted dog " in line) for line in lines[1:])
    rc, out, _ = _run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos",
                      "--limit", 2, "--top", 1)
    assert rc == 0 and len(out.splitlines()) == 3 and out.splitlines()[1].count("concept ") == 1
    assert "class subfolders but" not in err
    # an --output that is no class scores (here an 8-wide embedding, as a per-position score
    # of a sequence would be) against 2 class subfolders: said, not silently read as 8 classes
    rc, out, err = _run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws, "make_dict"), "--images",
                        ws / "photos", "--output", "embedding", "--limit", 2)
    assert rc == 0 and "--images has 2 class subfolders but the model's output (after --output) has 8 classes" in err


def test_explain_exact_gives_the_logit_drop_that_intervene_measures(ws, capsys):
    args = ["explain", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos", "--limit", 2,
            "--top", 1]
    rc, out, err = _run(capsys, *args, "--exact")
    assert rc == 0, err
    assert "measured" in out.splitlines()[0]
    # 3 concepts x 2 images: measured by default too; --first-order estimates
    rc, default, _ = _run(capsys, *args)
    assert rc == 0 and "measured" in default.splitlines()[0] and default.splitlines()[1:] == out.splitlines()[1:]
    rc, estimate, _ = _run(capsys, *args, "--first-order")
    assert rc == 0 and "to first order" in estimate.splitlines()[0]
    for line in out.splitlines()[1:]:
        name = line.split(": predicted ")[0]
        concept, value = line.rsplit("concept ", 1)[1].split()
        rc, cf, err = _run(capsys, "intervene", ws / "basis.safetensors", *_model_args(ws), "--images",
                           ws / "photos", "--limit", 2, "--remove", concept)
        assert rc == 0, err
        row = [r for r in cf.splitlines()[1:] if r.startswith(name + ": ")][0]
        change = float(row.rsplit("log-odds ", 1)[1].split()[0])     # intervene: log-odds after - before
        assert float(value) == pytest.approx(-change, abs=2e-3), (line, row)


def test_intervene_reports_probability_and_logit_changes(ws, capsys):
    common = ["intervene", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos", "--remove", 0, 1, 2]
    rc, out, err = _run(capsys, *common, "--strength", 0)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 13 and "strength 0" in lines[0] and "0 predictions changed" in lines[0]
    assert all("log-odds +0.000" in line or "log-odds -0.000" in line for line in lines[1:])
    rc, out, _ = _run(capsys, *common, "--strength", 4)
    deltas = [float(line.rsplit("log-odds ", 1)[1].split()[0]) for line in out.splitlines()[1:]]
    assert rc == 0 and max(abs(d) for d in deltas) > 0 and "membership all" in out.splitlines()[0]
    assert out.splitlines()[1].startswith(os.path.join("cat", "0.jpg") + ": ")
    rc, hard, _ = _run(capsys, *common, "--strength", 4, "--membership", "hard")
    assert rc == 0 and "membership hard" in hard.splitlines()[0] and hard.splitlines()[1:] != out.splitlines()[1:]
    # amplify: the edit pc.counterfactual makes, jointly with a removal
    basis = ConceptBasis.load(ws / "basis.safetensors")
    rc, amp, err = _run(capsys, "intervene", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos",
                        "--remove", 1, 1, "--amplify", "0=3", "2=0.5")   # (a concept named twice: once)
    assert rc == 0, err
    assert amp.splitlines()[0].startswith(
        "removed concept(s) 1 (strength 1) and amplified concept 0 x3, concept 2 x0.5")
    from safetensors.torch import load_file

    from pyconcepts.images import FolderImages
    model = importlib.import_module("model").make()
    model.load_state_dict(load_file(str(ws / "w.safetensors")))
    images = torch.cat(list(FolderImages(ws / "photos").batches(64)))
    cf = pc.counterfactual(model.eval(), basis, images, [1], amplify={0: 3.0, 2: 0.5})
    from pyconcepts.interventions import log_odds
    want = log_odds(cf.logits_after, cf.pred_before) - log_odds(cf.logits_before, cf.pred_before)
    got = [float(line.rsplit("log-odds ", 1)[1].split()[0]) for line in amp.splitlines()[1:]]
    assert torch.allclose(torch.tensor(got), want.float(), atol=2e-3), (got, want)
    for bad, msg in ((["--amplify", "0"], "CONCEPT=FACTOR"), (["--amplify", "0=-1"], ">= 0"),
                     (["--amplify", "7=2"], "--amplify 7"), (["--remove", 0, "--amplify", "0=2"], "both removed"),
                     ([], "nothing to do")):
        rc, _, err = _run(capsys, "intervene", ws / "basis.safetensors", *_model_args(ws), "--images",
                          ws / "photos", *bad)
        assert rc == 2 and msg in err, (bad, err)


def test_extract_honours_limit_and_module_output_selection(ws, capsys, tmp_path):
    out = tmp_path / "b.safetensors"
    rc, _, err = _run(capsys, "extract", *_model_args(ws, "make_dict", None), "--output", "logits",
                      "--images", ws / "photos", "--layer", "features.3", "-k", 2, "--limit", 5,
                      "--out", out, "--options", FAST, "--quiet")
    assert rc == 0, err
    assert ConceptBasis.load(out).metadata["n_images"] == 5
    rc, text, err = _run(capsys, "explain", out, *_model_args(ws, "make_dict", None), "--output", "logits",
                         "--images", ws / "photos", "--limit", 3)
    assert rc == 0 and len(text.splitlines()) == 4, err
    # the basis records the output it was extracted with: the later commands default to it
    assert ConceptBasis.load(out).metadata["output"] == "logits"
    rc, again, err = _run(capsys, "explain", out, *_model_args(ws, "make_dict", None), "--images", ws / "photos",
                          "--limit", 3)
    assert rc == 0 and again == text, err
    rc, _, err = _run(capsys, "intervene", out, *_model_args(ws, "make_dict", None), "--images", ws / "photos",
                      "--limit", 3, "--remove", 0)
    assert rc == 0, err


def test_tensor_files_and_demo_weights_saved_with_torch_save(ws, capsys, tmp_path):
    from pyconcepts.demo.run import load_model

    torch.save(load_model().state_dict(), tmp_path / "demo.pt")
    demo_basis = tmp_path / "demo.safetensors"
    ConceptBasis(torch.randn(2, 64).abs() + 0.1, torch.zeros(2), torch.ones(2, 64), torch.zeros(64),
                 layer="features.relu5").save(demo_basis)
    u8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", u8)
    rc, out, err = _run(capsys, "explain", demo_basis, "--weights", tmp_path / "demo.pt",
                        "--images", tmp_path / "x.npy")
    assert rc == 0, err
    assert out.splitlines()[1].startswith("x.npy[0]: predicted ")


def _one_line_error(rc, err):
    assert rc != 0
    assert "Traceback" not in err
    # warnings (e.g. no --weights) may precede it; the mistake itself is one error line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("pyconcepts: warning:")]
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    return lines[0]


def _mistakes(ws):
    m, img, out = _model_args(ws), ["--images", ws / "photos"], ["--out", ws / "new.safetensors"]
    ext = ["extract", "--layer", "features.3", "--quiet"]
    basis = ws / "basis.safetensors"
    return {
        "missing images": ([*ext, *m, "--images", ws / "nope", *out], "no such file or folder"),
        "empty folder": ([*ext, *m, "--images", ws / "empty", *out], "no image files"),
        "missing weights": ([*ext, *_model_args(ws, weights="nope.safetensors"), *img, *out], "no such file"),
        "missing factory": ([*ext, *_model_args(ws, "nope"), *img, *out],
                            "has no 'nope' (it defines: Net, Noisy, Probabilities, TwoOutputs, broken, make,"),
        "factory raises": ([*ext, *_model_args(ws, "broken", None), *img, *out], "the factory failed on purpose"),
        "missing model file": ([*ext, "--model", ws / "nope.py:make", *img, *out], "no such file"),
        "missing module": ([*ext, "--model", "no_such_module_xyz:make", *img, *out], "no module named"),
        "not a factory spec": ([*ext, "--model", "model", *img, *out], "--model must be"),
        "state dict mismatch": ([*ext, *_model_args(ws, "make_wide"), *img, *out],
                                "does not fit the model (6 tensors): 5 with other shapes (file vs model): features.0.weight (8, 3, 3, 3) vs (12, 3, 3, 3)"),
        "missing out folder": ([*ext, *m, "--images", ws / "nope", "--out", ws / "no" / "b.safetensors"],
                               "does not exist"),
        "out is a folder": ([*ext, *m, *img, "--out", ws], "is a folder"),
        "zero concepts": ([*ext, *m, *img, *out, "-k", "0"], "must be at least 1"),
        "bad options json": ([*ext, *m, *img, *out, "--options", "{n_init: 3}"], "not valid JSON"),
        "unknown option": ([*ext, *m, *img, *out, "--options", '{"n_inits": 3}'], "unknown option"),
        "model without images": ([*ext, *m, *out], "--images is required with --model"),
        "model without layer": (["extract", *m, *img, *out], "--layer is required"),
        "bad layer": ([*ext[:1], "--layer", "features.9", *m, *img, *out], "does not exist"),
        "dict output without --output": ([*ext, *_model_args(ws, "make_dict", None), *img, *out, "--refine"],
                                         "--output KEY"),
        "bad --output": ([*ext, *_model_args(ws, "make_dict", None), "--output", "probs", *img, *out],
                         "--output 'probs'"),
        "remove out of range": (["intervene", basis, *m, *img, "--remove", "3"], "3 concepts, numbered 0 to 2"),
        "negative remove": (["intervene", basis, *m, *img, "--remove", "-1"], "--remove -1"),
        "two mean values": (["intervene", basis, *m, *img, "--remove", "0", "--mean", "0.5,0.5"],
                            "--mean: mean must hold 1 or 3"),
        "another layer": (["intervene", basis, *m, *img, "--remove", "0", "--layer", "features.1"],
                          "extracted at layer 'features.3', not 'features.1'"),
        "another width": (["explain", basis, *_model_args(ws, "make_wide", None), *img], "width D = 8"),
        "other weights": (["explain", basis, *_model_args(ws, weights="other.safetensors"), *img], "other weights"),
        "no basis": (["explain", ws / "nope.safetensors", *m, *img], "no basis file"),
        "basis is not a basis": (["explain", ws / "w.safetensors", *m, *img], "not a pyconcepts ConceptBasis"),
        "strength not a number": (["intervene", basis, *m, *img, "--remove", "0", "--strength", "nan"], "finite"),
    }


MISTAKES = list(_mistakes(__import__("pathlib").Path("/")))


@pytest.mark.parametrize("case", MISTAKES)
def test_every_mistake_is_one_line(ws, capsys, case):
    args, expected = _mistakes(ws)[case]
    rc, out, err = _run(capsys, *args)
    line = _one_line_error(rc, err)
    assert expected in line, line
    assert not (ws / "new.safetensors").exists()


def test_pickled_weights_are_refused_unless_allowed(ws, capsys, tmp_path):
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(ws / "w.safetensors")), "note": _Note()}, tmp_path / "w.pt")
    args = ["explain", ws / "basis.safetensors", "--model", f"{ws / 'model.py'}:make", "--weights",
            tmp_path / "w.pt", "--images", ws / "photos", "--limit", 1]
    line = _one_line_error(*_run(capsys, *args)[::2])
    assert "--allow-pickle" in line
    rc, out, err = _run(capsys, *args, "--allow-pickle")
    assert rc == 0, err


def test_wrong_channel_count_and_unreadable_images(ws, capsys, tmp_path):
    torch.save(torch.rand(2, 1, 16, 16), tmp_path / "grey.pt")
    line = _one_line_error(*_run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws),
                                 "--images", tmp_path / "grey.pt")[::2])
    assert "1 channels but the model's first layer expects 3" in line
    _photos(str(tmp_path / "photos"), per_class=1)
    (tmp_path / "photos" / "cat" / "broken.jpg").write_bytes(b"no jpeg")
    rc, out, err = _run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws),
                        "--images", tmp_path / "photos")
    assert rc == 0 and "skipped 1 unreadable file(s)" in err and "broken.jpg" in err
    assert len(out.splitlines()) == 3


def test_debug_shows_the_traceback(ws):
    with pytest.raises(UserError, match="no basis file"):
        main(["--debug", "explain", str(ws / "nope.safetensors")])
    with pytest.raises(UserError, match="no basis file"):
        main(["explain", str(ws / "nope.safetensors"), "--debug"])


def test_missing_report_package_is_one_line(ws, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyconcepts.report", None)  # import of it fails
    line = _one_line_error(*_run(capsys, "report", ws / "basis.safetensors", *_model_args(ws),
                                 "--images", ws / "photos", "--out", ws / "report")[::2])
    assert "no HTML report" in line
    rc, out, _ = _run(capsys, "report", ws / "basis.safetensors")  # the text summary needs nothing more
    assert rc == 0 and "ConceptBasis(n_concepts=3" in out


def test_broken_pipe_ends_quietly(ws, capsys, monkeypatch):
    read, write = os.pipe()
    os.close(read)
    saved = os.dup(1)
    stream = os.fdopen(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        rc = main(["explain", str(ws / "basis.safetensors"), *map(str, _model_args(ws)), "--images", str(ws / "photos")])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert rc == 141
    assert "Traceback" not in capsys.readouterr().err


def test_help_says_model_runs_code(capsys):
    assert main(["extract", "--help"]) == 0
    assert "IMPORTS AND RUNS THAT CODE" in capsys.readouterr().out


def test_console_script_imports_module_factory_from_the_working_directory(ws, tmp_path):
    (tmp_path / "mymodel.py").write_text(MODEL_SRC)
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", "import sys; from pyconcepts.cli import main; sys.exit(main())",
                           "explain", str(ws / "basis.safetensors"), "--model", "mymodel:make",
                           "--weights", str(ws / "w.safetensors"), "--images", str(ws / "photos"), "--limit", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3


class _Note:
    pass


def test_report_calls_write_report_with_the_model_output_classes(ws, capsys, monkeypatch, tmp_path):
    import types

    seen = {}

    def write_report(out_dir, basis, model, layer, source, *, output=None, progress=None, **options):
        seen.update(out_dir=out_dir, layer=layer, source=source, output=output, options=options)
        os.makedirs(out_dir, exist_ok=True)
        return os.path.join(out_dir, "index.html")

    monkeypatch.setitem(sys.modules, "pyconcepts.report", types.SimpleNamespace(write_report=write_report))
    (tmp_path / "classes.txt").write_text("left\nright\n")
    rc, out, err = _run(capsys, "report", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos",
                        "--out", tmp_path / "rep", "--classes", tmp_path / "classes.txt", "--options",
                        '{"top": 4}', "--quiet")
    assert rc == 0, err
    assert seen["layer"] == "features.3" and seen["options"]["top"] == 4 and seen["output"] is None
    source = seen["source"]
    assert len(source) == 12 and source.class_names == ["left", "right"] and source.labels is None
    assert source.names[0] == os.path.join("cat", "0.jpg")
    assert "index.html" in out


def test_classes_file_with_a_byte_order_mark_or_a_name_twice(ws, capsys, tmp_path):
    # a file saved by an editor that writes a byte-order mark: the first name is still "cat"
    # (the folder check matches it: the names given in the folders' order are right)
    from types import SimpleNamespace

    from pyconcepts.cli import _output_class_names

    (tmp_path / "bom.txt").write_bytes("\ufeffcat\ndog\n".encode("utf-8"))
    args = SimpleNamespace(classes=str(tmp_path / "bom.txt"), model="model.py:make")
    assert _output_class_names(args, SimpleNamespace(class_names=["cat", "dog"]), 2) == ["cat", "dog"]
    common = ["explain", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos", "--limit", 2]
    rc, out, err = _run(capsys, *common, "--classes", tmp_path / "bom.txt")
    assert rc == 0 and "\ufeff" not in out + err
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    rc, _, err = _run(capsys, *common, "--classes", tmp_path / "twice.txt")
    assert rc == 2 and "--classes names 'cat' more than once" in err


def test_report_out_is_checked_before_any_work(ws, capsys, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.css").write_text("their style")
    common = ["report", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos"]
    rc, _, err = _run(capsys, *common, "--out", theirs)
    assert rc == 2 and "--out" in err and "report.css" in err and (theirs / "report.css").read_text() == "their style"
    rc, _, err = _run(capsys, *common, "--out", ws / "photos" / "report")
    assert rc == 2 and "lies inside the images folder" in err and not (ws / "photos" / "report").exists()


def test_demo_checks_its_outputs_and_numbers_before_the_run(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for args, said in ((["--json", tmp_path / "missing" / "x.json"], "--json"),
                       (["--json", tmp_path], "--json"),
                       (["--report-dir", tmp_path / "file"], "--report-dir"),
                       (["--threads", "-1"], "--threads"),
                       (["--seed", "99999999999999999999"], "--seed"),
                       (["--concepts", "1"], "--concepts")):
        rc, _, err = _run(capsys, "demo", *args)
        assert rc == 2 and said in err, (args, err)


def test_output_from_a_file_pools_a_detectors_map(ws, capsys, tmp_path):
    (tmp_path / "det.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn


        class Det(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
                self.head = nn.Conv2d(8, 1, 1)

            def forward(self, x):
                return torch.sigmoid(self.head(self.features(x)))   # a text-probability map, say


        def make():
            return Det()


        def pooled(y):
            return torch.logit(y.mean((1, 2, 3)), eps=1e-6)
    '''))
    det = tmp_path / "det.py"
    common = ["--model", f"{det}:make", "--images", ws / "photos"]
    rc, _, err = _run(capsys, "extract", *common, "--layer", "features.3", "-k", 2, "--output", f"{det}:pooled",
                      "--refine", "--out", tmp_path / "b.safetensors", "--quiet", "--options",
                      '{"refine_steps": 2, "n_init": 1}')
    assert rc == 0, err
    assert ConceptBasis.load(tmp_path / "b.safetensors").metadata["output_callable"] == f"{det}:pooled"
    rc, out, err = _run(capsys, "intervene", tmp_path / "b.safetensors", *common, "--output", f"{det}:pooled",
                        "--remove", 0, "--classes", '["no", "yes"]')
    assert rc == 0 and "12 image" in out, err
    rc, out, err = _run(capsys, "intervene", tmp_path / "b.safetensors", *common, "--remove", 0)
    assert rc == 2 and f"--output {det}:pooled" in err.replace("output=", "--output ")
    # the map itself is no class scores: said before any work, as every command reads outputs
    rc, _, err = _run(capsys, "extract", *common, "--layer", "features.3", "-k", 2, "--refine",
                      "--out", tmp_path / "c.safetensors")
    assert rc == 2 and "has shape (1, 1, 8, 8); expected (B, C) logits" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_transform_from_a_file(ws, capsys, tmp_path):
    (tmp_path / "prep.py").write_text(textwrap.dedent('''
        import numpy as np
        import torch

        def to_input(picture):
            return torch.from_numpy(np.asarray(picture.convert("RGB").resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255
    '''))
    rc, out, err = _run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws), "--images", ws / "photos",
                        "--transform", f"{tmp_path / 'prep.py'}:to_input", "--limit", 2)
    assert rc == 0, err
    line = _one_line_error(*_run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws), "--images",
                                 ws / "photos", "--transform", f"{tmp_path / 'prep.py'}:to_input", "--crop", 8)[::2])
    assert "--transform replaces" in line


def test_torchvision_names_build_without_download(ws, capsys, monkeypatch):
    import types

    calls = []

    def get_model(name, weights=None):
        calls.append((name, weights))
        if name != "tiny":
            raise ValueError(f"Unknown model {name}")
        import importlib.util

        spec = importlib.util.spec_from_file_location("_tv_fake_model", ws / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.make()

    fake = types.SimpleNamespace(models=types.SimpleNamespace(get_model=get_model))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    rc, out, err = _run(capsys, "explain", ws / "basis.safetensors", "--model", "torchvision:tiny", "--weights",
                        ws / "w.safetensors", "--images", ws / "photos", "--limit", 1)
    assert rc == 0, err
    assert calls == [("tiny", None)]
    line = _one_line_error(*_run(capsys, "explain", ws / "basis.safetensors", "--model", "torchvision:huge",
                                 "--images", ws / "photos")[::2])
    assert "Unknown model huge" in line
    monkeypatch.setitem(sys.modules, "timm", None)
    line = _one_line_error(*_run(capsys, "explain", ws / "basis.safetensors", "--model", "timm:vit_tiny",
                                 "--images", ws / "photos")[::2])
    assert "needs timm, which is not installed" in line


def test_basis_records_and_checks_the_model_fingerprint():
    from torch import nn

    from pyconcepts.basis import model_fingerprint

    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    b.load_state_dict(a.state_dict())
    c = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU())
    assert model_fingerprint(a) == model_fingerprint(b)
    basis = ConceptBasis(torch.randn(2, 4).abs() + 0.1, torch.zeros(2), torch.ones(2, 4), torch.zeros(4), layer="1")
    assert basis.compatibility_problems(model=a) == []  # nothing recorded: nothing to compare
    basis.record_model(a)
    assert basis.compatibility_problems(layer="1", width=4, model=b) == []
    assert "parameter names or shapes differ" in basis.compatibility_problems(model=c)[0]

    class Renamed(nn.Sequential):  # another class with the same tensors computes the same layer
        pass

    assert basis.compatibility_problems(model=Renamed(*b)) == []
    with torch.no_grad():
        b[0].bias[0] += 1e-6
    assert "other weights" in basis.compatibility_problems(model=b)[0]
    assert len(basis.compatibility_problems(layer="0", width=5)) == 2


def test_explain_reads_probabilities_as_the_model_gives_them(ws, capsys):
    args = ["explain", ws / "basis.safetensors", "--images", ws / "photos", "--limit", 3]
    rc, plain, err = _run(capsys, *args, *_model_args(ws))
    assert rc == 0, err
    # the same tensors under another class (a softmax on top): the basis fits as it is
    rc, probs, err = _run(capsys, *args, *_model_args(ws, "make_probs"))
    assert rc == 0 and "differ" not in err, err
    p = [line.split("(p ")[1].split(",")[0] for line in plain.splitlines()[1:]]
    assert p == [line.split("(p ")[1].split(",")[0] for line in probs.splitlines()[1:]]
    # the measured removals read the probabilities as log-probabilities (they were the raw
    # probabilities' changes, 100x smaller than the first-order estimate's)
    import importlib.util

    from pyconcepts.cli import _measured_removals

    spec = importlib.util.spec_from_file_location("_cli_probs_model", ws / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from safetensors.torch import load_file

    weights = load_file(str(ws / "w.safetensors"))
    logits_net, probs_net = mod.make(), mod.make_probs()
    logits_net.load_state_dict(weights)
    probs_net.load_state_dict(weights)
    basis = ConceptBasis.load(ws / "basis.safetensors")
    batch = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = _measured_removals(probs_net.eval(), basis, batch, basis.layer, 0, None)
    # the predicted class's log-odds, as the report measures them, on the network's logits
    ranking = pc.rank_concepts(logits_net.eval(), basis, batch, layer=basis.layer, target="predicted")
    expected = torch.empty_like(got)
    expected[:, torch.tensor(ranking.concepts)] = ranking.image_effects.T.float()
    assert torch.allclose(got, expected, atol=1e-4)


def test_a_model_without_weights_is_named_in_a_warning(capsys, tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),"
        " torch.nn.Flatten(), torch.nn.Linear(4, 2))\n")
    from pyconcepts.cli import load_model

    load_model(f"{tmp_path / 'net.py'}:make", None)
    assert "no --weights" in capsys.readouterr().err


def test_a_file_that_is_no_weights_file_is_not_called_a_pickle(capsys, tmp_path):
    (tmp_path / "w.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    from pyconcepts.cli import UserError, _read_state_dict

    with pytest.raises(UserError, match="not a weights file"):
        _read_state_dict(str(tmp_path / "w.png"), False)


COLOUR_MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn


    class ByColour(nn.Module):
        """Output 0: blue, output 1: red (the reverse of the photos' sorted folders cat, dog)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

        def forward(self, x):
            f = self.features(x).mean((2, 3)).sum(1, keepdim=True)
            red, blue = x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))
            return torch.stack([blue - red, red - blue], 1) * 10 + 0 * f


    def make():
        return ByColour()
''')


def test_class_folders_in_another_order_than_the_outputs_are_flagged(ws, capsys, tmp_path):
    (tmp_path / "colour.py").write_text(COLOUR_MODEL_SRC)
    _photos(str(tmp_path / "photos"), per_class=10)
    model = ["--model", f"{tmp_path / 'colour.py'}:make", "--allow-mismatch"]
    common = ["intervene", ws / "basis.safetensors", *model, "--images", tmp_path / "photos", "--remove", 0]
    rc, out, err = _run(capsys, *common)
    assert rc == 0 and "match the class subfolders of --images on only 0%" in err and "--classes" in err
    rc, out, err = _run(capsys, *common, "--classes", '["dog", "cat"]')
    assert rc == 0 and "subfolders" not in err
    # --classes in the folders' (wrong) order: its names are matched to the folders' names
    rc, out, err = _run(capsys, *common, "--classes", '["cat", "dog"]')
    assert rc == 0 and "named by --classes, match the class subfolders of --images on only 0%" in err
    rc, out, err = _run(capsys, *common, "--classes", '["Cat", "DOG"]')     # names matched loosely
    assert rc == 0 and "named by --classes, match the class subfolders" in err
    rc, out, err = _run(capsys, *common, "--classes", '["bird", "fish"]')   # names no folder: no judgement
    assert rc == 0 and "subfolders" not in err
    rc, _, err = _run(capsys, *common, "--limit", 6)  # too few images to judge the order (p = 1/64)
    assert rc == 0 and "subfolders" not in err
    rc, _, err = _run(capsys, *common, "--limit", 8)  # none of 8 matching two classes: p = 1/256
    assert rc == 0 and "match the class subfolders of --images on only 0%" in err
    rc, _, err = _run(capsys, "report", ws / "basis.safetensors", *model, "--images", tmp_path / "photos",
                      "--out", tmp_path / "rep", "--quiet", "--options", '{"rcav": false}')
    assert rc == 0 and "match the class subfolders" in err
    # the page says so too: whoever opens the report later is not misled by its class names
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    warning = page.split("Check before you read on</h2>")[1].split("</div>")[0]
    assert "match the class subfolders" in warning and "may be wrong" in warning
    rc, _, err = _run(capsys, *common, "--strength", "-1")
    assert rc == 2 and ">= 0" in err
    rc, _, err = _run(capsys, *common, "--strength", "3", "--classes", '["dog", "cat"]')
    assert rc == 0 and "anti-concept" in err
    rc, _, err = _run(capsys, *common, "--strength", "1", "--classes", '["dog", "cat"]')
    assert rc == 0 and "anti-concept" not in err


THREE_COLOUR_MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn


    class ByColour(nn.Module):
        """Outputs in the order given to make(): the channels (0 red, 1 green, 2 blue) they read."""

        def __init__(self, order):
            super().__init__()
            self.order = order
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

        def forward(self, x):
            f = self.features(x).mean((2, 3)).sum(1, keepdim=True)
            means = x.mean((2, 3))
            return (means[:, self.order] - means.mean(1, keepdim=True)) * 10 + 0 * f


    def swapped():   # red, green, blue: the sorted folders blue, green, red name red and blue wrong
        return ByColour([0, 1, 2])


    def sorted_like_folders():
        return ByColour([2, 1, 0])
''')


def test_class_folders_with_some_classes_in_another_order_are_flagged(ws, capsys, tmp_path):
    # blue / green / red folders, a model whose outputs are red, green, blue: the predictions
    # match the folders on the green third only, which is chance, yet a reordering fits them all
    (tmp_path / "three.py").write_text(THREE_COLOUR_MODEL_SRC)
    rng = np.random.default_rng(0)
    for name, channel in (("blue", 2), ("green", 1), ("red", 0)):
        os.makedirs(tmp_path / "photos" / name)
        for i in range(8):
            a = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
            a[..., channel] = 220
            Image.fromarray(a).save(tmp_path / "photos" / name / f"{i}.png")
    for factory, flagged in (("swapped", True), ("sorted_like_folders", False)):
        rc, _, err = _run(capsys, "intervene", ws / "basis.safetensors", "--model", f"{tmp_path / 'three.py'}:{factory}",
                          "--allow-mismatch", "--images", tmp_path / "photos", "--remove", 0)
        assert rc == 0
        if flagged:
            assert "match the class subfolders of --images on 33% of the images, but on 100%" in err
            assert "the 'blue' images are predicted as output 2 (now named 'red')" in err
            assert "the 'red' images are predicted as output 0 (now named 'blue')" in err
            assert "'green' images" not in err
        else:
            assert "subfolders" not in err


TOKEN_MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn


    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.cls = nn.Parameter(torch.zeros(1, 1, 8))
            self.block = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)                 # (B, 16, 8)
            t = self.block(torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1))
            return self.head(t[:, 0])


    def make():
        torch.manual_seed(0)
        return Tok()
''')


def test_extract_flags_a_token_layer_with_a_class_token_and_too_many_concepts(ws, capsys, tmp_path):
    (tmp_path / "tok.py").write_text(TOKEN_MODEL_SRC)
    common = ["extract", "--model", f"{tmp_path / 'tok.py'}:make", "--images", ws / "photos", "--layer", "block",
              "--options", FAST, "--quiet"]
    rc, _, err = _run(capsys, *common, "-k", 2, "--out", tmp_path / "a.safetensors")
    assert rc == 0 and "17 tokens of" in err and "not a square grid" in err and "--skip-tokens" in err
    rc, _, err = _run(capsys, *common, "-k", 2, "--skip-tokens", 1, "--out", tmp_path / "b.safetensors")
    assert rc == 0 and "square grid" not in err
    rc, _, err = _run(capsys, *common, "-k", 500, "--skip-tokens", 1, "--out", tmp_path / "c.safetensors")
    assert rc == 2 and "-k 500 exceeds the 192 patches of 12 image(s)" in err
    assert not (tmp_path / "c.safetensors").exists()
    # explain's first-order estimate sums over the tokens: no grid needed for 17 of them
    rc, out, err = _run(capsys, "explain", tmp_path / "a.safetensors", "--model", f"{tmp_path / 'tok.py'}:make",
                        "--images", ws / "photos", "--first-order", "--limit", 4)
    assert rc == 0 and out.count("; concept ") == 4, err
    import pyconcepts as pc

    basis = pc.ConceptBasis.load(tmp_path / "a.safetensors")
    from pyconcepts.cli import load_model

    model = load_model(f"{tmp_path / 'tok.py'}:make", None).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    totals = pc.contribution_totals(model, basis, images, 1)
    maps = pc.contribution_maps(model, basis, images, 1, grid=(1, 17))
    assert torch.allclose(totals, maps.sum((2, 3)), atol=1e-6)
    with pytest.raises(ValueError, match=r"pyconcepts report: --options"):
        pc.contribution_maps(model, basis, images, 1)


def test_a_basis_of_another_model_asks_for_its_model_before_any_work(ws, capsys, monkeypatch):
    """Without --model the commands would run the demo network; a basis that records another
    model names the --model and --weights it came from, before a model is built."""
    import pyconcepts.cli as cli

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "load_model", no_model)
    spec, weights = f"{ws / 'model.py'}:make", ws / "w.safetensors"
    basis = ws / "basis.safetensors"
    for command in (["explain", basis, "--limit", 2], ["intervene", basis, "--remove", 0],
                    ["report", basis, "--out", ws / "report_without_model"]):
        line = _one_line_error(*_run(capsys, *command, "--images", ws / "photos")[::2])
        assert f"{basis} was extracted from {spec}; pass --model {spec} --weights {weights} " in line, line
    assert not (ws / "report_without_model").exists()
    # a basis made in Python without a model_id: its fingerprint tells it is not the demo's
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("_cli_test_model_fp", ws / "model.py")
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    python_basis = ConceptBasis(torch.randn(2, 8).abs() + 0.1, torch.zeros(2), torch.ones(2, 8), torch.zeros(8),
                                layer="features.3")
    python_basis.record_model(mod.make())
    python_basis.save(ws / "python_basis.safetensors")
    line = _one_line_error(*_run(capsys, "explain", ws / "python_basis.safetensors")[::2])
    assert "extracted from another model than the demo network; pass --model with that network" in line


def test_demo_bases_still_need_no_model(capsys, tmp_path):
    from pyconcepts.demo.model import DEMO_LAYER, ShapesNet

    out = tmp_path / "demo.safetensors"
    rc, _, err = _run(capsys, "extract", "--limit", 8, "-k", 2, "--out", out, "--options", FAST, "--quiet")
    assert rc == 0, err
    assert ConceptBasis.load(out).metadata["weights"] is None
    rc, text, err = _run(capsys, "explain", out, "--limit", 2)
    assert rc == 0 and len(text.splitlines()) == 3, err
    # made in Python from the demo's architecture, without a model_id
    basis = ConceptBasis(torch.randn(2, 64).abs() + 0.1, torch.zeros(2), torch.ones(2, 64), torch.zeros(64),
                         layer=DEMO_LAYER)
    basis.record_model(ShapesNet())
    basis.save(tmp_path / "python.safetensors")
    rc, text, err = _run(capsys, "intervene", tmp_path / "python.safetensors", "--limit", 2, "--remove", 0,
                         "--allow-mismatch")  # the fingerprint's random weights are not the demo's
    assert rc == 0 and len(text.splitlines()) == 3, err
    # nothing recorded and a layer the demo lacks: the error says what --model would fix
    ConceptBasis(torch.randn(2, 8).abs() + 0.1, torch.zeros(2), torch.ones(2, 8), torch.zeros(8),
                 layer="relu2").save(tmp_path / "bare.safetensors")
    line = _one_line_error(*_run(capsys, "explain", tmp_path / "bare.safetensors")[::2])
    assert "'relu2' does not exist" in line and "pass the --model the basis was extracted from" in line


def test_quiet_means_no_progress_output_for_every_command(ws, capsys):
    from pyconcepts.cli import build_parser

    parser = build_parser()
    for command in (["demo"], ["extract", "--out", "b.safetensors"], ["report", "b.safetensors"],
                    ["explain", "b.safetensors"], ["intervene", "b.safetensors", "--remove", "0"], ["bench"]):
        assert parser.parse_args([*command, "--quiet"]).quiet, command
        assert parser.parse_args(["--quiet", *command]).quiet, command
        assert not parser.parse_args(command).quiet, command
    basis, images = ws / "basis.safetensors", ["--images", ws / "photos"]
    for command in (["explain", basis, *_model_args(ws), *images],
                    ["intervene", basis, *_model_args(ws), *images, "--remove", 0, "--batch-size", 5]):
        rc, out, err = _run(capsys, *command)
        # stdout is not a terminal here: the progress goes to stderr, one line per stage
        assert rc == 0 and "  images: 12/12 (" in err, err
        rc, quiet_out, quiet_err = _run(capsys, *command, "--quiet")
        assert rc == 0 and quiet_out == out and quiet_err == "", quiet_err


def test_extract_needs_output_only_where_the_class_scores_are_read(ws, capsys, tmp_path):
    """As pc.extract: plain extraction and refinement without URA never read the class scores,
    so a model returning a dict needs no --output; --refine (with URA) does, and says why."""
    common = ["extract", *_model_args(ws, "make_dict", None), "--images", ws / "photos", "--layer", "features.3",
              "-k", 2, "--limit", 4, "--options", FAST, "--quiet"]
    for extra in ([], ["--refine", "--no-ura"]):
        out = tmp_path / f"b{len(extra)}.safetensors"
        rc, text, err = _run(capsys, *common, "--out", out, *extra)
        assert rc == 0, err
        assert ConceptBasis.load(out).dim == 8 and ConceptBasis.load(out).metadata["output"] is None
    line = _one_line_error(*_run(capsys, *common, "--out", tmp_path / "c.safetensors", "--refine")[::2])
    assert "pass --output KEY" in line and "--refine reads the class scores for URA" in line
    assert not (tmp_path / "c.safetensors").exists()
    # a given --output is checked even when nothing reads it
    line = _one_line_error(*_run(capsys, *common, "--out", tmp_path / "c.safetensors", "--output", "probs")[::2])
    assert "--output 'probs'" in line


def test_warnings_of_the_users_model_keep_their_origin(ws, capsys):
    rc, _, err = _run(capsys, "explain", ws / "basis.safetensors", *_model_args(ws, "make_noisy"), "--images",
                      ws / "photos", "--limit", 2, "--allow-mismatch")
    assert rc == 0, err
    assert "model.py:" in err and "UserWarning: a warning of the user's model" in err, err
    assert "pyconcepts: warning: a warning of the user's model" not in err


def test_the_preprocessing_of_extraction_is_recorded_and_reused(ws, capsys, tmp_path):
    out = tmp_path / "b.safetensors"
    rc, _, err = _run(capsys, "extract", *_model_args(ws), "--images", ws / "photos", "--layer", "features.3",
                      "-k", 2, "--resize", 12, "--mean", "0.5", "--out", out, "--options", FAST, "--quiet")
    assert rc == 0, err
    meta = ConceptBasis.load(out).metadata
    assert meta["preprocess"]["resize"] == 12 and meta["preprocess"]["mean"] == [0.5]
    assert meta["input_shape"][1:] == [12, 12]
    args = ["explain", out, *_model_args(ws), "--images", ws / "photos", "--limit", 2]
    rc, same, err = _run(capsys, *args)
    assert rc == 0 and "no preprocessing given: using the basis's, --resize 12 --mean 0.5" in err, err
    rc, explicit, err = _run(capsys, *args, "--resize", 12, "--mean", "0.5")
    assert rc == 0 and "warning" not in err and explicit.splitlines()[1:] == same.splitlines()[1:]
    rc, _, err = _run(capsys, *args, "--resize", 16)
    assert rc == 0
    assert "extracted from images prepared with --resize 12 --mean 0.5, these with --resize 16" in err, err
    assert "reach the model as 3x16x16, the basis was extracted from 3x12x12" in err, err
    # flags that prepare images alike do not warn; a recorded --transform is never run unasked
    from pyconcepts.cli import _same_preprocessing
    crop = dict(resize=None, crop=12, mean="imagenet", std=None, transform=None)
    assert _same_preprocessing(crop, dict(crop, crop=[12, 12], mean=[0.485, 0.456, 0.406]))
    assert not _same_preprocessing(crop, dict(crop, crop=[12, 10]))
    meta = ConceptBasis.load(out)
    meta.metadata["preprocess"] = dict(resize=None, crop=None, mean=None, std=None, transform="tf.py:prepare")
    meta.save(tmp_path / "t.safetensors")
    rc, _, err = _run(capsys, "explain", tmp_path / "t.safetensors", *_model_args(ws), "--images", ws / "photos",
                      "--limit", 2, "--resize", 12)
    assert rc == 0 and "prepared with --transform tf.py:prepare, these with --resize 12" in err, err
    rc, _, err = _run(capsys, "explain", tmp_path / "t.safetensors", *_model_args(ws), "--images", ws / "photos",
                      "--limit", 2)
    assert "is not run by default" in err, err


def test_class_order_check_on_many_classes_pairs_only_the_sampled_ones(capsys):
    # 1,500 outputs named by 1,500 folders, 300 images from 30 of them: folders 0-9 are
    # predicted as the next folder's output (a rotation), the rest right
    from types import SimpleNamespace

    from pyconcepts.cli import _check_folder_classes

    n_classes = 1500
    names = [f"class{i:04d}" for i in range(n_classes)]
    folders = torch.arange(30).repeat_interleave(10)
    preds = torch.where(folders < 10, (folders + 1) % 10, folders)
    args = SimpleNamespace(model="m.py:make", classes=None)
    source = SimpleNamespace(labels=folders, class_names=names)
    message = _check_folder_classes(args, source, preds, n_classes)
    assert message is not None and "on 67% of the images, but on 100%" in message
    assert "the 'class0000' images are predicted as output 1 (now named 'class0001')" in message
    assert "class0015" not in message
    # the right order: nothing to say (and no assignment is solved)
    assert _check_folder_classes(args, source, folders.clone(), n_classes) is None
    # a confusion one way only (folder 3's images read as 4, 4's read right): no reordering fits better
    one_way = torch.where(folders == 3, torch.tensor(4), folders)
    assert _check_folder_classes(args, source, one_way, n_classes) is None
    # a model that is merely wrong on 40% of 256 images spread over 1,000 folders: pairing each
    # misread image with its folder would "fit" better, on one or two images a folder; not flagged
    g = torch.Generator().manual_seed(0)
    sparse = torch.randint(0, 1000, (256,), generator=g)
    wrong = torch.where(torch.rand(256, generator=g) < 0.6, sparse, torch.randint(0, 1000, (256,), generator=g))
    sparse_source = SimpleNamespace(labels=sparse, class_names=names[:1000])
    assert _check_folder_classes(args, sparse_source, wrong, 1000) is None
    # 21,841 outputs (a dense confusion would take 3.8 GB): the rotation is found on the classes
    # that occur, and named by output index
    many = [f"w{i}" for i in range(21841)]
    message = _check_folder_classes(args, SimpleNamespace(labels=folders + 20000, class_names=many),
                                    torch.where(folders < 10, (folders + 1) % 10, folders) + 20000, 21841)
    assert message is not None and "the 'w20000' images are predicted as output 20001 (now named 'w20001')" in message


def test_a_warning_raised_per_batch_is_printed_once(ws, capsys, tmp_path):
    # a one-score sigmoid output is warned of on every batch and again in every stage of the
    # report: the terminal shows it once
    (tmp_path / "colour.py").write_text(COLOUR_MODEL_SRC + textwrap.dedent('''

        class Sigmoid(ByColour):
            def forward(self, x):
                return super().forward(x)[:, :1].sigmoid()


        def sigmoid():
            return Sigmoid()
    '''))
    _photos(str(tmp_path / "photos"), per_class=6)
    model = ["--model", f"{tmp_path / 'colour.py'}:sigmoid", "--allow-mismatch", "--batch-size", 2]
    rc, _, err = _run(capsys, "report", ws / "basis.safetensors", *model, "--images", tmp_path / "photos",
                      "--out", tmp_path / "rep", "--quiet", "--options", '{"rcav": false}')
    assert rc == 0 and err.count("every one lies in [0, 1]") == 1
    rc, _, err = _run(capsys, "explain", ws / "basis.safetensors", *model, "--images", tmp_path / "photos")
    assert rc == 0 and err.count("every one lies in [0, 1]") == 1


GREY_MODEL_SRC = textwrap.dedent('''
    import torch
    from torch import nn


    class ByGrey(nn.Module):
        """30 classes read from the pictures' grey level; outputs 0-9 named one place on."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
            order = torch.arange(30)
            order[:10] = (order[:10] + 1) % 10
            self.register_buffer("order", order)

        def forward(self, x):
            f = self.features(x).mean((2, 3)).sum(1, keepdim=True)
            grey = x.mean((1, 2, 3))[:, None]
            centres = (torch.arange(30, dtype=x.dtype) + 0.5) / 30
            return -((grey - centres[self.order]) ** 2) * 1e4 + 0 * f


    def make():
        return ByGrey()
''')


def test_report_checks_the_class_order_on_enough_images_for_many_classes(ws, capsys, tmp_path):
    # 30 classes, 4 pictures each, outputs of 10 classes named one place on: with 64 pictures (two
    # a class) a reordering cannot be told from chance; on all 120 the report flags it
    (tmp_path / "grey.py").write_text(GREY_MODEL_SRC)
    for c in range(30):
        os.makedirs(tmp_path / "photos" / f"c{c:02d}")
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), round(255 * (c + 0.5) / 30), np.uint8)).save(
                tmp_path / "photos" / f"c{c:02d}" / f"{i}.png")
    rc, _, err = _run(capsys, "report", ws / "basis.safetensors", "--model", f"{tmp_path / 'grey.py'}:make",
                      "--allow-mismatch", "--images", tmp_path / "photos", "--limit", 120, "--out", tmp_path / "rep",
                      "--quiet", "--options", '{"rcav": false, "random_concepts": 0, "counterfactuals": 0}')
    assert rc == 0, err
    assert "on 67% of the images, but on 100% with some outputs named in another order" in err
    assert "the 'c01' images are predicted as output 0 (now named 'c00')" in err
