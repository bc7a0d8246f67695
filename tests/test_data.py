import io
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import carla_mask, png_bytes, write_pair
from unet_core import data

SIZE = (96, 128)


def test_pairs_are_matched_by_file_name(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.png"):
        write_pair(tmp_path, name, rng.integers(0, 255, (48, 64, 3), np.uint8), carla_mask(np.ones((48, 64), np.uint8)))
    (tmp_path / "CameraRGB" / ".hidden.png").write_bytes(b"")
    (tmp_path / "CameraRGB" / "notes.txt").write_text("not an image")
    (tmp_path / "CameraMask" / ".cache").mkdir()  # hidden: left alone
    pairs = data.find_pairs(str(tmp_path))
    assert [p.name for p in pairs] == ["a.png", "b.png"]
    assert pairs[0].mask_path.endswith("CameraMask/a.png")
    # A JPEG image's mask is a PNG of its stem (Pascal VOC's x.jpg / x.png).
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(tmp_path / "CameraRGB" / "c.JPG")
    Image.fromarray(carla_mask(np.full((48, 64), 7, np.uint8))).save(tmp_path / "CameraMask" / "c.png")
    pairs = data.find_pairs(str(tmp_path))
    assert [(p.name, os.path.basename(p.mask_path)) for p in pairs] == [("a.png", "a.png"), ("b.png", "b.png"),
                                                                        ("c.JPG", "c.png")]
    assert data.load_pairs(str(tmp_path), (32, 48), 23)[1][2].max() == 7  # its mask, read through the pair
    (tmp_path / "CameraMask" / "more").mkdir()  # its frames would never pair: refused, not passed over
    with pytest.raises(ValueError, match="CameraMask/more: a folder; CameraRGB and CameraMask hold frames only"):
        data.find_pairs(str(tmp_path))


def test_unpaired_files_are_all_listed(tmp_path):
    ids = carla_mask(np.ones((8, 8), np.uint8))
    image = np.zeros((8, 8, 3), np.uint8)
    write_pair(tmp_path, "ok.png", image, ids)
    Image.fromarray(image).save(tmp_path / "CameraRGB" / "lonely1.png")
    Image.fromarray(image).save(tmp_path / "CameraRGB" / "lonely2.png")
    Image.fromarray(ids).save(tmp_path / "CameraMask" / "orphan.png")
    with pytest.raises(ValueError) as error:
        data.find_pairs(str(tmp_path))
    message = str(error.value)
    assert "3 unpaired" in message
    for name in ("CameraRGB/lonely1.png", "CameraRGB/lonely2.png", "CameraMask/orphan.png"):
        assert name in message
    assert "CameraMask/orphan.png: no image CameraRGB/orphan.png (or the same stem in .jpg/.jpeg)" in message
    for name in ("lonely1.png", "lonely2.png", "orphan.png"):
        os.remove(tmp_path / ("CameraMask" if name == "orphan.png" else "CameraRGB") / name)

    Image.fromarray(image).save(tmp_path / "CameraRGB" / "shot.jpg")  # its mask must be shot.png
    Image.fromarray(ids).save(tmp_path / "CameraMask" / "shot.jpg", format="PNG")  # a PNG under a JPEG's name
    with pytest.raises(ValueError) as error:
        data.find_pairs(str(tmp_path))
    assert "CameraRGB/shot.jpg: no mask CameraMask/shot.png" in str(error.value)
    assert "CameraMask/shot.jpg: no image CameraRGB/shot.jpg (masks are .png files)" in str(error.value)
    os.rename(tmp_path / "CameraMask" / "shot.jpg", tmp_path / "CameraMask" / "shot.png")
    Image.fromarray(image).save(tmp_path / "CameraRGB" / "shot.png")  # two images, one mask
    with pytest.raises(ValueError, match="images that would share one mask .*\n  .*CameraRGB/shot.jpg, .*"
                                         "CameraRGB/shot.png: all paired with CameraMask/shot.png"):
        data.find_pairs(str(tmp_path))


def test_a_png_image_in_capitals_pairs_with_the_mask_of_the_same_name(tmp_path):
    # Extensions match in any case: FRAME.PNG's mask is FRAME.PNG as it stands, never a renamed FRAME.png.
    write_pair(tmp_path, "FRAME.PNG", np.zeros((8, 8, 3), np.uint8), carla_mask(np.ones((8, 8), np.uint8)))
    assert [os.path.basename(pair.mask_path) for pair in data.find_pairs(str(tmp_path))] == ["FRAME.PNG"]
    assert data.mask_name("shot.JPEG") == "shot.png"
    # So a JPEG in capitals never pairs with a mask in capitals, and the hint says so rather than name a .jpg.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "CameraRGB" / "SHOT.JPG")
    Image.fromarray(carla_mask(np.ones((8, 8), np.uint8))).save(tmp_path / "CameraMask" / "SHOT.PNG")
    with pytest.raises(ValueError) as error:
        data.find_pairs(str(tmp_path))
    assert "CameraRGB/SHOT.JPG: no mask CameraMask/SHOT.png" in str(error.value)
    assert ("CameraMask/SHOT.PNG: no image CameraRGB/SHOT.PNG (a JPEG's mask ends in a lower-case .png: "
            "SHOT.JPG pairs with SHOT.png)") in str(error.value)


def test_a_layout_without_any_frame_is_refused_not_read_as_an_empty_dataset(tmp_path):
    # Zero pairs would reach training as an empty set, far from the folder that holds no frame.
    for sub in ("CameraRGB", "CameraMask"):
        (tmp_path / sub).mkdir()
    (tmp_path / "CameraRGB" / "notes.txt").write_text("not a frame")
    with pytest.raises(ValueError, match=f"{tmp_path}: no images found in CameraRGB/ \\(expected .png, .jpg, .jpeg\\)"):
        data.find_pairs(str(tmp_path))


def test_missing_layout_is_named(tmp_path):
    with pytest.raises(ValueError, match="CameraRGB is missing"):
        data.find_pairs(str(tmp_path))


def encoded(image, format="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def smooth_rgb():
    rows, cols = np.mgrid[0:20, 0:30]
    return np.dstack([rows * 12, cols * 8, (rows + cols) * 5]).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_decode_png_any_mode_to_rgb(mode):
    rgb = smooth_rgb()
    if mode == "RGB":
        image, expected = Image.fromarray(rgb), rgb
    elif mode == "RGBA":
        image, expected = Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])), rgb
    elif mode == "L":
        image, expected = Image.fromarray(rgb[..., 0]), np.dstack([rgb[..., 0]] * 3)
    elif mode == "P":
        image = Image.fromarray(rgb).quantize(16)
        expected = np.asarray(image.convert("RGB"))
    else:
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        expected = np.dstack([rgb[..., 0]] * 3)
    assert image.mode == mode
    decoded = data.decode_image(encoded(image), f"frame-{mode}.png")
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)


def test_a_16bit_gray_image_rounds_to_the_nearest_8bit_level():
    # 257 × v is the 16-bit v: 128 and 385 lie just under a half-step, 129 and 386 just over.
    wide = np.array([[0, 128, 129, 385, 386, 65535]], np.uint16)
    assert data.decode_image(png_bytes(wide), "frame.png")[..., 0].tolist() == [[0, 0, 1, 1, 2, 255]]


def test_decode_jpeg_to_rgb():
    rgb = smooth_rgb()
    decoded = data.decode_image(encoded(Image.fromarray(rgb), "JPEG", quality=95), "frame.jpg")
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 4
    # EXIF orientation 6 (shown turned 90°) is not applied, as tf.io.decode_jpeg does not: the stored grid.
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = encoded(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(tagged)).getexif()[0x0112] == 6
    np.testing.assert_array_equal(data.decode_image(tagged, "frame.jpg"), decoded)


def test_mask_class_is_max_over_colour_channels_never_alpha():
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[..., 3] = 255
    mask[0, 0, :3] = (7, 0, 0)
    mask[0, 1, :3] = (3, 9, 2)
    mask[0, 2, :3] = (0, 0, 13)
    ids = data.decode_mask(png_bytes(mask), "mask.png")
    assert ids.shape == (4, 4)
    assert ids[0, :3].tolist() == [7, 9, 13] and ids.max() == 13


def raw_png(width, height, bit_depth, colour_type, rows):
    """A PNG of the given rows' bytes, unfiltered: IHDR, one IDAT, IEND."""
    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    idat = zlib.compress(b"".join(b"\0" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png16(pixels, colour_type):
    """A 16-bit PNG, which Pillow cannot write in colour."""
    return raw_png(pixels.shape[1], pixels.shape[0], 16, colour_type, [row.astype(">u2").tobytes() for row in pixels])


def gray_png(ids, bit_depth):
    """A 1-, 2- or 4-bit gray PNG, which Pillow cannot write: each row's values packed into bytes."""
    per_byte = 8 // bit_depth
    rows = []
    for row in ids:
        padded = np.concatenate([row, np.zeros(-len(row) % per_byte, row.dtype)]).reshape(-1, per_byte)
        shifts = bit_depth * np.arange(per_byte - 1, -1, -1)
        packed = np.bitwise_or.reduce(padded.astype(np.uint8) << shifts.astype(np.uint8), axis=1)
        rows.append(packed.astype(np.uint8).tobytes())
    return raw_png(ids.shape[1], ids.shape[0], bit_depth, 0, rows)


def test_gray_and_16bit_masks_hold_ids_directly():
    ids = np.array([[1, 2], [22, 0]], np.uint8)
    assert data.decode_mask(png_bytes(ids), "m.png").tolist() == ids.tolist()
    assert data.decode_mask(png_bytes(ids.astype(np.uint16)), "m16.png").tolist() == ids.tolist()
    # 16-bit colour too: Pillow would read these ids as 0 (it keeps each value's high byte).
    colour = np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], axis=-1).astype(np.uint16)
    opaque = np.full_like(colour[..., :1], 65535)
    assert data.decode_mask(png16(colour, 2), "m16rgb.png").tolist() == ids.tolist()
    assert data.decode_mask(png16(np.concatenate([colour, opaque], -1), 6), "m16rgba.png").tolist() == ids.tolist()
    with pytest.raises(ValueError, match="m16x257.png: mask has class id 5654 but the model has 23 classes"):
        data.check_class_ids(data.decode_mask(png16(colour * 257, 2), "m16x257.png"), 23, "m16x257.png")
    with pytest.raises(ValueError, match="m16la.png: a 16-bit gray\\+alpha mask, which cannot be read without"):
        data.decode_mask(png16(np.concatenate([colour[..., :1], opaque], -1), 4), "m16la.png")


@pytest.mark.parametrize("bit_depth, colour_type", [(8, 0), (16, 0), (4, 0), (8, 4)],
                         ids=["gray", "gray-16-bit", "gray-4-bit", "gray-alpha"])
def test_a_png_whose_image_stream_ends_rows_early_is_refused_not_read_as_class_0(bit_depth, colour_type):
    # Whole and checksummed, but its compressed rows stop halfway: Pillow read the rest as zeros, without a word.
    row = bytes((bit_depth * (2 if colour_type == 4 else 1) * 6 + 7) // 8 * [0x55])
    whole, short = raw_png(6, 4, bit_depth, colour_type, [row] * 4), raw_png(6, 4, bit_depth, colour_type, [row] * 2)
    assert data.decode_mask(whole, "m.png").shape == data.decode_image(whole, "i.png").shape[:2] == (4, 6)
    with pytest.raises(ValueError, match="^/d/CameraMask/m.png: not a readable PNG/JPEG image \\(.*IDAT stream too"):
        data.decode_mask(short, "/d/CameraMask/m.png")
    with pytest.raises(ValueError, match="^/d/CameraRGB/m.png: not a readable PNG/JPEG image \\(.*IDAT stream too"):
        data.decode_image(short, "/d/CameraRGB/m.png")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_palette_pngs_read_as_pillow_reads_them(bits):
    # Decoded by libspng alone: through Pillow they were decoded twice, once more to be checked.
    rng = np.random.default_rng(bits)
    indices = rng.integers(0, 2**bits, (9, 11), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(rng.integers(0, 256, 3 * 2**bits, dtype=np.uint8).tolist())
    for transparency in ({}, {"transparency": 1}):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", bits=bits, **transparency)
        png = buffer.getvalue()
        assert data._png_header(png) == (bits, data._PALETTE)
        with Image.open(io.BytesIO(png)) as opened:
            pillows = np.asarray(opened.convert("RGB"))
        np.testing.assert_array_equal(data.decode_image(png, "i.png"), pillows)
        assert data.decode_mask(png, "m.png").tolist() == pillows.max(axis=-1).tolist()


def test_8bit_gray_reads_as_pillow_reads_it():
    gray = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    assert data.decode_mask(png_bytes(gray), "m.png").tolist() == gray.tolist()
    pillows = np.asarray(Image.fromarray(gray).convert("RGB"))
    np.testing.assert_array_equal(data.decode_image(png_bytes(gray), "i.png"), pillows)


@pytest.mark.parametrize("bit_depth", [1, 2, 4])
def test_gray_masks_under_8_bits_hold_ids_directly(bit_depth):
    # Pillow stretches these to 0-255 (a 4-bit 1 reads 17): the stored value is the class id.
    ids = np.arange(15, dtype=np.uint8).reshape(3, 5) % (2 ** bit_depth)  # 5 columns: a partly filled last byte
    assert data.decode_mask(gray_png(ids, bit_depth), "mask.png").tolist() == ids.tolist()


def test_a_palette_mask_of_few_colours_holds_the_max_over_its_colours_channels():
    # Pillow writes a 4-colour palette at 2 bits a pixel: a small palette must not be taken for 2-bit gray, and
    # a colour's id is its brightest channel, as for an RGB mask, not its red one nor its luminance.
    palette = Image.new("P", (4, 1))
    palette.putpalette([0, 0, 0, 7, 0, 0, 0, 9, 0, 0, 0, 13])
    palette.putdata([0, 1, 2, 3])
    content = encoded(palette)
    assert data._png_header(content) == (2, 3)  # 2-bit palette
    assert data.decode_mask(content, "mask.png").tolist() == [[0, 7, 9, 13]]


def test_a_gray_and_alpha_mask_holds_its_gray_value_never_its_alpha():
    gray_alpha = np.array([[[1, 255], [2, 128], [22, 0]]], np.uint8)
    assert data.decode_mask(png_bytes(gray_alpha, "LA"), "mask.png").tolist() == [[1, 2, 22]]


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP", "GIF"])
def test_a_mask_in_another_format_than_png_is_refused(image_format):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(buffer, image_format)
    with pytest.raises(ValueError, match=f"mask.png: a {image_format} mask; masks must be PNG"):
        data.decode_mask(buffer.getvalue(), "mask.png")  # whatever its name says


@pytest.mark.parametrize("image_format", ["BMP", "WEBP", "TIFF"])
def test_an_image_is_read_by_its_content_whatever_its_name_says(image_format):
    # Lossless, so the pixels must come back exact: a frame saved in another format under .png is still that frame.
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **({"lossless": True} if image_format == "WEBP" else {}))
    assert data.decode_image(buffer.getvalue(), "frame.png").tolist() == pixels.tolist()


def test_masks_resize_with_nearest_neighbour_only():
    rng = np.random.default_rng(2)
    ids = rng.choice([1, 7, 13], size=(480, 640)).astype(np.uint8)
    small = data.resize_mask(ids, SIZE)
    assert small.shape == SIZE
    # Bilinear would blend 1 and 13 into 7 or invent ids in between; nearest only copies.
    assert set(np.unique(small)) <= {1, 7, 13}
    edge = np.zeros((480, 640), np.uint8)
    edge[:, 320:] = 20
    assert set(np.unique(data.resize_mask(edge, SIZE))) == {0, 20}


@pytest.mark.parametrize("source, size", [((480, 640), SIZE), ((479, 641), SIZE), ((1080, 1920), SIZE),
                                          ((7, 5), (32, 48)), ((100, 37), (64, 16))])
def test_nearest_neighbour_takes_the_pixel_under_each_output_pixels_centre(source, size):
    # Pillow's nearest resize, an implementation of its own, as the yardstick: sampling off the
    # centres (a pixel's top-left corner, say) would shift every label by up to a pixel.
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 256, source).astype(np.uint8)
    rgb = rng.integers(0, 256, (*source, 3)).astype(np.uint8)
    np.testing.assert_array_equal(data.resize_mask(ids, size), Image.fromarray(ids).resize(size[::-1], Image.NEAREST))
    expected_image = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.NEAREST)) / np.float32(255)
    np.testing.assert_array_equal(data.resize_image(rgb, size), expected_image)
    if source == (480, 640):  # 5×5 source blocks: the centre one, (5i + 2, 5j + 2)
        np.testing.assert_array_equal(data.resize_mask(ids, size), ids[2::5, 2::5])


@pytest.mark.parametrize("size", [(480, 640), (479, 641), (1080, 1920), (32, 48), (7, 5)])
def test_resized_mask_counts_equal_counting_the_resized_mask(size):
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 23, (96, 128)).astype(np.uint8)
    resized = data.resize_mask(ids, size)
    assert resized.shape == size
    expected = np.bincount(resized.ravel(), minlength=23)
    np.testing.assert_array_equal(data.resized_mask_counts(ids, size, 23), expected)
    # Exact integer factors keep every block whole: pixel (i, j) becomes a 5×5 block.
    if size == (480, 640):
        np.testing.assert_array_equal(resized[5 * 7 : 5 * 8, 5 * 9 : 5 * 10], ids[7, 9])


def test_images_are_scaled_to_unit_range_once():
    white = np.full((480, 640, 3), 255, np.uint8)
    scaled = data.resize_image(white, SIZE)
    assert scaled.shape == (96, 128, 3) and scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, 1.0)  # the exercise's second /255 would give 0.0039


def test_image_pixels_are_taken_where_the_mask_takes_its_labels():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 23, (480, 640)).astype(np.uint8)
    rgb = np.stack([ids * 10, 255 - ids, ids], axis=-1).astype(np.uint8)  # the colour encodes the id
    image, mask = data.resize_image(rgb, SIZE), data.resize_mask(ids, SIZE)
    np.testing.assert_array_equal(np.round(image[..., 2] * 255).astype(np.uint8), mask)


def test_preprocess_pair_decodes_drops_alpha_and_resizes_both_as_above():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (480, 640, 4), np.uint8)
    ids = rng.integers(0, 23, (480, 640)).astype(np.uint8)
    x, y = data.preprocess_pair(png_bytes(image), png_bytes(carla_mask(ids)), "i.png", "m.png", SIZE, 23)
    assert x.shape == (96, 128, 3) and x.dtype == np.float32 and y.shape == SIZE and y.dtype == np.uint8
    np.testing.assert_array_equal(x, data.resize_image(image[..., :3], SIZE))
    np.testing.assert_array_equal(y, data.resize_mask(ids, SIZE))


def _valid_png():
    return png_bytes(np.zeros((40, 50, 3), np.uint8))


@pytest.mark.parametrize(
    "bad_bytes, reason",
    [
        (_valid_png()[:60], "not a readable"),
        (b"", "empty file"),
        (b"this is a text file, not a picture\n", "not a readable PNG/JPEG image \\(not in any image format"),
    ],
    ids=["truncated", "zero-bytes", "text-named-png"],
)
def test_bad_image_files_are_named(bad_bytes, reason):
    mask = png_bytes(carla_mask(np.ones((40, 50), np.uint8)))
    with pytest.raises(ValueError, match=reason) as error:
        data.preprocess_pair(bad_bytes, mask, "/data/CameraRGB/bad.png", "/data/CameraMask/bad.png", SIZE, 23)
    assert "/data/CameraRGB/bad.png" in str(error.value)


def test_a_png_header_claiming_billions_of_pixels_is_refused_and_named():
    content = bytearray(_valid_png())
    content[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height
    content[29:33] = zlib.crc32(bytes(content[12:29])).to_bytes(4, "big")
    with pytest.raises(ValueError, match="bomb") as error:
        data.decode_image(bytes(content), "/d/CameraRGB/huge.png")
    assert "/d/CameraRGB/huge.png" in str(error.value)


def test_a_mask_over_pillows_warning_limit_reads_as_its_header_says_and_a_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow warns over 100 pixels, refuses over 200
    ids = np.arange(150).reshape(10, 15) % 23
    colour = np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], axis=-1)
    with pytest.warns(Image.DecompressionBombWarning):  # still read through Pillow, whose own warning it is
        assert data.decode_mask(png_bytes(ids.astype(np.uint8)), "m8.png").tolist() == ids.tolist()
        assert data.decode_mask(gray_png(ids % 2, 1), "m1.png").tolist() == (ids % 2).tolist()  # it read 255
    assert data.decode_mask(png16(colour, 2), "m16rgb.png").tolist() == ids.tolist()  # Pillow read 0
    with pytest.raises(ValueError, match="m16la.png: a 16-bit gray\\+alpha mask"):
        data.decode_mask(png16(np.stack([ids, ids], axis=-1), 4), "m16la.png")
    with pytest.raises(ValueError, match="/d/CameraMask/huge.png: .*bomb"):
        data.decode_mask(png16(np.zeros((15, 15, 3), int), 2), "/d/CameraMask/huge.png")


def test_class_id_beyond_the_model_is_named():
    ids = np.ones((40, 50), np.uint8)
    ids[3, 4] = 30
    with pytest.raises(ValueError, match="class id 30 but the model has 23 classes") as error:
        data.preprocess_pair(_valid_png(), png_bytes(carla_mask(ids)), "i.png", "/d/CameraMask/m.png", SIZE, 23)
    assert "/d/CameraMask/m.png" in str(error.value)
    reasons = [str(error.value), "/d/CameraRGB/x.png: empty file (0 bytes)"]
    for highest, n_classes in ((30, 23), (30, 5)):
        ids[5, 6] = highest
        with pytest.raises(ValueError) as other:
            data.check_class_ids(ids, n_classes, "/d/CameraMask/n.png")
        reasons.append(str(other.value))
    assert data.highest_refused_class_id(reasons) == 30
    assert data.highest_refused_class_id(reasons[1:2]) is None


def test_the_hint_names_the_highest_refused_id_among_masks_of_different_ids():
    # The hint's advice is a number of classes: the lowest refused id would leave the other masks refused.
    reasons = ["/d/CameraMask/a.png: mask has class id 25 but the model has 23 classes (ids 0..22); 1 pixel(s)",
               "/d/CameraMask/b.png: mask has class id 40 but the model has 23 classes (ids 0..22); 3 pixel(s)",
               "/d/CameraMask/c.png: mask has class id 31 but the model has 23 classes (ids 0..22); 2 pixel(s)"]
    assert data.highest_refused_class_id(reasons) == 40
    assert data.class_id_hint(reasons, lambda n: f": pass --n-classes {n}") == (
        "\n  the masks hold class ids up to 40: pass --n-classes 41")


def test_the_hint_calls_id_256_beyond_any_model_and_255_a_number_of_classes():
    # A model holds at most 256 classes (ids 0..255): --n-classes 257 would be advice the flag refuses.
    def reason(class_id):
        return f"m.png: mask has class id {class_id} but the model has 23 classes (ids 0..22); 1 pixel(s) out of range"

    assert data.class_id_hint([reason(255)], lambda n: f": pass --n-classes {n}") == (
        "\n  the masks hold class ids up to 255: pass --n-classes 256")
    assert "beyond the 256 classes a model can have" in data.class_id_hint([reason(256)], lambda n: "never asked")


def test_the_class_id_equal_to_the_number_of_classes_is_the_first_refused():
    # Ids run 0..n_classes - 1: id 23 in a 23-class run, let through, would fail the loss in a worker mid-epoch
    # (a NaN loss on a GPU) rather than name its mask before training.
    ids = np.zeros((40, 50), np.uint8)
    ids[3, 4] = 22
    data.preprocess_pair(_valid_png(), png_bytes(carla_mask(ids)), "i.png", "/d/CameraMask/m.png", SIZE, 23)
    ids[5, 6] = 23
    with pytest.raises(ValueError, match="/d/CameraMask/m.png: mask has class id 23 but the model has 23 classes "
                                         "\\(ids 0..22\\); 1 pixel\\(s\\) out of range"):
        data.preprocess_pair(_valid_png(), png_bytes(carla_mask(ids)), "i.png", "/d/CameraMask/m.png", SIZE, 23)


def test_class_id_past_8_bits_is_refused_whatever_n_classes():
    # resize_mask holds ids as uint8: with n_classes 400, a 16-bit id 300 trained as class 44.
    ids = np.full((40, 50), 300, np.uint16)
    with pytest.raises(ValueError, match="/d/CameraMask/m.png: mask has class id 300, beyond the 256 classes"):
        data.preprocess_pair(_valid_png(), png_bytes(ids), "i.png", "/d/CameraMask/m.png", SIZE, 400)


@pytest.mark.timeout(60)
def test_load_pairs_names_a_named_pipe_and_a_link_whose_target_is_gone(tmp_path):
    # The pipe's read waited for a writer forever; the link ended in FileNotFoundError, not a ValueError.
    write_pair(tmp_path, "a.png", np.zeros((8, 8, 3), np.uint8), carla_mask(np.ones((8, 8), np.uint8)))
    mask = tmp_path / "CameraMask" / "a.png"
    for name, make in (("pipe.png", os.mkfifo), ("gone.png", lambda path: os.symlink(tmp_path / "nowhere", path))):
        make(tmp_path / "CameraRGB" / name)
        (tmp_path / "CameraMask" / name).write_bytes(mask.read_bytes())
        message = "not a regular file" if name == "pipe.png" else "cannot be read \\(No such file"
        with pytest.raises(ValueError, match=f"CameraRGB/{name}: {message}"):
            data.load_pairs(str(tmp_path), SIZE, 23)
        (tmp_path / "CameraRGB" / name).unlink()
        (tmp_path / "CameraMask" / name).unlink()


def test_load_pairs_names_a_file_name_that_is_not_utf8(tmp_path):
    # find_pairs paired it, and the hash split ended in UnicodeEncodeError on its name.
    write_pair(tmp_path, "a.png", np.zeros((8, 8, 3), np.uint8), carla_mask(np.ones((8, 8), np.uint8)))
    for sub in ("CameraRGB", "CameraMask"):
        os.link(tmp_path / sub / "a.png", os.path.join(os.fsencode(tmp_path / sub), b"x\xff.png"))
    with pytest.raises(ValueError, match="CameraRGB/x\\\\xff.png: a file name that is not valid UTF-8; rename it$"):
        data.load_pairs(str(tmp_path), SIZE, 23)


def test_image_mask_size_mismatch_is_named():
    mask = png_bytes(carla_mask(np.ones((41, 50), np.uint8)))
    with pytest.raises(ValueError, match="50×40 but its mask") as error:
        data.preprocess_pair(_valid_png(), mask, "/d/CameraRGB/x.png", "/d/CameraMask/x.png", SIZE, 23)
    assert "/d/CameraRGB/x.png" in str(error.value) and "/d/CameraMask/x.png" in str(error.value)


def test_an_image_and_mask_of_the_same_height_but_another_width_are_refused():
    # Resized to the model's size, a mask narrower than its image would silently label the wrong pixels.
    mask = png_bytes(carla_mask(np.ones((40, 49), np.uint8)))
    with pytest.raises(ValueError, match="x.png: image is 50×40 but its mask /d/CameraMask/x.png is 49×40"):
        data.preprocess_pair(_valid_png(), mask, "/d/CameraRGB/x.png", "/d/CameraMask/x.png", SIZE, 23)


def test_image_without_mask_is_named(tmp_path):
    write_pair(tmp_path, "a.png", np.zeros((8, 8, 3), np.uint8), carla_mask(np.ones((8, 8), np.uint8)))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "CameraRGB" / "solo.png")
    with pytest.raises(ValueError, match="solo.png: no mask"):
        data.load_pairs(str(tmp_path), SIZE, 23)


def test_real_carla_frames_load(real_carla):
    images, masks, names = data.load_pairs(str(real_carla), SIZE, 23)
    assert images.shape == (106, 96, 128, 3) and masks.shape == (106, 96, 128)
    assert names == sorted(names) and names[0] == "000026.png"
    assert 0.9 < images.max() <= 1.0
    assert set(np.unique(masks)) <= set(range(1, 23))  # the README: ids 1..22, never 0
    road_share = (masks == 7).mean()
    assert 0.35 < road_share < 0.55  # README: road is 44% of pixels


def test_fast_png_path_gives_pillows_pixels(real_carla):
    """8-bit RGB(A) PNGs skip Pillow for libspng; both must see the same pixels."""
    for name in ("000026.png", "064407.png"):
        for folder in ("CameraRGB", "CameraMask"):
            content = (real_carla / folder / name).read_bytes()
            assert data._png_header(content) == (8, 6)  # 8-bit RGBA
            with_pillow = np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))
            np.testing.assert_array_equal(data.decode_image(content, name), with_pillow)
            if folder == "CameraMask":
                np.testing.assert_array_equal(data.decode_mask(content, name), with_pillow.max(axis=-1))


def test_tail_split_validates_the_last_frames_by_sorted_name_whatever_the_order():
    names = [f"{index:06d}.png" for index in (7, 3, 9, 1, 5, 2, 8, 0, 6, 4)]
    flags = data.validation_flags(names, 0.2, "tail")
    assert sorted(name for name, flag in zip(names, flags) if flag) == ["000008.png", "000009.png"]
    assert sum(data.validation_flags(names[:3], 0.01, "tail")) == 1  # never an empty validation set
    with pytest.raises(ValueError, match="split must be one of"):
        data.validation_flags(names, 0.2, "random")


def test_tail_split_rounds_the_validation_count_to_the_nearest_frame():
    # 40% of 4 frames is 1.6: two validate, not one.
    names = ["a.png", "b.png", "c.png", "d.png"]
    assert data.validation_flags(names, 0.4, "tail") == [False, False, True, True]


def test_hash_split_is_stable_and_near_the_fraction():
    names = [f"{index:06d}.png" for index in range(2000)]
    flags = data.validation_flags(names, 0.2, "hash")
    assert flags == data.validation_flags(list(reversed(names)), 0.2, "hash")[::-1]
    assert 0.17 < sum(flags) / len(names) < 0.23


def test_hash_split_sides_are_the_same_in_every_version():
    # A frame's side is part of a run's identity: a resumed run, or a run compared with an older one, must hold out
    # the same frames. Pinned at the threshold of 0.2 (buckets below 2,000 of 10,000 validate): 011011.png falls in
    # bucket 1,999, 004082.png in bucket 2,000.
    assert data.validation_flags(["011011.png", "004082.png"], 0.2, "hash") == [True, False]
    assert not any(data.validation_flags(["011011.png", "004082.png"], 0.0, "hash"))


def test_tail_split_of_the_real_frames_is_the_stretch_results_md_scores(real_carla):
    names = sorted(path.name for path in (real_carla / "CameraRGB").iterdir())
    held_out = [name for name, flag in zip(names, data.validation_flags(names, 0.2, "tail")) if flag]
    assert len(names) == 106 and len(held_out) == 21 and held_out == names[-21:]
    assert held_out[0] == "018084.png"
