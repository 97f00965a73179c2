import pytest
import torch

import pyconcepts as pc
from pyconcepts.extraction import DEFAULTS, batch_signal_vectors, fso_loss
from _toy_models import SmallCNN, TinyViT

torch.manual_seed(0)


def images(n=24, size=8):
    return torch.rand(n, 3, size, size)


def test_extract_returns_a_basis_for_the_layer_with_progress():
    model = SmallCNN().eval()
    stages = []
    basis = pc.extract(model, "features.3", images(), 3, seed=0, refine=True,
                       options={"refine_steps": 5, "joint_steps": 3, "ura_images": 8, "ura_batch": 4},
                       progress=lambda stage, done, total: stages.append(stage))
    assert isinstance(basis, pc.ConceptBasis)
    assert basis.decoding.shape == (3, 8) and basis.layer == "features.3"
    assert {"patches", "clustering", "refinement", "joint step", "signal vectors"} <= set(stages)
    assert basis.metadata["ura"] and basis.metadata["n_patches"] == 24 * 16
    assert basis.metadata["extract_settings"]["refine_steps"] == 5
    plain = pc.extract(model, "features.3", images(), 3, seed=0)  # no refinement by default
    assert not plain.metadata["refine"] and "URA" not in plain.metadata["method"]
    assert plain.absent_level is not None and basis.absent_level is not None


def test_same_seed_same_basis_and_batches_in_any_form():
    model = SmallCNN().eval()
    x = images()
    opts = {"refine_steps": 3, "joint_steps": 2, "ura_images": 8}
    a = pc.extract(model, "features.3", x, 3, seed=1, options=opts)
    b = pc.extract(model, "features.3", [(x[:10], None), (x[10:], None)], 3, seed=1, options=opts)
    assert torch.allclose(a.decoding, b.decoding, atol=1e-5)
    assert torch.allclose(a.encoding, b.encoding, atol=1e-4)


def test_without_refinement_and_on_tokens():
    model = TinyViT().eval()
    basis = pc.extract(model, "blocks.0", torch.rand(12, 3, 16, 16), 2, refine=False, skip_tokens=1)
    assert basis.decoding.shape == (2, 16)
    assert basis.metadata["n_patches"] == 12 * 16


def test_fso_and_batch_signal_vectors():
    w = torch.eye(3, 5)
    assert float(fso_loss(w, w)) < 1e-5
    s = w + 0.5 * torch.ones(3, 5)
    assert float(fso_loss(w, s)) > 0.1
    x = torch.randn(500, 5)
    sv = batch_signal_vectors(x, torch.eye(2, 5), torch.zeros(2))
    assert torch.allclose((sv * torch.eye(2, 5)).sum(1), torch.ones(2), atol=1e-4)  # w . s = 1


def test_bad_input_is_named():
    model = SmallCNN().eval()
    with pytest.raises(ValueError, match="close matches"):
        pc.extract(model, "features.03", images(), 2)
    with pytest.raises(ValueError, match="rank 2"):
        pc.extract(model, "fc", images(), 2)
    with pytest.raises(ValueError, match="channels"):
        pc.extract(model, "features.3", torch.rand(4, 1, 8, 8), 2)
    with pytest.raises(ValueError, match="n_concepts"):
        pc.extract(model, "features.3", images(), 0)
    with pytest.warns(UserWarning, match="n_concepts=1: the one concept's cluster holds every patch"):
        pc.extract(model, "features.3", images(), 1, options={"n_init": 1})
    with pytest.raises(ValueError, match="unknown option"):
        pc.extract(model, "features.3", images(), 2, options={"nonsense": 1})
    for name, value, said in (("refine_steps", -5, ">= 0"), ("n_init", 0, ">= 1"), ("batch_size", 2.5, ">= 1"),
                              ("tau", -5, "> 0"), ("refine_lr", float("inf"), "> 0"), ("ura_weight", "yes", ">= 0")):
        with pytest.raises(ValueError, match=rf"options\['{name}'\] must be .*{said}"):
            pc.extract(model, "features.3", images(), 2, refine=True, options={name: value})
    with pytest.raises(ValueError, match="empty"):
        pc.extract(model, "features.3", [], 2)
    assert "ura_weight" in DEFAULTS


def test_pc_extract_is_the_function_after_importing_the_submodule():
    import importlib
    import pyconcepts.extraction as extraction
    assert pc.extract is extraction.extract and callable(pc.extract)
    importlib.import_module("pyconcepts.extraction")
    assert pc.extract is extraction.extract
    for name in ("restore_corrections", "contribution_maps", "rcav"):
        assert callable(getattr(pc, name)), name


def test_a_refinement_the_merge_guard_rejects_throughout_says_so():
    from pyconcepts.extraction import DEFAULTS, _warn_if_guard_kept_nothing
    with pytest.warns(UserWarning, match="changed nothing"):
        _warn_if_guard_kept_nothing({"steps_run": 60, "kept_step": 0, "failed_checks": 6}, "refinement", DEFAULTS)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_guard_kept_nothing({"steps_run": 60, "kept_step": 40, "failed_checks": 2}, "refinement", DEFAULTS)
        _warn_if_guard_kept_nothing({"steps_run": 0, "kept_step": 0, "failed_checks": 0}, "refinement", DEFAULTS)
    # the extraction's metadata records the refinement it ran
    model = SmallCNN().eval()
    basis = pc.extract(model, "features.3", images(), 3, seed=0, refine=True,
                       options={"refine_steps": 3, "ura_images": 8, "ura_batch": 4})
    assert basis.metadata["refine"] and basis.metadata["settings"]["refine"]


def test_extract_records_the_model_so_other_weights_are_told_apart(tmp_path):
    model = SmallCNN().eval()
    basis = pc.extract(model, "features.3", images(), 3, options={"n_init": 2})
    basis.save(tmp_path / "b.safetensors")
    loaded = pc.ConceptBasis.load(tmp_path / "b.safetensors")
    assert loaded.compatibility_problems(model=model) == []
    other = SmallCNN().eval()  # same architecture, other (random) weights
    assert "other weights" in " ".join(loaded.compatibility_problems(model=other))


def test_extract_reads_an_image_source_as_it_reads_a_tensor():
    from pyconcepts.images import TensorImages

    model = SmallCNN().eval()
    x = images()
    seen = []
    a = pc.extract(model, "features.3", x, 3, options={"n_init": 2})
    b = pc.extract(model, "features.3", TensorImages(x), 3, options={"n_init": 2},
                   progress=lambda stage, done, total: seen.append((stage, total)))
    assert torch.equal(a.decoding, b.decoding) and torch.equal(a.bias, b.bias)
    assert ("patches", 1) in seen  # 24 images, batches of 64: one batch, counted without reading them


def test_vmf_polish_option_reaches_the_clustering():
    model = SmallCNN().eval()
    x = images()
    assert DEFAULTS["vmf_polish"] is False
    off = pc.extract(model, "features.3", x, 3, options={"n_init": 2})
    on = pc.extract(model, "features.3", x, 3, options={"n_init": 2, "vmf_polish": True})
    assert off.metadata["vmf_polish"] is None and on.metadata["settings"]["vmf_polish"] is True
    assert on.metadata["vmf_polish"]["iterations"] >= 1
    with pytest.raises(ValueError, match="vmf_polish"):
        pc.extract(model, "features.3", x, 3, options={"vmf_polish": "yes"})
