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


def test_each_epoch_reported_lands_on_disk_and_a_restarted_epoch_replaces_its_earlier_row(tmp_path):
    # What --output held (another run's epochs) gives way to the history of the checkpoint resumed from.
    progress.write_metrics(str(tmp_path), [{"epoch": epoch, "val_mean_iou": 0.9} for epoch in (1, 2, 3, 4)])
    callback = progress.EpochsToDisk(str(tmp_path), resumed=[{"epoch": 1, "val_mean_iou": 0.1}])

    def report(epoch, score):  # as Ray Train hands over what workers 0 and 1 reported
        callback.after_report(None, [{"epoch": epoch, "val_mean_iou": score}] * 2, checkpoint=None)
        return [(row["epoch"], row["val_mean_iou"]) for row in json.loads((tmp_path / "metrics.json").read_text())]

    assert report(2, 0.25) == [(1, 0.1), (2, 0.25)]  # resumed after epoch 1
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


def event_files(directory):
    return [path.name for path in directory.iterdir()]


def test_tensorboard_follows_the_run_and_draws_a_restarted_epoch_once(tmp_path):
    def report(callback, epoch, score):
        row = {"epoch": epoch, "val_mean_iou": score, "val_loss": 1 / epoch, "mixed_precision": "bf16",
               "jit_compile": True, "val_iou_per_class": {"road": score}}
        callback.after_report(None, [row, row], checkpoint=None)
        return tensorboard_shows(tmp_path / progress.TENSORBOARD, "val_mean_iou")

    callback = progress.EpochsToDisk(str(tmp_path), resumed=[])
    assert report(callback, 1, 0.1) == [(1, 0.1)]  # on disk as soon as the epoch is reported
    assert report(callback, 2, 0.2) == [(1, 0.1), (2, 0.2)]
    assert report(callback, 3, 0.3) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert report(callback, 2, 0.25) == [(1, 0.1), (2, 0.25)]  # workers restarted from epoch 1's checkpoint
    first_file = event_files(tmp_path / progress.TENSORBOARD)
    # The same command rerun (a new controller), resumed from the checkpoint of epoch 1.
    resumed = progress.EpochsToDisk(str(tmp_path), resumed=callback.history[:1])
    assert report(resumed, 2, 0.22) == [(1, 0.1), (2, 0.22)]
    assert report(resumed, 3, 0.33) == [(1, 0.1), (2, 0.22), (3, 0.33)]
    assert tensorboard_shows(tmp_path / progress.TENSORBOARD, "val_loss")[-1] == (3, round(1 / 3, 6))
    assert tensorboard_shows(tmp_path / progress.TENSORBOARD, "val_iou/road") == [(1, 0.1), (2, 0.22), (3, 0.33)]
    # One file: the rerun's, named to sort after the one a live TensorBoard was reading.
    [second_file] = event_files(tmp_path / progress.TENSORBOARD)
    assert "tfevents" in second_file and [second_file] != first_file and second_file > first_file[0]
    accumulator = EventAccumulator(str(tmp_path / progress.TENSORBOARD))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["val_iou/road", "val_loss", "val_mean_iou"]


def test_a_run_resumed_beside_another_runs_event_files_draws_only_its_own_epochs(tmp_path):
    # Another run's epochs 1-3 (an older unet-ray's file name, or a run trained here with other checkpoints).
    (tmp_path / "elsewhere").mkdir()
    other = progress.EpochsToDisk(str(tmp_path / "elsewhere"), resumed=[])
    for epoch in (1, 2, 3):
        other.after_report(None, [{"epoch": epoch, "val_mean_iou": 0.9}], checkpoint=None)
    (tmp_path / "tensorboard").mkdir()
    [name] = event_files(tmp_path / "elsewhere" / "tensorboard")
    os.replace(tmp_path / "elsewhere" / "tensorboard" / name,
               tmp_path / "tensorboard" / "events.out.tfevents.1796000000.head.123.v2")

    resumed = progress.EpochsToDisk(str(tmp_path), resumed=[{"epoch": 1, "val_mean_iou": 0.1}])
    resumed.after_report(None, [{"epoch": 2, "val_mean_iou": 0.2}], checkpoint=None)
    assert len(event_files(tmp_path / "tensorboard")) == 1
    assert tensorboard_shows(tmp_path / "tensorboard", "val_mean_iou") == [(1, 0.1), (2, 0.2)]
