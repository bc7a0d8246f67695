"""Figures for runs and predictions: coloured masks, learning curves, previews, confusion matrices.

Only numpy and matplotlib's object API (``Figure``) are used, never pyplot: these functions run
inside Ray workers, where pyplot's global figure registry and GUI-backend selection would leak
memory and state between calls. ``Figure.savefig`` renders PNGs with Agg on its own.
"""

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from unet_core.classes import CLASS_NAMES, PALETTE

# Multipliers co-prime with 256, so ids past the palette get distinct, stable colours.
_FALLBACK_MIX = np.array([97, 57, 193], dtype=np.int64)


def _class_ids(mask):
    mask = np.asarray(mask)
    # Keras-style masks carry a trailing channel axis; drop it so (H, W, 1) colours like (H, W).
    if mask.ndim >= 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim < 2:
        raise ValueError(f"mask must be (H, W), (H, W, 1) or batched; got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
        if not np.all(np.mod(mask, 1) == 0):
            raise ValueError("mask holds non-integer values; pass class ids (argmax the logits first)")
    ids = mask.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"mask holds negative class id {ids.min()}")
    return ids


def _colour_of(ids):
    ids = np.asarray(ids, dtype=np.int64)
    fallback = (ids[..., None] * _FALLBACK_MIX) % 256
    known = PALETTE[np.minimum(ids, len(PALETTE) - 1)]
    return np.where(ids[..., None] < len(PALETTE), known, fallback).astype(np.uint8)


def colorize(mask):
    """Class-id array (H, W), (H, W, 1) or batched -> uint8 RGB array (..., 3) in the class palette."""
    return _colour_of(_class_ids(mask))


def _to_uint8(images):
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    # Floats are expected in [0, 1]; clip so augmentation overshoot can't wrap around in uint8.
    return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


# Rows blended at once: the colours and the float blend take about 60 bytes a pixel, 7 GB for the
# overlay of a 120-megapixel frame, which jobs.infer writes at the frame's own size.
OVERLAY_ROWS = 256


def overlay(image, mask, alpha=0.5):
    """Blend the palette colours of `mask` (H, W[, 1]) over an RGB `image` (H, W, 3); returns uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1]; got {alpha}")
    image = _to_uint8(image)
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[:2] != mask.shape:
        raise ValueError(f"need an (H, W, 3) image and a same-size (H, W) mask; got {image.shape} and {mask.shape}")
    blended = np.empty_like(image)
    for start in range(0, image.shape[0], OVERLAY_ROWS):
        rows = slice(start, start + OVERLAY_ROWS)
        blended[rows] = np.round((1.0 - alpha) * image[rows] + alpha * colorize(mask[rows]))
    return blended


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _series(history, key):
    points = [
        (record.get("epoch", index + 1), float(record[key]))
        for index, record in enumerate(history)
        if record.get(key) is not None
    ]
    return tuple(zip(*points)) if points else None


def save_curves(history, path):
    """Plot per-epoch metric dicts: a loss panel and an accuracy/IoU panel.

    Missing keys are skipped, and so are non-scalar entries such as the per-class IoU table.
    """
    keys = sorted({key for record in history for key, value in record.items()
                   if key != "epoch" and isinstance(value, (int, float))})
    panels = (
        ("Loss", [key for key in keys if key.endswith("loss")]),
        ("Accuracy / IoU", [key for key in keys if "accuracy" in key or "iou" in key]),
    )
    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, (title, panel_keys) in zip(fig.subplots(1, 2), panels):
        # A metric and its val_ twin share a colour; validation is the dashed line.
        colours = {}
        for key in panel_keys:
            series = _series(history, key)
            if series:
                colour = colours.setdefault(key.removeprefix("val_"), f"C{len(colours)}")
                style = "o--" if key.startswith("val_") else "o-"
                ax.plot(*series, style, color=colour, label=key, markersize=3)
        if colours:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _bare(ax):
    # Unlike axis("off"), this keeps the y label, which carries the row title.
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_previews(images, true_masks, predicted_masks, path, titles=None, class_names=CLASS_NAMES):
    """One row per frame: input image | true mask | predicted mask, and a legend naming the classes
    shown (`unet_core.classes.class_names` of the model)."""
    images = _to_uint8(images)
    columns = [("Input Image", images), ("True Mask", _class_ids(true_masks)),
               ("Predicted Mask", _class_ids(predicted_masks))]
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, 3) batch; got shape {images.shape}")
    for name, masks in columns[1:]:
        if masks.shape != images.shape[:3]:
            raise ValueError(
                f"{name.lower()}s must be (N, H, W[, 1]) matching images {images.shape[:3]}; got {masks.shape}"
            )
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} frames")

    n_rows, n_cols = len(images), len(columns)
    height, width = images.shape[1:3]
    fig = Figure(figsize=(3 * n_cols, 3 * n_rows * height / width + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for col, (name, data) in enumerate(columns):
        for row in range(n_rows):
            ax = axes[row, col]
            ax.imshow(data[row] if col == 0 else colorize(data[row]), interpolation="nearest")
            _bare(ax)
        axes[0, col].set_title(name)
    if titles is not None:
        for row, title in enumerate(titles):
            # A frame's name as written: `$` in a file name would start matplotlib's maths markup.
            axes[row, 0].set_ylabel(str(title), parse_math=False)

    present = np.unique(np.concatenate([masks.ravel() for _, masks in columns[1:]]))
    fig.legend(
        handles=[
            Patch(color=_colour_of(i) / 255, label=class_names[i] if i < len(class_names) else f"class {i}")
            for i in present
        ],
        loc="outside lower center", ncol=min(len(present), 6), fontsize="small", frameon=False,
    )
    return _save(fig, path)


# Beyond this many classes, names and a figure per cell would need a figure growing with the square of
# the classes (4 GB of memory at 256): the heatmap is drawn alone, at the size of this many.
MAX_LABELLED_CLASSES = 64


def save_confusion_matrix(confusion, path, class_names=CLASS_NAMES):
    """Row-normalised heatmap of a (C, C) count matrix (rows = truth, columns = prediction)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix; got shape {confusion.shape}")
    if len(class_names) != len(confusion):
        raise ValueError(f"got {len(class_names)} class names for a {len(confusion)}-class confusion matrix")

    totals = confusion.sum(axis=1, keepdims=True)
    # Rows without any true pixels stay NaN (drawn blank) instead of dividing 0 by 0.
    rates = np.full_like(confusion, np.nan)
    np.divide(confusion, totals, out=rates, where=totals > 0)

    n = len(confusion)
    labelled = n <= MAX_LABELLED_CLASSES
    size = max(5.0, 0.4 * min(n, MAX_LABELLED_CLASSES) + 2)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(rates), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of the true class's pixels", shrink=0.8)
    if not labelled:
        ax.set(xlabel="Predicted class id", ylabel="True class id",
               title="Confusion matrix (fraction of each true class)")
        return _save(fig, path)
    for (row, col), rate in np.ndenumerate(rates):
        if rate >= 0.01:  # NaN compares False, so blank rows stay unannotated
            ax.text(col, row, f"{100 * rate:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if rate > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    row_labels = [name if total else f"{name} (no pixels)" for name, total in zip(class_names, totals[:, 0])]
    ax.set_yticks(range(n), row_labels, fontsize=7)
    ax.set(xlabel="Predicted class", ylabel="True class", title="Confusion matrix (% of each true class)")
    return _save(fig, path)
