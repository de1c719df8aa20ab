"""Image folders (odd and broken files, layout errors), the built-in digits, transforms and sampling."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from imagefolders import make_dataset, make_split
from mobilenets import data
from mobilenets.images import IMAGENET, INCEPTION

R = 32


def _odd_images(folder):
    """One file per awkward case the issue lists; all must come out as (3, R, R) RGB tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8), "RGB")
    rgb.convert("L").save(folder / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (24, 30))).astype(np.uint16)).save(folder / "sixteen.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    rgb.save(folder / "image.webp")
    rgb.save(folder / "image.bmp")
    rgb.save(folder / "image.gif")
    # EXIF orientation 6: stored 64x32 with red on the left; displayed rotated 90 degrees clockwise (red on top)
    halves = np.zeros((32, 64, 3), np.uint8)
    halves[:, :32, 0] = 255
    halves[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(halves).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    return 9


def _broken_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    return {"truncated.jpg", "empty.png", "notes.jpg"}


def test_odd_modes_and_formats_all_come_out_as_rgb(tmp_path):
    n = _odd_images(tmp_path / "train" / "a")
    ds = data.ImageFolder(tmp_path / "train", data.EvalTransform(R))
    assert len(ds) == n
    for i in range(len(ds)):
        item = ds[i]
        assert not isinstance(item, data.Skipped), item
        x, target = item
        assert x.shape == (3, R, R) and x.dtype == torch.float32 and target == 0
        assert -1.0 <= x.min() and x.max() <= 1.0  # x/127.5 - 1
    # EXIF rotation applied: red on top, blue at the bottom after the 90 degree turn
    x, _ = ds[[p.name for p in ds.paths].index("rotated.jpg")]
    top, bottom = x[:, 2, R // 2], x[:, -3, R // 2]
    assert top[0] > 0.8 and top[2] < -0.8, top
    assert bottom[2] > 0.8 and bottom[0] < -0.8, bottom


def test_broken_files_are_skipped_not_fatal(tmp_path):
    make_split(tmp_path, 2, 0, classes=("vertical",))
    broken = _broken_files(tmp_path / "vertical")
    ds = data.ImageFolder(tmp_path, data.TrainTransform(R))
    items = [ds[(i, 7)] for i in range(len(ds))]
    skipped = [it for it in items if isinstance(it, data.Skipped)]
    assert {s.path.rsplit("/", 1)[-1] for s in skipped} == broken
    assert all(s.path in s.error for s in skipped)  # the message names the file
    x, y, dropped = data.collate(items)
    assert x.shape == (2, 3, R, R) and y.tolist() == [0, 0] and len(dropped) == 3
    assert data.collate(skipped) == (None, None, skipped)


def test_layout_errors_say_what_would_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.splits(tmp_path / "nope", R, train_transform=None, eval_transform=None)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no val/ folder.*ImageFolder layout"):
        data.splits(tmp_path, R, train_transform=None, eval_transform=None)
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        data.splits(tmp_path, R, train_transform=None, eval_transform=None)

    root = make_dataset(tmp_path / "ds", 2, 1)
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*empty has no images"):
        data.splits(root, R, train_transform=None, eval_transform=None)

    root = make_dataset(tmp_path / "ds2", 2, 1)
    (root / "val" / "diagonal").rename(root / "val" / "diagonals")
    with pytest.raises(ValueError, match=r"differ from the training classes.*missing \['diagonal'\].*"
                                         r"not in training \['diagonals'\]"):
        data.splits(root, R, train_transform=None, eval_transform=None)


def test_classes_are_sorted_folders_and_hidden_files_ignored(tmp_path):
    root = make_dataset(tmp_path, 3, 2)
    (root / "train" / "vertical" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / ".cache").mkdir()
    train, val = data.splits(root, R, train_transform=data.TrainTransform(R), eval_transform=data.EvalTransform(R))
    assert train.classes == val.classes == ["diagonal", "horizontal", "vertical"]
    assert len(train) == 9 and len(val) == 6
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_builtin_digits_are_real_fixed_and_held_out():
    train = data.Digits("train", R, data.EvalTransform(R))
    val = data.Digits("val", R, data.EvalTransform(R))
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert train.classes == [str(i) for i in range(10)]
    assert set(train.paths).isdisjoint(val.paths)
    assert sorted(np.bincount(val.targets).tolist())[0] >= 35  # stratified: every digit held out
    assert data.Digits("val", R, data.EvalTransform(R)).paths == val.paths  # fixed split
    x, _ = val[0]
    assert x.shape == (3, R, R)
    # real scans, not noise: a nearest-centroid classifier on the pixels already separates the held-out digits
    flat = lambda ds: torch.stack([ds[i][0][0].flatten() for i in range(len(ds))])
    xt, xv = flat(train), flat(val)
    centroids = torch.stack([xt[torch.tensor(train.targets) == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xv, centroids).argmin(1) == torch.tensor(val.targets)).float().mean()
    assert accuracy > 0.85


@pytest.mark.parametrize("size, fallback", [((30, 50), (0, 5, 30, 40)), ((70, 50), (1, 0, 67, 50)),
                                            ((40, 50), (0, 0, 40, 50)), ((50, 40), (0, 0, 50, 40))])
def test_a_crop_no_draw_fits_is_the_centre_crop_of_the_clamped_aspect(size, fallback):
    """With the whole area asked for (min_scale 1), a draw fits only at the image's own aspect: otherwise
    torchvision's RandomResizedCrop fallback, worked by hand here, is the crop: the image's aspect clamped to
    [3/4, 4/3], centred (30x50: 30 wide, 30 / (3/4) = 40 high, 5 from the top; 70x50: 50 x 4/3 = 67 wide), and
    the whole image where its aspect is already inside (40x50, 50x40).  A draw that fits is the whole image
    to within a pixel of rounding."""
    t = data.TrainTransform(R, min_scale=1.0)
    width, height = size
    boxes = {t.crop_box(width, height, random.Random(seed)) for seed in range(100)}
    assert fallback in boxes
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        assert (left, top, w, h) == fallback or (abs(w - width) <= 1 and abs(h - height) <= 1)


def test_train_transform_is_a_function_of_its_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    t = data.TrainTransform(R, min_scale=0.3, hflip=0.5, normalization=IMAGENET)
    a, b = t(image, random.Random(5)), t(image, random.Random(5))
    assert torch.equal(a, b) and a.shape == (3, R, R)
    assert not torch.equal(a, t(image, random.Random(6)))
    for seed in range(200):
        left, top, w, h = t.crop_box(70, 50, random.Random(seed))
        assert 0 <= left and left + w <= 70 and 0 <= top and top + h <= 50
        assert w * h >= 0.3 * 70 * 50 * 0.9  # area drawn in [min_scale, 1] (rounding aside)
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (w, h) == (70, 50)
    flipped = data.TrainTransform(R, min_scale=1.0, hflip=1.0)
    plain = data.TrainTransform(R, min_scale=1.0, hflip=0.0)
    square = image.crop((0, 0, 50, 50))
    assert torch.allclose(flipped(square, random.Random(0)), plain(square, random.Random(0)).flip(-1))
    with pytest.raises(ValueError, match="min_scale"):
        data.TrainTransform(R, min_scale=0)


@pytest.mark.parametrize("option, value, message", [
    ("min_scale", 0.0, r"min_scale must be in \(0, 1\]"), ("min_scale", 1.01, r"min_scale must be in \(0, 1\]"),
    ("hflip", -0.01, r"hflip must be a probability in \[0, 1\]"), ("hflip", 1.01, r"hflip must be a probability in \[0, 1\]"),
    ("hflip", 1.5, r"hflip must be a probability in \[0, 1\]")])
def test_a_crop_area_or_flip_probability_outside_its_range_is_refused_saying_the_range(option, value, message):
    """The library's own check (the CLI's options are checked before it): a probability just outside [0, 1] (or
    an area just outside (0, 1]) is no setting, refused with the range rather than run as a clamp."""
    with pytest.raises(ValueError, match=message + f".*got {value}"):
        data.TrainTransform(R, **{option: value})
    data.TrainTransform(R, **{option: 1.0})  # each range's closed end is a setting


def test_augmentation_is_milder_for_small_alpha():
    scales = [data.default_min_scale(a) for a in (1.0, 0.75, 0.5, 0.25)]
    assert scales[0] == 0.08 and scales == sorted(scales) and scales[-1] == 0.35


def test_eval_transform_is_images_eval_transform():
    from mobilenets.images import eval_transform

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    assert torch.equal(data.EvalTransform(R, INCEPTION)(image), eval_transform(image, R, INCEPTION))


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    s = lambda **kw: list(data.EpochSampler(10, **{"seed": 1, "epoch": 0, **kw}))
    assert s() == s()
    assert [i for i, _ in s()] != [i for i, _ in s(epoch=1)]
    assert sorted(i for i, _ in s()) == list(range(10))
    assert s(start=4) == s()[4:]
    # two ranks share the epoch: padded to equal length, together covering every index
    r0, r1 = s(world_size=2, rank=0), s(world_size=2, rank=1)
    assert len(r0) == len(r1) == 5 and {i for i, _ in r0 + r1} == set(range(10))
    seeds = {k: v for k, v in s()}
    assert all(seeds[i] == v for i, v in r0 + r1)  # an image's augmentation does not depend on the rank
    assert list(data.ShardSampler(5, 1, 2)) == [1, 3]


def test_every_image_in_every_epoch_draws_its_own_crop():
    """An image's crop depends on the run's seed, the epoch and the image alone (above); it must also be a draw of
    its own, not one another image got in another epoch (a seed mix giving epoch e + 1's image i the seed of
    epoch e's image i + 1 would hand each epoch the last one's crops, shifted by one image)."""
    t = data.TrainTransform(R, min_scale=0.08)
    boxes = [t.crop_box(4000, 3000, random.Random(seed)) for epoch in range(3)
             for _, seed in data.EpochSampler(10, seed=1, epoch=epoch)]
    # a 4000x3000 image has ~10^13 (left, top, width, height) boxes: 30 independent draws repeat one with
    # p < 10^-9, while that shifted mix repeats 18 of them
    assert len(boxes) == 30 and len(set(boxes)) == 30


@pytest.mark.parametrize("resolution, decoded", [(64, (250, 188)), (160, (500, 375)), (224, (1000, 750))])
def test_large_jpegs_decode_at_reduced_scale_only_as_far_as_every_crop_keeps_its_detail(tmp_path, resolution,
                                                                                       decoded):
    """The smallest crop (a quarter of the area, aspect 3:4) of a 2000 x 1500 photo must keep `resolution`
    pixels a side: 1/8 scale keeps 94 (enough for 64), 1/4 keeps 188 (for 160), 1/2 keeps 375 (for 224)."""
    import math

    from mobilenets.data import EvalTransform, TrainTransform
    from mobilenets.images import load_rgb

    rng = np.random.default_rng(0)
    big = tmp_path / "phone.jpg"
    Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(big)
    train = TrainTransform(resolution, min_scale=0.25)
    image = load_rgb(big, min_side=train.min_side)
    w, h = image.size
    assert (w, h) == decoded  # a DCT scale, smaller than the file
    assert math.sqrt(0.25 * w * h * 3 / 4) >= resolution  # the smallest possible crop keeps its pixels
    assert math.sqrt(0.25 * (w / 2) * (h / 2) * 3 / 4) < resolution  # and the next coarser scale would not have
    # evaluation decodes exactly (reduced-scale decoding moved answers on phone-size photos)
    assert load_rgb(big, min_side=EvalTransform(224).min_side).size == (2000, 1500)
    assert load_rgb(big).size == (2000, 1500)


@pytest.mark.parametrize("orientation", [None, 6])
def test_each_training_crop_decodes_a_large_jpeg_at_the_smallest_scale_that_crop_allows(tmp_path, decoded_sizes,
                                                                                       orientation):
    """The crop is drawn from the header's size, the file decoded at the DCT scale that still gives the crop
    resolution pixels a side, and the result matches cropping the fully decoded photo."""
    from real_data import photos

    from mobilenets import images

    name, pixels = photos()[0]  # a real photograph: its detail is what reduced-scale decoding could lose
    folder = tmp_path / "photo"
    folder.mkdir()
    exif = Image.Exif()
    if orientation:
        exif[images.EXIF_ORIENTATION] = orientation  # stored 2000x1500, seen 1500x2000
    Image.fromarray(pixels).resize((2000, 1500), Image.BICUBIC).save(folder / "a.jpg", quality=95, exif=exif)
    transform = data.TrainTransform(64, min_scale=0.25, hflip=0.5)
    dataset = data.ImageFolder(tmp_path, transform)

    full = images.load_rgb(folder / "a.jpg")
    assert full.size == ((1500, 2000) if orientation else (2000, 1500))
    decoded = decoded_sizes
    decoded.clear()  # only what the data set decodes
    for seed in range(12):
        x, _ = dataset[(0, seed)]
        exact = transform(full, random.Random(seed))  # the same crop and flip, from the full decoding
        # the DCT-scaled decoding is slightly softer; a different crop or flip would differ by ~0.3-0.5
        assert (x - exact).abs().mean() < 0.04, seed
    assert all(min(size) >= 64 for size in decoded)
    assert min(min(size) for size in decoded) <= 1500 / 4  # most crops allow 1/4 or 1/8
    # and never coarser than each crop allows: redoing the draw, the crop keeps >= 64 pixels a side
    for seed, size in zip(range(12), decoded):
        w, h = full.size
        box = transform.crop_box(w, h, random.Random(seed))
        assert min(box[2], box[3]) * size[0] / w >= 64 - 1


def test_training_crop_is_pils_crop_and_bilinear_resize_to_within_one_grey_level():
    """The crop is resized by PyTorch's uint8 kernel for speed; what it must equal is what torchvision's
    RandomResizedCrop does with PIL (crop, then BILINEAR with its antialiasing filter), then the flip."""
    from real_data import photos

    from mobilenets.images import to_tensor

    image = Image.fromarray(photos()[0][1])
    transform = data.TrainTransform(224, min_scale=0.08, hflip=0.5)
    sizes = set()
    for seed in range(16):
        x = transform(image, random.Random(seed))
        rng = random.Random(seed)
        left, top, w, h = transform.crop_box(*image.size, rng)
        reference = image.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            reference = reference.transpose(Image.FLIP_LEFT_RIGHT)
        grey_levels = (x - to_tensor(reference)).abs() * 127.5
        assert grey_levels.max() <= 1.0 + 1e-3 and grey_levels.mean() < 0.25, seed  # rounding differs on some pixels by one level
        sizes.add(min(w, h) > 224)
    assert sizes == {True, False}  # both downscaled (antialiased) and upscaled crops were compared


@pytest.mark.parametrize("size,box", [((1000, 100), (433, 0, 133, 100)), ((100, 1000), (0, 433, 100, 133)),
                                      ((999, 150), (399, 0, 200, 150))])
def test_a_crop_no_draw_fits_is_the_centre_crop_of_the_nearest_allowed_aspect(size, box):
    """A panorama or a tall strip: no crop of aspect 3/4..4/3 holding min_scale of the area fits, so after its 10
    draws the crop is the centred one of aspect 4/3 (wide) or 3/4 (tall) on the full short side, written out:
    1000x100 -> 133x100 at (433, 0); 100x1000 -> 100x133 at (0, 433); 999x150 -> 200x150 at (399, 0), the odd margin's extra pixel on the right."""
    transform = data.TrainTransform(32, min_scale=0.35)
    for seed in range(5):
        assert transform.crop_box(*size, random.Random(seed)) == box


@pytest.mark.parametrize("size, world_size", [(10, 2), (10, 3), (7, 4), (2, 5), (1, 8), (13, 1)])
def test_epoch_sampler_gives_every_rank_as_many_steps_as_torchs_distributed_sampler(size, world_size):
    """torch's DistributedSampler is the oracle for the share of each rank (padding by wrapping around): every
    rank takes ceil(size / world_size) images, its __len__ says so, and together they cover every image; a
    rank with fewer would leave the others waiting at an all-reduce."""
    dataset = list(range(size))
    shares = [[i for i, _ in data.EpochSampler(size, seed=3, epoch=1, rank=r, world_size=world_size)]
              for r in range(world_size)]
    for rank, share in enumerate(shares):
        peer = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        assert len(share) == len(list(peer)) == len(data.EpochSampler(size, seed=3, epoch=1, rank=rank,
                                                                        world_size=world_size))
    assert {i for share in shares for i in share} == set(dataset)


@pytest.mark.parametrize("alpha", [2.0, 1.25, 1.0, 0.75, 0.5, 0.25, 0.1])
def test_default_min_scale_narrows_linearly_from_inception_s_8_percent(alpha):
    # the docstring's rule written out: 0.08 at alpha >= 1 (timm's 1.25 too), 0.35 at 0.25, a straight line
    # between, 0.35 below
    expected = 0.08 if alpha >= 1 else 0.08 + (0.35 - 0.08) * (1.0 - alpha) / 0.75 if alpha > 0.25 else 0.35
    assert data.default_min_scale(alpha) == pytest.approx(expected, abs=1e-4)


def test_builtin_digits_keep_sklearns_17_grey_levels_spread_over_0_to_255():
    """At 8 px (sklearn's own size) the scaled scans are sklearn's images, level 16 as white: 0..16 * 255 / 16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pictures, targets = data._digits_images(8)
    expected = np.round(digits.images[:50] * 255 / 16).astype(np.uint8)
    assert np.array_equal(np.stack([np.asarray(p)[..., 0] for p in pictures[:50]]), expected)
    assert np.asarray(pictures[0]).min() == 0 and max(np.asarray(p).max() for p in pictures[:50]) == 255
    assert np.array_equal(targets, digits.target)


def test_every_image_of_a_large_set_draws_from_its_own_seed_in_every_epoch():
    """An image's augmentation seed is a fixed mix of (run seed, epoch, index): over 5,000 images, 2 epochs and 2
    run seeds no two (epoch, image) pairs share one, so no image repeats another's crop and flip."""
    seeds = {data.sample_seed(s, e, i) for s in (0, 7) for e in (0, 1) for i in range(5000)}
    assert len(seeds) == 2 * 2 * 5000


def test_a_batch_reports_the_cpu_seconds_its_collation_took_in_this_thread():
    """collate adds its own thread CPU time to what the samples' decoding reported: at least that, at most
    the thread time measured around the call (the trainer's progress divides images by these seconds)."""
    import time

    samples = [(torch.rand(3, 64, 64), k) for k in range(64)]
    before = time.thread_time()
    batch = data.collate(samples)
    spent = time.thread_time() - before
    assert 0 <= batch.seconds <= spent and batch[0].shape == (64, 3, 64, 64)


def test_a_training_crop_of_uint8_pixels_is_the_crop_of_the_same_image_given_as_pil():
    """TrainTransform takes an RGB image or its (3, H, W) uint8 pixels: the same random draws give the same
    crop of a non-square image (its width read from the last axis, its height from the one before)."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    t = data.TrainTransform(R, min_scale=0.3, hflip=0.5, normalization=IMAGENET)
    for seed in range(5):
        assert torch.equal(t(pixels, random.Random(seed)), t(image, random.Random(seed))), seed


def test_a_lone_process_scores_every_image_once_in_order():
    # ShardSampler's defaults are one process: rank 0 of 1
    assert list(data.ShardSampler(5)) == [0, 1, 2, 3, 4]


def test_a_datasets_batch_reports_the_cpu_seconds_its_samples_took_in_this_thread(tmp_path):
    """__getitems__ (the DataLoader's batch fetch) records the thread CPU time of decoding its samples: at most
    the thread time measured around the call, and most of it (the call is the decoding).  In a fresh thread,
    as a loader's first fetch is, so that the time spent before the call is far less than the call's."""
    import threading
    import time

    train = data.ImageFolder(make_dataset(tmp_path / "ds") / "train", data.EvalTransform(R))
    found = {}

    def fetch():
        before = time.thread_time()
        found["samples"] = train.__getitems__(list(range(24)))
        found["spent"] = time.thread_time() - before

    thread = threading.Thread(target=fetch)
    thread.start()
    thread.join()
    samples, spent = found["samples"], found["spent"]
    assert len(samples) == 24 and 0.5 * spent <= samples.seconds <= spent, (samples.seconds, spent)
