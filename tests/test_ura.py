import pytest
import torch

from pyconcepts.taps import LayerTap
from pyconcepts.ura import URALoss, entropy_bits, ura_shift
from _toy_models import SmallCNN, TinyResNet

torch.manual_seed(0)


def test_unconstrained_shift_lands_on_the_hyperplanes_with_minimum_norm():
    w, b, x = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(20, 7, dtype=torch.float64)
    dx = ura_shift(x, w, b)
    assert torch.allclose((x - dx) @ w.T, b.expand(20, 3), atol=1e-9)
    # minimum norm: dx lies in the row space of W
    assert torch.allclose(dx @ w.T @ torch.linalg.pinv(w @ w.T) @ w, dx, atol=1e-9)


def test_constrained_shift_stays_in_span_s():
    w, s = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    b, x = torch.randn(3, dtype=torch.float64), torch.randn(20, 7, dtype=torch.float64)
    dx = ura_shift(x, w, b, s)
    assert torch.allclose((x - dx) @ w.T, b.expand(20, 3), atol=1e-8)
    coeffs = torch.linalg.lstsq(s.T, dx.T).solution
    assert torch.allclose(coeffs.T @ s, dx, atol=1e-8)


def test_entropy_in_bits():
    assert torch.allclose(entropy_bits(torch.zeros(2, 4)), torch.full((2,), 2.0))
    assert float(entropy_bits(torch.tensor([[100.0, 0.0]]))) < 1e-6


@pytest.mark.parametrize("make, layer", [(SmallCNN, "features.3"), (TinyResNet, "layer1")])
@pytest.mark.parametrize("form", ["unconstrained", "constrained", "both"])
def test_ura_loss_gradients_reach_the_directions_through_the_frozen_network(make, layer, form):
    model = make().eval()
    images = torch.rand(6, 3, 8, 8)
    tap = LayerTap(model, layer)
    d = tap.to_rows(tap.activations(images)).shape[1]
    w = torch.randn(2, d, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    s = torch.randn(2, d, requires_grad=True)
    loss = URALoss(tap, images, form=form, batch_size=4, seed=0)(w, b, s)
    assert loss.dim() == 0 and float(loss.detach()) <= 0
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert b.grad is not None
    if form != "unconstrained":
        assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_ura_bad_arguments():
    tap = LayerTap(SmallCNN(), "features.3")
    with pytest.raises(ValueError, match="form"):
        URALoss(tap, torch.rand(2, 3, 8, 8), form="sideways")
    with pytest.raises(ValueError, match="kappa_range"):
        URALoss(tap, torch.rand(2, 3, 8, 8), kappa_range=(0.9, 0.5))
    loss = URALoss(tap, torch.rand(2, 3, 8, 8), form="constrained")
    with pytest.raises(ValueError, match="encoding"):
        loss(torch.randn(2, 8), torch.zeros(2))
