"""Ray Train runs on a real local Ray: 2 workers × 1 CPU (1 × 2 for the lone-worker path), the smoke-sized model."""

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pyarrow.fs
import pytest
import ray
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distributed import checkpoint, ingest, progress, runtime, training
from distributed.config import TrainConfig
from distributed.runtime import native_bfloat16
from distributed.training import (
    best_epoch_index, class_balance, evaluate, is_new_best, should_stop_early, train,
)
from jobs import train as train_job
from unet_core import data, scenes
from tests.conftest import reference_scores, run_sigterm_after_ray_init
from unet_core.training import averaged_weights


def smoke_config(tmp_path, **overrides):
    return TrainConfig(output=str(tmp_path / "run"), num_workers=2, cpus_per_worker=1, **overrides).smoke()


def checkpoint_dirs(config):
    """{epoch: directory} of the checkpoints Ray Train kept."""
    run_dir = os.path.join(config.resolved_storage_path, config.run_name)
    found = {}
    for name in os.listdir(run_dir):
        if name.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, name)):
            with open(os.path.join(run_dir, name, "state.json")) as file:
                found[len(json.load(file)["history"])] = os.path.join(run_dir, name)
    return found


def checkpoint_model(directory):
    """A checkpoint's model with its optimizer, whose state holds the weights' moving average."""
    path = os.path.join(directory, "model.keras")
    assert zipfile.is_zipfile(path), "every checkpoint, not only the first, must be in the Keras v3 format"
    return tf.keras.models.load_model(path)


def assert_scores_as_reported(config, model, row):
    """A single-process score of `model` on the validation frames equals the reported figures of
    `row`: validation was counted once over the whole set, and `model` holds the weights scored."""
    pairs = data.find_pairs(config.data or os.path.join(config.output, "scenes"))
    is_val = data.validation_flags([pair.name for pair in pairs], config.val_fraction, config.split)
    # Only the validation frames are read: a run may have skipped an unreadable training frame.
    frames = [data.preprocess_pair(data.read_bytes(pair.image_path), data.read_bytes(pair.mask_path),
                                   pair.image_path, pair.mask_path, config.image_size, 23)
              for pair, flag in zip(pairs, is_val) if flag]
    images, masks = np.stack([image for image, _ in frames]), np.stack([mask for _, mask in frames])
    loss, confusion = reference_scores(model, images, masks, 23)
    assert row["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert row["val_mean_iou"] == pytest.approx(confusion.mean_iou(), abs=1e-6)
    assert row["val_pixel_accuracy"] == pytest.approx(confusion.pixel_accuracy(), abs=1e-6)


def assert_validation_counted_once(config, row):
    """The weights the checkpoint of that epoch was scored with (the moving average, when the run
    keeps one) score as reported. Returns the checkpoint's model, holding its raw weights again."""
    with averaged_weights(checkpoint_model(checkpoint_dirs(config)[row["epoch"]])) as model:
        assert_scores_as_reported(config, model, row)
    return model


def starts_no_worker(*args, **kwargs):
    raise AssertionError("Ray Train was started for a run with no epoch left to train")


def test_two_workers_train_validate_and_resume(tmp_path, ray_session, quickstart_run, monkeypatch, capfd):
    # The quickstart's training is this test's smoke run: shared (conftest.py), it is trained once.
    assert quickstart_run.code == 0, quickstart_run.err[-5000:]
    config = dataclasses.replace(smoke_config(tmp_path, epochs=2), output=quickstart_run.config.output)
    assert quickstart_run.config == config
    history = quickstart_run.history
    assert quickstart_run.ctrl_c_after is quickstart_run.ctrl_c_before  # Ray Train's handler for the run is gone

    with open(os.path.join(config.output, "metrics.json")) as file:
        saved = json.load(file)
    assert saved == history and [row["epoch"] for row in saved] == [1, 2]
    for row in saved:
        assert 0.0 <= row["val_mean_iou"] <= 1.0 and row["val_iou_per_class"]
        assert row["weights_in_sync"] is True  # the two workers' weights are identical: gradients all-reduced
        assert row["jit_compile"] is False  # XLA on CPU cannot compile the all-reduce
    for name in ("model.keras", "metrics.csv", "curves.png", "previews.png", "tensorboard"):
        assert os.path.exists(os.path.join(config.output, name)), name

    assert zipfile.is_zipfile(os.path.join(config.output, "model.keras"))  # the Keras v3 format, not HDF5
    model = tf.keras.models.load_model(os.path.join(config.output, "model.keras"), safe_mode=True)
    assert model.predict(np.zeros((3, 32, 48, 3), np.float32), verbose=0).shape == (3, 32, 48, 23)
    # Exported for inference: float32 whatever precision trained it (`auto` picks bf16 where the
    # CPU has it), no optimizer state.
    assert {row["mixed_precision"] for row in saved} == {"bf16" if native_bfloat16(False) else "off"}
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"} and model.optimizer is None

    # Validation is counted once over the whole set, though two workers share it.
    trained = assert_validation_counted_once(config, saved[-1])  # in the precision training scored in
    assert trained.jit_compile is False  # compiled as the rows say, not only reported so
    # Only the last epoch checkpointed (checkpoint_every 10), yet the export holds the weights the
    # best epoch was scored with, whichever it was, and the checkpoint carries them for a resume.
    assert list(checkpoint_dirs(config)) == [2]
    _, best = checkpoint.read(checkpoint_dirs(config)[2])
    assert len(best) == len(model.get_weights())
    assert all(np.array_equal(b, e) for b, e in zip(best, model.get_weights()))
    # The moving average (of epoch 1 or 2), never the raw weights training goes on from.
    assert not all(np.allclose(raw, b) for raw, b in zip(trained.get_weights(), best))
    trained.set_weights(best)
    assert_scores_as_reported(config, trained, max(saved, key=lambda row: row["val_mean_iou"]))

    # A checkpoint an interrupted attempt saved after the controller last polled its workers: Ray
    # Train never registered it, so neither resumes from it nor deletes it. The run does.
    untracked = os.path.join(config.resolved_storage_path, config.run_name, "checkpoint_2000-01-01_00-00-00.000000")
    shutil.copytree(checkpoint_dirs(config)[2], untracked)
    # Same run name and storage path, more epochs: continues after epoch 2 instead of restarting,
    # here into another --output, whose progress files start from the checkpoint's epochs.
    moved = dataclasses.replace(smoke_config(tmp_path, epochs=3), output=str(tmp_path / "moved"),
                                storage_path=config.resolved_storage_path)
    resumed = train(moved)
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert resumed[:2] == saved
    assert resumed[2]["resumed_from_epoch"] == 2
    assert list(checkpoint_dirs(config)) == [3] and not os.path.exists(untracked)
    with open(os.path.join(moved.output, "metrics.json")) as file:
        assert json.load(file) == resumed
    accumulator = EventAccumulator(os.path.join(moved.output, "tensorboard"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("val_mean_iou")] == [1, 2, 3]
    # Run again, it has no epoch left: the driver exports the checkpoint's best model again, no worker started.
    os.remove(os.path.join(moved.output, "model.keras"))
    with monkeypatch.context() as patch:
        patch.setattr(training, "TensorflowTrainer", starts_no_worker)
        assert train(moved) == resumed
    assert "has trained 3 epoch(s), --epochs 3 asks for no more" in capfd.readouterr().out
    exported = tf.keras.models.load_model(os.path.join(moved.output, "model.keras"))
    assert all(np.array_equal(b, e) for b, e in zip(checkpoint.read(checkpoint_dirs(config)[3])[1],
                                                    exported.get_weights()))
    # Other frames under the same name and storage: refused, not continued on the wrong data.
    with pytest.raises(ValueError, match="'24 generated scenes, seed 0' -> '24 generated scenes, seed 1'"):
        train(dataclasses.replace(moved, seed=1, epochs=4))
    # A disk that filled as Ray Train rewrote its record of the checkpoints (it truncates, then writes) left the
    # record empty or cut short, the checkpoints whole: the record is written again, naming the newest whole one,
    # not the newer upload the full disk cut short.
    run = os.path.join(config.resolved_storage_path, config.run_name)
    record = os.path.join(run, checkpoint.RECORD)
    with open(record) as file:
        whole_record = file.read()
    newest_whole = checkpoint_dirs(config)[3]
    cut_short = os.path.join(run, "checkpoint_2999-01-01_00-00-00.000000")
    os.makedirs(cut_short)
    shutil.copyfile(os.path.join(newest_whole, "model.keras"), os.path.join(cut_short, "model.keras"))
    os.truncate(os.path.join(cut_short, "model.keras"), 1000)
    for left in ("", whole_record[:40]):
        with open(record, "w") as file:
            file.write(left)
        assert checkpoint.resumed_history(config) == resumed
        assert ray.train.Result.from_path(run).checkpoint.path == newest_whole
    shutil.rmtree(cut_short)
    # A checkpoint that cannot be read is named before Ray starts or a frame is decoded: in the
    # workers, it would fail every attempt, each retried as a worker failure.
    monkeypatch.setattr(runtime, "connect", no_ray_connect)
    latest = os.path.join(checkpoint_dirs(config)[3], "model.keras")
    os.truncate(latest, 20_000)
    with pytest.raises(ValueError, match=f"^{re.escape(os.path.dirname(latest))}: the checkpoint run 'unet' would "
                                         f"resume from cannot be read \\(BadZipFile"):
        train(dataclasses.replace(moved, epochs=4, max_failures=-1))
    shutil.rmtree(os.path.dirname(latest))  # and a checkpoint Ray Train's record lists, gone
    with pytest.raises(ValueError, match="unet: Ray Train's record of the run's checkpoints does not match them"):
        train(dataclasses.replace(moved, epochs=4, max_failures=-1))
    with open(record, "w") as file:  # and an empty record with no whole checkpoint to name
        pass
    with pytest.raises(ValueError, match="unet: Ray Train's record of the run's checkpoints does not match them"):
        train(dataclasses.replace(moved, epochs=4, max_failures=-1))


def test_ray_trains_controller_is_handed_nothing_that_imports_tensorflow(tmp_path, ray_session, monkeypatch):
    # The controller never runs a model. Ray's TensorflowConfig, unpickled there, imported TensorFlow: ~500 MB held on
    # the driver's node for the whole run (BENCHMARKS.md, "Ray Train's controller").
    class Launched(Exception):
        pass

    contexts = []

    def launched(trainer, config):
        contexts.append(trainer.train_run_context)
        raise Launched

    monkeypatch.setattr(training, "fit", launched)
    with pytest.raises(Launched):
        train(smoke_config(tmp_path))
    # What Ray hands the controller: the run's configs, the backend's and the callbacks' included.
    (context,) = contexts
    loads = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
             "print(sorted({name.split('.')[0] for name in sys.modules} & {'tensorflow', 'tf_keras', 'keras'}))")
    unpickled = subprocess.run([sys.executable, "-c", loads], input=ray.cloudpickle.dumps(context),
                               capture_output=True, timeout=120)
    assert unpickled.returncode == 0, unpickled.stderr.decode()[-3000:]
    assert unpickled.stdout.decode().strip() == "[]"
    assert context.backend_config.framework.value == "tensorflow"  # as Ray's dashboard names the run's framework


def test_a_lone_worker_trains_with_xla_restarts_from_its_checkpoint_and_skips_bad_frames(tmp_path, ray_session,
                                                                                         capfd):
    """The default layout on a CPU without native bfloat16 (one worker with both cores, float32, XLA): a crash
    mid-run restarts the worker, which resumes from the latest checkpoint; an unreadable frame is skipped and listed."""
    frames = tmp_path / "frames"
    scenes.write_scenes(str(frames), 24, seed=3)
    truncated = frames / "CameraRGB" / "scene_000005.png"
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[:300])
    config = dataclasses.replace(
        smoke_config(tmp_path, data=str(frames), epochs=3, max_failures=1, fail_once_at_epoch=2, skip_bad=True,
                     checkpoint_every=1),
        # `auto` would pick bfloat16 on a CPU with AVX512-BF16, and bfloat16 is never XLA-compiled on CPU.
        num_workers=1, cpus_per_worker=2, mixed_precision="off", jit_compile=True,  # which --smoke turns off
    )

    history = train(config)

    marker = os.path.join(config.resolved_storage_path, config.run_name, "injected_failure")
    assert os.path.exists(marker), "the injected failure never fired"
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # Epochs 2 and 3 ran after the restart, which loaded epoch 1's checkpoint, not nothing.
    assert [row["resumed_from_epoch"] for row in history] == [0, 1, 1]
    assert all(row["jit_compile"] is True for row in history)
    kept = assert_validation_counted_once(config, history[max(checkpoint_dirs(config)) - 1])  # the kept epoch's
    # The rows' jit_compile is the run's own word: the model it trained was compiled with XLA.
    assert kept.jit_compile is True
    with open(os.path.join(config.output, "skipped.json")) as file:
        skipped = json.load(file)
    assert list(skipped) == ["scene_000005.png"] and "scene_000005.png" in skipped["scene_000005.png"]
    printed = capfd.readouterr().err  # named on the console too, not only counted
    assert f"[unet-ray] skipped: {truncated}: not a readable PNG/JPEG image" in printed
    assert f"every skipped frame and why: {config.output}/skipped.json" in printed
    # Mended, the frame would change what the run trains on: the rerun is refused, and the record of
    # what the exported model never saw stays as it was.
    truncated.write_bytes(whole)
    with pytest.raises(ValueError, match="trained with other settings"):
        train(config)
    with open(os.path.join(config.output, "skipped.json")) as file:
        assert json.load(file) == skipped


def test_ctrl_c_aborts_the_run_frees_its_workers_and_says_how_to_resume(tmp_path, ray_session, capsys):
    output = tmp_path / "run"
    run_dir = output / "ray_results" / "unet"

    def ctrl_c_once_a_checkpoint_is_saved():
        deadline = time.time() + 300
        while time.time() < deadline:
            if run_dir.is_dir() and any(path.name.startswith("checkpoint_") for path in run_dir.iterdir()):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    threading.Thread(target=ctrl_c_once_a_checkpoint_is_saved, daemon=True).start()
    ctrl_c = signal.getsignal(signal.SIGINT)
    code = train_job.main(["--smoke", "--output", str(output), "--num-workers", "2", "--cpus-per-worker", "1",
                           "--epochs", "1000", "--checkpoint-every", "1"])
    assert code == 130
    assert "interrupted: the same command resumes from the run's last checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # a later Ctrl-C is not swallowed
    deadline = time.time() + 60  # the aborted workers give their CPUs back to the session's Ray
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_sigterm_aborts_the_run_as_ctrl_c_does(tmp_path):
    # `kill`, `timeout`, `ray job stop` and schedulers send SIGTERM; `timeout` to the job's process group (the
    # local Ray's GCS and raylet lead groups of their own: runtime.py). In a session of its own: the C++
    # failure-signal handler that Ray and TensorFlow bring would abort it 3 s later (exit 134), unless
    # the process, tearing its Ray down meanwhile, happened to end first. Not Ray Train's own abort either:
    # where a scheduler ends the GCS too, it would wait a minute for it, then exit 1 (runtime.init).
    output = tmp_path / "run"
    script = "\n".join([
        "import os, signal, sys, threading, time",
        "from jobs import train",
        "output = sys.argv[sys.argv.index('--output') + 1]",
        "run_dir = output + '/ray_results/unet'",
        "def saved():",
        "    return os.path.isdir(run_dir) and any(name.startswith('checkpoint_') for name in os.listdir(run_dir)) \\",
        "        and os.path.exists(output + '/metrics.json')",
        "def sigterm_once_a_checkpoint_is_saved():",
        "    while not saved():",
        "        time.sleep(0.2)",
        "    os.killpg(0, signal.SIGTERM)",
        "threading.Thread(target=sigterm_once_a_checkpoint_is_saved, daemon=True).start()",
        "sys.exit(train.main(sys.argv[1:]))",
    ])
    job = subprocess.run([sys.executable, "-c", script, "--smoke", "--output", str(output), "--epochs", "1000",
                          "--checkpoint-every", "1"], capture_output=True, text=True, timeout=600,
                         start_new_session=True)
    assert job.returncode == 130, job.stderr[-3000:]
    assert "SIGTERM received" not in job.stderr  # the C++ handler's line: it never ran
    assert "interrupted: the same command resumes from the run's last checkpoint" in job.stderr
    assert progress.read_history(output)  # whole: no write of it was cut short
    ingest.hold(*ingest.open_output(str(output)), "the rerun").close()  # the run's hold went with it


def test_sigterm_while_ray_starts_ends_the_run_as_ctrl_c_does(tmp_path):
    # ray.init sets a SIGTERM handler of its own (sys.exit(15)) behind absl's, which sets a 3 s alarm that aborts:
    # a SIGTERM then ended jobs.train with exit 15 and no word. Sent here just after ray.init, in a session of its own.
    job = run_sigterm_after_ray_init("train", ["--smoke", "--output", str(tmp_path / "run")])
    assert job.returncode == 130, job.stderr[-3000:]
    assert "interrupted: the same command resumes from the run's last checkpoint" in job.stderr
    assert os.listdir(tmp_path) == []  # the new --output it had made, empty, removed


def test_the_last_line_printed_is_the_exported_epoch_not_the_last(monkeypatch, capsys):
    history = [{"epoch": epoch, "val_mean_iou": score, "val_iou_per_class": {"road": score}}
               for epoch, score in ((1, 0.1), (2, 0.3), (3, 0.2), (4, 0.3))]
    monkeypatch.setattr(training, "train", lambda config: history)
    assert train_job.main(["--smoke"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == {"epoch": 2, "val_mean_iou": 0.3, "epochs_trained": 4}  # a tie is no new best


def test_a_failed_run_exits_1_with_ray_trains_error_and_how_to_go_on(monkeypatch, capsys):
    class WorkerDies:  # what TensorflowTrainer.fit raises once --max-failures restarts are used up
        def fit(self):
            raise ray.train.WorkerGroupError("[Rank 0 Error Snippet]: The actor died unexpectedly", {})

    monkeypatch.setattr(training, "train", lambda config: training.fit(WorkerDies(), config))
    assert train_job.main(["--smoke"]) == 1
    error = capsys.readouterr().err
    assert "error: Training failed due to worker errors:\n[Rank 0 Error Snippet]: The actor died unexpectedly" in error
    assert ("training failed: the same command resumes from the run's last checkpoint (one every --checkpoint-every "
            "epochs); --max-failures N has Ray Train restart the workers from it by itself") in error


@pytest.mark.parametrize("native_here, others_lacking, expected", [
    (True, 0.0, "bf16"), (True, 1.0, "off"), (False, 0.0, "off")])
def test_auto_precision_is_bf16_only_where_every_worker_computes_it_natively(native_here, others_lacking, expected,
                                                                             monkeypatch):
    monkeypatch.setattr(runtime, "native_bfloat16", lambda use_gpu: native_here)
    policy = tf.keras.mixed_precision.global_policy()
    try:
        # Another worker's share of the all-reduce: 1 where it lacks native bfloat16.
        assert training.set_precision_policy("auto", True, lambda lacking: lacking + others_lacking) == expected
        assert tf.keras.mixed_precision.global_policy().name == {"bf16": "mixed_bfloat16", "off": "float32"}[expected]
        # A precision asked for is kept whatever the hardware, and asks the other workers nothing.
        assert training.set_precision_policy("bf16", True, None) == "bf16"
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)


def test_workers_all_reduce_over_nccl_on_gpus_and_the_ring_on_cpus(monkeypatch):
    built = []
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy",
                        lambda communication_options: built.append(communication_options.implementation))
    implementation = tf.distribute.experimental.CommunicationImplementation
    training.distribution_strategy(4, use_gpu=True)
    training.distribution_strategy(2, use_gpu=False)
    assert built == [implementation.NCCL, implementation.RING]
    # A lone worker has no one to all-reduce with: no MWMS, so XLA may compile its step.
    assert training.distribution_strategy(1, use_gpu=True) is tf.distribute.get_strategy() and len(built) == 2


def test_a_storage_path_that_fills_stops_every_worker_at_once_and_the_same_command_goes_on_after(
        tmp_path, ray_session, small_disk):
    config = dataclasses.replace(smoke_config(tmp_path, epochs=2, checkpoint_every=1, max_failures=2),
                                 storage_path=str(small_disk))
    with pytest.raises(ValueError, match=r"^a disk the run writes to cannot take more files \(\[Errno 28\] .*"
                                         r"make room, then the same command resumes from the last"):
        train(config)
    # The workers agreed to stop at the first upload that failed: no restart (--max-failures 2) tried the full disk
    # again, each leaving another half-written checkpoint; the one left is removed, for the room it holds.
    assert not [name for name in os.listdir(small_disk / "unet") if name.startswith("checkpoint_")]
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # room made
    history = train(config)
    assert [row["epoch"] for row in history] == [1, 2] and list(checkpoint_dirs(config)) == [2]


def test_a_checkpoint_record_left_unreadable_on_a_disk_still_full_is_one_error_that_says_to_make_room(small_disk):
    run = small_disk / "unet"
    saved = run / "checkpoint_2000-01-01_00-00-00.000000"
    saved.mkdir(parents=True)
    with zipfile.ZipFile(saved / checkpoint.MODEL, "w") as model:
        model.writestr("config.json", "{}")
    (saved / checkpoint.STATE).write_text(json.dumps({"history": [{"epoch": 1}]}))
    np.savez(saved / checkpoint.BEST, np.zeros(10))
    (run / checkpoint.RECORD).write_text("")  # the full disk cut it short
    with open(small_disk / "filler", "wb") as filler, contextlib.suppress(OSError):  # and it is full still
        while True:
            filler.write(bytes(2**16))
            filler.flush()
    config = TrainConfig(storage_path=str(small_disk))
    # Was an OSError's traceback (exit 1) from writing the record again.
    with pytest.raises(ValueError, match=f"^{run}: cannot take more files \\(No space left on device\\); so Ray "
                                         f"Train's record .* make room, then the same command resumes from "
                                         f"checkpoint_2000-01-01_00-00-00.000000$"):
        checkpoint.resumed_history(config)
    os.remove(small_disk / "filler")  # room made
    assert checkpoint.resumed_history(config) == [{"epoch": 1}]


def test_an_output_full_before_the_first_epoch_is_one_error_that_says_to_make_room(tmp_path, ray_session,
                                                                                   small_disk):
    with open(small_disk / "filler", "wb") as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(2**16))
            filler.flush()
    config = dataclasses.replace(smoke_config(tmp_path), output=str(small_disk / "run"))
    # The generated scenes, written into --output: was an OSError's traceback (exit 1).
    with pytest.raises(ValueError, match=f"^--output {small_disk / 'run'}: cannot take more files \\(No space left "
                                         f"on device\\); so training did not start; make room, then the same "
                                         f"command goes on$"):
        train(config)


def test_a_disk_that_takes_no_more_files_fails_the_run_with_one_error_that_says_to_make_room(monkeypatch, capsys):
    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    for error in (ray.train.ControllerError(full),  # metrics into --output, Ray Train's record of checkpoints
                  ray.train.WorkerGroupError("[Rank 0 Error Snippet]: OSError", {0: full}),  # a checkpoint
                  ray.train.WorkerGroupError("", {1: OSError(errno.EROFS, "Read-only file system")})):
        class Fails:
            def fit(self):
                raise error

        monkeypatch.setattr(training, "train", lambda config: training.fit(Fails(), config))
        assert train_job.main(["--smoke", "--storage-path", "/tmp/checkpoints"]) == 2
        message = capsys.readouterr().err
        assert message.startswith("error: a disk the run writes to cannot take more files ([Errno")
        assert "--storage-path (checkpoints)" in message and "make room, then the same command resumes" in message
        assert "--max-failures" not in message  # restarts would fail alike
        # Without --storage-path the checkpoints are in --output: no flag the user did not give is named.
        assert train_job.main(["--smoke"]) == 2
        assert "--output (metrics and checkpoints) or a node's" in capsys.readouterr().err


def test_early_stopping_stops_every_worker_and_a_rerun_only_exports(tmp_path, ray_session, capfd, monkeypatch):
    # A learning rate this small leaves every prediction as it was: epoch 2 only ties epoch 1.
    # A relative --output, as the README's commands give it: the workers run in other directories.
    monkeypatch.chdir(tmp_path)
    config = dataclasses.replace(smoke_config(tmp_path, epochs=5, learning_rate=1e-12, early_stopping_patience=1),
                                 output="run")
    history = train(config)
    assert (tmp_path / "run" / "model.keras").is_file()
    assert [row["epoch"] for row in history] == [1, 2]
    assert list(checkpoint_dirs(config)) == [2]  # the stopping epoch saved one, though not due
    captured = capfd.readouterr()
    assert "early stop: no better val_mean_iou for 1 epochs" in captured.out
    # 24 scenes: 19 train, which 2 workers cannot share equally.
    assert "19 training / 5 validation frames" in captured.out
    assert "; 0 skipped; 1 training frame(s) sit out each epoch (9 per worker)" in captured.out
    # Validation's all-reduce runs traced, not eagerly (which MWMS warns about on every worker).
    assert "eagerly has significant overhead" not in captured.out + captured.err

    monkeypatch.setattr(training, "TensorflowTrainer", starts_no_worker)
    assert train(config) == history  # stopped already: no third epoch, the same export, and no worker
    assert list(checkpoint_dirs(config)) == [2]
    assert "stopped early after epoch 2; exporting its best model again" in capfd.readouterr().out


def test_a_diverged_run_stops_on_every_worker_and_exports_nothing(tmp_path, ray_session, capfd):
    # Steps this large send the weights to inf within the first epoch; without the check the run
    # trained on, kept a NaN epoch as its best (val mIoU 0 > none) and exported it, exit 0.
    config = smoke_config(tmp_path, epochs=3, learning_rate=1e3, clip_norm=0.0, ema_momentum=0.0)
    with pytest.raises(ValueError, match="run: training diverged at epoch 1 \\(validation loss nan\\), so no model "
                                         "was exported from it; train into another --output with a lower "
                                         "--learning-rate \\(now 1000.0\\)"):
        train(config)
    assert "epoch 2/3" not in capfd.readouterr().out  # both workers stopped after the same epoch
    assert checkpoint_dirs(config) == {} and not os.path.exists(os.path.join(config.output, "model.keras"))
    # Written as the epoch ended, by Ray Train's controller: the run's only record of what went wrong.
    with open(os.path.join(config.output, "metrics.json")) as file:
        (epoch,) = json.load(file)
    assert epoch["epoch"] == 1 and np.isnan(epoch["val_loss"])
    assert epoch["val_iou_per_class"] and all(f"val_iou_{name}" in open(os.path.join(config.output, "metrics.csv"))
                                              .readline() for name in epoch["val_iou_per_class"])
    (event_file,) = os.listdir(os.path.join(config.output, "tensorboard"))
    assert "val_iou/" in open(os.path.join(config.output, "tensorboard", event_file), "rb").read().decode("latin-1")


def test_truncated_png_fails_before_training(tmp_path, ray_session):
    frames = tmp_path / "frames"
    scenes.write_scenes(str(frames), 6, seed=1)
    for name in ("scene_000002.png", "scene_000004.png"):
        path = frames / "CameraMask" / name
        path.write_bytes(path.read_bytes()[:200])
    config = smoke_config(tmp_path, data=str(frames), epochs=1)
    with pytest.raises(ValueError) as error:
        train(config)
    message = str(error.value)
    assert "2 of 6 frame(s) cannot be read" in message
    assert "CameraMask/scene_000002.png" in message and "CameraMask/scene_000004.png" in message
    assert not os.path.exists(os.path.join(config.resolved_storage_path, config.run_name))
    with open(os.path.join(config.output, "unreadable.txt")) as file:  # every one, however many
        assert sorted(line.split(":")[0] for line in file) == [str(frames / "CameraMask" / name)
                                                              for name in ("scene_000002.png", "scene_000004.png")]


def no_ray_connect(**_):
    raise AssertionError("Ray was started for a run that had to be refused before")


@pytest.fixture
def no_ray(monkeypatch):
    """For a run that must be refused before Ray starts."""
    monkeypatch.setattr(runtime, "connect", no_ray_connect)


def test_the_driver_hides_the_gpus_before_anything_can_start_tensorflow(tmp_path, monkeypatch, no_ray):
    # It draws the previews with the model: on a GPU head, TensorFlow would keep most of a GPU from the workers and
    # the actors of a quickstart's inference after it.
    steps = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [f"/physical_device:{kind}:0"])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: steps.append(("hide", devices, kind)))
    monkeypatch.setattr(training, "check_before_start", lambda config: steps.append("checks") or no_ray_connect())
    with pytest.raises(AssertionError, match="Ray was started"):
        train(smoke_config(tmp_path))
    assert steps == [("hide", [], "GPU"), "checks"]


def test_local_paths_on_a_cluster_are_named_by_the_flags_given(tmp_path, monkeypatch):
    # Without --storage-path the checkpoints go below --output: the warning named --storage-path, never given.
    named = []
    monkeypatch.setattr(runtime, "connect", lambda **_: None)
    monkeypatch.setattr(runtime, "cluster_shortfall", lambda *_: None)
    monkeypatch.setattr(runtime, "warn_of_local_paths", lambda paths, nodes_to_come, **_: named.append(paths))
    monkeypatch.setattr(runtime, "oversubscription", lambda *_: None)
    for storage_path in (None, str(tmp_path / "checkpoints")):
        training.connect_ray(smoke_config(tmp_path, storage_path=storage_path))
    flags = [[flag for flag, path in paths.items() if path is not None] for paths in named]
    assert flags == [["--output's scenes", "--output's checkpoints"], ["--output's scenes", "--storage-path"]]


def test_local_paths_below_the_output_on_a_cluster_are_told_the_flag_that_takes_a_uri(tmp_path, monkeypatch, capsys):
    # --output takes no URI: "--output's checkpoints ...: pass an s3:// or gs:// URI" said where to go nowhere.
    monkeypatch.setattr(runtime, "connect", lambda **_: None)
    monkeypatch.setattr(runtime, "cluster_shortfall", lambda *_: None)
    monkeypatch.setattr(runtime, "oversubscription", lambda *_: None)
    monkeypatch.setattr(runtime, "started_local_ray", False)
    monkeypatch.setattr(runtime.ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    training.connect_ray(smoke_config(tmp_path))
    assert capsys.readouterr().err.endswith("pass an s3:// or gs:// URI (as --data, --storage-path)\n")
    training.connect_ray(smoke_config(tmp_path, storage_path="s3://bucket/runs"))
    assert capsys.readouterr().err.endswith("pass an s3:// or gs:// URI (as --data)\n")
    training.connect_ray(smoke_config(tmp_path, data=str(tmp_path), storage_path=str(tmp_path / "checkpoints")))
    assert capsys.readouterr().err.endswith("pass an s3:// or gs:// URI\n")  # each named by the flag given


def test_an_output_that_is_a_file_is_refused_before_anything_starts(tmp_path, no_ray):
    (tmp_path / "run").write_text("an earlier run's notes")
    with pytest.raises(ValueError, match="run: a file; it must be a directory"):
        train(smoke_config(tmp_path))
    assert os.listdir(tmp_path) == ["run"] and (tmp_path / "run").read_text() == "an earlier run's notes"


def test_a_second_run_into_an_output_a_run_is_training_into_is_refused(tmp_path, no_ray):
    # A job submitted twice would train beside the first into the same checkpoints and metrics.
    output = tmp_path / "run"
    output.mkdir()
    (tmp_path / "alias").symlink_to(output)  # the same output however it is spelt
    first = ingest.hold(*ingest.open_output(str(tmp_path / "alias")), "jobs.train")  # another run's
    with pytest.raises(ValueError, match=f"run: jobs.train \\(pid {os.getpid()}\\) is writing into it; wait for it "
                                         f"to end, or pass another --output"):
        train(smoke_config(tmp_path))
    first.close()
    # A run that fails once it holds the output (here: at starting Ray) lets go of it.
    with pytest.raises(AssertionError, match="Ray was started"):
        train(smoke_config(tmp_path))
    ingest.hold(*ingest.open_output(str(output)), "jobs.train").close()


def test_a_second_run_into_the_checkpoints_a_run_is_training_into_is_refused(tmp_path, no_ray):
    # A second experiment given another --output only: it passed, resumed from the first's checkpoint and
    # wrote its own beside the first's.
    storage = tmp_path / "checkpoints"
    first = smoke_config(tmp_path, storage_path=str(storage))
    held = ingest.hold(*ingest.open_root(first.run_storage), "jobs.train")
    with pytest.raises(ValueError, match=f"checkpoints/unet: jobs.train \\(pid {os.getpid()}\\) is writing into it; "
                                         f"wait for it to end, or pass another --run-name or --storage-path"):
        train(dataclasses.replace(first, output=str(tmp_path / "second")))
    ingest.hold(*ingest.open_output(str(tmp_path / "second")), "jobs.train").close()  # let go of, on the refusal
    held.close()


def test_checkpoints_kept_in_the_output_itself_are_not_refused_as_another_runs(tmp_path, no_ray):
    # --storage-path the output's parent, --run-name its name: the run held its own checkpoint folder a second
    # time and refused itself, "jobs.train (pid <its own>) is writing into it".
    config = dataclasses.replace(smoke_config(tmp_path), storage_path=str(tmp_path), run_name="run")
    with pytest.raises(AssertionError, match="Ray was started"):  # every check passed
        train(config)
    ingest.hold(*ingest.open_output(str(tmp_path / "run")), "jobs.train").close()  # let go of, on the way out


def test_a_file_where_the_output_keeps_its_checkpoints_is_named_by_output_before_ray_starts(tmp_path, no_ray):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ray_results").write_text("notes")
    # No --storage-path: it was named, and only once Ray had started.
    with pytest.raises(ValueError, match=f"^--output's checkpoints {tmp_path / 'run' / 'ray_results'}: a file; it "
                                         f"must be a directory \\(new or existing\\)$"):
        train(smoke_config(tmp_path))


def test_checkpoints_that_could_never_be_written_are_refused_before_ray_starts(tmp_path, no_ray):
    (tmp_path / "notes").write_text("a file where a folder would go")
    storage = tmp_path / "notes" / "checkpoints"
    with pytest.raises(ValueError, match=f"--storage-path {storage}: {tmp_path / 'notes'} is a file, so no output "
                                         f"directory can be made below it"):
        train(smoke_config(tmp_path, storage_path=str(storage)))


def test_checkpoints_in_a_bucket_they_could_never_reach_or_would_break_are_refused_before_ray_starts(
        tmp_path, no_ray, s3_bucket):
    scenes.write_scenes(str(tmp_path / "frames"), 2)
    pyarrow.fs.copy_files(str(tmp_path / "frames"), "unet/frames", destination_filesystem=s3_bucket)
    for storage, message in (
        ("s3://nosuch/checkpoints", "--storage-path s3://nosuch/checkpoints: bucket nosuch not found"),
        ("s3://unet/frames/CameraRGB/scene_000000.png", "--storage-path s3://unet/frames/CameraRGB/scene_000000.png: "
                                                        "a file"),
        # Ray Train's checkpoint folders in CameraRGB/ would make the data unreadable for every later run.
        ("s3://unet/frames/CameraRGB/checkpoints/",
         "s3://unet/frames/CameraRGB/checkpoints/: inside --data \\(s3://unet/frames\\); its checkpoints would land"),
    ):
        with pytest.raises(ValueError, match=message):
            train(smoke_config(tmp_path, data="s3://unet/frames", storage_path=storage))
    assert sorted(info.path for info in s3_bucket.get_file_info(pyarrow.fs.FileSelector("unet/frames/CameraRGB"))) == [
        "unet/frames/CameraRGB/scene_000000.png", "unet/frames/CameraRGB/scene_000001.png"]


def test_a_path_the_filesystem_cannot_take_is_a_bad_flag_not_a_crash(tmp_path, no_ray):
    too_long = str(tmp_path / ("a" * 300))
    for path, flag in (("output", ""), ("data", "--data ")):  # each named as given
        with pytest.raises(ValueError, match=f"^{flag}{re.escape(too_long)}: cannot be used \\(.*File name too long"):
            train(dataclasses.replace(smoke_config(tmp_path), **{path: too_long}))


def test_validating_on_the_training_data_is_refused_before_anything_starts(tmp_path, no_ray):
    scenes.write_scenes(str(tmp_path / "frames"), 2)
    (tmp_path / "link").symlink_to(tmp_path / "frames")
    for val_data in (tmp_path / "frames", f"{tmp_path / 'frames'}/", tmp_path / "link"):
        with pytest.raises(ValueError, match=f"{val_data}: the validation directory is the training data "
                                             f"\\({tmp_path / 'frames'}\\)"):
            train(smoke_config(tmp_path, data=str(tmp_path / "frames"), val_data=str(val_data)))
    assert not (tmp_path / "run").exists()

    # An --output among the frames: its folder in CameraRGB/ would make the data unreadable.
    scenes.write_scenes(str(tmp_path / "held_out"), 1)
    for data_dir, val_data, output, flag in (
        (tmp_path / "frames", None, tmp_path / "frames" / "CameraRGB" / "run", "--data"),
        (tmp_path / "link", None, tmp_path / "frames" / "run", "--data"),
        (tmp_path / "frames", tmp_path / "held_out", tmp_path / "held_out" / "run", "--val-data"),
    ):
        with pytest.raises(ValueError, match=f"{output}: inside {flag} .*the run's files would land among its frames"):
            train(dataclasses.replace(smoke_config(tmp_path, data=str(data_dir), val_data=val_data and str(val_data)),
                                      output=str(output)))
    # Nor may the checkpoints land there, which Ray Train writes as folders.
    storage = tmp_path / "frames" / "CameraRGB" / "checkpoints"
    with pytest.raises(ValueError, match=f"{storage}: inside --data .*its checkpoints would land among its frames: "
                                         f"pass --storage-path outside it"):
        train(smoke_config(tmp_path, data=str(tmp_path / "frames"), storage_path=str(storage)))
    assert sorted(os.listdir(tmp_path / "frames" / "CameraRGB")) == ["scene_000000.png", "scene_000001.png"]
    assert sorted(os.listdir(tmp_path / "held_out")) == ["CameraMask", "CameraRGB"]


def test_validation_frames_where_the_run_generates_its_scenes_are_refused_and_kept(tmp_path, no_ray):
    # Without --data the run writes its scenes into --output/scenes, removing every other frame there.
    val_data = tmp_path / "run" / "scenes"
    scenes.write_scenes(str(val_data), 2, seed=7, start=40)
    with pytest.raises(ValueError, match=f"{val_data}: --val-data lies in {val_data}, where the run writes the "
                                         f"scenes it trains on"):
        train(smoke_config(tmp_path, val_data=str(val_data)))
    assert sorted(os.listdir(val_data / "CameraRGB")) == ["scene_000040.png", "scene_000041.png"]


def test_an_evaluation_report_is_refused_as_the_output_and_kept(tmp_path, no_ray):
    report = tmp_path / "run"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"pixel_accuracy": 0.9}))
    with pytest.raises(ValueError, match="run: a jobs.evaluate report, whose metrics.json and previews.png"):
        train(smoke_config(tmp_path))
    assert os.listdir(report) == ["metrics.json"]


def test_a_mistyped_data_path_is_refused_before_ray_starts_or_anything_is_written(tmp_path, no_ray):
    scenes.write_scenes(str(tmp_path / "frames"), 2)
    for data_dir, val_data, error in (
        (tmp_path / "framez", None, f"^--data {tmp_path / 'framez'}: not found$"),
        (tmp_path / "frames", tmp_path / "frames" / "CameraRGB",
         f"^--val-data {tmp_path / 'frames' / 'CameraRGB'}: not a CARLA-layout directory "
         f"\\({tmp_path / 'frames' / 'CameraRGB' / 'CameraRGB'}: directory not found\\)"),
    ):
        with pytest.raises(ValueError, match=error):
            train(smoke_config(tmp_path, data=str(data_dir), val_data=val_data and str(val_data)))
    assert sorted(os.listdir(tmp_path)) == ["frames"]  # no run directory, no ray_results in it


def test_a_rerun_on_frames_added_since_is_refused_by_name_before_ray_starts(tmp_path, no_ray):
    from distributed import run_directory

    frames = tmp_path / "frames"
    scenes.write_scenes(str(frames), 5, seed=1)
    config = smoke_config(tmp_path, data=str(frames))
    names = sorted(os.listdir(frames / "CameraRGB"))
    run_directory.record_run_identity(config, run_directory.frames_identity(names[:4], names[4:]))  # as trained
    os.makedirs(os.path.join(config.run_storage, "checkpoint_2026-12-06_10-00-00.000000"))
    scenes.write_scenes(str(tmp_path / "more"), 6, seed=2)
    for folder in ("CameraRGB", "CameraMask"):  # one more frame, after the last: the tail split moves
        shutil.copy(tmp_path / "more" / folder / "scene_000005.png", frames / folder)
    with pytest.raises(ValueError, match="trained with other settings \\(frames '4 training / 1 validation frames, "
                                         "names sha256:.*' -> '5 training / 1 validation frames"):
        train(config)
    # With --skip-bad the frames trained on are known once decoded: Ray starts to read them.
    with pytest.raises(AssertionError, match="Ray was started"):
        train(dataclasses.replace(config, skip_bad=True))


def test_unpaired_files_or_too_few_to_split_are_refused_by_name_before_ray_starts(tmp_path, no_ray):
    frames = tmp_path / "frames"
    scenes.write_scenes(str(frames), 4, seed=1)
    os.remove(frames / "CameraMask" / "scene_000001.png")
    with pytest.raises(ValueError, match="CameraRGB/scene_000001.png: no mask"):
        train(smoke_config(tmp_path, data=str(frames), epochs=1))
    # No --output made: an empty ray_results/ left there read later as a training run's (jobs.evaluate refused
    # it as a report's --output).
    assert sorted(os.listdir(tmp_path)) == ["frames"]
    for folder, scene in (("CameraRGB", 1), ("CameraRGB", 3), ("CameraMask", 3)):
        os.remove(frames / folder / f"scene_00000{scene}.png")
    (tmp_path / "run").mkdir()  # an --output that was there stays
    # Two workers, one frame to train: by name, not once the frames are decoded (all of them, on a large set).
    with pytest.raises(ValueError, match="2 frame\\(s\\) give 1 for training and 1 for validation at val_fraction=0.2; "
                                         "training needs at least 2 \\(one frame per worker\\)"):
        train(smoke_config(tmp_path, data=str(frames), epochs=1))
    assert sorted(os.listdir(tmp_path)) == ["frames", "run"] and os.listdir(tmp_path / "run") == []


def test_a_new_best_beats_every_earlier_epoch():
    history = [{"val_mean_iou": value} for value in (0.1, 0.3, 0.2)]
    assert is_new_best([], {"val_mean_iou": 0.0})  # the first epoch always is
    assert is_new_best(history, {"val_mean_iou": 0.31})
    assert not is_new_best(history, {"val_mean_iou": 0.3})  # a tie is not
    assert best_epoch_index(history + [{"val_mean_iou": 0.3}]) == 1  # so the first of a tie is the one kept


def test_each_worker_drops_out_its_own_units_the_same_again_after_a_restart():
    # Every worker sets one global seed so the model starts from the same weights everywhere; with
    # that seed left in place, every worker's dropout drew the same masks at each step.
    config = TrainConfig(seed=3)

    def masks(rank):
        tf.keras.utils.set_random_seed(config.seed)
        dropout = tf.keras.layers.Dropout(0.3)
        training.seed_dropout(config, rank)
        return [dropout(tf.ones((4, 64)), training=True).numpy() != 0 for _ in range(3)]

    rank_0 = masks(0)
    assert all(np.array_equal(a, b) for a, b in zip(masks(0), rank_0))
    assert not any(np.array_equal(a, b) for a, b in zip(masks(1), rank_0))


def test_the_workers_score_every_validation_frame_once_between_them(ray_session):
    # The reported figures are ratios of all-reduced sums, which stay the same if every worker
    # scored every frame: only the summed pixel and confusion counts tell.
    rows = [{"image": np.full((4, 4, 3), i, np.float32), "mask": np.full((4, 4), i % 3, np.uint8)} for i in range(5)]
    config = TrainConfig(n_classes=3, batch_size=2)  # 3 batches: rank 0 takes the 1st and 3rd
    model = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])

    def predict_class_0(images):
        return tf.one_hot(tf.zeros(images.shape[:3], tf.int32), 3)

    sent = []  # what each worker puts into the all-reduce: [loss, pixels, fingerprint, its square, counts...]
    for rank in (0, 1):
        evaluate(model, predict_class_0, lambda local: sent.append(local.numpy()) or local,
                 ray.data.from_items(rows), rank, 2, config)

    assert [local[1] for local in sent] == [3 * 16, 2 * 16]  # frames 0, 1, 4 and frames 2, 3
    counts = (sent[0] + sent[1])[4:].reshape(3, 3)
    np.testing.assert_array_equal(counts[:, 0], [2 * 16, 2 * 16, 16])  # classes 0, 1, 2, 0, 1
    assert counts[:, 1:].sum() == 0


def test_workers_whose_weights_differ_are_reported_out_of_sync(ray_session):
    # The training tests can only see weights_in_sync True; a check that never says False would
    # pass them all, and a run whose gradients were not all-reduced would go unnoticed.
    rows = [{"image": np.zeros((4, 4, 3), np.float32), "mask": np.zeros((4, 4), np.uint8)} for _ in range(4)]
    config = TrainConfig(n_classes=3, batch_size=2)

    def model_with_bias(bias):
        model = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])
        model.set_weights([np.ones((1, 1), np.float32), np.array([bias], np.float32)])
        return model

    def predict_class_0(images):
        return tf.one_hot(tf.zeros(images.shape[:3], tf.int32), 3)

    def scored_by_rank_0(rank_0_model, rank_1_model):
        """Rank 0's figures once its sums are all-reduced with rank 1's."""
        rank_1 = []
        evaluate(rank_1_model, predict_class_0, lambda local: rank_1.append(local) or local,
                 ray.data.from_items(rows), 1, 2, config)
        return evaluate(rank_0_model, predict_class_0, lambda local: local + rank_1[0],
                        ray.data.from_items(rows), 0, 2, config)

    assert scored_by_rank_0(model_with_bias(0.5), model_with_bias(0.5))["weights_in_sync"] is True
    assert scored_by_rank_0(model_with_bias(0.5), model_with_bias(0.501))["weights_in_sync"] is False


def test_the_workers_get_the_class_balance_of_the_training_masks_the_recipe_asks_for(ray_session):
    masks = np.array([0] * 60 + [1] * 30 + [2] * 10, np.uint8).reshape(4, 5, 5)  # 60, 30 and 10 pixels
    frames = ray.data.from_items([{"image": np.zeros((5, 5, 3), np.float32), "mask": mask} for mask in masks])
    weights, counts = class_balance(frames, TrainConfig(n_classes=4))  # the default: both
    assert counts == [60, 30, 10, 0]
    # (median frequency / frequency) ** 0.5 over the classes present, scaled to a pixel mean of 1.
    raw = np.sqrt(np.array([30 / 60, 1.0, 30 / 10]))
    np.testing.assert_allclose(weights, [*(raw / (raw @ [0.6, 0.3, 0.1])), 0.0], rtol=1e-6)
    # --class-weight-power reaches the weights: 1 is full median-frequency balancing, not the default's 0.5.
    full = np.array([30 / 60, 1.0, 30 / 10])
    np.testing.assert_allclose(class_balance(frames, TrainConfig(n_classes=4, class_weight_power=1.0))[0],
                               [*(full / (full @ [0.6, 0.3, 0.1])), 0.0], rtol=1e-6)
    assert class_balance(frames, TrainConfig(n_classes=4, prior_bias=False))[1] is None
    assert class_balance(frames, TrainConfig(n_classes=4, class_weight_power=0.0)) == (None, [60, 30, 10, 0])
    assert class_balance(frames, TrainConfig.from_preset("classic")) == (None, None)


def test_early_stopping_waits_patience_epochs_after_the_best_val_mean_iou():
    history = [{"val_mean_iou": value} for value in (0.10, 0.30, 0.20, 0.25)]
    assert not should_stop_early(history, 0)  # 0: never
    assert not should_stop_early(history, 3)  # the best, epoch 2, is only two epochs back
    assert should_stop_early(history, 2)
    assert not should_stop_early(history + [{"val_mean_iou": 0.31}], 2)  # a new best restarts the count


def test_reports_are_polled_every_tenth_of_a_second_unless_the_environment_says_otherwise(monkeypatch):
    # Ray Train's 2 s default held every shorter epoch to 2 s: its controller takes one report per poll.
    polled = []

    class Records:
        def fit(self):
            polled.append(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"))

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")  # restored after the test, whatever fit sets
    training.fit(Records(), TrainConfig())
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    training.fit(Records(), TrainConfig())
    assert polled == ["1.5", "0.1"]


def test_a_ctrl_c_that_ray_trains_handler_takes_as_the_run_finishes_still_ends_the_job(monkeypatch, capsys):
    # Ray Train's handler asks the controller to abort; a run finishing that second ignores it and fit() returned
    # as if nothing had happened: the job exported and exited 0, the Ctrl-C lost.
    class FinishesAsCtrlCComes:
        def __init__(self, signum):
            self.signum = signum

        def fit(self):
            signal.signal(signal.SIGINT, lambda *args: None)  # as Ray Train's: the abort it asks for comes too late
            signal.signal(signal.SIGUSR1, lambda *args: None)
            os.kill(os.getpid(), self.signum)
            return "the finished run's result"

    ctrl_c, usr1 = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    try:
        assert training.fit(FinishesAsCtrlCComes(signal.SIGUSR1), TrainConfig()) == "the finished run's result"
        monkeypatch.setattr(training, "train",
                            lambda config: training.fit(FinishesAsCtrlCComes(signal.SIGINT), config))
        assert train_job.main(["--smoke"]) == 130
    finally:
        signal.signal(signal.SIGUSR1, usr1)
    assert "interrupted: the same command resumes from the run's last checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    assert signal.set_wakeup_fd(-1) == -1  # the fd the run watched is given back


def test_a_wakeup_fd_the_process_has_already_is_left_alone():
    read, write = os.pipe()
    os.set_blocking(write, False)
    earlier = signal.set_wakeup_fd(write)
    try:
        with training.signals_received() as received:
            assert signal.set_wakeup_fd(write) == write  # still its own
        assert received == set()
    finally:
        signal.set_wakeup_fd(earlier)
        os.close(read)
        os.close(write)
