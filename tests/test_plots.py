import tracemalloc
import warnings

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from unet_core import plots
from unet_core.classes import N_CLASSES, PALETTE
from unet_core.plots import colorize, overlay, save_confusion_matrix, save_curves, save_previews


def _frames(n=2, height=24, width=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, height, width, 3), dtype=np.float32)
    masks = np.zeros((n, height, width), dtype=np.int64)
    masks[:, height // 2:] = 7  # road
    masks[:, :, : width // 4] = 10  # vehicle
    return images, masks


def _assert_real_png(path, min_side=100):
    assert path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert min(png.size) >= min_side
        pixels = np.asarray(png.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, "figure looks blank"
    return pixels


def test_colorize_maps_ids_to_palette_and_keeps_shape():
    mask = np.arange(N_CLASSES).reshape(1, N_CLASSES)
    rgb = colorize(mask)
    assert rgb.shape == (1, N_CLASSES, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], PALETTE)
    # Channel axis and batch axis are handled like the plain (H, W) mask.
    np.testing.assert_array_equal(colorize(mask[..., None]), rgb)
    batch = np.stack([mask, mask[:, ::-1]])[..., None]
    assert colorize(batch).shape == (2, 1, N_CLASSES, 3)
    np.testing.assert_array_equal(colorize(batch)[1, 0], PALETTE[::-1])
    # Integer-valued floats (e.g. from a tensor cast) are accepted.
    np.testing.assert_array_equal(colorize(mask.astype(np.float32)), rgb)


def test_colorize_gives_ids_past_palette_a_stable_colour():
    mask = np.array([[N_CLASSES, N_CLASSES + 1, 300]])
    colours = colorize(mask)
    assert len({tuple(c) for c in colours[0]}) == 3
    # The same id, the same colour, wherever it appears and whatever else the mask holds.
    np.testing.assert_array_equal(colorize(np.array([[300]]))[0, 0], colours[0, 2])
    np.testing.assert_array_equal(colorize(np.array([[0, 300, 5]]))[0, 1], colours[0, 2])


def test_the_first_id_past_the_palette_gets_its_own_colour_not_the_last_classs():
    # Id 23 sharing terrain's colour (id 22) would make a 24-class model's previews mix two classes up.
    # Its colour is 23 × (97, 57, 193) mod 256.
    assert colorize(np.array([[N_CLASSES - 1, N_CLASSES]])).tolist() == [[list(PALETTE[-1]), [183, 31, 87]]]


def test_colorize_rejects_bad_input():
    with pytest.raises(ValueError, match="argmax"):
        colorize(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="negative"):
        colorize(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="shape"):
        colorize(np.array([1, 2, 3]))


def test_overlay_shape_dtype_and_alpha_extremes():
    images, masks = _frames(n=1)
    image = (images[0] * 255).astype(np.uint8)
    blended = overlay(image, masks[0][..., None])
    assert blended.shape == image.shape and blended.dtype == np.uint8
    assert not np.array_equal(blended, image)
    np.testing.assert_array_equal(overlay(image, masks[0], alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, masks[0], alpha=1.0), colorize(masks[0]))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, masks[0], alpha=1.5)
    with pytest.raises(ValueError):
        overlay(image, masks[0][:-1])


def test_overlay_clips_float_images_outside_the_unit_range_rather_than_wrapping():
    # Augmented images overshoot [0, 1]: 1.2 would wrap to 50 in uint8, and -0.1 to 230.
    image = np.array([[[1.2, -0.1, 0.5]]], np.float32)
    assert overlay(image, np.zeros((1, 1), np.int64), alpha=0.0).tolist() == [[[255, 0, 128]]]


def test_overlay_of_a_large_frame_takes_little_memory_beside_its_result():
    # jobs.infer blends each frame at its own size: 62 bytes a pixel at once were 7 GB for 120 megapixels.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2000, 1200, 3), dtype=np.uint8)
    mask = rng.integers(0, 40, (2000, 1200), dtype=np.uint8)  # past the palette too
    tracemalloc.start()
    try:
        blended = overlay(image, mask, alpha=0.3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * image.size  # the result (1 byte a value) and one band of rows
    np.testing.assert_array_equal(blended, np.round(0.7 * image + 0.3 * colorize(mask)).astype(np.uint8))


def test_save_curves_with_missing_keys(tmp_path):
    history = [
        {"epoch": 1, "loss": 1.2, "pixel_accuracy": 0.5},
        {"epoch": 2, "loss": 0.9, "val_loss": 1.0, "pixel_accuracy": 0.6, "val_pixel_accuracy": 0.55},
        {"epoch": 3, "loss": 0.7, "val_loss": 0.8, "val_mean_iou": 0.3},
    ]
    path = save_curves(history, tmp_path / "nested" / "curves.png")
    pixels = _assert_real_png(path)
    # The loss and accuracy panels are the figure's left and right halves. A metric and its val_
    # twin share the cycle's first colour; val_mean_iou, with no twin, takes the second.
    loss_panel, accuracy_panel = np.array_split(pixels, 2, axis=1)
    first, second = (np.round(np.array(to_rgb(name)) * 255).astype(np.uint8) for name in ("C0", "C1"))
    loss_rows, loss_columns = np.nonzero((loss_panel == first).all(axis=-1))
    # A legend's line samples are a few dozen pixels wide; the loss curve runs from epoch 1 to 3,
    # across most of the panel, and falls: it starts higher up than it ends.
    assert loss_columns.size and np.ptp(loss_columns) > 0.6 * loss_panel.shape[1], "no loss curve drawn"
    left_end, right_end = loss_columns <= loss_columns.min() + 5, loss_columns >= loss_columns.max() - 5
    assert loss_rows[left_end].mean() < loss_rows[right_end].mean(), "the loss curve does not fall"
    accuracy_columns = np.nonzero((accuracy_panel == first).all(axis=-1))[1]
    assert accuracy_columns.size and np.ptp(accuracy_columns) > 0.25 * accuracy_panel.shape[1], "no accuracy curve"
    assert (accuracy_panel == second).all(axis=-1).any(), "val_mean_iou not drawn"
    assert not (loss_panel == second).all(axis=-1).any(), "val_loss drawn in another colour than loss"


def test_save_curves_with_no_metrics_still_writes_a_figure(tmp_path):
    _assert_real_png(save_curves([{"epoch": 1}], tmp_path / "empty.png"))


def _class_shares(pixels, class_ids):
    """Each class's share of the pixels drawn in any of `class_ids`' palette colours."""
    counts = np.array([(pixels == PALETTE[class_id]).all(axis=-1).sum() for class_id in class_ids])
    return counts / counts.sum()


def test_save_previews_with_true_masks(tmp_path):
    images, masks = _frames(n=3)
    masks[:, :, 8:12] = 4  # pedestrian, only in the truth
    predicted = masks.copy()
    predicted[:, :4] = 13  # sky, only predicted
    predicted[:, :, 8:12] = 7  # the pedestrian taken for road
    path = tmp_path / "previews.png"
    pixels = _assert_real_png(save_previews(images, masks[..., None], predicted, path, titles=["a", "b", "c"]))
    # Three frames stacked vertically: the figure is taller than for a single frame.
    single = _assert_real_png(save_previews(images[:1], masks[:1], predicted[:1], tmp_path / "one.png"))
    assert pixels.shape[0] > single.shape[0]
    # Every class present is drawn in its palette colour somewhere in the figure.
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    for class_id in (4, 7, 10, 13):
        assert tuple(PALETTE[class_id]) in colours
    # The legend draws one small patch of every class present, so colours found anywhere prove
    # little: in the true and the predicted column (the figure's middle and right thirds), the
    # classes must cover the shares of the image their masks give them. Unlabeled (black) is
    # left out, as text is black too.
    shown = [4, 7, 10, 13]
    _, true_column, predicted_column = np.array_split(pixels, 3, axis=1)
    for column, class_ids in ((true_column, masks), (predicted_column, predicted)):
        counts = np.array([(class_ids == class_id).sum() for class_id in shown])
        np.testing.assert_allclose(_class_shares(column, shown), counts / counts.sum(), atol=0.02)


def test_frame_names_with_dollar_signs_are_drawn_not_parsed_as_maths(tmp_path):
    images, masks = _frames(n=3)
    names = ["z$^$.png", "a$_$.png", "x$\\frac$.png"]  # each fails matplotlib's maths parser
    _assert_real_png(save_previews(images, masks, masks, tmp_path / "previews.png", titles=names))


def test_save_previews_rejects_mismatched_inputs(tmp_path):
    images, masks = _frames(n=3)
    with pytest.raises(ValueError, match="matching images"):
        save_previews(images, masks[:2], masks, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="matching images"):
        save_previews(images, masks, masks[:, :-1], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="titles"):
        save_previews(images, masks, masks, tmp_path / "bad.png", titles=["only one"])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        save_previews(images[..., 0], masks, masks, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_save_confusion_matrix_with_empty_row_raises_no_warnings(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    confusion = rng.integers(0, 1000, size=(N_CLASSES, N_CLASSES))
    confusion[3] = 0  # a class with no true pixels in the evaluation set
    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = save_confusion_matrix(confusion, tmp_path / "confusion.png")
    _assert_real_png(path, min_side=300)
    # A real PNG without warnings holds for any normalisation: the heatmap must draw each true
    # class's row as fractions of its own pixels, and the empty row blank, not as zeros.
    drawn = figures[0].axes[0].images[0].get_array()
    others = np.arange(N_CLASSES) != 3
    assert np.ma.getmaskarray(drawn)[3].all() and not np.ma.getmaskarray(drawn)[others].any()
    np.testing.assert_allclose(drawn.data[others], (confusion / confusion.sum(axis=1, keepdims=True).clip(1))[others])


def test_a_confusion_matrix_of_many_classes_is_drawn_at_a_bounded_size(tmp_path, monkeypatch):
    # At 256 classes, a name per row and a figure per cell took 43 s and 4 GB, at the end of a whole evaluation.
    from unet_core.classes import class_names

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    confusion = np.eye(256, dtype=np.int64) * 1000 + 1
    path = save_confusion_matrix(confusion, tmp_path / "confusion.png", class_names(256))
    with Image.open(path) as image:
        assert max(image.size) <= 100 * (0.4 * plots.MAX_LABELLED_CLASSES + 3)
    drawn = figures[0].axes[0]
    assert drawn.images[0].get_array().shape == (256, 256) and not drawn.texts
    bound = plots.MAX_LABELLED_CLASSES  # up to it, every class named
    save_confusion_matrix(np.eye(bound), tmp_path / "bound.png", class_names(bound))
    assert [label.get_text() for label in figures[-1].axes[0].get_xticklabels()] == class_names(bound)
    save_confusion_matrix(np.eye(bound + 1), tmp_path / "past.png", class_names(bound + 1))
    assert not figures[-1].axes[0].texts


def test_save_confusion_matrix_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="square"):
        save_confusion_matrix(np.zeros((3, 4)), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="class names"):
        save_confusion_matrix(np.eye(3), tmp_path / "bad.png")
