"""Checkpoints: what every worker saves together, what a restarted or resumed worker restores,
and the driver's cleanup of those Ray Train lost track of.

A checkpoint holds the model with Adam's state (the weights' moving average included), the
history so far, fp16's loss scale, and the weights the best val mIoU so far was scored with.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile

import numpy as np
import pyarrow.fs
import ray
import ray.train
import tensorflow as tf
from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError
# Ray's own model of its record, to write one again as Ray 2.60 (the version pinned) reads it.
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState, _TrainingResultState

from distributed import ingest, progress

MODEL = "model.keras"
STATE = "state.json"
BEST = "best_weights.npz"
CUT_SHORT = (OSError, ValueError, KeyError, zipfile.BadZipFile)  # a checkpoint's file missing or truncated
RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, in its folder


def check_reachable(storage_path, flag):
    """Run in every worker before training. A local storage path exists on the driver's node (the
    driver made it), and on another node only through a shared mount: said now, not at the first
    checkpoint, `--checkpoint-every` epochs in, and again after each restart. `flag`: what names
    the path to the user (`TrainConfig.storage_flag`, on the driver)."""
    if "://" not in storage_path and not os.path.isdir(storage_path):
        node = ray.util.get_node_ip_address()
        raise RuntimeError(f"{flag} {storage_path}: not on this worker's node ({node}); on a cluster, checkpoints "
                           f"need storage every node reaches: pass --storage-path an s3:// or gs:// URI, or a "
                           f"shared mount")


def is_due(epoch, config):
    """Every `checkpoint_every`-th epoch (what a restart resumes from) and the last.

    Saving model and Adam's state costs about a second, a lot beside the few seconds of an epoch
    on a small dataset. Every worker decides the same way, as saving under MWMS needs.
    """
    return (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs


def save_and_report(model, metrics, history, best_weights, rank, with_checkpoint, sum_across_workers):
    """Every worker saves (saving runs collectives under MWMS); rank 0's copy becomes the checkpoint.

    Every worker reports every epoch, checkpoint or not: Ray Train counts the reports. Returns why
    every worker must stop, or None on every worker alike: a disk that takes no more files (full,
    over quota, read-only), which a restart would meet again. The worker that met it gives its own
    error; the others say where it was (the driver reports rank 0's). Raised instead, it would have
    Ray Train retry the run --max-failures times (forever at -1).
    """
    if not with_checkpoint:
        ray.train.report(metrics)
        return None
    # Checked before anyone writes: a worker failing midway through a save would leave the others
    # waiting in its collectives. The workers of one node save at once into the same directory.
    short = room_short(model, best_weights, tempfile.gettempdir(), ray.train.get_context().get_local_world_size())
    if sum_across_workers(tf.constant([float(short is not None)], tf.float64)).numpy()[0]:
        if short:
            print(f"[unet-ray] {short}", file=sys.stderr, flush=True)
        ray.train.report(metrics)
        return short or "a worker's temporary directory has no room for a checkpoint (its line above says which)"
    full = None
    with tempfile.TemporaryDirectory() as directory:
        # "keras_v3", not the default: tf-keras decides the format from a thread-local flag that
        # reads False in Ray Train's worker thread after the first save, writing HDF5 instead.
        model.save(os.path.join(directory, MODEL), save_format="keras_v3")
        with open(os.path.join(directory, STATE), "w") as file:
            json.dump({"history": history, **loss_scale(model)}, file)
        np.savez(os.path.join(directory, BEST), *best_weights)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        try:  # the upload comes after every worker passed the report's barrier: none waits on rank 0 here
            ray.train.report(metrics, checkpoint=checkpoint)
        except OSError as error:
            if not ingest.is_out_of_room(error):
                raise
            full = error
    # Only rank 0 uploads: the others learn of a full --storage-path from it (and the driver reads rank 0's word).
    if sum_across_workers(tf.constant([float(full is not None)], tf.float64)).numpy()[0]:
        return str(full) if full else "--storage-path took no more files at rank 0's upload"
    return None


def room_short(model, best_weights, directory, workers_saving_there):
    """Why `directory` has no room for a checkpoint of `model` from each of `workers_saving_there`, or None."""
    variables = model.variables + model.optimizer.variables  # Adam's moments and the weights' average
    needed = (sum(variable.shape.num_elements() * variable.dtype.size for variable in variables)
              + sum(weights.nbytes for weights in best_weights))
    needed = (int(needed * 1.1) + 2**20) * workers_saving_there  # + the files' own structure, the run's history
    free = shutil.disk_usage(directory).free
    if free >= needed:
        return None
    what = ("a checkpoint, saved there before it is uploaded, needs" if workers_saving_there == 1 else
            f"{workers_saving_there} checkpoints (one per worker on this node), saved there before rank 0's is "
            f"uploaded, need")
    return (f"{directory} on {ray.util.get_node_ip_address()}: {free / 2**20:.1f} MiB free, and {what} about "
            f"{needed / 2**20:.1f} MiB")


def restore(model, checkpoint, steps_per_epoch):
    """Load weights and Adam's state from a checkpoint; returns (first epoch to run, history,
    best weights so far).

    Adam's step count, which drives the learning-rate schedule, is set to the epochs done times
    this run's steps per epoch: a rerun on another number of workers or batch size has another
    number of steps per epoch, and the restored count would put the schedule epochs off (past
    its end, at a learning rate of 0, when the steps per epoch shrink). On the same shape the
    count is unchanged. On another, Adam's bias correction reads the new count too: until the
    count reaches a few thousand, its steps shrink or grow by up to the square root of the ratio
    of the old to the new steps per epoch, a smaller error than the schedule's.
    """
    if checkpoint is None:
        return 0, [], None
    with checkpoint.as_directory() as directory:
        # Adam's slots must exist before loading, or their saved values are silently dropped.
        model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(directory, MODEL))
        state, best_weights = read(directory)
    history = state["history"]
    model.optimizer.iterations.assign(len(history) * steps_per_epoch)
    if "loss_scale" in state and loss_scale(model):  # tf-keras has no public setter for it
        model.optimizer._loss_scale.current_loss_scale.assign(state["loss_scale"])
    return len(history), history, best_weights


def loss_scale(model):
    """{"loss_scale": fp16's dynamic loss scale}, or {} without one. tf-keras's model file leaves it
    out, so a resumed run would start it at 2**15 again and skip each step whose gradients overflow
    until the scale is back down: about one step per halving, its learning rate spent."""
    return {"loss_scale": float(model.optimizer.loss_scale)} if getattr(model.optimizer, "dynamic", False) else {}


def resumed_history(config):
    """The history of the checkpoint the run of `config` resumes from (Ray Train's latest), or []
    for a new run. Read on the driver before the workers start, so that a checkpoint that cannot
    be restored is named at once: in the workers it would fail each attempt, and Ray Train would
    retry that as a worker failure, --max-failures times (forever at -1)."""
    run = config.run_storage
    def instead():  # metrics.json is read only for a refusal, not on every resume
        results = bool(progress.read_history(config.output))  # which a new run may not replace
        return f"{config.to_train_afresh(results)} to train the run afresh, or pass {config.new_run_flags(results)}"

    try:
        latest = latest_checkpoint(run)
    except CheckpointManagerInitializationError as error:
        if not rebuilt_record(run):
            raise ValueError(f"{run}: Ray Train's record of the run's checkpoints does not match them ({error}); "
                             f"{instead()}") from None
        latest = latest_checkpoint(run)
    if latest is None:
        return []
    try:
        return whole_history(latest.filesystem, latest.path)  # read in place: a bucket's model is not downloaded
    except CUT_SHORT as error:
        raise ValueError(f"{latest.path}: the checkpoint run {config.run_name!r} would resume from cannot be read "
                         f"({type(error).__name__}: {error}); {instead()}") from None


def latest_checkpoint(run):
    """Ray Train's latest checkpoint of the run in `run` (storage path/run name), or None."""
    try:
        return latest_result(run).checkpoint
    except RuntimeError:  # no snapshot of checkpoints (or no folder): nothing to resume
        return None


def latest_result(run):
    """Ray Train's record of the run in `run` (storage path/run name), as its `fit` returns it."""
    quiet = logging.getLogger("ray.train")  # Ray's note on the snapshot found, which names no flag of ours
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(run)
    finally:
        quiet.setLevel(level)


def whole_history(filesystem, path):
    """The history in the checkpoint at `path`, once each of its files reads whole; raises one of
    CUT_SHORT if one does not."""
    with filesystem.open_input_stream(f"{path}/{STATE}") as stream:
        history = json.loads(stream.read())["history"]
    # Both zips (a .npz is one): a truncated file has no zip directory at its end. A cut-short
    # best_weights.npz, checked for being there only, failed every worker at its restore instead.
    for name in (MODEL, BEST):
        if filesystem.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.File:
            raise FileNotFoundError(f"{name} is missing")
        with filesystem.open_input_file(f"{path}/{name}") as file, zipfile.ZipFile(file):
            pass
    return history


def rebuilt_record(run):
    """Ray Train truncates its record of a run's checkpoints, then writes it: when the disk fills
    in between (most likely just after a checkpoint's upload took the last room), the record is
    left empty or cut short, and Ray Train would refuse the run though its checkpoint folders are
    whole. Rewrites the record to name the newest whole checkpoint, the one the run would have
    resumed from, and returns True; returns False if the record reads (it is wrong in another way)
    or no checkpoint is whole."""
    filesystem, root = ingest.open_root(run)
    with filesystem.open_input_stream(f"{root}/{RECORD}") as stream:
        text = stream.read()
    try:
        json.loads(text)
        return False
    except ValueError:
        pass
    whole = []
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            try:
                history = whole_history(filesystem, info.path)
            except CUT_SHORT:
                continue  # the upload the full disk cut short, say
            whole.append((len(history), info.base_name, history))
    if not whole:
        return False
    epochs, name, history = max(whole)  # the most epochs; of equals (a restart's), the newest by Ray's timestamped name
    # Its last epoch's metrics: what the workers reported with it.
    latest = _TrainingResultState(checkpoint_dir_name=name, metrics=history[-1])
    # One report per epoch: the checkpoint was the run's report number `epochs` (0-based: epochs - 1).
    record = _CheckpointManagerState(
        checkpoint_results=[latest], checkpoint_report_indices=[epochs - 1], latest_checkpoint_result=latest,
        pending_training_results=[], pending_validation_specs=[], current_report_index=epochs,
        validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[])
    # Still full, say: one error that says to make room, not a traceback (the record stays unreadable till then).
    with ingest.stopped_when_out_of_room(run, f"so Ray Train's record of the run's checkpoints, left unreadable, "
                                              f"cannot be written again; the checkpoints are kept: make room, then "
                                              f"the same command resumes from {name}"):
        with filesystem.open_output_stream(f"{root}/{RECORD}") as stream:
            stream.write(record.json().encode())
    print(f"[unet-ray] {run}/{RECORD}: Ray Train's record of the run's checkpoints was left unreadable (by a full "
          f"disk, most likely) and is written again, naming the newest whole checkpoint, {name} (epoch {epochs})",
          file=sys.stderr, flush=True)
    return True


def read(directory):
    """(state: {"history", and "loss_scale" under fp16}, the weights the best val mIoU so far was
    scored with) of a checkpoint's directory."""
    with open(os.path.join(directory, STATE)) as file:
        state = json.load(file)
    with np.load(os.path.join(directory, BEST)) as arrays:
        best_weights = [arrays[f"arr_{index}"] for index in range(len(arrays.files))]
    return state, best_weights


def remove_untracked(result):
    """Delete the run's checkpoint directories that Ray Train does not track.

    An aborted run loses the reports its workers made after the controller last polled them
    (`training.REPORT_POLL`): those checkpoints are on storage, yet Ray Train never resumes from
    them and, not counting them in `keep_checkpoints`, never deletes them.
    """
    tracked = {checkpoint.path.rstrip("/") for checkpoint, _ in result.best_checkpoints}
    if result.checkpoint is not None:  # None when a full disk stopped the run at its first checkpoint
        tracked.add(result.checkpoint.path.rstrip("/"))
    listing = result.filesystem.get_file_info(pyarrow.fs.FileSelector(result.path))
    for info in listing:
        if (info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
                and info.path.rstrip("/") not in tracked):
            try:
                result.filesystem.delete_dir(info.path)
                print(f"[unet-ray] removed {info.path}: a checkpoint an interrupted attempt left untracked",
                      flush=True)
            except OSError as error:
                print(f"[unet-ray] warning: could not remove {info.path}, a checkpoint an interrupted attempt "
                      f"left untracked: {error}", file=sys.stderr, flush=True)
