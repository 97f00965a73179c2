import pytest
import torch

from pyconcepts.taps import LayerTap, iter_batches, resolve_layer
from _toy_models import SmallCNN, TinyResNet, TinyViT

torch.manual_seed(0)


def test_conv_rows_match_the_layer_output():
    model = SmallCNN()
    images = torch.rand(5, 3, 8, 8)
    tap = LayerTap(model, "features.3")
    act = tap.activations(images)
    assert act.shape == (5, 8, 4, 4)
    rows = tap.to_rows(act)
    assert rows.shape == (5 * 16, 8)
    # row (b, h, w) is the channel vector at that position
    assert torch.equal(rows[1 * 16 + 2 * 4 + 3], act[1, :, 2, 3])
    assert torch.equal(tap.from_rows(rows, act), act)
    maps = tap.rows_to_maps(rows[:, :2], 5)
    assert torch.equal(maps, act[:, :2])


def test_rows_stream_batch_by_batch_from_tensors_tuples_and_loaders():
    model = SmallCNN()
    images = torch.rand(10, 3, 8, 8)
    tap = LayerTap(model, "features.1")
    whole = torch.cat(list(tap.rows(images, batch_size=4)))
    assert whole.shape == (10 * 64, 8)
    pairs = [(images[:6], torch.zeros(6)), (images[6:], torch.zeros(4))]
    assert torch.allclose(torch.cat(list(tap.rows(pairs))), whole)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=3)
    assert torch.allclose(torch.cat(list(tap.rows(loader))), whole)
    assert len(list(iter_batches(images, 4))) == 3


def test_collection_stops_at_the_layer_and_restores_training_mode():
    model = SmallCNN()
    calls = []
    model.fc.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    LayerTap(model, "features.1").activations(torch.rand(2, 3, 8, 8))
    assert calls == [] and model.training


@pytest.mark.parametrize("make, layer", [(SmallCNN, "features.3"), (TinyResNet, "layer1"), (TinyViT, "blocks.0")])
def test_identity_replacement_reproduces_the_model(make, layer):
    model = make().eval()
    images = torch.rand(4, 3, 16, 16)
    tap = LayerTap(model, layer, skip_tokens=1 if make is TinyViT else 0)
    with torch.no_grad():
        plain = model(images)
        same = tap.forward_rows(images, lambda r: r.clone())
    assert torch.allclose(plain, same, atol=1e-6)


@pytest.mark.parametrize("make, layer", [(SmallCNN, "features.3"), (TinyResNet, "layer1"), (TinyViT, "blocks.0")])
def test_edits_reach_the_output_and_gradients_flow_to_the_edit(make, layer):
    model = make().eval()
    images = torch.rand(3, 3, 16, 16)
    tap = LayerTap(model, layer, skip_tokens=1 if make is TinyViT else 0)
    shift = torch.zeros(tap.to_rows(tap.activations(images)).shape[1], requires_grad=True)
    out = tap.forward_rows(images, lambda r: r + shift)
    out.sum().backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0
    # the frozen network gets no gradients, and its flags are restored
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert not torch.allclose(tap.forward_rows(images, lambda r: r + 1.0), model(images))


def test_token_maps_drop_class_tokens_and_keep_them_on_replacement():
    model = TinyViT().eval()
    images = torch.rand(2, 3, 16, 16)
    tap = LayerTap(model, "blocks.0", skip_tokens=1)
    act = tap.activations(images)
    rows = tap.to_rows(act)
    assert rows.shape == (2 * 16, 16)
    assert torch.equal(rows[:16], act[0, 1:])
    back = tap.from_rows(rows, act)
    assert torch.equal(back, act)
    assert tap.rows_to_maps(rows[:, :3], 2).shape == (2, 3, 4, 4)


def test_bad_layer_names_list_close_matches():
    model = TinyResNet()
    with pytest.raises(ValueError, match="layer1"):
        resolve_layer(model, "layer_1")
    with pytest.raises(ValueError, match="does not exist"):
        LayerTap(model, "nothing_like_it")
    with pytest.raises(TypeError, match="nn.Module"):
        LayerTap("not a model", "x")


def test_layers_without_a_rank_3_or_4_tensor_output_are_refused():
    model = SmallCNN()
    tap = LayerTap(model, "fc")
    with pytest.raises(ValueError, match="rank 2"):
        tap.activations(torch.rand(2, 3, 8, 8))


def test_wrong_channel_count_is_named():
    tap = LayerTap(SmallCNN(), "features.1")
    with pytest.raises(ValueError, match="channels"):
        tap.activations(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        list(tap.rows(torch.rand(3, 8, 8)))


def test_a_layer_that_runs_twice_in_a_forward_pass_is_refused():
    import pyconcepts as pc
    from torch import nn

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.features(self.features(x)).mean((2, 3)))

    tap = pc.LayerTap(Twice(), "features")
    with pytest.raises(ValueError, match="runs more than once"):
        tap.forward_with(torch.rand(2, 3, 8, 8), lambda out: out)
    assert tap.activations(torch.rand(2, 3, 8, 8)).shape == (2, 3, 8, 8)  # stops at the first call
