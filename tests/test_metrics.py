import numpy as np
import pytest
import tensorflow as tf

from unet_core.metrics import ConfusionMatrix, KerasMeanIoU, confusion_counts


def test_confusion_counts_rows_are_truth():
    counts = confusion_counts([0, 0, 1, 2], [0, 1, 1, 1], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_metrics_by_hand():
    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
    prediction = np.array([[0, 1, 1, 1], [2, 2, 2, 0]])
    matrix = ConfusionMatrix(5).update(truth, prediction)
    assert matrix.pixel_accuracy() == pytest.approx(6 / 8)
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 3, union 4. Classes 3, 4 absent.
    assert matrix.iou() == pytest.approx({0: 1 / 3, 1: 2 / 3, 2: 3 / 4})
    assert matrix.mean_iou() == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert matrix.truth_classes().tolist() == [0, 1, 2]


def test_absent_classes_never_leak_nan():
    matrix = ConfusionMatrix(23).update(np.full((4, 4), 7), np.full((4, 4), 7))
    assert matrix.iou() == {7: 1.0}
    assert matrix.mean_iou() == 1.0
    summary = matrix.summary("val_")
    assert summary["val_iou_per_class"] == {"road": 1.0}
    assert not np.isnan(summary["val_mean_iou"])
    assert ConfusionMatrix(3).mean_iou() == 0.0 and ConfusionMatrix(3).pixel_accuracy() == 0.0


def test_class_predicted_but_never_true_counts_as_zero():
    matrix = ConfusionMatrix(4).update([1, 1, 1, 1], [1, 1, 3, 3])
    assert matrix.iou() == {1: 0.5, 3: 0.0}
    assert matrix.mean_iou(classes=matrix.truth_classes()) == 0.5
    assert matrix.summary()["mean_iou_truth_classes"] == 0.5 and matrix.summary()["mean_iou"] == 0.25


def test_accumulating_batches_equals_one_pass():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, (10, 8, 8))
    prediction = np.where(rng.random((10, 8, 8)) < 0.7, truth, rng.integers(0, 6, (10, 8, 8)))
    whole = ConfusionMatrix(6).update(truth, prediction)
    parts = ConfusionMatrix(6)
    for start in range(0, 10, 3):
        parts.update(truth[start : start + 3], prediction[start : start + 3])
    np.testing.assert_array_equal(whole.counts, parts.counts)


def test_keras_metric_matches_numpy_and_resets():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 5, (3, 6, 6))
    logits = rng.normal(size=(3, 6, 6, 7)).astype(np.float32)
    metric = KerasMeanIoU(7)
    assert float(metric.result()) == ConfusionMatrix(7).mean_iou() == 0.0  # no pixel yet: 0, not NaN
    metric.update_state(truth[:2], logits[:2])
    metric.update_state(truth[2:], logits[2:])
    expected = ConfusionMatrix(7).update(truth, logits.argmax(-1)).mean_iou()
    assert float(metric.result()) == pytest.approx(expected)
    metric.reset_state()
    assert metric.counts.numpy().sum() == 0
    metric.update_state(tf.constant(truth), tf.constant(logits))  # tensors, as Keras passes them
    assert float(metric.result()) == pytest.approx(expected)


def test_keras_metric_after_a_reset_scores_only_what_came_after():
    # Keras resets metrics every epoch: an epoch of all-wrong pixels after a perfect one scores 0, not the 1/3 of
    # both epochs' counts together. Same data before and after a reset would not tell: the ratios repeat.
    truth = np.array([[0, 1]])
    right, wrong = np.array([[[5.0, 0.0], [0.0, 5.0]]]), np.array([[[0.0, 5.0], [5.0, 0.0]]])
    metric = KerasMeanIoU(2)
    metric.update_state(truth, right)
    assert float(metric.result()) == 1.0
    metric.reset_state()
    metric.update_state(truth, wrong)
    assert float(metric.result()) == 0.0


def test_keras_metric_leaves_classes_absent_from_truth_and_prediction_out_of_the_mean():
    # The training logs' mean_iou: a 23-class model sees a few classes per frame, and dividing by
    # every class the model has would read as a model scoring a fraction of what it does.
    truth = np.array([[[1, 1, 4, 4]]])
    logits = np.zeros((1, 1, 4, 23), np.float32)
    logits[0, 0, [0, 1, 2, 3], [1, 4, 4, 4]] = 1.0  # predicts 1, 4, 4, 4: class 1 IoU 1/2, class 4 IoU 2/3
    metric = KerasMeanIoU(23)
    metric.update_state(tf.constant(truth), tf.constant(logits))
    assert ConfusionMatrix(23).update(truth, logits.argmax(-1)).mean_iou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert float(metric.result()) == pytest.approx((1 / 2 + 2 / 3) / 2)


@pytest.mark.parametrize("truth, prediction, message", [
    ([0, 1], [0, 3], "prediction has class id 3 but there are 3 classes"),
    ([0, 3], [0, 1], "truth has class id 3 but there are 3 classes"),
    ([0, 1], [-1, 1], "prediction has class id -1"),
])
def test_out_of_range_ids_are_refused_not_counted_elsewhere(truth, prediction, message):
    # Truth 0 predicted 3 used to be counted as truth 1 predicted 0, and truth 3 dropped.
    with pytest.raises(ValueError, match=message):
        confusion_counts(truth, prediction, 3)
