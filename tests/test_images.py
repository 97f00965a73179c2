"""Image sources: a folder of image files (Pillow) and tensor files."""
import os

import numpy as np
import pytest
import torch

from pyconcepts.images import (BatchStream, FolderImages, Preprocess, TensorImages, load_tensor_images, spread_indices,
                               open_images)

Image = pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")


def _write(path, pixels, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def _pixels(seed, h=12, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_folder_with_class_subfolders_reads_exact_pixels_in_sorted_order(tmp_path):
    _write(str(tmp_path / "dog" / "b.png"), _pixels(1))
    _write(str(tmp_path / "cat" / "z.png"), _pixels(2))
    _write(str(tmp_path / "cat" / "a.png"), _pixels(3))
    _write(str(tmp_path / "dog" / ".hidden.png"), _pixels(4))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    src = FolderImages(tmp_path, workers=2)
    assert len(src) == 3
    assert src.names == [os.path.join("cat", "a.png"), os.path.join("cat", "z.png"), os.path.join("dog", "b.png")]
    assert src.class_names == ["cat", "dog"] and src.labels.tolist() == [0, 0, 1]
    batches = list(src.batches(2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 12, 10), (1, 3, 12, 10)]
    expected = torch.from_numpy(_pixels(3)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(batches[0][0], expected, rtol=0, atol=0)
    assert list(src.batches(2))[1].shape[0] == 1  # re-iterable
    shown = src.display([2])
    assert shown.dtype == torch.uint8 and torch.equal(shown[0], torch.from_numpy(_pixels(1)))
    assert len(BatchStream(src, 2)) == 2 and sum(b.shape[0] for b in BatchStream(src, 2)) == 3
    # iterating a source gives its batches (of 64)
    assert [tuple(b.shape) for b in src] == [(3, 3, 12, 10)]
    tensors = TensorImages(torch.rand(70, 3, 4, 4))
    assert [b.shape[0] for b in tensors] == [64, 6]


def test_flat_folder_has_no_classes_and_subset_keeps_names(tmp_path):
    for i in range(5):
        _write(str(tmp_path / f"{i}.jpg"), _pixels(i, 16, 16), "JPEG")
    src = FolderImages(tmp_path, workers=1)
    assert src.class_names is None and src.labels is None
    part = src.subset(1, 3)
    assert part.names == ["1.jpg", "2.jpg"]
    torch.testing.assert_close(next(iter(part.batches(8))), list(src.batches(8))[0][1:3])


def test_preprocessing_resize_crop_and_normalise(tmp_path):
    _write(str(tmp_path / "wide.png"), _pixels(0, 20, 40))
    _write(str(tmp_path / "tall.png"), _pixels(1, 30, 10))
    with pytest.raises(ValueError, match=r"'tall.png': 30x10, 'wide.png': 20x40, height x width\); give the model one input size"):
        FolderImages(tmp_path)
    with pytest.raises(ValueError, match=r"'tall.png': 48x16, 'wide.png': 16x32.*crop them to one size"):
        FolderImages(tmp_path, preprocess=Preprocess(resize=16))    # --resize given: --crop is missing
    with pytest.raises(ValueError, match=r"30x10 \(height x width, after resizing\), smaller than the crop 16x16"):
        FolderImages(tmp_path, preprocess=Preprocess(crop=16))
    with pytest.raises(ValueError, match=r"resize 100000 makes pictures of at least 100000 x 100000"):
        Preprocess(resize=100000)
    with pytest.raises(ValueError, match=r"would be resized to 24576x8192"):
        FolderImages(tmp_path, preprocess=Preprocess(resize=8192))
    big = FolderImages(tmp_path, preprocess=Preprocess(resize=(8000, 8000)))    # 0.7 GiB a picture
    with pytest.raises(ValueError, match=r"a batch of 2 pictures at 8000x8000 holds 1.4 GiB"):
        import pyconcepts.images as images_module

        limit, images_module.MAX_BATCH_BYTES = images_module.MAX_BATCH_BYTES, 2 ** 30
        try:
            next(iter(big.batches(64)))
        finally:
            images_module.MAX_BATCH_BYTES = limit
    pre = Preprocess(resize=16, crop=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    x = next(iter(FolderImages(tmp_path, preprocess=pre).batches(4)))
    assert x.shape == (2, 3, 16, 16)
    assert float(x.min()) >= -2.0 - 1e-6 and float(x.max()) <= 2.0 + 1e-6 and float(x.min()) < -1
    # the display is the geometry only: uint8 pixels of the 16 x 16 crop
    assert FolderImages(tmp_path, preprocess=pre).display([0, 1]).shape == (2, 16, 16, 3)
    # a custom transform replaces the steps
    src = FolderImages(tmp_path, preprocess=Preprocess(transform=lambda im: torch.ones(3, 4, 4)))
    assert torch.equal(next(iter(src.batches(2))), torch.ones(2, 3, 4, 4))


def test_grey_level_inputs_for_one_channel_models(tmp_path):
    _write(str(tmp_path / "a.png"), _pixels(0))
    x = next(iter(FolderImages(tmp_path, preprocess=Preprocess(channels=1)).batches(1)))
    assert x.shape == (1, 1, 12, 10)


def test_unreadable_files_are_skipped_and_counted_empty_folders_refused(tmp_path):
    _write(str(tmp_path / "good.png"), _pixels(0))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    src = FolderImages(tmp_path)
    assert src.names == ["good.png"] and [name for name, _ in src.skipped] == ["broken.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        FolderImages(empty)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="could be read"):
        FolderImages(only_bad)
    with pytest.raises(FileNotFoundError):
        FolderImages(tmp_path / "missing")


def test_folder_links_are_read_once_and_pipes_and_bombs_are_skipped(tmp_path):
    root = tmp_path / "photos"
    _write(str(root / "a" / "0.png"), _pixels(0))
    _write(str(root / "b" / "1.png"), _pixels(1))
    os.symlink("..", root / "a" / "up")                  # a loop
    os.symlink(root / "a", root / "b" / "also_a")        # a second way to folder a
    os.mkfifo(root / "a" / "pipe.png")                   # would block a read
    os.symlink(root / "gone.png", root / "b" / "dangling.png")
    with pytest.warns(UserWarning, match="2 folder link"):
        src = FolderImages(root)
    assert src.names == [os.path.join("a", "0.png"), os.path.join("b", "1.png")]
    # skipped and counted, not dropped in silence
    assert sorted(src.skipped) == [(os.path.join("a", "pipe.png"), "not a regular file"),
                                   (os.path.join("b", "dangling.png"), "a link to nothing")]
    # a picture over Pillow's pixel limit is skipped and named, not a run-ending error
    big = tmp_path / "big"
    _write(str(big / "small.png"), _pixels(2))
    Image.new("L", (200, 200)).save(big / "huge.png")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 40 * 40 // 2              # 2x over it: Pillow refuses
    try:
        src = FolderImages(big)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert src.names == ["small.png"] and "Pillow's limit" in src.skipped[0][1]
    # JPEG's other extensions are read too
    _write(str(tmp_path / "ext" / "x.jfif"), _pixels(3), "JPEG")
    _write(str(tmp_path / "ext" / "y.jpe"), _pixels(4), "JPEG")
    assert FolderImages(tmp_path / "ext").names == ["x.jfif", "y.jpe"]


def test_truncated_file_fails_with_its_name_when_decoded(tmp_path):
    _write(str(tmp_path / "a.jpg"), _pixels(0, 64, 64), "JPEG")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 3])
    src = FolderImages(tmp_path)
    with pytest.raises(ValueError, match="a.jpg"):
        list(src.batches(1))


def test_tensor_files_pt_npy_safetensors(tmp_path):
    from safetensors.torch import save_file

    x = torch.rand(4, 3, 8, 8)
    torch.save({"images": x, "labels": torch.tensor([0, 1, 0, 1])}, tmp_path / "x.pt")
    images, labels, _ = load_tensor_images(tmp_path / "x.pt")
    assert torch.equal(images, x) and labels.tolist() == [0, 1, 0, 1]
    u8 = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)  # channels last
    np.save(tmp_path / "x.npy", u8)
    images, labels, _ = load_tensor_images(tmp_path / "x.npy")
    assert images.shape == (4, 3, 8, 8) and labels is None
    torch.testing.assert_close(images, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    save_file({"images": x}, str(tmp_path / "x.safetensors"))
    src = open_images(tmp_path / "x.safetensors", preprocess=Preprocess(crop=4))
    assert isinstance(src, TensorImages) and next(iter(src.batches(8))).shape == (4, 3, 4, 4)
    assert src.names[0] == "x.safetensors[0]"


def test_pickles_are_refused_unless_allowed(tmp_path):
    torch.save({"images": torch.rand(2, 3, 4, 4), "note": _Note()}, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="allow-pickle"):
        load_tensor_images(tmp_path / "p.pt")
    images, _, _ = load_tensor_images(tmp_path / "p.pt", allow_pickle=True)
    assert images.shape == (2, 3, 4, 4)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow-pickle"):
        load_tensor_images(tmp_path / "o.npy")


def test_bad_tensor_files(tmp_path):
    torch.save(torch.zeros(2, 3, 4, 4, dtype=torch.int32), tmp_path / "i.pt")
    with pytest.raises(ValueError, match="uint8 pixels or floats"):
        load_tensor_images(tmp_path / "i.pt")
    torch.save(torch.zeros(5), tmp_path / "v.pt")
    with pytest.raises(ValueError, match="expected images"):
        load_tensor_images(tmp_path / "v.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        load_tensor_images(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_tensor_images(tmp_path / "none.pt")


class _Note:
    pass


def test_one_image_file(tmp_path):
    _write(str(tmp_path / "one.png"), _pixels(0))
    src = open_images(tmp_path / "one.png")
    assert len(src) == 1 and src.names == ["one.png"] and src.labels is None
    torch.testing.assert_close(next(iter(src.batches(4)))[0],
                               torch.from_numpy(_pixels(0)).permute(2, 0, 1).float() / 255)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="could be read"):
        open_images(tmp_path / "bad.png")


def test_preprocess_takes_imagenet_statistics_by_name():
    from pyconcepts.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    p = Preprocess(mean="imagenet", std="ImageNet")
    assert p.mean.tolist() == pytest.approx(list(IMAGENET_MEAN))
    assert p.std.tolist() == pytest.approx(list(IMAGENET_STD))
    with pytest.raises(ValueError, match="mean"):
        Preprocess(mean="cifar")


def test_select_and_an_even_spread_cover_every_class_folder(tmp_path):
    for cls, seeds in (("a", range(0, 6)), ("b", range(6, 8)), ("c", range(8, 12))):
        for s in seeds:
            _write(str(tmp_path / cls / f"{s:02d}.png"), _pixels(s))
    src = FolderImages(tmp_path, workers=1)
    idx = spread_indices(len(src), 3)
    assert idx == [2, 6, 10] and spread_indices(5, 9) == [0, 1, 2, 3, 4]
    picked = src.select(idx)
    assert [src.class_names[int(i)] for i in picked.labels] == ["a", "b", "c"]
    assert picked.names == [src.names[i] for i in idx]
    first = next(iter(picked.batches(8)))
    torch.testing.assert_close(first[1], torch.from_numpy(_pixels(6)).permute(2, 0, 1).float() / 255)
    tensors = TensorImages(torch.rand(5, 3, 4, 4), labels=[0, 1, 2, 3, 4])
    assert tensors.select([4, 0]).labels.tolist() == [4, 0]
    with pytest.raises(IndexError, match="out of range"):
        src.select([12])
    with pytest.raises(ValueError, match="no indices"):
        tensors.select([])


def test_sixteen_bit_grey_pictures_keep_their_contrast(tmp_path):
    ramp = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)  # 0 .. 59500
    os.makedirs(tmp_path / "g", exist_ok=True)
    Image.fromarray(ramp).save(tmp_path / "g" / "r.png")  # uint16: a 16-bit grey PNG
    src = FolderImages(tmp_path / "g", workers=1)
    x = next(iter(src.batches(1)))[0]
    assert x.shape == (3, 12, 10)
    expected = torch.from_numpy(np.round(ramp.astype(np.float64) * 255 / 65535) / 255).float()
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1.5 / 255)
    assert float(x.max()) < 0.95 and float(x.min()) == 0.0  # not clipped to white


def test_float_pixels_in_0_255_are_flagged_and_uint8_batches_refused(tmp_path):
    x = np.random.default_rng(0).random((3, 8, 8, 3)) * 255
    np.save(tmp_path / "f.npy", x.astype(np.float32))
    with pytest.warns(UserWarning, match="uint8"):
        images, _, _ = load_tensor_images(str(tmp_path / "f.npy"))
    assert float(images.max()) > 200  # read as they are, not silently rescaled
    import pyconcepts as pc
    from torch import nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(TypeError, match="divide by 255"):
        pc.LayerTap(model, "1").activations(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))



def test_a_failing_transform_is_named(tmp_path):
    _write(str(tmp_path / "a.png"), _pixels(0))

    def make():  # takes no picture: the mistake of passing a model factory as --transform
        return None

    src = FolderImages(tmp_path, preprocess=Preprocess(transform=make), workers=1)
    with pytest.raises(ValueError, match="transform 'make' failed"):
        next(iter(src.batches(1)))


def test_errors_name_the_python_argument_and_the_command_line_flag(tmp_path):
    """The messages reach Python users (Preprocess(...), allow_pickle=True) as well as the command
    line (--resize, --crop, --allow-pickle): both spellings are named."""
    _write(str(tmp_path / "mixed" / "wide.png"), _pixels(0, 20, 40))
    _write(str(tmp_path / "mixed" / "tall.png"), _pixels(1, 30, 10))
    both = "Preprocess(resize=..., crop=...) (command line: --resize, --crop)"
    with pytest.raises(ValueError) as err:
        FolderImages(tmp_path / "mixed")
    assert both in str(err.value) and "pass --crop" not in str(err.value)
    resize = "Preprocess(resize=...) (command line: --resize)"
    with pytest.raises(ValueError) as err:
        FolderImages(tmp_path / "mixed", preprocess=Preprocess(crop=16))
    assert resize in str(err.value)
    with pytest.raises(ValueError) as err:
        Preprocess(crop=16).tensor(torch.rand(1, 3, 8, 8))
    assert resize in str(err.value)
    with pytest.raises(ValueError) as err:
        Preprocess(crop=16).geometry(Image.fromarray(_pixels(0, 8, 8)))
    assert resize in str(err.value)
    # a transform that keeps each picture's size: the sizes differ only when decoded
    keep_size = Preprocess(transform=lambda picture: torch.zeros(3, picture.size[1], picture.size[0]))
    with pytest.raises(ValueError) as err:
        list(FolderImages(tmp_path / "mixed", preprocess=keep_size, workers=1).batches(2))
    assert "Preprocess(resize=..., crop=...) or a transform returning one size (command line: --resize, --crop)" \
        in str(err.value)
    torch.save({"images": torch.rand(2, 3, 4, 4), "note": _Note()}, tmp_path / "p.pt")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name in ("p.pt", "o.npy"):
        with pytest.raises(ValueError) as err:
            load_tensor_images(tmp_path / name)
        assert "pass allow_pickle=True (command line: --allow-pickle)" in str(err.value)


def test_resize_then_crop_keeps_the_aspect_and_crops_the_centre(tmp_path):
    # a 30 x 40 (h x w) picture, resize 16 (shorter side), crop 12: resized to 16 x 21, then
    # its centre 12 x 12 (the torchvision recipe), not squashed to 12 x 12
    pixels = _pixels(5, h=30, w=40)
    picture = Image.fromarray(pixels)
    resized = picture.resize((21, 16), Image.Resampling.BILINEAR)
    left, top = (21 - 12) // 2, (16 - 12) // 2
    want = torch.from_numpy(np.asarray(resized.crop((left, top, left + 12, top + 12))).copy()).permute(2, 0, 1) / 255
    pre = Preprocess(resize=16, crop=12)
    assert pre.resized_size(40, 30) == (16, 21) and pre.output_size(40, 30) == (12, 12)
    assert torch.equal(pre(picture), want.float())
    _write(str(tmp_path / "p" / "a.png"), pixels)
    assert torch.equal(FolderImages(tmp_path / "p", preprocess=pre).batches(1).__next__()[0], want.float())
    # the tensor path: the same geometry (antialiased interpolation: close, not equal)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    assert (pre.tensor(x)[0] - want).abs().mean() < 0.02
    squashed = torch.from_numpy(np.asarray(picture.resize((12, 12), Image.Resampling.BILINEAR)).copy())
    assert (pre(picture) - squashed.permute(2, 0, 1) / 255).abs().mean() > 0.05
