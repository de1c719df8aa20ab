"""Images of any mode decode to RGB; the evaluation preprocessing is the Inception one."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import mobilenets.errors
from mobilenets import images


def save(tmp_path, name, image, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "name,make",
    [
        ("gray.png", lambda: Image.new("L", (40, 30), 128)),
        ("rgba.png", lambda: Image.new("RGBA", (40, 30), (255, 0, 0, 0))),
        ("cmyk.jpg", lambda: Image.new("CMYK", (40, 30), (0, 255, 0, 0))),
        ("palette.png", lambda: Image.new("P", (40, 30), 3)),
        ("sixteen.png", lambda: Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))),
        ("photo.webp", lambda: Image.new("RGB", (40, 30), (1, 2, 3))),
        ("bitmap.bmp", lambda: Image.new("RGB", (40, 30), (1, 2, 3))),
    ],
)
def test_any_mode_becomes_rgb(tmp_path, name, make):
    im = images.load_rgb(save(tmp_path, name, make()))
    assert im.mode == "RGB" and im.size == (40, 30)


def test_transparent_pixels_are_white_and_16_bit_is_scaled(tmp_path):
    rgba = images.load_rgb(save(tmp_path, "a.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert rgba.getpixel((0, 0)) == (255, 255, 255)
    a = np.zeros((4, 4), dtype=np.uint16)
    a[0, 0] = 65535
    a[1, 1] = 32768
    sixteen = images.load_rgb(save(tmp_path, "s.png", Image.fromarray(a)))
    assert sixteen.getpixel((0, 0)) == (255, 255, 255) and sixteen.getpixel((1, 1))[0] == 127
    # a palette image whose index 0 (black) is transparent: those pixels white, the opaque red ones red
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((2, 2), 1)
    p = images.load_rgb(save(tmp_path, "p.png", palette, transparency=0))
    assert p.getpixel((0, 0)) == (255, 255, 255) and p.getpixel((2, 2)) == (255, 0, 0)


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path, "rotated.jpg", im, exif=exif)
    assert images.load_rgb(path).size == (20, 40)


@pytest.mark.parametrize("content", [b"", b"definitely not an image", "truncated"])
def test_undecodable_files_raise_image_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(images.ImageError, match="bad.jpg"):
        images.load_rgb(path)
    with pytest.raises(images.ImageError, match="bad.jpg"):
        images.load_pixels(path)


@pytest.fixture
def jpeg_decodes(monkeypatch):
    """How many times simplejpeg's decoder ran (load_pixels' fast path)."""
    import simplejpeg

    calls = []
    decode = simplejpeg.decode_jpeg

    def counting(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", counting)
    return calls


@pytest.mark.parametrize("kind", ["baseline", "progressive", "gray", "cmyk", "png"] +
                         [f"orientation{k}" for k in range(2, 9)])
def test_load_pixels_are_load_rgbs_pixels_bit_for_bit(tmp_path, jpeg_decodes, kind):
    """The fast path (simplejpeg, for colour and grayscale JPEGs at full scale) sees exactly what PIL decodes,
    EXIF orientation included; other files (CMYK JPEGs, PNG) go through PIL."""
    from real_data import photos

    photo = Image.fromarray(photos()[0][1]).resize((300, 200))
    options = {"progressive": True} if kind == "progressive" else {}
    if kind.startswith("orientation"):
        exif = Image.Exif()
        exif[images.EXIF_ORIENTATION] = int(kind[-1])
        options["exif"] = exif
    image = photo.convert({"gray": "L", "cmyk": "CMYK"}.get(kind, "RGB"))
    path = save(tmp_path, "a.png" if kind == "png" else "a.jpg", image, **options)
    expected = torch.from_numpy(np.array(images.load_rgb(path))).permute(2, 0, 1)
    got = images.load_pixels(path)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)
    assert len(jpeg_decodes) == (kind not in ("png", "cmyk"))
    if kind in ("orientation6", "orientation8"):
        assert got.shape[-2:] == (300, 200)  # seen rotated


def test_load_pixels_checks_the_size_before_decoding(tmp_path, jpeg_decodes, monkeypatch):
    """PIL's decompression-bomb limit is read from the header before simplejpeg decodes anything."""
    path = save(tmp_path, "big.jpg", Image.new("RGB", (400, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 300 // 4)  # refused above twice this
    with pytest.raises(images.ImageError, match="big.jpg"):
        images.load_pixels(path)
    assert not jpeg_decodes


@pytest.mark.parametrize("as_bytes, w, h", [(False, 40, 30), (True, 40, 30), (False, 1600, 1400)])
def test_a_file_may_exceed_its_pixels_by_8_bytes_each_plus_16_mib_and_not_a_byte_more(tmp_path, as_bytes, w, h):
    """The size bound read from the header, written out: 8 bytes a pixel (16-bit RGBA, uncompressed) plus 16 MiB
    of metadata. Zeros after a PNG's end up to it decode as the image alone; one byte more is refused unread.
    (A bound off by any factor, e.g. w * h ^ 8 instead of w * h * 8, moves the edge by thousands of bytes;
    at 1600 x 1400 the pixels' 17.9 MB and the 16 MiB share bits, so a sum written as an or shows too.)"""
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = save(tmp_path, "padded.png", Image.fromarray(pixels))
    bound = w * h * 8 + 16 * 1024 * 1024
    for size, fits in ((bound, True), (bound + 1, False)):
        with open(path, "r+b") as f:
            f.truncate(size)  # zeros after IEND, which PNG readers ignore
        source = path.read_bytes() if as_bytes else path
        if fits:
            assert images.load_pixels(source).permute(1, 2, 0).numpy().tolist() == pixels.tolist()
            if not as_bytes:
                assert np.array_equal(np.asarray(images.load_rgb(path)), pixels)
        else:
            with pytest.raises(images.ImageError, match=f"is {size:,} bytes, far more than a {w}x{h} image takes "
                                                        rf"\(at most {bound:,}\)"):
                images.load_pixels(source)
            if not as_bytes:
                with pytest.raises(images.ImageError, match=f"is {size:,} bytes"):
                    images.load_rgb(path)


def test_eval_transform_resizes_crops_and_scales_to_minus_one_one():
    im = Image.new("RGB", (300, 200), (255, 0, 127))
    x = images.eval_transform(im, 160)
    assert x.shape == (3, 160, 160)
    assert torch.allclose(x[:, 80, 80], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]), atol=1e-6)


def test_eval_transform_centre_crop_keeps_the_centre():
    # a 280x280 image resized to floor(160/0.875) = 182 then cropped: the centre pixel survives, the border does not
    a = np.zeros((280, 280, 3), dtype=np.uint8)
    a[130:150, 130:150] = 255
    x = images.eval_transform(Image.fromarray(a), 160, images.IMAGENET)
    assert x[0, 80, 80] > 2 and x[0, 0, 0] < -2


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        images.list_images(tmp_path / "nope")
    with pytest.raises(images.ImageError, match="no image files"):
        images.list_images(tmp_path)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_float_tiff_with_a_non_finite_pixel_is_refused_naming_the_file(tmp_path, bad):
    # one infinity used to set the scale, turning every other pixel black without a word
    a = np.full((30, 40), 1000.0, np.float32)
    a[3, 4] = bad
    path = save(tmp_path, "float.tif", Image.fromarray(a, "F"))
    with pytest.raises(images.ImageError, match=r"float\.tif.*1 of its 1200 pixels are not finite"):
        images.load_rgb(path)
    assert issubclass(images.ImageError, mobilenets.errors.MobilenetsError)


def test_a_finite_float_tiff_keeps_its_contrast(tmp_path):
    # the real range is scaled to 8 bits: 0 stays black, the maximum becomes 255, the middle 128
    a = np.zeros((30, 40), np.float32)
    a[:, 20:] = 1000.0
    a[:, 10:20] = 500.0
    rgb = np.asarray(images.load_rgb(save(tmp_path, "float.tif", Image.fromarray(a, "F"))))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 30].tolist() == [255, 255, 255]
    assert rgb[0, 15].tolist() == [127, 127, 127]
    # one within 0..255 is grey levels as they are (the fraction dropped), not stretched to white
    a = np.array([[0.0, 100.0, 254.6]], np.float32)
    rgb = np.asarray(images.load_rgb(save(tmp_path, "levels.tif", Image.fromarray(a, "F"))))
    assert rgb[0, :, 0].tolist() == [0, 100, 254]


def test_load_pixels_falls_back_to_pil_without_simplejpeg(tmp_path, jpeg_decodes, monkeypatch):
    path = save(tmp_path, "a.jpg", Image.effect_mandelbrot((64, 48), (-2, -1, 1, 1), 50).convert("RGB"))
    expected = images.load_pixels(path)
    monkeypatch.setattr(images, "_simplejpeg", lambda: None)  # not installed
    assert torch.equal(images.load_pixels(path), expected) and len(jpeg_decodes) == 1


def _structured(w: int, h: int, seed: int) -> Image.Image:
    """A real photograph resized to w x h plus fine seeded noise: edges at every scale, from the photo's
    objects down to single pixels, so a resize or crop one pixel off shows (a flat image or a thin patch
    cannot show it)."""
    from real_data import photos

    base = np.asarray(Image.fromarray(photos()[seed % len(photos())][1]).resize((w, h), Image.BICUBIC), np.int16)
    noise = np.random.default_rng(seed).integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size,resolution,normalization", [
    ((300, 200), 224, "inception"), ((200, 300), 160, "imagenet"), ((517, 389), 128, "odd"),
    ((97, 131), 96, "inception"), ((64, 48), 192, "imagenet"), ((1000, 1), 32, "odd"), ((41, 40), 32, "imagenet"),
    ((131, 97), 64, "default"),
    # a tall portrait (a phone screenshot): resized, its long side is over twice the crop
    ((120, 400), 64, "imagenet")])
@pytest.mark.parametrize("path", ["whole", "box"])
def test_eval_transform_is_torchvisions_resize_crop_normalize(size, resolution, normalization, path, monkeypatch):
    """The independent oracle: torchvision's Resize(floor(R / 0.875)) (PIL bilinear), CenterCrop(R), ToTensor,
    Normalize, at several resolutions, aspect ratios (down- and upscaling) and normalizations; by both of
    eval_pixels' paths: the whole image resized, and only the crop's box (taken by images too large to resize
    whole, forced here by a zero pixel budget)."""
    from torchvision import transforms

    if path == "box":
        monkeypatch.setattr(images, "MAX_RESIZED_PIXELS", 0)

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

    # ours, and the (mean, std) the oracle normalizes with: a peer's published values (timm's constants; the
    # default Normalization() is the official weights' x/127.5 - 1), never read back from the object under test
    odd = ((0.3, 0.6, 0.45), (0.15, 0.35, 0.25))
    norm, (mean, std) = {"inception": (images.INCEPTION, (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)),
                         "default": (images.Normalization(), (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)),
                         "imagenet": (images.IMAGENET, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)),
                         "odd": (images.Normalization(*odd), odd)}[normalization]
    image = _structured(*size, seed=sum(size))

    def torchvision_eval(shift=0):
        resized = transforms.Resize(int(resolution / 0.875))(image)
        w, h = resized.size
        left, top = int(round((w - resolution) / 2.0)) + shift, int(round((h - resolution) / 2.0))
        assert shift or transforms.CenterCrop(resolution)(resized).tobytes() == \
            resized.crop((left, top, left + resolution, top + resolution)).tobytes()
        crop = resized.crop((left, top, left + resolution, top + resolution))
        return transforms.Normalize(mean, std)(transforms.ToTensor()(crop))

    ours = images.eval_transform(image, resolution, norm)
    grey = torch.tensor(std)[:, None, None] * 255  # one grey level, in normalized units per channel
    levels = (ours - torchvision_eval()).abs() * grey
    # PyTorch's uint8 bilinear kernel rounds some pixels one level off PIL's (eval_pixels' docstring); PIL's
    # resize of the box alone starts from fractional offsets and rounds otherwise than the whole image's resize
    # (measured: mean up to 0.26 levels, at most 2 levels, at 41x40 -> 32); a crop one pixel off moves the mean
    # by more than a level (checked below), so either bar still shows it
    assert ours.shape == (3, resolution, resolution)
    max_bar, mean_bar = (1.0, 0.25) if path == "whole" else (2.0, 0.5)
    assert float(levels.max()) <= max_bar + 1e-3 and float(levels.mean()) < mean_bar, \
        (float(levels.max()), float(levels.mean()))
    if min(size) > 1:  # the fixture can show a crop one pixel off: that moves the mean by more than a level
        assert float(((ours - torchvision_eval(shift=1)).abs() * grey).mean()) > 1.0


@pytest.mark.parametrize("min_side,decoded", [(300, (640, 480)), (240, (320, 240)), (200, (320, 240)),
                                              (120, (160, 120)), (100, (160, 120)), (60, (80, 60)), (10, (80, 60))])
def test_a_jpeg_decodes_at_the_smallest_dct_scale_that_keeps_min_side(tmp_path, min_side, decoded):
    """libjpeg decodes a JPEG at 1/1, 1/2, 1/4 or 1/8 a side: a 640x480 one comes back at the smallest of those
    whose shorter side is still at least min_side (written out: 480 / s >= min_side), by both loaders."""
    path = tmp_path / "photo.jpg"
    _structured(640, 480, seed=5).save(path, quality=90)
    assert images.load_rgb(path, min_side=min_side).size == decoded
    assert tuple(images.load_pixels(path, min_side=min_side).shape) == (3, decoded[1], decoded[0])


@pytest.mark.parametrize("budget,decoded", [(640 * 480, (640, 480)), (640 * 480 - 1, (320, 240)),
                                            (320 * 240 - 1, (160, 120)), (80 * 60, (80, 60))])
def test_a_jpeg_over_the_pixel_budget_decodes_at_the_first_dct_scale_that_fits(tmp_path, monkeypatch, budget,
                                                                                decoded):
    """A JPEG larger than MAX_DECODED_PIXELS decodes at 1/2, 1/4 or 1/8 a side, the first whose pixels fit
    (written out for 640x480: 307200, 76800, 19200, 4800 pixels), by both loaders."""
    path = tmp_path / "photo.jpg"
    _structured(640, 480, seed=6).save(path, quality=90)
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", budget)
    assert images.load_rgb(path).size == decoded
    assert tuple(images.load_pixels(path).shape) == (3, decoded[1], decoded[0])


@pytest.mark.parametrize("min_side,budget,decoded", [(150, 128 * 96, (128, 96)), (90, 256 * 192, (128, 96)),
                                                     (150, 256 * 192, (256, 192))])
def test_a_jpeg_with_a_side_and_a_pixel_budget_decodes_at_the_smaller_of_the_two_scales(tmp_path, monkeypatch,
                                                                                       min_side, budget, decoded):
    """min_side and MAX_DECODED_PIXELS each ask for a DCT scale; the smaller image (fewer pixels) wins. For
    512x384, written out: min_side 150 keeps 1/2 (256x192; 1/4's 96 < 150), min_side 90 allows 1/4 (128x96);
    a budget of 128*96 pixels needs 1/4, one of 256*192 needs 1/2. (At these sizes width & height is 0 at both
    scales, so a comparison by anything but the area, e.g. a bitwise and, ties and keeps the first.)"""
    path = tmp_path / "photo.jpg"
    _structured(512, 384, seed=7).save(path, quality=90)
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", budget)
    assert images.load_rgb(path, min_side=min_side).size == decoded
    assert tuple(images.load_pixels(path, min_side=min_side).shape) == (3, decoded[1], decoded[0])


def _textured_jpeg(tmp_path, width, height, name="photo.jpg", **options):
    """A JPEG of a real photo resized to width x height (fine detail everywhere, so the scale shows)."""
    from real_data import photos

    photo = Image.fromarray(photos()[0][1]).resize((width, height), Image.BICUBIC)
    return save(tmp_path, name, photo, quality=90, **options)


# (shorter side, side needed) around each threshold: libjpeg's 1/s decode has ceil(shorter / s) pixels, so
# 1/s covers ``side`` from shorter = s * (side - 1) + 1 on; one pixel less keeps the next finer scale.
SIDE = 20
THRESHOLDS = [(s * (SIDE - 1) + d, s if d else s // 2) for s in (2, 4, 8) for d in (0, 1)]


@pytest.mark.parametrize("shorter,scale", THRESHOLDS)
@pytest.mark.parametrize("aspect", [4 / 3, 1.0, 16 / 9 + 0.013])
def test_reduced_scale_decodes_at_the_coarsest_dct_scale_covering_the_side(tmp_path, shorter, scale, aspect):
    """The decoded shorter side is the smallest of libjpeg's 1/1, 1/2, 1/4, 1/8 sizes that is still >= the side
    asked for, whatever the longer side (a longer side not divisible by the scale once cost a whole scale)."""
    width = round(shorter * aspect)
    assert images.dct_scale(width, shorter, SIDE) == scale
    for w, h in ((width, shorter), (shorter, width)):
        got = images.load_pixels(_textured_jpeg(tmp_path, w, h), min_side=SIDE)
        assert got.shape[-2:] == (-(-h // scale), -(-w // scale))
        assert min(got.shape[-2:]) >= SIDE


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_scale_is_libjpeg_turbos_scaled_decode_then_pils_resize(tmp_path, orientation):
    """Against a reference computed elsewhere: libjpeg-turbo's own scaled decode (simplejpeg, asked for the
    size), turned upright by PIL, resized by PIL's bilinear filter (torchvision's Resize) and centre-cropped:
    the same decoded pixels bit for bit, and the crop within one grey level."""
    import simplejpeg

    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    path = _textured_jpeg(tmp_path, 1640, 1230, exif=exif)
    side = images.draft_side(224)  # 256: 1/4 (410 x 308) covers it, 1/8 (205 x 154) does not
    reference = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB", min_width=410, min_height=308)
    assert reference.shape == (308, 410, 3)
    reference = Image.fromarray(reference)
    if orientation == 6:  # stored turned a quarter anticlockwise: PIL turns it back (ImageOps.exif_transpose)
        reference = reference.transpose(Image.Transpose.ROTATE_270)
    got = images.load_pixels(path, min_side=side)
    assert torch.equal(got, torch.from_numpy(np.array(reference)).permute(2, 0, 1))
    w, h = reference.size
    resized = reference.resize((256, 256 * h // w) if w < h else (256 * w // h, 256), Image.BILINEAR)
    left, top = round((resized.width - 224) / 2), round((resized.height - 224) / 2)
    expected = np.array(resized.crop((left, top, left + 224, top + 224))).astype(int)
    crop = images.eval_pixels(got, 224).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(crop - expected).max() <= 1


def test_without_a_side_a_jpeg_is_pils_full_decode_bit_for_bit(tmp_path):
    """Exact decoding (predict's ``exact=True``): every pixel PIL decodes, at full size."""
    path = _textured_jpeg(tmp_path, 1640, 1230)
    with Image.open(path) as im:
        expected = np.array(im.convert("RGB"))
    got = images.load_pixels(path)
    assert got.shape == (3, 1230, 1640) and np.array_equal(got.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_multi_picture_jpeg_decodes_as_a_jpeg_does(tmp_path, jpeg_decodes, orientation):
    """An MPO file (a JPEG followed by more pictures: what iPhones and many cameras write) is decoded as the JPEG
    it starts with: at the reduced DCT scale (libjpeg-turbo's own scaled decode, simplejpeg asked for the size,
    is the reference) and, exactly, by the fast path with PIL's pixels bit for bit.  It was once decoded whole
    by PIL whatever was asked, three times the CPU of the reduced scale."""
    import simplejpeg

    from real_data import photos

    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    first = Image.open(_textured_jpeg(tmp_path, 1640, 1230)).convert("RGB")
    preview = Image.fromarray(photos()[1][1]).resize((160, 120))
    path = save(tmp_path, "phone.jpg", first, format="MPO", save_all=True, append_images=[preview], quality=90,
                exif=exif)
    with Image.open(path) as im:
        assert im.format == "MPO" and im.n_frames == 2  # the fixture is what a phone writes
        expected = np.array(ImageOps.exif_transpose(im.convert("RGB")))
    reference = Image.fromarray(simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB", min_width=410,
                                                       min_height=308))
    assert reference.size == (410, 308)
    if orientation == 6:
        reference = reference.transpose(Image.Transpose.ROTATE_270)
    jpeg_decodes.clear()
    reduced = images.load_pixels(path, min_side=images.draft_side(224))  # 256: 1/4 covers it, 1/8 does not
    assert torch.equal(reduced, torch.from_numpy(np.array(reference)).permute(2, 0, 1))
    assert images.load_rgb(path, min_side=images.draft_side(224)).size == reference.size
    whole = images.load_pixels(path)
    assert len(jpeg_decodes) == 1 and np.array_equal(whole.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("size, resolution", [((300, 200), 224), ((131, 97), 64)])
def test_eval_transform_module_on_float_pixels_is_torchvisions_float_resize_crop_normalize(size, resolution):
    """A float image in [0, 1] (what ToTensor gives), alone and batched, against torchvision's functional ops on
    the same float tensor: antialiased bilinear resize of the shorter side to R / 0.875, centre crop, Normalize
    with a non-default mean and std.  Both are float arithmetic of one filter: 1e-4 is rounding, while a scale
    off by a grey level moves values by ~1/255 / std > 1e-2."""
    from torchvision.transforms import v2 as T

    odd = ((0.3, 0.6, 0.45), (0.15, 0.35, 0.25))
    x = torch.from_numpy(np.array(_structured(*size, seed=5))).permute(2, 0, 1).float() / 255
    expected = T.functional.normalize(T.functional.center_crop(
        T.functional.resize(x, int(resolution / 0.875), antialias=True), resolution), *odd)
    module = images.EvalTransform(resolution, images.Normalization(*odd))
    # constants, not weights: a model saved with the transform in front loads into one built without it
    assert module.state_dict() == {}
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(module(torch.stack([x, x.flip(-1)]))[1], module(x.flip(-1)), rtol=0, atol=1e-6)


def test_a_strip_is_preprocessed_within_a_gib_though_resized_whole_it_would_take_three(tmp_path):
    """A 1 x 16000 strip resized whole (shorter side to 256) is 256 x 4,096,000 pixels, 3.1 GB of uint8: only the
    crop's box is resized, whether the strip comes as a PIL image or as its uint8 pixels (3, H, W), what the
    decoding workers pass.  Run where the address space can grow by 1 GiB at most, so the whole resize fails."""
    import subprocess
    import sys

    script = (
        "import resource, numpy as np, torch\nfrom PIL import Image\nfrom mobilenets import images\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "rgb = np.random.default_rng(0).integers(0, 255, (16000, 1, 3), dtype=np.uint8)\n"
        "for strip in (Image.fromarray(rgb), Image.fromarray(rgb.transpose(1, 0, 2).copy())):\n"
        "    for image in (strip, images.pixels(strip)):\n"
        "        print(tuple(images.eval_pixels(image, 224).shape))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split("\n")[:4] == ["(3, 224, 224)"] * 4, done.stderr[-2000:]


def test_an_image_over_the_pixel_budget_says_its_size_and_the_budget_in_megapixels(tmp_path):
    path = save(tmp_path, "big.png", Image.new("L", (6000, 6000)))  # 36.0 megapixels; the budget is 2^25
    with pytest.raises(images.ImageSizeError) as raised:
        images.load_pixels(path)
    assert f"{path} is 6000x6000 = 36 megapixels, over the 33.6 megapixels mobilenets decodes" in str(raised.value)
