"""Scoring a saved model on a labelled CARLA-layout directory or URI, in one process.

Frames are read and scored a batch at a time into one confusion matrix, so memory stays flat
however large the set; the frames become tensors through unet_core.data, exactly as in training.
"""

import contextlib
import csv
import heapq
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from distributed import ingest, model_io, run_directory
from distributed.config import EvaluateConfig, refuse_missing_relative_input
from unet_core import data, plots
from unet_core.classes import class_names
from unet_core.metrics import ConfusionMatrix
from unet_core.training import ends_in_softmax, predict_logits_fn, score_batch


# The report is written here in the output, then moved into place whole.
STAGING = ".report.partial"


def evaluate(config: EvaluateConfig):
    """Score `config.model` (a .keras file or run directory) on `config.data` (every frame, or the
    validation side of `config.split`); writes the report into `config.output`.

    Returns the metrics written to metrics.json. Frames that cannot be read fail the evaluation
    with one ValueError (every one of them listed in unreadable.txt), because leaving them out would
    change the scores; the report in `config.output` is then left as it was.
    """
    model, data_uri, output = config.model, config.data, config.output
    ingest.check_output_outside(output, data_uri, "--data", "the report's PNGs")
    if run_directory.is_run_output(output):
        raise ValueError(f"{output}: a training run's directory; the report's metrics.json and previews.png would "
                         f"replace the run's own: pass another --output, such as {os.path.join(output, 'evaluation')}")
    # A mistyped --model or --data (or unpaired frames) named before the output is made: no empty report left.
    for path, flag in ((model, "--model"), (data_uri, "--data")):
        refuse_missing_relative_input(path, flag)
    model_path = model_io.model_file(model)
    filesystem, root, names = ingest.discover_pairs(data_uri)
    if config.split is not None:
        names = held_out(names, config)
    # One report at a time into an output: a second would write the same files, its rows among the first's.
    with ingest.hold(*ingest.open_output(output), "jobs.evaluate"):
        return score_and_report(config, model_path, filesystem, root, names)


def score_and_report(config, model_path, filesystem, root, names):
    """`evaluate` once its inputs are checked and it holds the output: load the model, score the
    frames, write the report. The report is written into a folder of its own in the output, and its
    files replace the last report's only once all are written: a failure or Ctrl-C midway, a disk
    that fills, leave the last report as it was."""
    output, staging = config.output, os.path.join(config.output, STAGING)
    # A refused model, Ctrl-C: no empty report left behind (unreadable.txt is kept).
    with ingest.removed_if_left_empty(output), written_into(output):
        ingest.make_directory(output, "--output")  # before the model loads, which takes seconds
        shutil.rmtree(staging, ignore_errors=True)  # an earlier evaluation's, cut short
        try:
            os.mkdir(staging)
            metrics = write_scores(config, model_path, filesystem, root, names, staging)
            # metrics.json last: a report whose metrics.json is new is whole.
            for name in sorted(os.listdir(staging), key=lambda name: name == "metrics.json"):
                os.replace(os.path.join(staging, name), os.path.join(output, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return metrics


@contextlib.contextmanager
def written_into(output):
    """An --output that takes no more files, or none at all (read-only), is one ValueError naming it."""
    kept = "the last report there is kept"
    with ingest.stopped_when_out_of_room(f"--output {output}", f"{kept}: make room, then the same command scores "
                                                                f"the frames again"):
        try:
            yield
        except OSError as error:
            # Only the output's own: reading a frame can fail with an OSError too, and is not the output's doing.
            if ingest.is_out_of_room(error) or not str(error.filename or "").startswith(os.path.join(output, "")):
                raise
            raise ValueError(f"--output {output}: the report cannot be written there ({error}); {kept}") from None


def write_scores(config, model_path, filesystem, root, names, output):
    """`score_and_report`, writing the report into `output`, an empty folder."""
    keras_model = model_io.load_model(model_path)  # first: a bad file fails here, with its name
    size, n_classes = model_io.model_geometry(keras_model, model_path)
    with open(model_path, "rb") as file:
        identity = model_io.model_identity(file.read(), model_path)

    confusion, loss, previews, worst = score_frames(keras_model, filesystem, root, names, size, n_classes, config,
                                                    output)
    summary = confusion.summary()
    metrics = {
        "model": identity,
        "data": config.data,
        "frames": len(names),
        "split": None if config.split is None else {"split": config.split, "val_fraction": config.val_fraction},
        "loss": loss,
        "pixel_accuracy": summary["pixel_accuracy"],
        "mean_iou": summary["mean_iou"],
        "mean_iou_truth_classes": summary["mean_iou_truth_classes"],
        "per_class_iou": summary["iou_per_class"],
        # Frames the model gets most wrong: where a mislabelled pair or an unseen kind of scene shows.
        "worst_frames": {name: accuracy for name, accuracy, _ in worst.ranked()},
    }
    write_report(output, metrics, confusion, previews)
    ranked = worst.ranked()
    if ranked:
        images, masks, predicted = (np.stack(arrays) for arrays in zip(*(arrays for *_, arrays in ranked)))
        titles = [f"{name}: {accuracy:.3f}" for name, accuracy, _ in ranked]
        plots.save_previews(images, masks, predicted, os.path.join(output, "worst_frames.png"), titles,
                            class_names(n_classes))
    return metrics


def score_frames(keras_model, filesystem, root, names, size, n_classes, config, output):
    """(confusion matrix, mean pixel loss, preview frames, worst frames) of `names`, scored a batch
    at a time; each frame's scores go to `output`/per_frame.csv as it is scored. Unreadable frames
    raise once all are read, listed in unreadable.txt in `config.output`."""
    forward = predict_logits_fn(keras_model)
    from_logits = not ends_in_softmax(keras_model)  # a model from elsewhere may end in probabilities
    confusion, loss_sum, pixels = ConfusionMatrix(n_classes), 0.0, 0
    previews = {"images": [], "masks": [], "predicted": [], "names": []}
    worst = WorstFrames(run_directory.PREVIEW_FRAMES)
    unreadable = []
    with open(os.path.join(output, "per_frame.csv"), "w", newline="") as per_frame_file:
        per_frame = csv.writer(per_frame_file)
        per_frame.writerow(["name", "pixel_accuracy", "mean_iou_truth_classes"])
        for start in range(0, len(names), config.batch_size):
            batch_names = names[start : start + config.batch_size]
            images, masks, reasons = ingest.read_frames(filesystem, root, batch_names, size, n_classes)
            unreadable += [reason for reason in reasons if reason]
            if unreadable:
                continue  # the scores are void; read on only to name every bad frame at once
            logits = forward(tf.constant(images)).numpy()
            if not np.isfinite(logits).all():  # argmax would score every pixel as class 0, without a word
                raise ValueError(f"--model {config.model}: predicts NaN or infinite scores (on {batch_names[0]} "
                                 f"and others): its weights have diverged; no scores are written")
            batch_loss, batch_pixels, counts = score_batch(logits, masks, n_classes, from_logits)
            loss_sum, pixels = loss_sum + batch_loss, pixels + batch_pixels
            confusion.counts += counts
            predicted = np.argmax(logits, axis=-1)
            keep = run_directory.PREVIEW_FRAMES - len(previews["names"])
            for key, values in zip(previews, (images, masks, predicted, batch_names)):
                previews[key].extend(values[:keep])
            for name, image, mask, prediction in zip(batch_names, images, masks, predicted):
                frame = ConfusionMatrix(n_classes).update(mask, prediction)
                per_frame.writerow([name, frame.pixel_accuracy(), frame.mean_iou(frame.truth_classes())])
                worst.add(name, frame.pixel_accuracy(), (image, mask, prediction))
    if unreadable:
        hint = data.class_id_hint(unreadable, lambda n: f", the model predicts {n_classes} classes: score a "
                                                         f"model trained with --n-classes {n} or more")
        raise ingest.unreadable_frames(config.data, unreadable, len(names),
                                       "fix them; scores without them would not be this set's", config.output, hint)
    ingest.forget_unreadable_frames(config.output)
    return confusion, loss_sum / max(pixels, 1), previews, worst


def held_out(names, config):
    """The names `config.split` holds out for validation, as jobs.train holds them out."""
    kept = [name for name, is_val in zip(names, data.validation_flags(names, config.val_fraction, config.split))
            if is_val]
    if not kept:
        raise ValueError(f"{config.data}: --split {config.split} --val-fraction {config.val_fraction} holds out none "
                         f"of its {len(names)} frame(s)")
    print(f"[unet-ray] scoring the {len(kept)} of {len(names)} frames that --split {config.split} --val-fraction "
          f"{config.val_fraction} holds out for validation", flush=True)
    return kept


class WorstFrames:
    """The `count` frames of lowest pixel accuracy seen so far, with their arrays for a preview."""

    def __init__(self, count):
        self.count, self.heap = count, []  # a max-heap on accuracy: the best of the worst leaves first

    def add(self, name, accuracy, arrays):
        heapq.heappush(self.heap, (-accuracy, name, arrays))
        if len(self.heap) > self.count:
            heapq.heappop(self.heap)

    def ranked(self):
        """[(name, pixel accuracy, arrays)], worst first; names break ties, so arrays are never compared."""
        ranked = sorted(self.heap, key=lambda entry: entry[:2], reverse=True)
        return [(name, -negative, arrays) for negative, name, arrays in ranked]


def write_report(output, metrics, confusion, previews):
    """metrics.json, per_class_iou.csv, confusion_matrix.png and previews.png in `output`."""
    with open(os.path.join(output, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)
    names = class_names(confusion.n_classes)
    iou = confusion.iou()
    with open(os.path.join(output, "per_class_iou.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class_id", "class_name", "iou", "true_pixels", "predicted_pixels"])
        for class_id, name in enumerate(names):
            writer.writerow([class_id, name, iou.get(class_id, ""),
                             int(confusion.counts[class_id].sum()), int(confusion.counts[:, class_id].sum())])
    plots.save_confusion_matrix(confusion.counts, os.path.join(output, "confusion_matrix.png"), names)
    plots.save_previews(np.stack(previews["images"]), np.stack(previews["masks"]), np.stack(previews["predicted"]),
                        os.path.join(output, "previews.png"), titles=[str(name) for name in previews["names"]],
                        class_names=names)


def iou_table(metrics):
    """The per-class IoU as aligned text, classes absent from truth and prediction left out."""
    rows = [f"{'class':<14} {'IoU':>7}"]
    rows += [f"{name:<14} {value:>7.4f}" for name, value in metrics["per_class_iou"].items()]
    rows.append(f"{'mean':<14} {metrics['mean_iou']:>7.4f}   pixel accuracy {metrics['pixel_accuracy']:.4f}")
    return "\n".join(rows)
