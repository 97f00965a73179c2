"""ConceptBasis: detection, latent factors, save/load round trip, bad files."""
import os

import pytest
import torch

from pyconcepts.basis import ConceptBasis


def _basis(k=3, d=5, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g)
    s = torch.randn(k, d, generator=g)
    s = s * torch.sign((w * s).sum(1, keepdim=True))  # w_i . s_i > 0, as a basis needs
    return ConceptBasis(w, torch.randn(k, generator=g), s, torch.randn(d, generator=g), **kw)


def test_detect_and_latent_follow_the_definitions():
    b = _basis()
    x = torch.randn(7, 5)
    det = b.detect(x)
    assert det.dtype == torch.bool and det.shape == (7, 3)
    assert torch.equal(det, (x @ b.decoding.T) > b.bias)
    lat = b.latent(x)
    expect = (x @ b.decoding.T - b.decoding @ b.mean) / (b.decoding * b.encoding).sum(1)
    torch.testing.assert_close(lat, expect)
    # leading dimensions (e.g. a token map) pass through
    assert b.detect(torch.randn(2, 4, 5)).shape == (2, 4, 3)
    assert b.n_concepts == 3 and b.dim == 5
    bad = x.clone()
    bad[3, 1] = float("nan")
    for use in (b.detect, b.latent, b.scores, b.membership):
        with pytest.raises(ValueError, match="NaN or Inf"):
            use(bad)


def test_latent_of_signal_vector_step_is_one():
    b = _basis()
    x = torch.randn(4, 5)
    # moving x by s_i raises concept i's latent factor by exactly 1 (w_i . s_i normalisation)
    step = b.latent(x + b.encoding[1]) - b.latent(x)
    torch.testing.assert_close(step[:, 1], torch.ones(4), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    b = _basis(layer="layer4", model_id="resnet18@abc", metadata={"method": "test", "settings": {"k": 3}})
    path = tmp_path / "basis.safetensors"
    b.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["basis.safetensors"]  # no temp file left
    c = ConceptBasis.load(path)
    for name in ("decoding", "bias", "encoding", "mean"):
        assert torch.equal(getattr(b, name), getattr(c, name))
    assert c.layer == "layer4" and c.model_id == "resnet18@abc"
    assert c.metadata == {"method": "test", "settings": {"k": 3}}
    # overwriting in place works and stays atomic
    _basis(seed=1).save(str(path))
    assert not torch.equal(ConceptBasis.load(str(path)).decoding, b.decoding)


def test_save_refuses_a_basis_that_load_would_refuse(tmp_path):
    # the attributes can be changed after construction: save checks them as load does, and
    # writes nothing (an older file at the path stays)
    path = tmp_path / "basis.safetensors"
    _basis(seed=1).save(path)
    before = path.read_bytes()
    for spoil, message in ((lambda b: b.bias.__setitem__(2, float("nan")), "NaN or Inf"),
                           (lambda b: setattr(b, "decoding", b.decoding[:, :4]), r"shape \(3, 4\)"),
                           (lambda b: b.decoding.__setitem__(1, 0.0), "must be > 0")):
        b = _basis()
        spoil(b)
        with pytest.raises(ValueError, match=message):
            b.save(path)
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["basis.safetensors"]


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError):
        ConceptBasis.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ConceptBasis.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a pyconcepts ConceptBasis"):
        ConceptBasis.load(foreign)
    good = tmp_path / "good.safetensors"
    _basis().save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 16])
    with pytest.raises(ValueError):
        ConceptBasis.load(truncated)
    # one flipped byte in the tensors' data or in the header's values: refused at load
    _basis(layer="layer4").save(good)
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for at, what in ((len(data) - 5, "data"), (data.index(b"layer4"), "header")):
        flipped = tmp_path / f"flipped-{what}.safetensors"
        flipped.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
        assert (at >= header_end) == (what == "data")
        with pytest.raises(ValueError, match="checksum"):
            ConceptBasis.load(flipped)
    # a file written without a checksum (an older version) still loads
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as handle:
        header = {k: v for k, v in handle.metadata().items() if k != "checksum_blake2b"}
        tensors = {n: handle.get_tensor(n) for n in handle.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=header)
    assert ConceptBasis.load(old).layer == "layer4"


def test_failed_save_leaves_no_temp_and_keeps_old(tmp_path, monkeypatch):
    path = tmp_path / "b.safetensors"
    _basis().save(path)
    before = path.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(RuntimeError):
        _basis(seed=2).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["b.safetensors"]


def test_constructor_validates_shapes():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="bias"):
        ConceptBasis(w, torch.zeros(2), w, torch.zeros(4))
    with pytest.raises(ValueError, match="encoding"):
        ConceptBasis(w, torch.zeros(3), torch.zeros(3, 5), torch.zeros(4))
    with pytest.raises(ValueError, match="mean"):
        ConceptBasis(w, torch.zeros(3), w, torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        ConceptBasis(w * float("nan"), torch.zeros(3), w, torch.zeros(4))
    with pytest.raises(TypeError, match="metadata"):
        ConceptBasis(w, torch.zeros(3), w, torch.zeros(4), metadata={"x": object()})
    for gain in (0.0, -1.0):  # w_i . s_i must be > 0: the latent factor divides by it
        s = w.clone()
        s[1] = gain * w[1] / (w[1] @ w[1])
        with pytest.raises(ValueError, match=r"encoding row 1 has decoding\[1\] . encoding\[1\]"):
            ConceptBasis(w, torch.zeros(3), s, torch.zeros(4))
    s = w.clone()  # a signal vector orthogonal to its filter but for rounding: refused too
    across = torch.randn(4)
    across = across - (across @ w[1]) / (w[1] @ w[1]) * w[1]
    s[1] = across / across.norm() + 1e-9 * w[1] / w[1].norm()
    with pytest.raises(ValueError, match=r"encoding row 1"):
        ConceptBasis(w, torch.zeros(3), s, torch.zeros(4))
    with pytest.raises(ValueError, match="last dimension"):
        ConceptBasis(w, torch.zeros(3), w, torch.zeros(4)).detect(torch.zeros(2, 5))


def test_an_extracted_basis_without_absent_levels_is_warned_of_on_load(tmp_path):
    import warnings

    meta = {"method": "pyconcepts.extract: spherical k-means"}
    _basis(metadata=meta).save(tmp_path / "old.safetensors")
    with pytest.warns(UserWarning, match="records no absent levels"):
        ConceptBasis.load(tmp_path / "old.safetensors")
    _basis(metadata=meta, absent_level=torch.zeros(3)).save(tmp_path / "new.safetensors")
    _basis().save(tmp_path / "own.safetensors")  # built by hand: the mean is its level
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConceptBasis.load(tmp_path / "new.safetensors")
        ConceptBasis.load(tmp_path / "own.safetensors")
