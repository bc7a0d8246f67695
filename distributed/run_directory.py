"""What a training run leaves in `--output` (the best model, metrics, curves, previews, its generated
scenes), and which reruns may resume it (the settings and frames it was started with)."""

import contextlib
import hashlib
import json
import os

import pyarrow.fs
import tensorflow as tf

from distributed import ingest, model_io, progress
from distributed.config import DEFAULT_STORAGE
from unet_core import data, plots, scenes, unet_model
from unet_core.classes import class_names
from unet_core.training import predict_class_ids_fn

PREVIEW_FRAMES = 6


# What a checkpoint is only good for: the same frames, the same network and the same slots of
# Adam's state (`weight_average`: tf-keras loads no optimizer variable at all, silently, when the
# checkpoint holds the weight average and the rerun does not, or the other way round). A rerun may
# change anything else (more epochs, another cluster shape, a new learning rate) and resume.
IDENTITY_FIELDS = ("data", "val_data", "val_fraction", "split", "image_size", "n_filters", "n_classes")
IDENTITY_FILE = "unet_run.json"
# Recorded only since a later unet-ray: compared when the recorded identity holds them.
LATER_FIELDS = ("frames", "weight_average")


SCENES = "scenes"  # the folder of a run's generated scenes


def generate_scenes(config):
    """The default data: synthetic CARLA-layout scenes inside the run directory."""
    return write_scene_set(os.path.join(config.output, SCENES), config.scene_count, config.seed)


def write_scene_set(directory, count, seed):
    """Exactly `count` generated scenes in `directory`, a folder the product owns: a rerun writes the
    same frames again and removes any beyond `count`, left by a larger run before it."""
    directory = os.path.abspath(directory)
    names = set(scenes.write_scenes(directory, count, seed=seed))
    for folder in (data.IMAGE_DIR, data.MASK_DIR):
        for name in set(os.listdir(os.path.join(directory, folder))) - names:
            os.remove(os.path.join(directory, folder, name))
    return directory


def check_run_identity(config, frames=None, new_run=None):
    """Refuse to resume a run (same `run_name` and storage) that trained on other frames or another
    network, which would silently continue it or fail inside a worker, where Ray Train retries
    the error as a worker failure instead of reporting it. A run stopped before its first
    checkpoint left nothing to resume: its rerun starts afresh, whatever the settings.

    `frames` (`frames_identity`): the frames it trains and validates on, as the same directory may
    hold other frames by then (frames added to a tail split would move validation frames into
    training); checked before Ray starts by their names, and with --skip-bad once they are decoded.
    `new_run`: what to pass instead, by default `TrainConfig.new_run_flags`."""
    def instead():  # metrics.json is read only for a refusal, not on every run's way in
        return new_run or config.new_run_flags(bool(progress.read_history(config.output)))

    filesystem, path, identity = _identity(config, frames)
    run_root = path.rsplit("/", 1)[0]
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(run_root, allow_not_found=True))
    if not any(item.base_name.startswith("checkpoint_") for item in found):
        return
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        # Every run records its identity before its first checkpoint, so these came from an older
        # unet-ray (its checkpoints lack the best epoch's weights), or the record was deleted.
        raise ValueError(f"{config.run_storage}: checkpoints of a run without "
                         f"{IDENTITY_FILE} (an older unet-ray wrote them, or the file was deleted), which this one "
                         f"cannot tell the settings of and will not resume; pass {instead()} to start a new run")
    with filesystem.open_input_stream(path) as stream:
        recorded = json.loads(stream.read())
    changed = [f"{field} {recorded.get(field)!r} -> {value!r}" for field, value in identity.items()
               if not same_setting(field, recorded.get(field), value)
               and (field not in LATER_FIELDS or field in recorded)]
    if changed:
        raise ValueError(
            f"{config.run_storage}: run {config.run_name!r} there trained with other "
            f"settings ({'; '.join(changed)}); rerun with its settings to resume it, or pass {instead()} to start a "
            f"new run")


def check_output_is_this_runs(config):
    """Refuse an --output that holds another run's results (its epochs in metrics.json, and
    model.keras), which this run would replace: every run records its settings beside its
    checkpoints before its first epoch, so results there without this run's record are another's."""
    if not progress.read_history(config.output):
        return
    filesystem, path, _ = _identity(config)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise ValueError(f"{config.output}: holds the results of another run (metrics.json, model.keras), which run "
                         f"{config.run_name!r} would replace: pass another --output, or that run's --run-name and "
                         f"--storage-path to resume it")


def same_setting(field, recorded, value):
    """Whether a rerun's setting is the recorded one; the data's location however it is spelt
    (`file:///d` and `/d`, `s3://b/d/` and `s3://b/d`, a symbolic link to `/d`), so a resume is not
    refused for a spelling."""
    def place(uri):
        uri = uri.removeprefix("file://")
        return uri.rstrip("/") if "://" in uri else os.path.realpath(uri)

    if field in ("data", "val_data") and recorded is not None and value is not None:
        return place(recorded) == place(value)
    return recorded == value


def record_run_identity(config, frames):
    """What `check_run_identity` compares a rerun with, written beside the run's checkpoints."""
    filesystem, path, identity = _identity(config, frames)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(identity, indent=2).encode())


def frames_identity(train_names, val_names):
    """The frames a run trains and validates on, in one line: their counts and a hash of their names."""
    digest, counts = hashlib.sha256(), []
    for names in (train_names, val_names):
        names = sorted(names)
        digest.update(("\n".join(names) + "\0").encode())
        counts.append(len(names))
    return f"{counts[0]} training / {counts[1]} validation frames, names sha256:{digest.hexdigest()[:16]}"


def _identity(config, frames=None):
    # With a validation directory the split settings go unused, so changing them changes nothing.
    unused = ("val_fraction", "split") if config.val_data is not None else ()
    identity = {field: value for field, value in config.to_dict().items()
                if field in IDENTITY_FIELDS and field not in unused}
    for field in ("data", "val_data"):
        if identity[field] is not None and "://" not in identity[field]:
            identity[field] = os.path.abspath(identity[field])
    if config.data is None:
        identity["data"] = f"{config.scene_count} generated scenes, seed {config.seed}"
    identity["image_size"] = list(identity["image_size"])
    identity["weight_average"] = "on (--ema-momentum > 0)" if config.ema_momentum > 0 else "off (--ema-momentum 0)"
    if frames is not None:
        identity["frames"] = frames
    filesystem, run_root = ingest.open_root(config.run_storage)
    return filesystem, f"{run_root}/{IDENTITY_FILE}", identity


def is_run_output(directory):
    """Whether `directory` is a training run's --output: it holds the run's history (metrics.json,
    a list of epochs; an evaluation report's is one dict) or, while the run trains, its default
    checkpoint storage."""
    return os.path.isdir(os.path.join(directory, DEFAULT_STORAGE)) or bool(progress.read_history(directory))


def is_evaluation_report(directory):
    """Whether `directory` holds a jobs.evaluate report: a metrics.json that is one dict of scores
    (a training run's lists its epochs)."""
    return isinstance(progress.read_metrics(directory), dict)


def write_skipped(output, skipped):
    """skipped.json, of a run that goes on; an earlier refusal's list of unreadable frames is gone with it."""
    path = os.path.join(output, "skipped.json")
    if skipped:
        with open(path, "w") as file:
            json.dump(skipped, file, indent=2)
    elif os.path.exists(path):
        os.remove(path)
    ingest.forget_unreadable_frames(output)


def write(config, history, best_weights, val_frames):
    """Fill the run directory from a finished run's history and the weights its best epoch was
    scored with. An output that takes no more files is one error that says how to go on."""
    with ingest.stopped_when_out_of_room(f"--output {config.output}", "so the run's files were not all written; its "
                                         "checkpoints are kept: make room, then the same command writes them again"):
        write_files(config, history, best_weights, val_frames)


def write_files(config, history, best_weights, val_frames):
    model_path = os.path.join(config.output, "model.keras")
    export_model(config, best_weights, model_path)

    progress.write_metrics(config.output, history)
    progress.write_tensorboard(config.output, history)
    plots.save_curves(history, os.path.join(config.output, "curves.png"))
    model = model_io.load_model(model_path)
    frames = val_frames.take_batch(PREVIEW_FRAMES, batch_format="numpy")
    predicted = predict_class_ids_fn(model)(tf.constant(frames["image"])).numpy()
    plots.save_previews(frames["image"], frames["mask"], predicted, os.path.join(config.output, "previews.png"),
                        titles=[str(name) for name in frames["name"]], class_names=class_names(config.n_classes))
    print(f"[unet-ray] run directory {os.path.abspath(config.output)}: model.keras (best val mIoU "
          f"{max(h['val_mean_iou'] for h in history):.4f}), metrics.json, curves.png, previews.png", flush=True)


def export_model(config, weights, path):
    """Weights (as scored: their moving average, when the run kept one) in a float32 model without
    optimizer state: a quarter of a checkpoint's size, and it predicts the same on any hardware,
    whatever precision training used."""
    tf.keras.mixed_precision.set_global_policy("float32")  # the driver trains nothing itself
    model = unet_model((*config.image_size, 3), config.n_filters, config.n_classes)
    model.set_weights(weights)
    try:
        model.save(path + ".tmp.keras", save_format="keras_v3")
        os.replace(path + ".tmp.keras", path)
    except BaseException:
        with contextlib.suppress(OSError):  # a half-written model, on a full disk, would hold space for nothing
            os.remove(path + ".tmp.keras")
        raise
