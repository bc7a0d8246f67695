"""Segmentation metrics from one confusion matrix: pixel accuracy, per-class IoU, mean IoU.

A confusion matrix is additive, so partial counts from batches, epochs or workers are summed and
the ratios taken once at the end; averaging per-batch ratios would weight small batches wrongly.
"""

import numpy as np
import tensorflow as tf

from unet_core.classes import class_names


def confusion_counts(true_ids, predicted_ids, n_classes):
    """(n_classes, n_classes) int64 counts, rows = truth, columns = prediction."""
    true_ids = np.asarray(true_ids).reshape(-1).astype(np.int64)
    predicted_ids = np.asarray(predicted_ids).reshape(-1).astype(np.int64)
    if true_ids.shape != predicted_ids.shape:
        raise ValueError(f"truth has {true_ids.size} pixels but prediction has {predicted_ids.size}")
    # An id past n_classes would land in another cell of the flattened matrix (truth 0 predicted
    # n_classes counts as truth 1 predicted 0), or be cut off: wrong scores, without a word.
    for what, ids in (("truth", true_ids), ("prediction", predicted_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
            wrong = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"{what} has class id {wrong} but there are {n_classes} classes (ids 0..{n_classes - 1}); "
                             f"{int(((ids < 0) | (ids >= n_classes)).sum())} pixel(s) out of range")
    flat = np.bincount(true_ids * n_classes + predicted_ids, minlength=n_classes * n_classes)
    return flat[: n_classes * n_classes].reshape(n_classes, n_classes)


class ConfusionMatrix:
    """Accumulates pixel counts and answers every metric from them."""

    def __init__(self, n_classes, counts=None):
        self.n_classes = n_classes
        self.counts = np.zeros((n_classes, n_classes), np.int64) if counts is None else np.asarray(counts, np.int64)

    def update(self, true_ids, predicted_ids):
        self.counts += confusion_counts(true_ids, predicted_ids, self.n_classes)
        return self

    def pixel_accuracy(self):
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else 0.0

    def present_classes(self):
        """Classes seen in the truth or the prediction: the only ones IoU is defined for."""
        return np.flatnonzero(self.counts.sum(axis=0) + self.counts.sum(axis=1))

    def iou(self):
        """{class id: IoU} for present classes; absent classes have no IoU rather than NaN."""
        true_positive = np.diag(self.counts)
        union = self.counts.sum(axis=0) + self.counts.sum(axis=1) - true_positive
        return {int(c): float(true_positive[c] / union[c]) for c in self.present_classes()}

    def mean_iou(self, classes=None):
        """Mean IoU over present classes, or over `classes` (e.g. those in the truth)."""
        iou = self.iou()
        chosen = iou.keys() if classes is None else [int(c) for c in classes]
        values = [iou.get(c, 0.0) for c in chosen]
        return float(np.mean(values)) if values else 0.0

    def truth_classes(self):
        return np.flatnonzero(self.counts.sum(axis=1))

    def summary(self, prefix=""):
        """JSON-ready metrics; IoU per class is keyed by class name."""
        names = class_names(self.n_classes)
        return {
            f"{prefix}pixel_accuracy": self.pixel_accuracy(),
            f"{prefix}mean_iou": self.mean_iou(),
            # The same mean over the classes in the truth only: a class that is merely
            # predicted (wrongly) is not counted as a 0.
            f"{prefix}mean_iou_truth_classes": self.mean_iou(self.truth_classes()),
            f"{prefix}iou_per_class": {names[c]: value for c, value in self.iou().items()},
        }


@tf.keras.saving.register_keras_serializable(package="unet_core")
class KerasMeanIoU(tf.keras.metrics.Metric):
    """Mean IoU over present classes from logits, for `model.compile(metrics=...)`.

    tf.keras.metrics.MeanIoU wants class ids, so it would need an argmax layer in the model or a
    wrapper; this one takes the logits the model outputs. The confusion matrix is a metric
    variable, so Keras sums it across replicas and resets it each epoch. Same mean as
    `ConfusionMatrix.mean_iou()`: over classes in the truth or the prediction, 0 before any pixel.
    """

    def __init__(self, n_classes, name="mean_iou", **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_classes = n_classes
        self.counts = self.add_weight(
            name="counts", shape=(n_classes, n_classes), initializer="zeros", dtype=tf.float64
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        true_ids = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        predicted_ids = tf.reshape(tf.argmax(y_pred, axis=-1, output_type=tf.int32), [-1])
        batch = tf.math.confusion_matrix(true_ids, predicted_ids, self.n_classes, dtype=tf.float64)
        self.counts.assign_add(batch)

    def result(self):
        true_positive = tf.linalg.diag_part(self.counts)
        union = tf.reduce_sum(self.counts, 0) + tf.reduce_sum(self.counts, 1) - true_positive
        present = union > 0
        iou_sum = tf.reduce_sum(tf.math.divide_no_nan(true_positive, union))
        return tf.math.divide_no_nan(iou_sum, tf.reduce_sum(tf.cast(present, tf.float64)))

    def reset_state(self):
        self.counts.assign(tf.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes}
