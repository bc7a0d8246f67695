"""Reading CARLA-layout frames: pairing, decoding and preprocessing, written once.

Training, evaluation and batch inference all call these functions, so a frame becomes the same
tensor everywhere. Everything works on bytes + a path (for error messages), which lets the Ray
ingest read from any filesystem and hand the bytes here.
"""

import io
import os
import re
import stat
import zlib
from dataclasses import dataclass

import numpy as np
import pyspng
from PIL import Image, UnidentifiedImageError

IMAGE_DIR = "CameraRGB"
MASK_DIR = "CameraMask"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Pillow's modes for 16- and 32-bit single-channel images.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class Pair:
    """One training frame: the camera image and its mask, matched by file name (`mask_name`)."""

    name: str
    image_path: str
    mask_path: str


def has_image_extension(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_image_name(name):
    return has_image_extension(name) and not name.startswith(".")


def frame_names(entries, directory):
    """(names of the PNG/JPEG frames, names of the other files) among the (name, is_folder)
    entries of one CARLA-layout folder. A hidden PNG/JPEG (macOS's `._` copies, say) is among the
    others, to be named; other hidden files and folders are left out. A subfolder is refused
    rather than passed over: its frames would silently not train."""
    names, others = [], []
    for name, is_folder in entries:
        if name.startswith("."):
            if not is_folder and has_image_extension(name):
                others.append(name)
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # os.scandir keeps undecodable bytes as surrogates: the hash split fails on them
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ValueError(f"{directory}/{shown}: a file name that is not valid UTF-8; rename it") from None
        if is_folder:
            raise ValueError(f"{directory}/{name}: a folder; {IMAGE_DIR} and {MASK_DIR} hold frames only (move its "
                             f"files up, or pass it as a CARLA-layout directory of its own)")
        (names if is_image_name(name) else others).append(name)
    return names, sorted(others)


def mask_name(image_name):
    """The file name of an image's mask: the same for a PNG (CARLA), the stem with .png for a JPEG
    (x.jpg → x.png, as in Pascal VOC), since masks are PNG."""
    stem, extension = os.path.splitext(image_name)
    return image_name if extension.lower() == ".png" else stem + ".png"


def pair_names(image_names, mask_names, root="."):
    """The image names, each with its mask (`mask_name`); raises one ValueError listing every
    unpaired file, or every two images that would share a mask (x.png and x.jpg)."""
    by_mask = {}
    for name in sorted(image_names):
        by_mask.setdefault(mask_name(name), []).append(name)
    shared = [f"  {', '.join(os.path.join(root, IMAGE_DIR, n) for n in names)}: all paired with {MASK_DIR}/{mask}"
              for mask, names in sorted(by_mask.items()) if len(names) > 1]
    if shared:
        raise ValueError("\n".join([f"{root}: images that would share one mask (rename all but one)", *shared]))
    masks = set(mask_names)
    missing_masks = [names[0] for mask, names in sorted(by_mask.items()) if mask not in masks]
    missing_images = sorted(masks - set(by_mask))
    if missing_masks or missing_images:
        lines = [f"{root}: {len(missing_masks) + len(missing_images)} unpaired file(s)"]
        lines += [f"  {os.path.join(root, IMAGE_DIR, n)}: no mask {MASK_DIR}/{mask_name(n)}" for n in missing_masks]
        lines += [f"  {os.path.join(root, MASK_DIR, n)}: no image {IMAGE_DIR}/{n}{_image_hint(n)}"
                  for n in missing_images]
        raise ValueError("\n".join(lines))
    if not by_mask:
        raise ValueError(f"{root}: no images found in {IMAGE_DIR}/ (expected {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(name for names in by_mask.values() for name in names)


def _image_hint(mask):
    """What else the image of an unpaired mask could be named (see `mask_name`)."""
    stem, extension = os.path.splitext(mask)
    if extension == ".png":
        return " (or the same stem in .jpg/.jpeg)"
    if extension.lower() == ".png":  # x.JPG's mask is x.png: a JPEG never pairs with this one
        return f" (a JPEG's mask ends in a lower-case .png: {stem}.JPG pairs with {stem}.png)"
    return " (masks are .png files)"


def find_pairs(root):
    """Pairs of a local CARLA-layout directory `root/CameraRGB`, `root/CameraMask`."""
    listing = {}
    for sub in (IMAGE_DIR, MASK_DIR):
        directory = os.path.join(root, sub)
        if not os.path.isdir(directory):
            raise ValueError(f"{root}: not a CARLA-layout directory, {directory} is missing")
        with os.scandir(directory) as entries:
            listing[sub], _ = frame_names(((entry.name, entry.is_dir()) for entry in entries), directory)
    names = pair_names(listing[IMAGE_DIR], listing[MASK_DIR], root)
    return [Pair(n, os.path.join(root, IMAGE_DIR, n), os.path.join(root, MASK_DIR, mask_name(n))) for n in names]


def _open(data, path):
    if not data:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a readable PNG/JPEG image (not in any image format Pillow knows)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: not a readable PNG/JPEG image ({error})") from None
    if image.format == "PNG":
        # Pillow fills the rows a whole but short image stream leaves out with zeros (class 0, black),
        # without a word; libspng refuses such a file. Only the rarest PNGs (1/2/4/16-bit gray, gray+alpha)
        # come this way and are decoded twice (see `_decode_png`).
        _decode_png(data, path, "RGBA")
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# PNG colour types of the IHDR chunk.
_GRAY, _RGB, _PALETTE, _GRAY_ALPHA, _RGBA = 0, 2, 3, 4, 6


def _png_header(data):
    """(bit depth, colour type) per the IHDR chunk a PNG must start with; None for any other
    image, and for a decompression bomb, left to Pillow, which refuses it and names the file."""
    if not (len(data) > 25 and data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR"):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    # Pillow refuses over twice its limit and reads what lies under that, warning: such a mask
    # must still read as its header says (Pillow read 16-bit ids as 0).
    within_limit = Image.MAX_IMAGE_PIXELS is None or width * height <= 2 * Image.MAX_IMAGE_PIXELS
    return (data[24], data[25]) if within_limit else None


def _decode_png(data, path, output_format="RGB"):
    # libspng decodes 8-bit colour PNGs in about 3/4 of Pillow's time (BENCHMARKS.md), to the same
    # pixels; decoding is most of the CPU work of batch inference besides the model. 8-bit gray and
    # palette ones to Pillow's pixels too, in its time, where Pillow's would need libspng's check besides
    # (`_open`).
    try:
        return pyspng.load(data, output_format)
    except RuntimeError as error:
        raise ValueError(f"{path}: not a readable PNG/JPEG image ({error})") from None


def decode_image(data, path):
    """Encoded bytes → uint8 RGB array (H, W, 3), from any common mode (RGB, RGBA, L, P, 16-bit)."""
    header = _png_header(data)
    if header in ((8, _RGB), (8, _RGBA)) or (header and header[1] == _PALETTE):  # every CARLA frame
        return _decode_png(data, path)
    if header == (8, _GRAY):
        return np.repeat(_decode_png(data, path, None)[..., None], 3, axis=-1)
    image = _open(data, path)
    if image.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def decode_mask(data, path):
    """Encoded bytes → class ids (H, W): the max over the colour channels, never alpha.

    Masks must be PNG: a lossy format changes class ids along every edge. 16-bit masks keep their
    full values: Pillow keeps only the high byte of 16-bit colour, so those go through libspng's
    16-bit output; 16-bit gray+alpha, which neither reads whole, is refused.
    """
    header = _png_header(data)
    if header in ((8, _RGB), (8, _RGBA)) or (header and header[1] == _PALETTE):
        return _decode_png(data, path).max(axis=-1).astype(np.int64)
    if header == (8, _GRAY):  # the masks of many datasets besides CARLA
        return _decode_png(data, path, None).astype(np.int64)
    if header in ((16, _RGB), (16, _RGBA)):
        return _decode_png(data, path, None)[..., :3].max(axis=-1).astype(np.int64)
    if header == (16, _GRAY_ALPHA):
        raise ValueError(f"{path}: a 16-bit gray+alpha mask, which cannot be read without losing its low byte; "
                         f"save it as 16-bit gray (no alpha), 16-bit RGB or 8-bit")
    image = _open(data, path)
    if image.format != "PNG":
        raise ValueError(f"{path}: a {image.format} mask; masks must be PNG, as lossy compression changes class "
                         f"ids along every edge")
    if header is not None and header[0] < 8 and header[1] == _GRAY:
        # Pillow stretches 1-, 2- and 4-bit gray to 0-255; the class id is the value stored.
        return np.asarray(image.convert("L")).astype(np.int64) // (255 // (2 ** header[0] - 1))
    if image.mode in _WIDE_GRAY_MODES or image.mode == "L":
        return np.asarray(image).astype(np.int64)
    if image.mode == "LA":
        return np.asarray(image)[..., 0].astype(np.int64)
    return np.asarray(image.convert("RGB")).max(axis=-1).astype(np.int64)


def resize_image(rgb, size):
    """uint8 RGB → float32 in [0, 1] at `size` (height, width). Scaled by 255 exactly once.

    Nearest neighbour, at the very source pixels `resize_mask` takes its labels from: each input
    pixel then shows what its label names. An antialiased filter blurs a pole or a road line into
    its neighbours' label; on the real frames, sampling like the mask scored 0.890 / 0.262 against
    0.883 / 0.251 (same seed, RESULTS.md).
    """
    return sample_nearest(rgb, size).astype(np.float32) / 255.0


def nearest_indices(length, new_length):
    """The source index behind each of `new_length` positions, pixel centres aligned: the map of
    a nearest-neighbour resize along one axis."""
    return np.minimum(((np.arange(new_length) + 0.5) * (length / new_length)).astype(np.int64), length - 1)


def sample_nearest(array, size):
    """`array` (H, W, ...) at `size` (height, width) by nearest neighbour: images and masks alike."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    rows = np.take(array, nearest_indices(array.shape[0], height), axis=0)
    return np.take(rows, nearest_indices(array.shape[1], width), axis=1)


def resize_mask(class_ids, size):
    """Class ids → uint8 ids at `size` (height, width), nearest neighbour so no id is invented."""
    return sample_nearest(np.asarray(class_ids, dtype=np.uint8), size)


def resized_mask_counts(class_ids, size, n_classes):
    """Pixels per class of `resize_mask(class_ids, size)`, counted on the small mask: each of its
    pixels stands for (output rows it fills) × (output columns it fills). Counting a 640×480 mask
    itself costs about 10 times as much."""
    height, width = np.shape(class_ids)
    rows = np.bincount(nearest_indices(height, size[0]), minlength=height)
    columns = np.bincount(nearest_indices(width, size[1]), minlength=width)
    counts = np.bincount(np.ravel(class_ids), weights=np.outer(rows, columns).ravel(), minlength=n_classes)
    return counts.round().astype(np.int64)


def check_class_ids(class_ids, n_classes, path):
    highest = int(class_ids.max()) if class_ids.size else 0
    if highest >= n_classes:
        count = int((class_ids >= n_classes).sum())
        raise ValueError(
            f"{path}: mask has class id {highest} but the model has {n_classes} classes "
            f"(ids 0..{n_classes - 1}); {count} pixel(s) out of range"
        )
    if highest >= MAX_CLASSES:  # resize_mask holds ids in 8 bits: 300 would become 44, silently
        count = int((class_ids >= MAX_CLASSES).sum())
        raise ValueError(f"{path}: mask has class id {highest}, beyond the {MAX_CLASSES} classes an 8-bit mask holds "
                         f"(ids 0..{MAX_CLASSES - 1}); {count} pixel(s) out of range")


CLASS_ID_REFUSED = re.compile(r": mask has class id (\d+) but the model has \d+ classes")


def highest_refused_class_id(reasons):
    """The highest class id `check_class_ids` refused among these failure reasons, or None: when
    every mask fails, the likelier fix is the number of classes, not the masks."""
    found = [int(match.group(1)) for match in map(CLASS_ID_REFUSED.search, reasons) if match]
    return max(found, default=None)


MAX_CLASSES = 256  # class ids are held as 8 bits, in masks and in a model's settings


def class_id_hint(reasons, with_classes):
    """The line that ends an error of unreadable frames whose masks held class ids beyond the model's
    (`with_classes(n)`: how to have a model of n classes), or "". Ids a model cannot have are said so:
    "pass --n-classes 22008" (16-bit instance ids, say) was advice the flag then refused."""
    highest = highest_refused_class_id(reasons)
    if highest is None:
        return ""
    if highest >= MAX_CLASSES:
        return (f"\n  the masks hold ids up to {highest}, beyond the {MAX_CLASSES} classes a model can have: "
                f"no class ids (instance ids, say); save masks of class ids below {MAX_CLASSES}")
    return f"\n  the masks hold class ids up to {highest}{with_classes(highest + 1)}"


def preprocess_image(data, path, size):
    """Encoded image bytes → (model input float32 (H, W, 3), source (height, width))."""
    rgb = decode_image(data, path)
    return resize_image(rgb, size), rgb.shape[:2]


def preprocess_pair(image_data, mask_data, image_path, mask_path, size, n_classes):
    """Encoded image + mask bytes → (float32 image (H, W, 3) in [0, 1], uint8 mask (H, W))."""
    rgb = decode_image(image_data, image_path)
    class_ids = decode_mask(mask_data, mask_path)
    if rgb.shape[:2] != class_ids.shape:
        raise ValueError(
            f"{image_path}: image is {rgb.shape[1]}×{rgb.shape[0]} but its mask {mask_path} is "
            f"{class_ids.shape[1]}×{class_ids.shape[0]} (width×height); they must match"
        )
    check_class_ids(class_ids, n_classes, mask_path)
    return resize_image(rgb, size), resize_mask(class_ids, size)


def refuse_irregular_file(path):
    """A ValueError for a local path that is no regular file. Opening a named pipe waits for a
    writer: the read, and the job with it, would never end. A path that cannot be stat'ed (a link
    whose target is gone) is left for opening it to name."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file (a named pipe, socket or device), so not a frame")


def read_bytes(path):
    """A local file's bytes; a ValueError naming it when it cannot be a frame's."""
    refuse_irregular_file(path)
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:  # a link whose target is gone, say
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None


def load_pairs(root, size, n_classes):
    """A whole local CARLA-layout directory in memory: (images, masks, names). For small sets."""
    pairs = find_pairs(root)
    images = np.empty((len(pairs), *size, 3), np.float32)
    masks = np.empty((len(pairs), *size), np.uint8)
    for index, pair in enumerate(pairs):
        images[index], masks[index] = preprocess_pair(
            read_bytes(pair.image_path), read_bytes(pair.mask_path),
            pair.image_path, pair.mask_path, size, n_classes,
        )
    return images, masks, [pair.name for pair in pairs]


def is_validation_name(name, val_fraction):
    """A stable split by file name: the same frame lands on the same side in every run."""
    bucket = zlib.crc32(name.encode("utf-8")) % 10_000
    return bucket < round(val_fraction * 10_000)


SPLITS = ("hash", "tail")


def validation_flags(names, val_fraction, split):
    """Which frames validate. `hash`: a stable pseudo-random pick by name. `tail`: the last
    fraction by sorted name, for sequences whose neighbouring frames look alike, where a random
    pick would put near-copies of training frames into validation and flatter the score."""
    if split == "hash":
        return [is_validation_name(name, val_fraction) for name in names]
    if split == "tail":
        ordered = sorted(names)
        first_val = ordered[len(ordered) - max(1, round(val_fraction * len(ordered)))]
        return [name >= first_val for name in names]
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
