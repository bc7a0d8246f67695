"""A run's metrics on disk as each epoch ends, not only once training finishes: during a long run
and after a crash, metrics.json and metrics.csv hold every epoch reported so far.

`EpochsToDisk` runs in Ray Train's controller, which Ray places on the driver's node (its
label_selector, in `DataParallelTrainer`), so it writes the --output the driver reads. It imports
no TensorFlow: the controller stays small.
"""

import csv
import json
import os

import ray.train

from unet_core.classes import CLASS_NAMES


class EpochsToDisk(ray.train.UserCallback):
    def __init__(self, output):
        self.output = os.path.abspath(output)
        self.history = None

    def after_report(self, run_context, metrics, checkpoint):
        row = metrics[0]  # rank 0's: the scores are all-reduced, so every worker reports the same
        if self.history is None:  # a resumed run's earlier epochs: as the last run wrote them
            self.history = read_history(self.output)
        # A resumed or restarted run reports again the epochs after its checkpoint: they replace those rows.
        self.history = [earlier for earlier in self.history if earlier["epoch"] < row["epoch"]] + [row]
        write_metrics(self.output, self.history)


def read_history(output):
    """The epochs in a run directory's metrics.json; none if it has none (an evaluation report's is one dict)."""
    try:
        with open(os.path.join(output, "metrics.json")) as file:
            history = json.load(file)
    except (OSError, ValueError):
        return []
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
