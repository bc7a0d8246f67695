"""What a training run leaves in `--output`: the best model, metrics, curves, previews, TensorBoard."""

import csv
import json
import os

import numpy as np
import tensorflow as tf

from distributed import inference
from unet_core import plots, scenes, unet_model
from unet_core.training import predict_logits_fn

PREVIEW_FRAMES = 6


def generate_scenes(config):
    """The default data: synthetic CARLA-layout scenes inside the run directory (kept on rerun)."""
    directory = os.path.abspath(os.path.join(config.output, "scenes"))
    scenes.write_scenes(directory, config.scene_count, seed=config.seed)
    return directory


def write_skipped(output, skipped):
    path = os.path.join(output, "skipped.json")
    if skipped:
        with open(path, "w") as file:
            json.dump(skipped, file, indent=2)
    elif os.path.exists(path):
        os.remove(path)


def write(config, history, best_weights, val_frames):
    """Fill the run directory from a finished run's history and the weights its best epoch was
    scored with; returns the per-epoch metrics."""
    model_path = os.path.join(config.output, "model.keras")
    export_model(config, best_weights, model_path)

    write_metrics(config.output, history)
    plots.save_curves(history, os.path.join(config.output, "curves.png"))
    write_tensorboard(os.path.join(config.output, "tensorboard"), history)
    model = inference.load_model(model_path)
    frames = val_frames.take_batch(PREVIEW_FRAMES, batch_format="numpy")
    predicted = np.argmax(predict_logits_fn(model)(tf.constant(frames["image"])).numpy(), axis=-1)
    plots.save_previews(frames["image"], frames["mask"], predicted, os.path.join(config.output, "previews.png"),
                        titles=[str(name) for name in frames["name"]])
    print(f"[unet-ray] run directory {os.path.abspath(config.output)}: model.keras (best val mIoU "
          f"{max(h['val_mean_iou'] for h in history):.4f}), metrics.json, curves.png, previews.png", flush=True)
    return history


def export_model(config, weights, path):
    """Weights (as scored: their moving average, when the run kept one) in a float32 model without
    optimizer state: a quarter of a checkpoint's size, and it predicts the same on any hardware,
    whatever precision training used."""
    tf.keras.mixed_precision.set_global_policy("float32")  # the driver trains nothing itself
    model = unet_model((*config.image_size, 3), config.n_filters, config.n_classes)
    model.set_weights(weights)
    model.save(path + ".tmp.keras", save_format="keras_v3")
    os.replace(path + ".tmp.keras", path)


def write_metrics(output, history):
    with open(os.path.join(output, "metrics.json"), "w") as file:
        json.dump(history, file, indent=2)
    flat_keys = [key for key in history[-1] if not isinstance(history[-1][key], dict)]
    class_names = sorted({name for row in history for name in row.get("val_iou_per_class", {})})
    with open(os.path.join(output, "metrics.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(flat_keys + [f"val_iou_{name}" for name in class_names])
        for row in history:
            per_class = row.get("val_iou_per_class", {})
            writer.writerow([row.get(key) for key in flat_keys] + [per_class.get(name, "") for name in class_names])


def write_tensorboard(directory, history):
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
        for row in history:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tf.summary.scalar(key, value, step=row["epoch"])
    writer.close()
