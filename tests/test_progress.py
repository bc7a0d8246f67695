"""A run's metrics on disk as each epoch ends: what Ray Train's controller writes into --output."""

import csv
import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distributed import progress


def test_metrics_csv_has_a_row_per_epoch_and_the_classes_in_class_id_order(tmp_path):
    history = [{"epoch": 1, "val_mean_iou": 0.2, "val_iou_per_class": {"road": 0.5, "sky": 0.6}},
               {"epoch": 2, "val_mean_iou": 0.3, "val_iou_per_class": {"building": 0.1, "road": 0.7, "sky": 0.8}}]
    progress.write_metrics(str(tmp_path), history)
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["epoch", "val_mean_iou", "val_iou_building", "val_iou_road", "val_iou_sky"]  # ids 1, 7, 13
    assert rows[1:] == [["1", "0.2", "", "0.5", "0.6"], ["2", "0.3", "0.1", "0.7", "0.8"]]
    progress.write_metrics(str(tmp_path), [{"epoch": 1, "val_iou_per_class": {"2": 0.1, "10": 0.2}}])
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "epoch,val_iou_2,val_iou_10"  # not "10" < "2"


def test_each_epoch_reported_lands_on_disk_and_a_resumed_epoch_replaces_its_earlier_row(tmp_path):
    # What the run before left: three epochs, the last two after its last checkpoint.
    progress.write_metrics(str(tmp_path), [{"epoch": epoch, "val_mean_iou": 0.1 * epoch} for epoch in (1, 2, 3)])
    callback = progress.EpochsToDisk(str(tmp_path))

    def report(epoch, score):  # as Ray Train hands over what workers 0 and 1 reported
        callback.after_report(None, [{"epoch": epoch, "val_mean_iou": score}] * 2, checkpoint=None)
        return [(row["epoch"], row["val_mean_iou"]) for row in json.loads((tmp_path / "metrics.json").read_text())]

    assert report(2, 0.25) == [(1, 0.1), (2, 0.25)]  # resumed after epoch 1: epochs 2 and 3 are retrained
    assert report(3, 0.35) == [(1, 0.1), (2, 0.25), (3, 0.35)]
    assert report(3, 0.36) == [(1, 0.1), (2, 0.25), (3, 0.36)]  # a worker restarted from the same checkpoint
    with open(tmp_path / "metrics.csv", newline="") as file:
        assert list(csv.reader(file))[1:] == [["1", "0.1"], ["2", "0.25"], ["3", "0.36"]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.csv", "metrics.json", "tensorboard"]


def tensorboard_shows(directory, tag):
    """The (step, value) points TensorBoard draws for `tag`, read by TensorBoard's own loader."""
    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return [(event.step, round(event.value, 6)) for event in accumulator.Scalars(tag)]


def test_tensorboard_follows_the_run_and_draws_a_restarted_epoch_once(tmp_path):
    def report(callback, epoch, score):
        row = {"epoch": epoch, "val_mean_iou": score, "val_loss": 1 / epoch, "mixed_precision": "bf16",
               "jit_compile": True, "val_iou_per_class": {"road": score}}
        callback.after_report(None, [row, row], checkpoint=None)
        return tensorboard_shows(tmp_path / progress.TENSORBOARD, "val_mean_iou")

    callback = progress.EpochsToDisk(str(tmp_path))
    assert report(callback, 1, 0.1) == [(1, 0.1)]  # on disk as soon as the epoch is reported
    assert report(callback, 2, 0.2) == [(1, 0.1), (2, 0.2)]
    assert report(callback, 3, 0.3) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert report(callback, 2, 0.25) == [(1, 0.1), (2, 0.25)]  # workers restarted from epoch 1's checkpoint
    resumed = progress.EpochsToDisk(str(tmp_path))  # the same command rerun: a new controller
    assert report(resumed, 2, 0.22) == [(1, 0.1), (2, 0.22)]
    assert report(resumed, 3, 0.33) == [(1, 0.1), (2, 0.22), (3, 0.33)]
    assert tensorboard_shows(tmp_path / progress.TENSORBOARD, "val_loss")[-1] == (3, round(1 / 3, 6))
    assert tensorboard_shows(tmp_path / progress.TENSORBOARD, "val_iou/road") == [(1, 0.1), (2, 0.22), (3, 0.33)]
    assert [path.name for path in (tmp_path / progress.TENSORBOARD).iterdir()] == [progress.EVENT_FILE]
    accumulator = EventAccumulator(str(tmp_path / progress.TENSORBOARD))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["val_iou/road", "val_loss", "val_mean_iou"]


def test_a_run_directory_an_older_version_wrote_gets_one_event_file_of_its_whole_history(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    old = progress.EpochsToDisk(str(tmp_path / "elsewhere"))  # an event file of epochs 1-3, as exported before
    for epoch in (1, 2, 3):
        old.after_report(None, [{"epoch": epoch, "val_mean_iou": 0.5}], checkpoint=None)
    (tmp_path / "tensorboard").mkdir()
    os.replace(tmp_path / "elsewhere" / "tensorboard" / progress.EVENT_FILE,
               tmp_path / "tensorboard" / "events.out.tfevents.1796000000.head.123.v2")
    progress.write_metrics(str(tmp_path), [{"epoch": epoch, "val_mean_iou": 0.1 * epoch} for epoch in (1, 2, 3)])

    resumed = progress.EpochsToDisk(str(tmp_path))
    resumed.after_report(None, [{"epoch": 3, "val_mean_iou": 0.35}], checkpoint=None)  # resumed after epoch 2
    assert [path.name for path in (tmp_path / "tensorboard").iterdir()] == [progress.EVENT_FILE]
    assert tensorboard_shows(tmp_path / "tensorboard", "val_mean_iou") == [(1, 0.1), (2, 0.2), (3, 0.35)]
