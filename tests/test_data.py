"""convgap.data: the generated shapes dataset, the image-folder loader, the transforms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from convgap import data
from convgap.data import CLASSES, augment, image_folder, normalize, shapes
from convgap.data.augment import RandomCrop, RandomFlip
from convgap.data.render import KINDS, Canvas
from convgap.errors import ConvgapError


@pytest.fixture(scope="module")
def small():
    return shapes(num_classes=10, image_size=32, train_size=400, val_size=200, seed=3)


# --- shapes -------------------------------------------------------------------------------

def test_images_are_float_chw_in_unit_range_with_labels_in_range(small):
    train, val = small
    assert (len(train), len(val)) == (400, 200)
    for ds in (train, val):
        for i in (0, 7, len(ds) - 1):
            image, label = ds[i]
            assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert isinstance(label, int) and 0 <= label < 10
    assert train.classes == [k for k, _ in CLASSES[:10]]


def test_an_image_depends_only_on_seed_split_and_index(small):
    train, _ = small
    again, _ = shapes(num_classes=10, image_size=32, train_size=50, val_size=1, seed=3)
    # same (seed, split, index) whatever the dataset's size or the order of access
    for i in (49, 0, 17):
        assert torch.equal(train[i][0], again[i][0])
    other, _ = shapes(num_classes=10, image_size=32, train_size=50, val_size=1, seed=4)
    assert not torch.equal(train[5][0], other[5][0])


def test_train_and_val_are_different_streams(small):
    train, val = small
    for i in range(20):
        assert not torch.equal(train[i][0], val[i][0])
        assert train[i][1] == val[i][1]  # labels cycle alike, images differ


def test_cached_dataset_returns_the_same_images():
    lazy, _ = shapes(image_size=24, train_size=30, val_size=1, seed=1)
    cached, _ = shapes(image_size=24, train_size=30, val_size=1, seed=1, cache=True)
    for i in range(30):
        assert torch.equal(lazy[i][0], cached[i][0]) and lazy[i][1] == cached[i][1]


def test_classes_are_balanced(small):
    train, _ = small
    counts = np.bincount([train[i][1] for i in range(len(train))], minlength=10)
    assert counts.min() == counts.max() == 40


def test_images_of_one_class_differ_and_the_object_moves_and_scales(small):
    train, _ = small
    images = [train[i][0] for i in range(0, 200, 10)]  # class 0
    assert all(not torch.equal(images[0], im) for im in images[1:])
    boxes = torch.tensor([train.object_box(i) for i in range(0, 200, 10)])
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = boxes[:, 2] - boxes[:, 0]
    assert torch.allclose(sides, boxes[:, 3] - boxes[:, 1])
    # diameters 10-50% of the 32 px side; centres spread over the image
    assert sides.min() >= 0.1 * 32 - 1e-4 and sides.max() <= 0.5 * 32 + 1e-4
    assert sides.max() - sides.min() > 0.2 * 32
    assert (centres.std(0) > 3.0).all()
    assert (centres >= 0).all() and (centres <= 32).all()


def test_canvas_draws_a_shape_where_and_as_large_as_asked():
    size = 32
    coords = np.arange(size, dtype=np.float32)
    canvas = Canvas(size, (coords[None, :], coords[:, None]))
    canvas.pixels[:] = 0.0
    canvas.shape("disc", 10.0, 20.0, 6.0, 0.3, np.array([1.0, 0.5, 0.25], np.float32), 1.0)
    dist = np.hypot(coords[None, :] - 10.0, coords[:, None] - 20.0)
    assert np.allclose(canvas.pixels[:, dist <= 5.4], np.array([[1.0], [0.5], [0.25]]))
    assert (canvas.pixels[:, dist >= 6.6] == 0).all()
    # half opacity blends halfway; a rotated square covers its rotated corners
    canvas.pixels[:] = 1.0
    canvas.shape("square", 16.0, 16.0, 10.0, np.pi / 4, np.zeros(3, np.float32), 0.5)
    assert np.allclose(canvas.pixels[:, 16, 16], 0.5)
    assert np.allclose(canvas.pixels[:, 16, 16 + 10], 0.5)   # a corner now lies on the axis
    assert np.allclose(canvas.pixels[:, 16 + 7, 16 + 7], 1.0)  # and the old corner is out


def test_every_kind_is_inside_its_unit_circle_and_fills_part_of_it():
    u, v = np.meshgrid(np.linspace(-1.5, 1.5, 301), np.linspace(-1.5, 1.5, 301))
    for name, distance in KINDS.items():
        inside = distance(u, v) < 0
        assert not inside[np.hypot(u, v) > 1.25].any(), name
        assert 0.1 < inside.mean() / (np.pi / 9) < 1.0, name


def test_mean_colour_does_not_give_the_class_away(small):
    """A nearest-centroid classifier on each image's mean colour is near chance."""
    train, val = small
    def mean_colours(ds):
        return (torch.stack([ds[i][0].mean((1, 2)) for i in range(len(ds))]),
                torch.tensor([ds[i][1] for i in range(len(ds))]))
    xt, yt = mean_colours(train)
    xv, yv = mean_colours(val)
    centroids = torch.stack([xt[yt == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xv, centroids).argmin(1) == yv).float().mean().item()
    assert accuracy < 0.25  # chance is 0.1


def test_transforms_apply_to_their_split():
    flip = RandomFlip(p=1.0)
    train, val = shapes(image_size=16, train_size=3, val_size=3, transform=flip,
                        val_transform=normalize([0.5] * 3, [0.25] * 3))
    plain_train, plain_val = shapes(image_size=16, train_size=3, val_size=3)
    assert torch.equal(train[1][0], plain_train[1][0].flip(-1))
    assert torch.allclose(val[1][0], (plain_val[1][0] - 0.5) / 0.25)


def test_indexing_follows_sequence_rules(small):
    train, _ = small
    assert torch.equal(train[-1][0], train[len(train) - 1][0])
    with pytest.raises(IndexError):
        train[len(train)]
    with pytest.raises(TypeError):
        train[1.5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=1), "num_classes must be an integer >= 2"),
    (dict(num_classes=len(CLASSES) + 1), f"at most {len(CLASSES)}"),
    (dict(num_classes=True), "num_classes"),
    (dict(image_size=15), "image_size must be an integer >= 16"),
    (dict(image_size=32.0), "image_size"),
    (dict(train_size=0), "train_size must be an integer >= 1"),
    (dict(val_size=-3), "val_size"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ConvgapError, match=message):
        shapes(**kwargs)


def test_every_class_count_up_to_all_kinds_works():
    train, _ = shapes(num_classes=len(CLASSES), image_size=16, train_size=len(CLASSES),
                      val_size=1)
    assert sorted(train[i][1] for i in range(len(train))) == list(range(len(CLASSES)))


# --- image_folder -------------------------------------------------------------------------

def _png(path, colour, size=(40, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    for i in range(5):
        _png(tmp_path / "cat" / f"{i}.png", (255, 0, 0))
        _png(tmp_path / "dog" / f"{i}.PNG", (0, 0, 255))
    _png(tmp_path / "ant" / "a.png", (0, 255, 0), size=(10, 30))
    _png(tmp_path / "ant" / "nested" / "b.png", (0, 255, 0))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"junk")
    return tmp_path


def test_image_folder_reads_classes_in_sorted_order(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = image_folder(folder, 8)
    assert ds.classes == ["ant", "cat", "dog"]
    assert len(ds) == 12
    assert sorted(label for _, label in ds.samples) == [0] * 2 + [1] * 5 + [2] * 5
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        expect = torch.zeros(3)
        expect[{0: 1, 1: 0, 2: 2}[label]] = 1.0
        assert torch.allclose(image.mean((1, 2)), expect)


def test_image_folder_resizes_shorter_side_and_crops_the_centre(tmp_path):
    # a 40x20 image: left half black, right half white; after resizing to 8 px high
    # (16 wide) and a centre crop of 8, the left 4 columns are black, the right 4 white
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (20, 0, 40, 20))
    (tmp_path / "only").mkdir()
    img.save(tmp_path / "only" / "x.png")
    image, _ = image_folder(tmp_path, 8)[0]
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image[:, :, :3], torch.zeros(3, 8, 3))
    assert torch.allclose(image[:, :, 5:], torch.ones(3, 8, 3))


def test_corrupt_images_are_skipped_with_one_counting_warning(folder):
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    (folder / "dog" / "fake.jpg").write_bytes(b"hello")
    with pytest.warns(UserWarning, match="skipped 2 unreadable image") as caught:
        ds = image_folder(folder, 8)
    assert len(caught) == 1
    assert len(ds) == 12
    assert all(p.name not in ("broken.png", "fake.jpg") for p, _ in ds.samples)


def test_train_and_val_splits_partition_each_class(folder):
    train = image_folder(folder, 8, "train", val_fraction=0.4, seed=1)
    val = image_folder(folder, 8, "val", val_fraction=0.4, seed=1)
    everything = image_folder(folder, 8)
    assert sorted(train.samples + val.samples) == sorted(everything.samples)
    assert not set(train.samples) & set(val.samples)
    # round(0.4 * 5) = 2 of cat and of dog, round(0.4 * 2) = 1 of ant
    assert sorted(label for _, label in val.samples) == [0, 1, 1, 2, 2]
    other = image_folder(folder, 8, "val", val_fraction=0.4, seed=2)
    assert len(other) == 5  # a different seed draws the same counts (maybe other files)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ConvgapError, match="no class sub-folders"):
        image_folder(tmp_path, 8)


def test_folder_without_class_folders_is_an_error(tmp_path):
    _png(tmp_path / "loose.png", (1, 2, 3))
    with pytest.raises(ConvgapError, match=f"{tmp_path}.*no class sub-folders"):
        image_folder(tmp_path, 8)


def test_class_folders_without_images_are_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(ConvgapError, match="a, b hold no readable images"):
        image_folder(tmp_path, 8)


def test_missing_folder_and_bad_arguments_are_errors(tmp_path, folder):
    with pytest.raises(ConvgapError, match="does not exist"):
        image_folder(tmp_path / "nope", 8)
    with pytest.raises(ConvgapError, match="image_size"):
        image_folder(folder, 0)
    with pytest.raises(ConvgapError, match="split"):
        image_folder(folder, 8, "test")
    with pytest.raises(ConvgapError, match="val_fraction"):
        image_folder(folder, 8, "val", val_fraction=1.0)


def test_an_image_that_fails_to_decode_later_names_the_file(folder):
    ds = image_folder(folder, 8)
    path, _ = ds.samples[0]
    path.write_bytes(b"gone bad")
    with pytest.raises(ConvgapError, match=str(path)):
        ds[0]


# --- transforms ---------------------------------------------------------------------------

def test_flip_mirrors_the_last_axis():
    x = torch.rand(3, 5, 7)
    assert torch.equal(RandomFlip(p=1.0)(x), torch.flip(x, dims=[-1]))
    assert torch.equal(RandomFlip(p=0.0)(x), x)


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.rand(3, 6, 6) + 1.0  # no zeros of its own
    padded = torch.zeros(3, 10, 10)
    padded[:, 2:8, 2:8] = x
    seen = set()
    for seed in range(40):
        out = RandomCrop(2, torch.Generator().manual_seed(seed))(x)
        assert out.shape == x.shape
        # find the offset the crop took: exactly one window of the padded image matches
        matches = [(t, l) for t in range(5) for l in range(5)
                   if torch.equal(out, padded[:, t:t + 6, l:l + 6])]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    assert len(seen) > 10  # offsets spread over the 5 x 5 possible


def test_seeded_augmentation_repeats_and_keeps_batches_together():
    x = torch.rand(4, 3, 8, 8)
    a = augment(padding=3, generator=torch.Generator().manual_seed(5))
    b = augment(padding=3, generator=torch.Generator().manual_seed(5))
    outs = [a(x) for _ in range(6)]
    assert all(torch.equal(o, b(x)) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    # a batch is transformed alike: each image's result equals transforming it alone
    c = augment(padding=3, generator=torch.Generator().manual_seed(9))
    d = augment(padding=3, generator=torch.Generator().manual_seed(9))
    batch = c(x)
    assert torch.equal(batch[2], d(x[2]))
    assert augment(padding=0, flip=False)(x) is x


def test_normalize_is_per_channel():
    x = torch.rand(3, 4, 4)
    out = normalize([0.1, 0.2, 0.3], [0.5, 1.0, 2.0])(x)
    for c, (m, sd) in enumerate([(0.1, 0.5), (0.2, 1.0), (0.3, 2.0)]):
        assert torch.allclose(out[c], (x[c] - m) / sd)


@pytest.mark.parametrize("make, message", [
    (lambda: normalize([0.5, 0.5], [0.2, 0.2, 0.2]), "equal-length"),
    (lambda: normalize([0.5] * 3, [0.2, 0.0, 0.2]), "positive"),
    (lambda: RandomCrop(-1), "padding"),
    (lambda: RandomFlip(1.5), "probability"),
])
def test_bad_transform_arguments_are_errors(make, message):
    with pytest.raises(ConvgapError, match=message):
        make()


def test_normalize_rejects_a_wrong_channel_count():
    with pytest.raises(ConvgapError, match="3 channels"):
        normalize([0.5] * 3, [0.2] * 3)(torch.rand(1, 4, 4))


def test_public_api():
    import convgap
    assert convgap.data is data and "data" in convgap.__all__
    assert callable(data.shapes) and callable(data.image_folder)
