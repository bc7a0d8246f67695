"""Distributed training: Ray Train's TensorflowTrainer, MultiWorkerMirroredStrategy across workers.

Read top to bottom: `train` (driver) prepares data and launches `train_loop_per_worker` on every
worker; each worker runs one `fit` over every epoch of its shard (fed by shard.py), and after each
epoch the workers score the whole validation set once between them, keep the weights of the best
epoch so far in memory, report, and save a checkpoint together when one is due (checkpoint.py);
the driver then exports the best weights the last checkpoint carries.
"""

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time

import numpy as np
import ray
import ray.train
import tensorflow as tf
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer

from distributed import checkpoint, ingest, progress, runtime, run_directory, shard
from distributed.failure_injection import FailOnce
from distributed.tf_backend import TensorflowClusterConfig
from distributed.config import TrainConfig, TrainingFailed, refuse_missing_relative_input, refuse_relative_output
from unet_core import augment, unet_model
from unet_core.metrics import ConfusionMatrix
from unet_core.training import (
    averaged_weights, compile_unet, cosine_with_warmup, predict_logits_fn, score_batch, start_from_class_prior,
)


def train(config: TrainConfig):
    """Run a whole training job; returns the run directory's metrics (one dict per epoch)."""
    # The driver only draws previews with the model: a GPU it touched would stay taken for the whole process.
    runtime.leave_gpus_to_actors()
    with ingest.removed_if_left_empty(config.output):  # a run refused for its data, say
        held, resumed, frame_list = check_before_start(config)
        with held:  # the run's hold on --output, until it ends
            return run_training(config, resumed, frame_list)


BEFORE_TRAINING = "so training did not start; make room, then the same command goes on"


def run_training(config, resumed, frame_list):
    """`train` once `check_before_start` holds --output for this run; `resumed` is the history of
    the checkpoint it resumes from, `frame_list` the frames of --data (None: the run generates its own)."""
    # A disk full before the first epoch, as midway: one error that says to make room, not a traceback (exit 1).
    with ingest.stopped_when_out_of_room(f"--output {config.output}", BEFORE_TRAINING):
        data_uri = config.data or run_directory.generate_scenes(config)
    frame_list = frame_list or list_frames(config, data_uri)
    train_frames, val_frames, skipped = ingest.load_frames(
        frame_list, config.image_size, config.n_classes, config.output, config.skip_bad)
    frames = run_directory.frames_identity(*frame_list.names(skipped))
    # With --skip-bad, or scenes generated just now, the frames trained on are known only now.
    run_directory.check_run_identity(config, frames)
    with ingest.stopped_when_out_of_room(f"--output {config.output}", BEFORE_TRAINING):
        run_directory.write_skipped(config.output, skipped)  # once the run may go on: a refused rerun changes no record
    with ingest.stopped_when_out_of_room(config.run_storage, BEFORE_TRAINING):
        run_directory.record_run_identity(config, frames)
    per_worker = print_frames(config, data_uri, train_frames, val_frames, skipped)
    done = trains_no_more(config, resumed)
    if done:  # the driver exports what the checkpoint holds: Ray Train's workers would take ~20 s to start
        print(f"[unet-ray] run {config.run_name!r} {done}", flush=True)
        return export(config, checkpoint.latest_result(config.run_storage), val_frames)
    if config.use_gpu:  # only for a run that trains: a finished one only exports, on the driver
        runtime.check_a_gpu_node(config.cpus_per_worker, config.num_workers)
    weights, counts = class_balance(train_frames, config)

    trainer = TensorflowTrainer(
        train_loop_per_worker,
        tensorflow_config=TensorflowClusterConfig(),  # Ray's own would import TensorFlow into the controller
        train_loop_config={
            # The storage path as this process resolves it: a worker runs in another directory,
            # where a relative --output would point somewhere else.
            "config": dataclasses.replace(config, storage_path=config.resolved_storage_path).to_dict(),
            "storage_flag": config.storage_flag,  # the worker's config always has the path the driver resolved
            "rows_per_worker": per_worker,
            "class_weights": weights,
            "class_pixel_counts": counts,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        datasets={"train": train_frames, "val": val_frames},
        # Validation is not split by Ray: every worker sees it whole and scores its own stride.
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=config.resolved_storage_path,
            # The most recent ones: each carries the best weights so far.
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=[progress.EpochsToDisk(config.output, resumed)],
        ),
    )
    result = fit(trainer, config)
    stopped = result.return_value or {}  # rank 0's; the workers stop together, on all-reduced figures
    if "out_of_room" in stopped:
        checkpoint.remove_untracked(result)  # the half-uploaded one: it holds room the user is asked to make
        raise out_of_room(stopped["out_of_room"], config)
    if "diverged" in stopped:
        diverged = stopped["diverged"]
        raise ValueError(
            f"{config.output}: training diverged at epoch {diverged['epoch']} (validation loss "
            f"{diverged['val_loss']}), so no model was exported from it; train into another --output with a "
            f"lower --learning-rate (now {config.learning_rate}) or a cap on the gradient (--clip-norm 1)")
    return export(config, result, val_frames)


def export(config, result, val_frames):
    """Fill the run directory from the last checkpoint of `result` (Ray Train's); returns its history."""
    with result.checkpoint.as_directory() as directory:  # the last epoch always checkpoints
        state, best_weights = checkpoint.read(directory)
    history = state["history"]
    run_directory.write(config, history, best_weights, val_frames)
    checkpoint.remove_untracked(result)  # after the export: housekeeping never costs the run its model
    return history


def check_before_start(config):
    """Refuses a run that cannot go on (bad paths, another run's output or one training into it,
    too few workers, a checkpoint to resume from that cannot be read) before any data is decoded;
    makes the output and checkpoint directories and connects to Ray, or starts it. Returns the run's
    hold on --output and its checkpoints (`ingest.hold`), the history of the checkpoint it resumes
    from ([] if none) and the FrameList of --data (None without it)."""
    try:
        frame_list = check_paths(config)
    except OSError as error:  # a name too long for the filesystem, say: a bad flag, not a crash
        raise ValueError(f"a path given to --output, --data, --val-data or --storage-path cannot be used: "
                         f"{error}") from None
    held = contextlib.ExitStack()
    output = ingest.open_output(config.output)
    held.enter_context(ingest.hold(*output, "jobs.train"))
    try:
        # And the run's checkpoints: a second experiment given another --output but the same --storage-path
        # and --run-name passed, resumed from the first's checkpoint and wrote its own beside the first's.
        # Unless they are --output itself (--storage-path its parent, --run-name its name): held a second
        # time, the run refused itself, naming its own pid.
        storage = ingest.open_root(config.run_storage)
        if ingest.held_place(*storage) != ingest.held_place(*output):
            held.enter_context(ingest.hold(*storage, "jobs.train", "another --run-name or --storage-path"))
        # Held first: a checkpoint another run is writing is that run's, and the hold says so.
        resumed = checkpoint.resumed_history(config)
        connect_ray(config)
    except BaseException:
        held.close()
        raise
    return held, resumed, frame_list


def connect_ray(config):
    """Ray for this run, started or joined: enough workers for it, the checkpoint folder made, warnings given."""
    runtime.connect(num_cpus=config.num_workers * config.cpus_per_worker + 1)
    shortfall = runtime.cluster_shortfall(config.num_workers, config.cpus_per_worker, config.use_gpu)
    runtime.refuse_or_warn(shortfall)
    if "://" not in config.resolved_storage_path:  # once the run can start; a bucket is Ray Train's to reach
        ingest.make_directory(config.resolved_storage_path, config.storage_flag)
    scenes = os.path.join(config.output, run_directory.SCENES)
    data = {"--data": config.data} if config.data else {"--output's scenes": scenes}
    paths = {**data, "--val-data": config.val_data, config.storage_flag: config.resolved_storage_path}
    # Below --output, which takes no URI: the flag that takes one in their place.
    passed_as = {"--output's scenes": "--data"}
    if config.storage_path is None:
        passed_as[config.storage_flag] = "--storage-path"
    runtime.warn_of_local_paths(paths, nodes_to_come=shortfall is not None, passed_as=passed_as)
    oversubscribed = runtime.oversubscription(config.num_workers, config.cpus_per_worker)
    if oversubscribed:
        print(f"[unet-ray] warning: {oversubscribed}", file=sys.stderr, flush=True)


def check_paths(config):
    """Before anything is written: each path can be used, and none lands among another's files, and
    --data pairs up and splits into enough frames; returns its FrameList (None without --data)."""
    if config.storage_path is not None:
        refuse_relative_output(config.storage_path, "--storage-path")
    ingest.open_output(config.output)
    try:  # a file there or above it, a missing bucket: now, not once Ray has started and the data is decoded
        ingest.open_output(config.resolved_storage_path)
    except ValueError as error:
        raise ValueError(f"{config.storage_flag} {error}") from None
    for uri, flag in ((config.data, "--data"), (config.val_data, "--val-data")):
        if uri is not None:
            refuse_missing_relative_input(uri, flag)
            try:  # a mistyped path: named at once, not once Ray has started, with the flag that gave it
                ingest.check_layout(uri)
            except ValueError as error:
                raise ValueError(f"{flag} {error}") from None
            # A folder in CameraRGB/ would break the data.
            ingest.check_output_outside(config.output, uri, flag, "the run's files")
            if config.storage_path is not None:
                ingest.check_output_outside(config.storage_path, uri, flag, "its checkpoints", "--storage-path")
    if config.data is not None and config.val_data is not None:
        ingest.check_validation_apart(config.data, config.val_data)
    scenes = os.path.join(config.output, run_directory.SCENES)
    if config.data is None and config.val_data is not None and ingest.within(*ingest.open_root(config.val_data),
                                                                             *ingest.open_root(scenes)):
        raise ValueError(f"{config.val_data}: --val-data lies in {scenes}, where the run writes the scenes it trains "
                         f"on (and removes every other frame): pass another --val-data or --output")
    if run_directory.is_evaluation_report(config.output):
        raise ValueError(f"{config.output}: a jobs.evaluate report, whose metrics.json and previews.png the run's "
                         f"would replace: pass another --output")
    run_directory.check_output_is_this_runs(config)
    frame_list = list_frames(config, config.data) if config.data else None  # by name: unpaired, too few to split
    ingest.make_directory(config.output, "--output")
    # Without --skip-bad every frame listed trains or validates: a rerun on frames added or removed since is
    # refused now, not once every frame is decoded.
    frames = None if frame_list is None or config.skip_bad else run_directory.frames_identity(*frame_list.names())
    run_directory.check_run_identity(config, frames)
    return frame_list


def list_frames(config, data_uri):
    """The run's FrameList: --data's frames split for validation (`ingest.list_frames`)."""
    return ingest.list_frames(data_uri, config.val_fraction, config.split, min_train_frames=config.num_workers,
                              val_uri=config.val_data)


def print_frames(config, data_uri, train_frames, val_frames, skipped):
    """The frames the run trains and validates on, and the skipped ones; returns the training
    frames each worker gets."""
    sources = data_uri if config.val_data is None else f"{data_uri} and {config.val_data}"
    per_worker, sitting_out = divmod(train_frames.count(), config.num_workers)
    # Ray Data's equal split: every worker gets the same number of training frames.
    uneven = f"; {sitting_out} training frame(s) sit out each epoch ({per_worker} per worker)" if sitting_out else ""
    print(f"[unet-ray] {train_frames.count()} training / {val_frames.count()} validation frames "
          f"from {sources}; {len(skipped)} skipped{uneven}", flush=True)
    for reason in list(skipped.values())[:ingest.FAILURES_SHOWN]:
        print(f"[unet-ray] skipped: {reason}", file=sys.stderr, flush=True)
    if skipped:
        more = len(skipped) - ingest.FAILURES_SHOWN
        print(f"[unet-ray] every skipped frame and why{f' ({more} not shown above)' if more > 0 else ''}: "
              f"{os.path.join(config.output, 'skipped.json')}", file=sys.stderr, flush=True)
    return per_worker


def class_balance(train_frames, config):
    """(per-class loss weights, or None for a plain loss; pixels per class for the logits' prior
    bias, or None without it), both from the training masks, as lists for the workers."""
    if config.class_weight_power == 0 and not config.prior_bias:
        return None, None
    counts = ingest.class_pixel_counts(train_frames, config.n_classes)
    weights = augment.class_weights(counts, config.class_weight_power).tolist() if config.class_weight_power else None
    return weights, counts.tolist() if config.prior_bias else None


# Ray Train's controller takes one report from each worker per poll, every 2 s by default, and a worker's
# next ray.train.report waits until it has: every epoch shorter than that (on a GPU, a small data set,
# --smoke) was held to 2 s. Polled every 0.1 s, none waits, and answering the polls costs an epoch
# 1-4% of its compute on 2 cores (BENCHMARKS.md, "Reports polled").
REPORT_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def fit(trainer, config):
    """`trainer.fit()`, where Ctrl-C ends in KeyboardInterrupt and leaves Ctrl-C working afterwards,
    and a failed run in TrainingFailed, which says how to go on; reports polled as `REPORT_POLL` says
    unless the environment sets it (the driver's environment reaches the controller).

    Ray Train installs a SIGINT handler for the run: the first Ctrl-C aborts the run and ends the
    driver's wait in SystemExit(1). It leaves the handler installed after the run, where aborting
    the finished run does nothing: the next two Ctrl-C (in the quickstart's inference, say) would
    be swallowed and the third would exit 0. A Ctrl-C as the run finishes (its controller no longer
    takes an abort) was swallowed alike, and the job went on to export: it ends the job here too.
    """
    handler = signal.getsignal(signal.SIGINT)
    os.environ.setdefault(*REPORT_POLL)
    try:
        with signals_received() as received:
            result = trainer.fit()
        if signal.SIGINT in received:
            raise KeyboardInterrupt("training interrupted as it finished")
        return result
    except SystemExit as aborted:
        raise KeyboardInterrupt("training interrupted") from aborted
    except ray.train.TrainingFailedError as failed:
        full = disk_full(failed)
        if full is not None:
            # Said alone, not after Ray's traceback: the traceback's last line would read as the cause to fix.
            raise out_of_room(full, config) from None
        raise TrainingFailed(
            f"{failed}\ntraining failed: the same command resumes from the run's last checkpoint (one every "
            f"--checkpoint-every epochs); --max-failures N has Ray Train restart the workers from it by itself"
        ) from failed
    finally:
        if threading.current_thread() is threading.main_thread():  # where Ray installs it, too
            signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def signals_received():
    """Yields a set that holds, once the block is left, the number of every signal the process received
    inside it, whichever handler took it (through Python's wakeup fd). Empty outside the main thread and
    where the process has a wakeup fd already (an asyncio loop's signal handlers), which is left alone."""
    received = set()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    read, write = os.pipe()
    try:
        os.set_blocking(read, False)
        os.set_blocking(write, False)  # a full pipe drops bytes, never blocks the handler
        earlier = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if earlier != -1:
            signal.set_wakeup_fd(earlier)
            yield received
            return
        try:
            yield received
        finally:
            signal.set_wakeup_fd(-1)
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(read, 512):
                    received.update(chunk)
    finally:
        os.close(read)
        os.close(write)


def out_of_room(cause, config):
    """The error a run ends in when a disk took no more files: neither the same command nor a restart
    can go on until there is room."""
    places = ("--output (metrics), --storage-path (checkpoints)" if config.storage_path is not None
              else "--output (metrics and checkpoints)")
    return ValueError(
        f"a disk the run writes to cannot take more files ({cause}): {places} or a node's temporary directory; "
        f"the checkpoints saved before are kept: make room, then the same command resumes from the last")


def disk_full(failed):
    """The OSError that failed a run (in Ray Train's controller, which writes --output's metrics, or in a
    worker, which writes checkpoints) when a disk took no more files: full, over quota, read-only; else None."""
    causes = [getattr(failed, "controller_failure", None), *getattr(failed, "worker_failures", {}).values()]
    return next((cause for cause in causes if ingest.is_out_of_room(cause)), None)


def train_loop_per_worker(loop_config):
    """One worker's whole run: set up TensorFlow, build (or restore) the model, then one `fit` over
    the remaining epochs; returns why training stopped before --epochs (`EndOfEpoch.stopped`), if it did for
    another reason than early stopping (every worker stops alike; the driver reads rank 0's reason)."""
    config = TrainConfig(**loop_config["config"])
    steps_per_epoch = math.ceil(loop_config["rows_per_worker"] / config.batch_size)
    runtime.configure_tensorflow_threads(config.cpus_per_worker)
    runtime.select_devices(config.use_gpu)
    checkpoint.check_reachable(config.resolved_storage_path, loop_config["storage_flag"])
    runtime.quiet_per_epoch_logs()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    tf.keras.utils.set_random_seed(config.seed)  # same initial weights on every worker

    # A lone worker has nothing to all-reduce, so it runs without MWMS and can XLA-compile its
    # training step: 13 s instead of 21 s per epoch on 2 cores (BENCHMARKS.md). Not under MWMS
    # (XLA on CPU cannot compile collectives), nor with mixed precision on CPU: for bfloat16 XLA
    # computes convolutions in float32 (openxla/xla#10687) and would forfeit the native bf16 speed.
    strategy = distribution_strategy(world_size, config.use_gpu)
    sum_across_workers = summing_across_workers(strategy)  # traced once, for every agreement of the run
    precision = set_precision_policy(config.mixed_precision, config.use_gpu, sum_across_workers)
    jit_compile = config.jit_compile and world_size == 1 and (config.use_gpu or precision == "off")
    learning_rate = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = cosine_with_warmup(
            config.learning_rate, steps_per_epoch * config.epochs, steps_per_epoch * config.resolved_warmup_epochs
        )
    with strategy.scope():
        model = compile_unet(
            unet_model((*config.image_size, 3), config.n_filters, config.n_classes), learning_rate,
            jit_compile=jit_compile, clip_norm=config.clip_norm, ema_momentum=config.ema_momentum,
        )
        if loop_config["class_pixel_counts"] is not None:
            start_from_class_prior(model, loop_config["class_pixel_counts"], loop_config["class_weights"])
        first_epoch, history, best_weights = checkpoint.restore(model, ray.train.get_checkpoint(), steps_per_epoch)
    if first_epoch and rank == 0:
        worker_log(f"[unet-ray] resumed from the checkpoint of epoch {first_epoch}")
    done = trains_no_more(config, history)
    if done:  # restarted after the last epoch's checkpoint; a rerun of a finished run starts no worker
        if rank == 0:
            worker_log(f"[unet-ray] run {config.run_name!r} {done}")
        return
    seed_dropout(config, rank)

    train_shard = ray.train.get_dataset_shard("train")
    # Each worker feeds its own shard in per-worker batches. Handing Keras a plain dataset
    # instead would make it slice every batch across workers and silently drop the rest. One
    # dataset holds every remaining epoch, so fit runs once: a fit per epoch spent 3-4 s per
    # epoch tearing down its distributed iterator (py-spy, BENCHMARKS.md).
    in_memory = shard.fits_in_memory(loop_config["rows_per_worker"], config)
    batches = strategy.distribute_datasets_from_function(
        lambda _: shard.training_batches(train_shard, config, first_epoch, rank, loop_config["class_weights"],
                                         in_memory))
    end_of_epoch = EndOfEpoch(
        sum_across_workers, ray.train.get_dataset_shard("val"), rank, world_size, config, history, best_weights,
        {"resumed_from_epoch": first_epoch, "mixed_precision": precision, "jit_compile": jit_compile,
         "shard_in_memory": in_memory},
    )
    callbacks = [end_of_epoch] + ([FailOnce(config, rank, world_size)] if config.fail_once_at_epoch else [])
    model.fit(batches, initial_epoch=first_epoch, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
              verbose=0, callbacks=callbacks)
    return end_of_epoch.stopped


class EndOfEpoch(tf.keras.callbacks.Callback):
    """After each epoch, on every worker: score validation (on the weights' moving average when
    the run keeps one) and copy the scored weights when they beat every epoch before, report to
    Ray Train (with a checkpoint when one is due: raw weights and Adam's state, the average
    included, and the best weights so far), and stop early once val mIoU stops improving.

    The best weights wait in memory for the next scheduled checkpoint instead of being
    checkpointed at once: a new best comes almost every epoch early in a run, and saving model
    and Adam's state each time took 156 saves and 14% of a 250-epoch run (RESULTS.md).
    """

    def __init__(self, sum_across_workers, val_frames, rank, world_size, config, history, best_weights, constants):
        super().__init__()
        self.val_frames, self.rank, self.world_size = val_frames, rank, world_size
        self.config, self.history, self.best_weights, self.constants = config, history, best_weights, constants
        self.forward = None
        self.sum_across_workers = sum_across_workers
        self.started = None  # when the epoch began
        # Why every worker stopped before --epochs, as the driver reports it: {"diverged": the metrics of the
        # epoch whose weights went to NaN or inf} or {"out_of_room": why a disk took no checkpoint}.
        self.stopped = None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if self.forward is None:
            self.forward = predict_logits_fn(self.model)  # traced once, not every epoch
        config = self.config
        val_started = time.time()
        with averaged_weights(self.model):
            scores = evaluate(self.model, self.forward, self.sum_across_workers, self.val_frames, self.rank,
                              self.world_size, config)
            # Weights gone to NaN or inf still score a val mIoU (every pixel class 0): never the best.
            diverged = not math.isfinite(scores["val_loss"])
            # The scores are all-reduced, so every worker keeps the same epoch's weights (and stops alike).
            if not diverged and is_new_best(self.history, scores):
                self.best_weights = self.model.get_weights()
        metrics = {
            "epoch": epoch + 1,
            "loss": logs["loss"],
            "pixel_accuracy": logs["pixel_accuracy"],
            "mean_iou": logs["mean_iou"],
            **scores,
            **self.constants,
            "epoch_seconds": time.time() - self.started,  # training + validation
            "val_seconds": time.time() - val_started,
        }
        self.history.append(metrics)
        if diverged:
            self.stopped = {"diverged": {key: metrics[key] for key in ("epoch", "val_loss")}}
        stop = diverged or should_stop_early(self.history, config.early_stopping_patience)
        if self.rank == 0:
            worker_log(f"[unet-ray] epoch {metrics['epoch']}/{config.epochs} loss {metrics['loss']:.4f} "
                       f"val_loss {metrics['val_loss']:.4f} val_pixel_accuracy "
                       f"{metrics['val_pixel_accuracy']:.4f} val_mean_iou {metrics['val_mean_iou']:.4f} "
                       f"({metrics['epoch_seconds']:.0f} s)")
        # A diverged epoch is not checkpointed: the last checkpoint keeps weights that were still finite.
        checkpoint_now = (checkpoint.is_due(epoch, config) or stop) and not diverged
        no_room = checkpoint.save_and_report(self.model, metrics, self.history, self.best_weights, self.rank,
                                             checkpoint_now, self.sum_across_workers)
        if no_room:
            self.stopped = {"out_of_room": no_room}
            stop = True
        if stop:
            if self.rank == 0 and self.stopped is None:
                worker_log(f"[unet-ray] early stop: no better val_mean_iou for {config.early_stopping_patience} epochs")
            self.model.stop_training = True


def seed_dropout(config, rank):
    """After the model is built (the same initial weights everywhere), give each worker its own
    global random stream: with one seed, every worker's dropout drew the same masks at each step."""
    tf.random.set_seed(shard.worker_seed(config, rank))


def worker_log(message):
    """One line to the driver's console. Ray Train patches `print` in workers to also log each
    line, which printed every line twice; a print to an explicit file is left alone."""
    print(message, file=sys.__stdout__, flush=True)


def is_new_best(history, scores):
    """Whether an epoch's val mIoU beats every earlier epoch's (a tie does not).

    By `val_mean_iou`, Keras's definition: a class predicted but absent from the truth counts
    as an IoU of 0, so an epoch that hallucinates classes is not kept for it.
    """
    return scores["val_mean_iou"] > max((row["val_mean_iou"] for row in history), default=-1.0)


def best_epoch_index(history):
    """The epoch `model.keras` holds: the best val mIoU, the first of a tie (as `is_new_best` keeps it)."""
    return max(range(len(history)), key=lambda index: history[index]["val_mean_iou"])


def trains_no_more(config, history):
    """Why a run at `history` (its checkpoint's) has no epoch left to train, or None if it has."""
    if len(history) >= config.epochs:
        return (f"has trained {len(history)} epoch(s), --epochs {config.epochs} asks for no more; exporting its "
                f"best model again (pass more --epochs to train on)")
    if should_stop_early(history, config.early_stopping_patience):
        return (f"stopped early after epoch {len(history)}; exporting its best model again (pass a larger "
                f"--early-stopping-patience to train on)")
    return None


def should_stop_early(history, patience):
    if not patience or len(history) <= patience:
        return False
    return len(history) - 1 - best_epoch_index(history) >= patience


def distribution_strategy(world_size, use_gpu):
    """MWMS across workers (a lone worker's default strategy otherwise). TensorFlow all-reduces over
    NCCL only when asked: its AUTO takes the ring over gRPC, which carries every GPU gradient through
    host memory. Tensors on the host (the workers' agreements) take the ring either way."""
    if world_size == 1:
        return tf.distribute.get_strategy()
    implementation = tf.distribute.experimental.CommunicationImplementation
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation.NCCL if use_gpu else implementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def set_precision_policy(mixed_precision, use_gpu, sum_across_workers):
    """Sets Keras's global policy; returns the precision the workers train in, `auto` resolved to
    bf16 if every worker computes it natively, else off. Resolved by each worker alone, the workers
    of a mixed cluster (Ampere GPUs beside older ones) would train in different precisions and
    all-reduce gradients computed at different precisions."""
    if mixed_precision == "auto":
        lacking = sum_across_workers(tf.constant([0.0 if runtime.native_bfloat16(use_gpu) else 1.0], tf.float64))
        mixed_precision = "off" if lacking.numpy()[0] else "bf16"
    name = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[mixed_precision]
    tf.keras.mixed_precision.set_global_policy(name)
    return mixed_precision


def evaluate(model, forward, sum_across_workers, val_frames, rank, world_size, config):
    """Loss and metrics over the whole validation set, every frame counted exactly once.

    Each worker scores every world_size-th batch locally, then one all-reduce sums the loss and
    the confusion matrix, so every worker ends up with the same, global figures.
    """
    loss_sum, pixels = 0.0, 0
    counts = np.zeros((config.n_classes, config.n_classes), np.float64)
    batches = val_frames.iter_batches(batch_size=config.batch_size, batch_format="numpy")
    for index, batch in enumerate(batches):
        if index % world_size != rank:
            continue
        logits = forward(tf.constant(batch["image"])).numpy()
        batch_loss, batch_pixels, batch_counts = score_batch(logits, batch["mask"], config.n_classes)
        loss_sum, pixels, counts = loss_sum + batch_loss, pixels + batch_pixels, counts + batch_counts

    # The weights' fingerprint rides along: equal on all workers iff gradients were all-reduced.
    fingerprint = weights_fingerprint(model)
    local = tf.constant(np.concatenate([[loss_sum, pixels, fingerprint, fingerprint**2], counts.ravel()]), tf.float64)
    total = sum_across_workers(local).numpy()
    confusion = ConfusionMatrix(config.n_classes, total[4:].reshape(config.n_classes, config.n_classes))
    spread = total[3] / world_size - (total[2] / world_size) ** 2  # variance of the fingerprints
    return {
        "val_loss": float(total[0] / max(total[1], 1)),
        **confusion.summary("val_"),
        "weights_in_sync": bool(spread <= 1e-12 * max(fingerprint**2, 1.0)),
    }


def summing_across_workers(strategy):
    """An all-reduce (sum) of one tensor over every worker, traced once: run eagerly, MWMS
    warns of its overhead on every worker. Traced, a replica context's `all_reduce` finds no
    device to reduce to ("destinations can not be empty"); `strategy.reduce` picks one."""

    @tf.function
    def summed(value):
        return strategy.reduce("SUM", strategy.run(tf.identity, (value,)), axis=None)

    return summed


def weights_fingerprint(model):
    """One number that changes with any weight: a position-weighted sum of all of them."""
    return float(sum((index + 1) * np.abs(weights).astype(np.float64).sum()
                     for index, weights in enumerate(model.get_weights())))
