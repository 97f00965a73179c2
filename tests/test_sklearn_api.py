"""DirectionalClustering follows scikit-learn's estimator conventions; scikit-learn stays
optional (only the check_estimator test needs it)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pyconcepts as pc


def _blobs(n=600, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    lab = torch.randint(0, k, (n,), generator=g)
    x = dirs[lab] * (2 + torch.rand(n, 1, generator=g)) + 0.15 * torch.randn(n, d, generator=g)
    return x.double().numpy() + 0.5


def test_numpy_in_numpy_out():
    x = _blobs()
    km = pc.DirectionalClustering(n_concepts=3, seed=0, whiten=True).fit(x)
    # the same rows as a tensor: the same fit (float64 rows are read as float32 either way)
    ref = pc.DirectionalClustering(n_concepts=3, seed=0, whiten=True).fit(torch.from_numpy(x))
    assert isinstance(km.centroids_, torch.Tensor)  # fitted state stays torch
    torch.testing.assert_close(km.centroids_, ref.centroids_, rtol=0, atol=0)
    assert km.n_samples_ == 600 and km.n_features_in_ == 6

    labels = km.predict(x)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (600,)
    assert np.array_equal(labels, ref.predict(torch.from_numpy(x)).numpy())
    assert isinstance(km.labels_, np.ndarray) and np.array_equal(km.labels_, labels)
    assert isinstance(ref.labels_, torch.Tensor)  # a tensor fit keeps tensor labels
    assert np.array_equal(pc.DirectionalClustering(n_concepts=3, seed=0, whiten=True)
                          .fit_predict(x), labels)

    out = km.transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (600, 6)
    np.testing.assert_array_equal(out, ref.transform(torch.from_numpy(x)).numpy())
    np.testing.assert_array_equal(
        pc.DirectionalClustering(n_concepts=3, seed=0, whiten=True).fit_transform(x), out)
    # tensors in, tensors out
    assert isinstance(km.predict(torch.from_numpy(x)), torch.Tensor)
    assert isinstance(km.transform(torch.from_numpy(x)), torch.Tensor)

    # other array-likes: integer arrays, lists of rows, Fortran order, read-only memory
    assert np.array_equal(km.predict(x.tolist()), labels)
    assert np.array_equal(km.predict(np.asfortranarray(x)), labels)
    frozen = x.copy()
    frozen.flags.writeable = False
    assert np.array_equal(km.predict(frozen), labels)
    assert km.predict(np.rint(x * 10).astype(np.int64)).dtype == np.int64
    # an untransformed fit returns a float32 copy, never the caller's own array
    plain = pc.DirectionalClustering(n_concepts=3, seed=0, center=False).fit(x.astype(np.float32))
    x32 = x.astype(np.float32)
    moved = plain.transform(x32)
    assert not np.shares_memory(moved, x32) and np.array_equal(moved, x32)


def test_bad_arrays_raise_clear_errors():
    km = pc.DirectionalClustering(n_concepts=2, seed=0).fit(_blobs())
    with pytest.raises(ValueError, match="Complex data not supported"):
        km.fit(_blobs() + 1j)
    with pytest.raises(ValueError, match="Reshape your data"):
        km.predict(_blobs()[0])
    with pytest.raises(ValueError, match=r"0 feature\(s\)"):
        km.fit(np.zeros((5, 0)))
    with pytest.raises(TypeError, match="must hold numbers"):
        km.fit(np.array([["a", "b"], ["c", "d"]], dtype=object))
    with pytest.raises(ValueError, match="X has 5 features, but DirectionalClustering is "
                                         "expecting 6 features"):
        km.predict(_blobs(d=5))
    with pytest.raises(ValueError, match="n_samples = 1"):
        pc.DirectionalClustering(n_concepts=2).fit(_blobs()[:1])


@pytest.mark.parametrize("center", [False, True])
def test_transform_validates_its_input(center):
    x = torch.from_numpy(_blobs()).float()
    km = pc.DirectionalClustering(n_concepts=3, seed=0, center=center).fit(x)
    for bad_value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[7, 2] = bad_value
        with pytest.raises(ValueError, match="NaN or Inf"):
            km.transform(bad)
        with pytest.raises(ValueError, match="NaN or Inf"):
            km.transform(bad.numpy())
    with pytest.raises(ValueError, match="X has 4 features"):
        km.transform(x[:, :4])
    with pytest.raises(ValueError, match="2-D"):
        km.transform(x[0])
    with pytest.raises(TypeError, match="map a stream chunk by chunk"):
        km.transform(list(x.split(100)))
    assert km.transform(x).dtype == torch.float32


def test_not_fitted_error():
    km = pc.DirectionalClustering(n_concepts=2)
    x = _blobs()
    for call in (lambda: km.predict(x), lambda: km.transform(x), lambda: km.labels_):
        with pytest.raises(pc.NotFittedError, match="not fitted yet") as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)
    assert not hasattr(km, "labels_")
    assert pc.NotFittedError is pc.clustering.NotFittedError
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:
        assert pc.NotFittedError.__bases__ == (ValueError, AttributeError)
    else:
        assert pc.NotFittedError is NotFittedError


def test_scikit_learn_is_optional_and_never_imported_eagerly():
    # In a fresh interpreter: fitting does not import scikit-learn (about a second), and
    # without it the not-fitted error is our own class with scikit-learn's bases.
    script = textwrap.dedent("""
        import sys
        import torch
        import pyconcepts as pc
        km = pc.DirectionalClustering(n_concepts=2, seed=0).fit(torch.randn(50, 3))
        km.predict(torch.randn(4, 3).numpy())
        assert "sklearn" not in sys.modules, "fit/predict imported scikit-learn"
        sys.modules["sklearn"] = None  # as if it were not installed
        try:
            pc.DirectionalClustering(n_concepts=2).predict(torch.randn(4, 3))
        except pc.NotFittedError as exc:
            assert type(exc).__bases__ == (ValueError, AttributeError), type(exc).__mro__
            assert type(exc).__name__ == "NotFittedError"
            assert type(exc).__module__ == "pyconcepts.clustering"
            print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_parameters_follow_the_estimator_conventions():
    # stored as given and checked by fit: clone / set_params / grid searches never fail early
    km = pc.DirectionalClustering(n_concepts=-1, seed="x", tol=[1], pruning="yes")
    assert km.get_params()["tol"] == [1] and km.get_params()["n_concepts"] == -1
    assert km.set_params(n_concepts=3, seed=0, tol=1e-4, pruning=False) is km
    km.fit(_blobs())
    params = km.get_params()
    assert type(km)(**params).get_params() == params
    assert set(params) == {"n_concepts", "seed", "init", "center", "whiten", "whiten_shrinkage",
                           "n_init", "max_iter", "tol", "init_sample_size", "chunk_size",
                           "num_threads", "pruning", "pruning_memory", "pruning_dir", "signal"}
    x = _blobs()
    for name, value, message in [("n_concepts", 0, "n_concepts must be a positive int"),
                                 ("seed", 1.5, "seed must be an int"),
                                 ("init", "kmeans", "init must be"),
                                 ("whiten", "yes", "whiten must be True or False"),
                                 ("whiten_shrinkage", float("nan"), "whiten_shrinkage must be"),
                                 ("tol", -1.0, "tol must be"),
                                 ("chunk_size", 0, "chunk_size must be"),
                                 ("num_threads", 0, "num_threads must be"),
                                 ("pruning_memory", -5, "pruning_memory must be")]:
        with pytest.raises(ValueError, match=message):
            pc.DirectionalClustering(**{"n_concepts": 3, name: value}).fit(x)
    with pytest.raises(ValueError, match="unknown parameter 'colour'"):
        km.set_params(colour=1)


def test_repr_shows_the_parameters_that_differ_from_their_defaults():
    assert repr(pc.DirectionalClustering(8)) == "DirectionalClustering(n_concepts=8)"
    assert (repr(pc.DirectionalClustering(n_concepts=4, whiten=True, seed=3, pruning=False))
            == "DirectionalClustering(n_concepts=4, seed=3, whiten=True, pruning=False)")
    assert (repr(pc.DirectionalClustering(4, center=1))  # 1 is not the default True
            == "DirectionalClustering(n_concepts=4, center=1)")


# scikit-learn checks that cannot apply to DirectionalClustering, with the reason. Empty: it
# passes every check that check_estimator runs (check_array_api_input skips itself unless
# SCIPY_ARRAY_API=1 and array-api-compat are set up; the estimator declares no array API
# support). Keep each entry honest: the test fails if a listed check starts to pass.
EXPECTED_FAILED_CHECKS: dict = {}


# duck-typed on purpose: inheriting sklearn.base.BaseEstimator would import scikit-learn
@pytest.mark.filterwarnings("ignore:Estimator DirectionalClustering does not inherit")
def test_check_estimator():
    pytest.importorskip("sklearn", minversion="1.6", reason="needs scikit-learn >= 1.6 "
                        "(the estimator-tags API)")
    from functools import partial

    from sklearn.utils import estimator_checks as checks

    estimator = pc.DirectionalClustering(n_concepts=3, seed=0)
    results = checks.check_estimator(estimator, expected_failed_checks=EXPECTED_FAILED_CHECKS,
                                     on_fail=None, on_skip=None)
    assert len(results) > 40
    for result in results:
        name = result["check_name"]
        if name in EXPECTED_FAILED_CHECKS:
            assert result["status"] == "xfail", f"{name} passes now: drop it from the list"
        elif result["status"] == "skipped":
            assert name == "check_array_api_input", result
        else:
            assert result["status"] == "passed", result
    # check_estimator runs the clustering checks only for subclasses of sklearn's
    # ClusterMixin; DirectionalClustering is duck-typed (scikit-learn stays optional)
    for check in (checks.check_clustering, partial(checks.check_clustering, readonly_memmap=True),
                  checks.check_clusterer_compute_labels_predict):
        check("DirectionalClustering", estimator)
    from sklearn.base import clone, is_clusterer

    assert is_clusterer(estimator)
    assert clone(estimator).get_params() == estimator.get_params()
