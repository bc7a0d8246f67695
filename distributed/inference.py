"""Batch inference: a folder tree of images → predicted masks as Parquet and PNG, on Ray Data.

Read top to bottom: `infer` (driver) lists the inputs, leaves out those a previous run into the
same output already predicted, and streams the rest through two Ray Data stages — `read_images`
tasks decode and preprocess, a pool of `Predictor` actors runs the model and encodes the masks —
back to the driver, which commits them under the output, each file whole or not at all.

The predictions table is the ledger of what is done. A Parquet part is committed only after the
PNG files of its rows, so a killed run loses at most its uncommitted rows, which the next run
predicts again (rewriting their PNGs in place). Failed inputs are retried on every run, so each
run starts the errors table afresh: every input is in predictions or errors, never in both.
"""

import dataclasses
import io
import math
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.fs
import ray
import tensorflow as tf
from PIL import Image

from distributed import inference_output, runtime
from distributed.config import InferConfig, refuse_missing_relative_input
from distributed.ingest import (
    FAILURES_SHOWN, hold, list_tree, named_if_unusable, open_output, open_root, place_below, read_file, spelled,
    stopped_when_out_of_room, within,
)
from distributed.model_io import MODEL_FILE, load_model, model_file, model_geometry, model_identity
from unet_core import data, plots
from unet_core.classes import class_names
from unet_core.training import predict_class_ids_fn


def infer(config: InferConfig):
    """Predict every image under `config.input` not yet done in `config.output`.

    Returns {"ok": predicted now, "failed": unreadable now, "skipped": done by earlier runs}.
    """
    output = inference_output.Output(*open_output(config.output))
    for path, flag in ((config.model, "--model"), (config.input, "--input")):
        refuse_missing_relative_input(path, flag)
    model_path = model_file(config.model)
    runtime.leave_gpus_to_actors()
    # Loaded here too, so a broken model fails before any actor starts (and before its members
    # are read for its identity), and for its shapes.
    size, n_classes = model_geometry(load_model(model_path), model_path)
    with open(model_path, "rb") as file:
        model_bytes = file.read()
    identity = model_identity(model_bytes, model_path)

    input_filesystem, given_root = open_root(config.input)
    with named_if_unusable(config.input):  # the first request to a bucket: out of reach, it fails here
        input_root = image_root(input_filesystem, given_root)
    if input_root != given_root:
        print(f"[unet-ray] {config.input}: a CARLA-layout directory, so the frames of its {data.IMAGE_DIR}/ are "
              f"the inputs (their paths relative to it) and its {data.MASK_DIR}/ is left alone",
              file=sys.stderr, flush=True)
    if within(input_filesystem, input_root, output.filesystem, output.root):
        # Everything under the output counts as earlier results, so no input would be predicted.
        raise ValueError(f"{config.output}: the output must be another directory than the input images "
                         f"({config.input}), and not one that holds them")
    # One run at a time into an output: a second would empty the first's staging and write its parts beside them.
    # Held from before the output is read: a ledger read unheld, while a first run commits its last parts and
    # ends, has those frames predicted again, each then twice in predictions.
    with hold(output.filesystem, output.root, "jobs.infer"):
        settings = output_settings(config, input_filesystem, input_root, size, n_classes)
        output.check_settings(settings)
        below = place_below(output.filesystem, output.root, input_filesystem, input_root)  # an output inside the input,
        inputs, ignored, left_out = list_images(  # however either is spelt: its masks are never inputs
            input_filesystem, input_root, skip=None if below is None else f"{input_root}/{below}",
            writes_files="png" in config.formats or config.overlay)
        kinds = "/".join(data.IMAGE_EXTENSIONS)
        if not inputs:
            raise ValueError(f"{config.input}: no {kinds} images below it"
                             + (f" (only {len(ignored)} other file(s), such as {ignored[0]})" if ignored else ""))
        done = output.done_paths(identity)
        pending = [path for path in inputs if path not in done]
        print(f"[unet-ray] {len(inputs)} image(s) under {config.input}: {len(pending)} to predict, "
              f"{len(inputs) - len(pending)} already done in {config.output}", flush=True)
        if ignored:
            print(f"[unet-ray] {len(ignored)} file(s) there are not {kinds} images (by their extension, or hidden by "
                  f"a dot leading their name or a folder's) and are left alone, such as {', '.join(ignored[:3])}",
                  file=sys.stderr, flush=True)
        if left_out:
            print(f"[unet-ray] {len(left_out)} folder(s) there hold masks, not camera frames (a {data.MASK_DIR} beside "
                  f"{data.IMAGE_DIR}, or an earlier jobs.infer output), and are left alone: {', '.join(left_out[:3])}"
                  + (", ..." if len(left_out) > 3 else ""), file=sys.stderr, flush=True)

        if not pending:  # a finished output is only read, so it may be read-only; and Ray never starts
            return {"ok": 0, "failed": 0, "skipped": len(inputs)}
        new_output = output.filesystem.get_file_info(output.root).type == pyarrow.fs.FileType.NotFound
        try:
            output.make()
        except OSError as error:  # a read-only place, say: a bad --output, named before Ray starts
            raise ValueError(f"--output {config.output}: cannot be made a directory "
                             f"({error.strerror or error})") from None
        unwritable = (f"--output {config.output}", "nothing was predicted: make room, then the same command goes on")
        try:
            # A write before Ray starts, so an output that takes no files (full, read-only) is named at once;
            # and before any part is committed: every done frame is under these settings.
            with stopped_when_out_of_room(*unwritable):
                output.record_settings(settings)
            config = connect_ray(config, len(pending))  # Ray starts only now: a bad model, input or output is refused
        except BaseException:  # a cluster that can never hold the actors, Ctrl-C: no new output left behind
            if new_output:
                output.filesystem.delete_dir(output.root)
            raise
        with stopped_when_out_of_room(*unwritable):  # once Ray is up: a run refused for its cluster keeps its errors
            output.start_run()
        names = class_names(n_classes)
        source = spelled(input_filesystem, input_root)  # failures name a frame as the user would find it
        predictions = inference_output.PartWriter(output, "predictions", config.rows_per_file)
        errors = inference_output.PartWriter(output, "errors", config.rows_per_file)
        ok = failed = 0
        with stopped_when_out_of_room(
                f"--output {config.output}", "the frames committed before are kept: make room, then the same command "
                                             "goes on from them"):
            try:
                if pending:
                    pipeline = predict_pipeline(pending, input_filesystem, input_root, size, ray.put(model_bytes),
                                                config)
                    for batch in pipeline.iter_batches(batch_size=None, batch_format="numpy"):
                        succeeded, reasons = inference_output.write_images(output, batch, config, source)
                        # After the images: a committed row always has its PNG files.
                        predictions.add(inference_output.prediction_table(batch, succeeded, identity, names,
                                                                          "parquet" in config.formats))
                        errors.add(pa.table({"path": pa.array(batch["path"][~succeeded], pa.string()),
                                             "error": pa.array(reasons[~succeeded], pa.string())}))
                        for error in reasons[~succeeded][:max(0, FAILURES_SHOWN - failed)]:
                            print(f"[unet-ray] failed: {error}", file=sys.stderr, flush=True)
                        ok, failed = ok + int(succeeded.sum()), failed + int((~succeeded).sum())
            finally:  # Ctrl-C included: every row collected has its files, so a rerun skips it
                predictions.flush()
                errors.flush()
        if failed:
            more = f" ({failed - FAILURES_SHOWN} not shown above)" if failed > FAILURES_SHOWN else ""
            print(f"[unet-ray] {failed} image(s) failed{more}: every path and reason is in "
                  f"{config.output}/errors/*.parquet; a rerun retries them", file=sys.stderr, flush=True)
        return {"ok": ok, "failed": failed, "skipped": len(inputs) - len(pending)}


def connect_ray(config, frames):
    """Start or join Ray for the actors `config` asks for; refuse a cluster that can never hold one.
    Returns `config` with --num-actors auto resolved (`pool_size`), and a number given capped at the
    batches to predict: each actor more would load its model for nothing (and, on this process's own
    local Ray, sized to the actors asked for, take a process and memory of its own)."""
    batches = batches_to_predict(config, frames)
    if config.num_actors is not None and config.num_actors > batches:
        print(f"[unet-ray] --num-actors {config.num_actors}: {frames} frame(s) make {batches} batch(es) of "
              f"--batch-size {config.batch_size}, so {batches} actor(s), each more would load the model for nothing",
              file=sys.stderr, flush=True)
        config = dataclasses.replace(config, num_actors=batches)
    # The actors' CPUs, and one for Ray Data's read tasks when they cannot run inside the actors. Auto: the cores,
    # and at least one actor's CPUs: --cpus-per-actor above the cores left the reads none, and Ray Data waited.
    actor_cpus = (max(os.cpu_count() or 1, config.cpus_per_actor) if config.num_actors is None
                  else config.num_actors * config.cpus_per_actor)
    runtime.connect(num_cpus=actor_cpus + (0 if reads_in_actors(config) else 1))
    if config.num_actors is None:
        config = dataclasses.replace(config, num_actors=pool_size(config, frames))
        print(f"[unet-ray] --num-actors auto: {config.num_actors} actor(s) of {config.cpus_per_actor} CPU(s)"
              f"{' and 1 GPU' if config.use_gpu else ''} each", file=sys.stderr, flush=True)
    shortfall = actor_shortfall(config)
    runtime.refuse_or_warn(shortfall)
    if config.use_gpu:
        runtime.check_a_gpu_node(config.cpus_per_actor, config.num_actors)
    starved = reads_starved(config)
    if starved:
        print(f"[unet-ray] warning: {starved}", file=sys.stderr, flush=True)
    runtime.warn_of_local_paths({"--input": config.input}, nodes_to_come=shortfall is not None)
    oversubscribed = runtime.oversubscription(config.num_actors, config.cpus_per_actor, what="inference actors",
                                              fewer="each holds its own copy of the model: fewer would run as fast")
    if oversubscribed:
        print(f"[unet-ray] warning: {oversubscribed}", file=sys.stderr, flush=True)
    return config


# What an actor holds at its peak, measured at 1.0 GB (batch 32 at 96x128, tf-keras on CPU), with room
# for masks and overlays at the frames' own size.
ACTOR_MEMORY = 1536 * 2**20


def reads_in_actors(config):
    """Whether Ray Data fuses the read tasks into the actors: only when both ask for the same
    resources, and a read task asks for 1 CPU and no GPU."""
    return config.cpus_per_actor == 1 and not config.use_gpu


def leaves_reads_no_cpu(actors, config):
    """Whether `actors` take every CPU of the cluster while Ray Data's read tasks run outside them."""
    return not reads_in_actors(config) and actors * config.cpus_per_actor >= ray.cluster_resources().get("CPU", 0)


def reads_starved(config):
    """A warning when the actors that fit take every CPU of the cluster while the read tasks run outside
    them, else None. Ray Data then waits for a CPU to read on without end (a head of 2 CPUs joined through
    RAY_ADDRESS, --cpus-per-actor 2: auto's one actor, the least it takes, holds both)."""
    started = min(config.num_actors, runtime.workers_that_fit(config.cpus_per_actor, 1 if config.use_gpu else 0))
    if started == 0 or not leaves_reads_no_cpu(started, config):
        return None
    cpus = ray.cluster_resources().get("CPU", 0)
    return (f"the {started} inference actor(s) that fit take all {cpus:g} CPUs of the cluster, and Ray Data's read "
            f"tasks, which run outside actors of {config.cpus_per_actor} CPUs{' and 1 GPU' if config.use_gpu else ''}, "
            f"need one more: they wait until a node adds one. On a cluster that does not autoscale, lower "
            f"--cpus-per-actor or --num-actors")


def pool_size(config, frames):
    """The actors of --num-actors auto: one per --cpus-per-actor CPUs (per GPU with --use-gpu), and
    per ACTOR_MEMORY of what Ray gives tasks, on the nodes alive now (nodes an autoscaler adds later
    are not counted: pass --num-actors for those), and on this process's own local Ray no more CPUs
    than the cores; a CPU left to the reads when they run outside the actors; never more actors than
    batches to predict, each of which loads a model for nothing."""
    fit = runtime.workers_that_fit(config.cpus_per_actor, 1 if config.use_gpu else 0, ACTOR_MEMORY)
    if runtime.started_local_ray:
        # Its CPUs may pass the cores (jobs.quickstart's training left one more, for Ray Data): actors beyond the
        # cores would share them, each with a model of its own, no faster (runtime.oversubscription).
        fit = min(fit, (os.cpu_count() or 1) // config.cpus_per_actor)
    if leaves_reads_no_cpu(fit, config):
        fit -= 1
    return max(1, min(fit, batches_to_predict(config, frames)))


def batches_to_predict(config, frames):
    """The most actors that can have work: one batch of --batch-size frames each."""
    return math.ceil(frames / config.batch_size)


def output_settings(config, input_filesystem, input_root, size, n_classes):
    """What the frames done in an output were made from and into, which a rerun must keep: the
    input (done frames are known by their path below it), the model's input size and classes (the
    masks' size, the table's columns) and the flags that shape the files. The others (batch size,
    actors, CPUs, rows per file, failing on errors) change no result, so reruns may change them."""
    if isinstance(input_filesystem, pyarrow.fs.LocalFileSystem):
        input_root = os.path.realpath(input_root)
    return {"input": f"{input_filesystem.type_name}://{input_root}", "model_input_size": list(size),
            "model_classes": n_classes, "formats": sorted(set(config.formats)), "overlay": config.overlay,
            "output_size": config.output_size}


def actor_shortfall(config):
    """A warning when the cluster holds fewer Predictor actors than asked for, else None."""
    # With Ray Data's default wait_for_min_actors_s (-1), the actors that start predict and the
    # rest start as nodes are added; with none, nothing ever runs.
    return runtime.cluster_shortfall(
        config.num_actors, config.cpus_per_actor, config.use_gpu, what="inference actors",
        flags=("--num-actors", "--cpus-per-actor"),
        waits="Ray Data predicts with those that start, starts the rest as nodes are added, and with none waits",
    )


# --- listing the inputs ------------------------------------------------------------------------

def image_root(filesystem, root):
    """A CARLA-layout root means its CameraRGB folder: its masks are not inputs. A root that is itself
    such masks (a CameraMask folder beside a CameraRGB one) or an earlier jobs.infer output, or lies
    below either (its masks/: they mirror the input's folders), is a ValueError: below another input
    all are left alone, and given as the input they would be predicted as camera frames without a word."""
    # Every folder from the root up: the masks of an earlier output sit in its masks/<the input's folders>.
    folders = [root.rstrip("/")]
    while "/" in folders[-1].strip("/"):
        folders.append(folders[-1].rpartition("/")[0])
    for folder in folders:
        parent = folder.rpartition("/")[0]
        given = folder == folders[0]
        if (folder.endswith(f"/{data.MASK_DIR}")
                and kind(filesystem, f"{parent}/{data.IMAGE_DIR}", given) == pyarrow.fs.FileType.Directory):
            # A CameraMask at the filesystem's root: its parent is "/", whose listing would be the whole disk.
            instead = (f"{spelled(filesystem, parent)} or its {data.IMAGE_DIR}/" if parent
                       else spelled(filesystem, f"/{data.IMAGE_DIR}"))
            raise ValueError(f"{spelled(filesystem, root)}: the masks of a CARLA-layout directory, not camera "
                             f"frames; pass {instead}")
        settings = f"{folder}/{inference_output.SETTINGS_FILE}"
        if kind(filesystem, settings, given) == pyarrow.fs.FileType.File:
            where = "" if given else f" (in {spelled(filesystem, folder)})"
            raise ValueError(f"{spelled(filesystem, root)}: an earlier jobs.infer output{where}, whose PNGs are "
                             f"masks, not camera frames; pass the images it was given")
    subfolders = filesystem.get_file_info([f"{root}/{data.IMAGE_DIR}", f"{root}/{data.MASK_DIR}"])
    if all(info.type == pyarrow.fs.FileType.Directory for info in subfolders):
        return f"{root}/{data.IMAGE_DIR}"
    return root


def kind(filesystem, path, given):
    """`path`'s FileType; above the folder the user gave (`given` false) one that cannot be read is
    taken for missing: a bucket's policy may allow only the prefix a job reads."""
    try:
        return filesystem.get_file_info(path).type
    except (OSError, pyarrow.ArrowException):  # Azure's come as bare ArrowException
        if given:
            raise
        return pyarrow.fs.FileType.NotFound


def list_images(filesystem, root, skip=None, writes_files=True):
    """(sorted paths of the PNG/JPEG files below `root`, sorted paths of its other files, the
    folders left out as `not_inputs`), all relative to `root`. A hidden PNG/JPEG (its name or a
    folder's starts with a dot) is among the other files; any other hidden file is left out.

    `skip` is the output directory: nested in the input, its masks must not become inputs.
    `writes_files`: each image gets PNG files named after it, so two that would share one are refused.
    """
    root_type = filesystem.get_file_info(root).type
    if root_type != pyarrow.fs.FileType.Directory:
        what = {pyarrow.fs.FileType.File: "a file", pyarrow.fs.FileType.NotFound: "not found"}.get(
            root_type, "a device, named pipe or socket")  # /dev/null, say, which is there: not "not found"
        raise ValueError(f"{spelled(filesystem, root)}: {what}; --input must be a directory of images")
    found = list_tree(filesystem, root)
    folders = not_inputs(found, root) - {skip}
    skipped = folders | {skip}
    paths, ignored = [], []
    for info in found:
        relative = info.path[len(root) + 1:]
        parts = relative.split("/")
        if (info.type == pyarrow.fs.FileType.Directory
                or any(f"{root}/{'/'.join(parts[:depth])}" in skipped for depth in range(1, len(parts)))):
            continue
        if any(part.startswith(".") for part in parts):  # hidden: a PNG/JPEG there is named, never predicted
            if data.has_image_extension(info.base_name):
                ignored.append(relative)
            continue
        (paths if data.is_image_name(info.base_name) else ignored).append(relative)
    paths.sort()
    outputs = {}
    for path in paths if writes_files else ():
        mask = inference_output.output_png_name(path)
        clash = outputs.setdefault(inference_output.output_path("masks", mask), path)
        if clash != path:
            raise ValueError(f"{spelled(filesystem, root)}: {clash} and {path} would both write the mask {mask}")
    for written, path in outputs.items():  # x.jpg's mask x.jpg.png is the folder x.jpg.png/y.png's needs
        parents = written.split("/")[1:-1]
        for depth in range(1, len(parents) + 1):
            clash = outputs.get(inference_output.output_path("masks", "/".join(parents[:depth])))
            if clash is not None:
                raise ValueError(f"{spelled(filesystem, root)}: {clash}'s mask {'/'.join(parents[:depth])} would be a "
                                 f"file where {path}'s mask needs a folder of that name")
    return paths, sorted(ignored), sorted(folder[len(root) + 1:] for folder in folders)


def not_inputs(found, root):
    """Folders below `root` whose PNGs are no camera frames: the CameraMask folder of a CARLA-layout
    root at any depth (a tree of drives), and the outputs of earlier runs of jobs.infer."""
    folders = {info.path for info in found if info.type == pyarrow.fs.FileType.Directory}
    masks = {folder for folder in folders if folder.endswith(f"/{data.MASK_DIR}")
             and folder.removesuffix(data.MASK_DIR) + data.IMAGE_DIR in folders}
    settings = f"/{inference_output.SETTINGS_FILE}"
    outputs = {info.path.removesuffix(settings) for info in found
               if info.path.endswith(settings) and info.path != f"{root}{settings}"}
    return masks | outputs


# --- the Ray Data pipeline ---------------------------------------------------------------------

def predict_pipeline(paths, filesystem, root, size, model_ref, config):
    """Lazy and streaming: relative paths → read + preprocess tasks → a pool of Predictor actors.

    When both stages ask for the same resources (CPU inference, one CPU per actor) Ray Data fuses
    the reading into the actors; with GPUs it stays in CPU tasks that keep the GPUs fed.
    """
    # Ray Data splits the paths into 200 blocks whatever their number, and each block's frames come
    # back to this process as one batch: at a million frames, batches of 5,000 masks held at once,
    # and as many finished frames per actor lost to a crash. At most a Parquet part's rows a block.
    blocks = min(len(paths), max(200, math.ceil(len(paths) / config.rows_per_file)))
    return ray.data.from_items([{"path": path} for path in paths], override_num_blocks=blocks).map_batches(
        read_images,
        batch_size=config.batch_size,
        fn_kwargs=dict(filesystem=filesystem, root=root, size=size,
                       keep_bytes=config.overlay and config.output_size == "source"),
    ).map_batches(
        Predictor,
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        fn_constructor_kwargs=dict(model_ref=model_ref, cpus=config.cpus_per_actor, use_gpu=config.use_gpu,
                                   output_size=config.output_size, overlay=config.overlay),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if config.use_gpu else 0,
    )


def read_images(batch, filesystem, root, size, keep_bytes):
    """Relative paths → model inputs; a file that fails keeps its row, with the reason in `error`."""
    paths = batch["path"]
    images = np.zeros((len(paths), *size, 3), np.float32)
    source_sizes = np.zeros((len(paths), 2), np.int32)
    errors, contents = [], []
    for index, relative in enumerate(paths):
        path, content = f"{root}/{relative}", b""
        named = spelled(filesystem, path)  # a frame in a bucket with its scheme, as the user gave --input
        try:
            content = read_file(filesystem, path)
            images[index], source_sizes[index] = data.preprocess_image(content, named, size)
            errors.append("")
        except Exception as error:  # noqa: BLE001  one bad file must never stop the others
            errors.append(str(error) if isinstance(error, ValueError) else f"{named}: {type(error).__name__}: {error}")
        contents.append(content if keep_bytes else b"")
    return {"path": paths, "image": images, "source_size": source_sizes, "error": np.array(errors, object),
            "image_bytes": np.array(contents, object)}


class Predictor:
    """One per actor: loads the model once, then turns preprocessed batches into encoded masks."""

    def __init__(self, model_ref, cpus, use_gpu, output_size, overlay):
        runtime.configure_tensorflow_threads(cpus)  # before TF starts its thread pools
        runtime.select_devices(use_gpu)
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, MODEL_FILE)
            with open(path, "wb") as file:
                file.write(ray.get(model_ref))
            self.model = load_model(path)
        self.class_ids = predict_class_ids_fn(self.model)
        self.n_classes = self.model.output_shape[-1]
        self.output_size, self.overlay = output_size, overlay

    def __call__(self, batch):
        succeeded = batch["error"] == ""
        count = len(batch["path"])
        predicted = np.zeros((count, *batch["image"].shape[1:3]), np.uint8)
        if succeeded.any():
            predicted[succeeded] = self.class_ids(tf.constant(batch["image"][succeeded])).numpy()
        sizes = np.zeros((count, 2), np.int32)
        pixels = np.zeros((count, self.n_classes), np.int64)
        masks, overlays = [b""] * count, [b""] * count
        for index in np.flatnonzero(succeeded):
            size = tuple(batch["source_size"][index]) if self.output_size == "source" else predicted.shape[1:]
            class_ids = data.resize_mask(predicted[index], size)
            sizes[index] = size
            pixels[index] = data.resized_mask_counts(predicted[index], size, self.n_classes)
            masks[index] = encode_mask(class_ids)
            if self.overlay:
                overlays[index] = encode_png(plots.overlay(self.background(batch, index), class_ids))
        return {"path": batch["path"], "error": batch["error"], "height": sizes[:, 0], "width": sizes[:, 1],
                "pixels": pixels, "mask_png": np.array(masks, object), "overlay_png": np.array(overlays, object)}

    def background(self, batch, index):
        """The image under an overlay, at the mask's size."""
        if self.output_size == "source":
            return data.decode_image(batch["image_bytes"][index], batch["path"][index])
        return batch["image"][index]


# Palette entry i is the colour (i, 0, 0): any reader that expands the palette sees CameraMask's
# convention (class id in R, G = B = 0, opaque), while the file holds one byte per pixel, which
# encodes 3-4x faster than RGBA.
MASK_PALETTE = bytes(channel for class_id in range(256) for channel in (class_id, 0, 0))


def encode_mask(class_ids):
    """A mask PNG that decodes, as RGB or RGBA, to the class id in R with G = B = 0."""
    image = Image.fromarray(class_ids.astype(np.uint8, copy=False), mode="P")
    image.putpalette(MASK_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_png(pixels):
    buffer = io.BytesIO()
    # Level 1: several times faster than the default, and masks compress well regardless.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


