"""A run's metrics on disk as each epoch ends, not only once training finishes: during a long run
and after a crash, metrics.json, metrics.csv and TensorBoard's event file hold every epoch reported
so far.

`EpochsToDisk` runs in Ray Train's controller, which Ray places on the driver's node (its
label_selector, in `DataParallelTrainer`), so it writes the --output the driver reads. It imports
no TensorFlow: the controller stays small.
"""

import csv
import json
import os
import time

import ray.train
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter  # neither imports TensorFlow

from unet_core.classes import CLASS_NAMES

TENSORBOARD = "tensorboard"
EVENT_FILE = "events.out.tfevents.unet-ray"  # TensorBoard reads every file with "tfevents" in its name


class EpochsToDisk(ray.train.UserCallback):
    def __init__(self, output):
        self.output = os.path.abspath(output)
        self.history = None

    def after_report(self, run_context, metrics, checkpoint):
        row = metrics[0]  # rank 0's: the scores are all-reduced, so every worker reports the same
        if self.history is None:  # a resumed run's earlier epochs: as the last run wrote them
            self.history = read_history(self.output)
        # A resumed or restarted run reports again the epochs after its checkpoint: they replace those rows.
        kept = [earlier for earlier in self.history if earlier["epoch"] < row["epoch"]]
        restarted = len(kept) < len(self.history)
        self.history = kept + [row]
        write_metrics(self.output, self.history)
        append_to_tensorboard(os.path.join(self.output, TENSORBOARD), self.history, restarted)


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


def append_to_tensorboard(directory, history, restarted):
    """The last epoch of `history` appended to the run's event file, which TensorBoard follows as
    it grows; a new file (the run's first epoch, or a run directory an older unet-ray wrote, whose
    event files go) gets every epoch of `history`.

    A session-start event opens the file and comes before each restarted epoch: TensorBoard then
    drops what the earlier attempt logged from that epoch on, so it draws every epoch once.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EVENT_FILE)
    if os.path.exists(path):
        rows, events = history[-1:], [session_start(history[-1]["epoch"])] if restarted else []
    else:
        for name in os.listdir(directory):
            if "tfevents" in name:
                os.remove(os.path.join(directory, name))
        rows = history
        events = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"),
                  session_start(history[0]["epoch"])]
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
