"""A run's metrics on disk as each epoch ends, not only once training finishes: during a long run
and after a crash, metrics.json, metrics.csv and TensorBoard's event file hold every epoch reported
so far.

`EpochsToDisk` runs in Ray Train's controller, which Ray places on the driver's node (its
label_selector, in `DataParallelTrainer`), so it writes the --output the driver reads. It imports
no TensorFlow, and nothing else handed to the controller does (tf_backend.py): it would cost the
driver's node ~500 MB for the whole run.
"""

import csv
import json
import os
import time

import ray.train
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter  # neither imports TensorFlow

from unet_core.classes import CLASS_NAMES

TENSORBOARD = "tensorboard"  # TensorBoard reads every file with "tfevents" in its name there


class EpochsToDisk(ray.train.UserCallback):
    """`resumed`: the history of the checkpoint the run resumes from, whatever --output held before
    (another run's epochs, or none: a run resumed into a new --output)."""

    def __init__(self, output, resumed):
        self.output = os.path.abspath(output)
        self.history, self.event_file = list(resumed), None

    def after_report(self, run_context, metrics, checkpoint):
        row = metrics[0]  # rank 0's: the scores are all-reduced, so every worker reports the same
        # A restarted run reports again the epochs after its checkpoint: they replace those rows.
        kept = [earlier for earlier in self.history if earlier["epoch"] < row["epoch"]]
        restarted = len(kept) < len(self.history)
        self.history = kept + [row]
        write_metrics(self.output, self.history)
        if self.event_file is None:
            self.event_file = new_event_file(os.path.join(self.output, TENSORBOARD))
            append_to_tensorboard(self.event_file, self.history, start=True)
        else:
            append_to_tensorboard(self.event_file, self.history[-1:], start=restarted)


def read_metrics(output):
    """`output`'s metrics.json: a training run's list of epochs, an evaluation report's dict, or
    None where there is none (or it cannot be read)."""
    try:
        with open(os.path.join(output, "metrics.json")) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def read_history(output):
    """The epochs in a run directory's metrics.json; none if it has none (an evaluation report's is one dict)."""
    history = read_metrics(output)
    return history if isinstance(history, list) else []


def write_metrics(output, history):
    """metrics.json and metrics.csv (one row per epoch), each replaced whole: a reader never sees half."""
    with open(os.path.join(output, "metrics.json.tmp"), "w") as file:
        json.dump(history, file, indent=2)
    flat_keys = [key for key in history[-1] if not isinstance(history[-1][key], dict)]
    # Class-id order, as metrics.json lists them (a 23-class model's names are CARLA's, others' are ids).
    class_names = sorted({name for row in history for name in row.get("val_iou_per_class", {})},
                         key=lambda name: CLASS_NAMES.index(name) if name in CLASS_NAMES else int(name))
    with open(os.path.join(output, "metrics.csv.tmp"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(flat_keys + [f"val_iou_{name}" for name in class_names])
        for row in history:
            per_class = row.get("val_iou_per_class", {})
            writer.writerow([row.get(key) for key in flat_keys] + [per_class.get(name, "") for name in class_names])
    for name in ("metrics.json", "metrics.csv"):
        os.replace(os.path.join(output, f"{name}.tmp"), os.path.join(output, name))


def write_tensorboard(output, history):
    """TensorBoard's file of `history` alone, in place of `output`'s earlier ones. The export writes it as it writes
    metrics.json: a rerun that trains no epoch (a finished run exported again) reports none to `EpochsToDisk`, which
    left a new --output without TensorBoard, and --output's own drawing epochs the checkpoint does not hold."""
    append_to_tensorboard(new_event_file(os.path.join(output, TENSORBOARD)), history, start=True)


def new_event_file(directory):
    """A new event file for this run's epochs in place of the folder's earlier ones. Its name sorts
    after theirs, so a TensorBoard that is following them reads on into it."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if "tfevents" in name:
            os.remove(os.path.join(directory, name))
    path = os.path.join(directory, f"events.out.tfevents.{time.time_ns()}.unet-ray")
    header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    with open(path, "ab") as file:
        RecordWriter(file).write(header.SerializeToString())
    return path


def append_to_tensorboard(path, rows, start):
    """`rows` appended to the event file at `path`, which TensorBoard follows as it grows. With
    `start`, a session-start event comes first: TensorBoard then drops what it drew from that epoch
    on (an earlier run's, an earlier attempt's), so it draws every epoch once."""
    events = [session_start(rows[0]["epoch"])] if start else []
    for row in rows:
        scores = {key: value for key, value in row.items()  # not flags such as jit_compile: a flat line says nothing
                  if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}
        scores.update({f"val_iou/{name}": value for name, value in row.get("val_iou_per_class", {}).items()})
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                             for tag, value in scores.items()])
        events.append(event_pb2.Event(wall_time=time.time(), step=row["epoch"], summary=summary))
    with open(path, "ab") as file:
        writer = RecordWriter(file)
        for event in events:
            writer.write(event.SerializeToString())


def session_start(step):
    return event_pb2.Event(wall_time=time.time(), step=step,
                           session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
