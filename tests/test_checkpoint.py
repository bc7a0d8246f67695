"""Checkpoints: when they are due, what a resumed worker restores, and the untracked ones cleaned up."""

import errno
import json
import os
import re
import shutil
import tempfile
import zipfile
from types import SimpleNamespace

import numpy as np
import pyarrow.fs
import pytest
import ray

from distributed import checkpoint
from distributed.config import TrainConfig
from unet_core import unet_model
from unet_core.training import averaged_weights, compile_unet


def test_checkpoints_every_nth_epoch_and_the_last():
    config = TrainConfig(epochs=10, checkpoint_every=4)
    assert [epoch + 1 for epoch in range(10) if checkpoint.is_due(epoch, config)] == [4, 8, 10]


def test_an_epoch_without_a_checkpoint_only_reports_its_metrics(monkeypatch):
    # Between --checkpoint-every epochs nothing is saved: no model to size or write (None here would fail at it),
    # no all-reduce, one report without a checkpoint.
    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)))
    returned = checkpoint.save_and_report(None, {"epoch": 3}, [{"epoch": 3}], None, 0, False,
                                          lambda share: pytest.fail("an all-reduce ran"))
    assert (returned, reports) == (None, [({"epoch": 3}, None)])


def test_resume_restores_the_weights_their_moving_average_and_the_best_so_far(tmp_path):
    def compiled():
        return compile_unet(unet_model((32, 48, 3), n_filters=4), learning_rate=1e-2, ema_momentum=0.9)

    images = np.random.default_rng(0).random((4, 32, 48, 3), np.float32)
    masks = np.random.default_rng(1).integers(0, 23, (4, 32, 48))
    model = compiled()
    for _ in range(3):
        model.train_on_batch(images, masks)
    with averaged_weights(model):
        averaged = model.get_weights()
    model.save(str(tmp_path / checkpoint.MODEL), save_format="keras_v3")
    (tmp_path / checkpoint.STATE).write_text(json.dumps({"history": [{"epoch": 1}]}))
    best = [np.full_like(w, index) for index, w in enumerate(averaged)]
    np.savez(tmp_path / checkpoint.BEST, *best)

    resumed = compiled()
    saved = ray.train.Checkpoint.from_directory(str(tmp_path))
    first_epoch, history, best_weights = checkpoint.restore(resumed, saved, 3)
    assert (first_epoch, history) == (1, [{"epoch": 1}])
    assert len(best_weights) == len(best) and all(np.array_equal(a, b) for a, b in zip(best, best_weights))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), resumed.get_weights()))
    with averaged_weights(resumed):
        assert all(np.array_equal(a, b) for a, b in zip(averaged, resumed.get_weights()))
    assert resumed.optimizer.iterations.numpy() == 3  # the epoch's 3 steps, as saved

    # On another cluster shape or batch size, an epoch has another number of steps: the step
    # count (the learning-rate schedule's clock) restarts at the epoch the run stopped after.
    reshaped = compiled()
    checkpoint.restore(reshaped, saved, 5)
    assert reshaped.optimizer.iterations.numpy() == 5
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), reshaped.get_weights()))


def test_resume_under_fp16_keeps_the_loss_scale(tmp_path, monkeypatch):
    import tensorflow as tf

    def compiled():
        return compile_unet(unet_model((32, 48, 3), n_filters=4), learning_rate=1e-3, clip_norm=1.0, ema_momentum=0.9)

    saved = tmp_path / "saved"

    def report(metrics, checkpoint=None):  # Ray Train's upload: a copy of what the worker saved
        shutil.copytree(checkpoint.path, saved)

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_local_world_size=lambda: 1))
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compiled()
        model.train_on_batch(np.random.default_rng(0).random((2, 32, 48, 3), np.float32), np.zeros((2, 32, 48)))
        model.optimizer._loss_scale.current_loss_scale.assign(64.0)  # where overflowing steps had halved it
        # tf-keras saves the model without the scale: save_and_report writes it beside the model.
        assert checkpoint.save_and_report(model, {"epoch": 1}, [{"epoch": 1}], model.get_weights(), 0, True,
                                          lambda share: share) is None

        resumed = compiled()
        checkpoint.restore(resumed, ray.train.Checkpoint.from_directory(str(saved)), 1)
        assert float(resumed.optimizer.loss_scale) == 64.0  # not 2**15 again
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
        assert checkpoint.loss_scale(compiled()) == {}  # bfloat16 has no loss scale to keep
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert checkpoint.loss_scale(compiled()) == {}  # nor has float32


def test_a_disk_without_room_for_a_checkpoint_stops_every_worker_alike_before_any_writes(tmp_path, monkeypatch):
    """save_and_report on one worker, the others' shares of its two all-reduces given: (no room in a temporary
    directory before the save, a full --storage-path at rank 0's upload)."""
    model = compile_unet(unet_model((32, 48, 3), n_filters=4), learning_rate=1e-3, ema_momentum=0.9)
    model.train_on_batch(np.zeros((2, 32, 48, 3), np.float32), np.zeros((2, 32, 48)))
    reports, sizes = [], []

    def report(metrics, checkpoint=None):
        reports.append(None if checkpoint is None else sorted(os.listdir(checkpoint.path)))
        if checkpoint is not None:
            sizes.append(sum(entry.stat().st_size for entry in os.scandir(checkpoint.path)))
        if checkpoint is not None and upload_fails is not None:
            raise upload_fails

    def save(rank, others, free=None, workers_on_node=1):
        """What save_and_report returns, and what it reported, with `others` the other workers' shares."""
        shares = iter(others)
        reports.clear()
        if free is not None:
            monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
        monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(
            get_local_world_size=lambda: workers_on_node))
        returned = checkpoint.save_and_report(model, {"epoch": 1}, [{"epoch": 1}], model.get_weights(), rank, True,
                                              lambda share: share + next(shares))
        monkeypatch.undo()
        monkeypatch.setattr(ray.train, "report", report)
        return returned, list(reports)

    monkeypatch.setattr(ray.train, "report", report)
    upload_fails = None
    assert save(0, [0, 0]) == (None, [["best_weights.npz", "model.keras", "state.json"]])
    assert save(1, [0, 0]) == (None, [None])  # only rank 0's copy is uploaded
    # A checkpoint of this model takes 2.8 MiB: with 2 MiB free in the temporary directory nothing is saved (a
    # worker failing midway through a save would leave the others waiting in its collectives), every worker still
    # reports, and all stop.
    short, reported = save(1, [0], free=2 * 2**20)
    assert reported == [None]
    needed = re.fullmatch(f"{re.escape(tempfile.gettempdir())} on [0-9.]+: 2\\.0 MiB free, and a checkpoint, saved "
                          f"there before it is uploaded, needs about ([0-9.]+) MiB", short)
    assert needed and sizes[0] / 2**20 < float(needed[1]) < 2 * sizes[0] / 2**20
    assert save(1, [0, 0], free=sizes[0] * 2) == (None, [None])  # room enough
    # ...but not for three workers of one node saving into one temporary directory at once.
    short, reported = save(1, [0], free=sizes[0] * 2, workers_on_node=3)
    assert reported == [None] and re.fullmatch(
        f"{re.escape(tempfile.gettempdir())} on [0-9.]+: [0-9.]+ MiB free, and 3 checkpoints \\(one per worker on this "
        f"node\\), saved there before rank 0's is uploaded, need about [0-9.]+ MiB", short)
    # Another worker's directory is short: this one, with room, does not save either.
    assert save(0, [1]) == ("a worker's temporary directory has no room for a checkpoint (its line above says which)",
                            [None])
    # --storage-path full at rank 0's upload: rank 0 says why, the others stop on its word.
    upload_fails = OSError(errno.ENOSPC, "No space left on device")
    assert save(0, [0, 0]) == ("[Errno 28] No space left on device",
                               [["best_weights.npz", "model.keras", "state.json"]])
    assert save(1, [0, 1]) == ("--storage-path took no more files at rank 0's upload", [None])
    # Any other failure is Ray Train's to retry.
    upload_fails = OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError, match="Input/output error"):
        save(0, [0, 0])


def test_untracked_checkpoints_are_removed_and_one_that_cannot_be_is_named(tmp_path, capsys):
    local = pyarrow.fs.LocalFileSystem()
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_stray", "checkpoint_stuck"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    # Not Ray Train's to track, nor ours to delete: only checkpoint folders are cleaned up.
    (tmp_path / "notes").mkdir()

    def delete_dir(path):  # as a bucket without delete permission would answer
        if path.endswith("stuck"):
            raise PermissionError(f"[Errno 13] Permission denied: '{path}'")
        local.delete_dir(path)

    def tracked(name):
        return ray.train.Checkpoint(str(tmp_path / name))

    result = SimpleNamespace(path=str(tmp_path), filesystem=SimpleNamespace(get_file_info=local.get_file_info,
                                                                            delete_dir=delete_dir),
                             checkpoint=tracked("checkpoint_b"),
                             best_checkpoints=[(tracked("checkpoint_a"), {}), (tracked("checkpoint_b"), {})])
    checkpoint.remove_untracked(result)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_a", "checkpoint_b", "checkpoint_manager_snapshot.json", "checkpoint_stuck", "notes"]
    printed = capsys.readouterr()
    assert f"removed {tmp_path / 'checkpoint_stray'}: a checkpoint an interrupted attempt left" in printed.out
    assert f"warning: could not remove {tmp_path / 'checkpoint_stuck'}" in printed.err
    assert "Permission denied" in printed.err


def test_a_worker_that_cannot_reach_the_checkpoint_storage_says_so_before_training(tmp_path):
    checkpoint.check_reachable(str(tmp_path), "--storage-path")
    checkpoint.check_reachable("s3://bucket/runs", "--storage-path")  # Ray Train's to reach
    with pytest.raises(RuntimeError, match=f"--storage-path {tmp_path / 'elsewhere'}: not on this worker's node "
                                           f"\\(.*\\); on a cluster, checkpoints need storage every node reaches"):
        checkpoint.check_reachable(str(tmp_path / "elsewhere"), "--storage-path")
    # Without --storage-path, the checkpoints' place is named as the driver names it, and the flag that moves them.
    config = TrainConfig(output=str(tmp_path / "elsewhere"))
    with pytest.raises(RuntimeError, match=f"^--output's checkpoints {config.resolved_storage_path}: not on this "
                                           f"worker's node .* pass --storage-path an s3:// or gs:// URI"):
        checkpoint.check_reachable(config.resolved_storage_path, config.storage_flag)


def test_a_checkpoint_whose_best_weights_are_cut_short_is_not_the_one_a_run_resumes_from(tmp_path):
    run = tmp_path / "unet"
    for name, epochs in (("checkpoint_2000-01-01_00-00-00.000000", 1), ("checkpoint_2000-01-02_00-00-00.000000", 2)):
        (run / name).mkdir(parents=True)
        with zipfile.ZipFile(run / name / checkpoint.MODEL, "w") as model:
            model.writestr("config.json", "{}")
        (run / name / checkpoint.STATE).write_text(json.dumps({"history": [{"epoch": e + 1} for e in range(epochs)]}))
        np.savez(run / name / checkpoint.BEST, np.zeros(1000))
    os.truncate(run / "checkpoint_2000-01-02_00-00-00.000000" / checkpoint.BEST, 500)  # a copy cut short, say
    (run / checkpoint.RECORD).write_text("")  # left empty by a full disk: written again, naming the newest whole one
    # The cut-short one passed for whole: every worker then failed at its restore, an attempt at a time.
    assert checkpoint.resumed_history(TrainConfig(storage_path=str(tmp_path))) == [{"epoch": 1}]
    # And the checkpoint Ray Train's record names, cut short so: named on the driver, before Ray starts.
    os.truncate(run / "checkpoint_2000-01-01_00-00-00.000000" / checkpoint.BEST, 500)
    config = TrainConfig(storage_path=str(tmp_path), output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="checkpoint_2000-01-01_00-00-00.000000: the checkpoint run 'unet' would "
                                         f"resume from cannot be read \\(BadZipFile.*; delete {run} to train the run "
                                         "afresh, or pass another --run-name or --storage-path$"):
        # Not "or --output": given a --storage-path, a run into another --output resumes this same checkpoint.
        checkpoint.resumed_history(config)
    # Where --output holds the run's results, which a new run is refused to replace: they go too, or another --output.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text(json.dumps([{"epoch": 1}]))
    with pytest.raises(ValueError, match=f"\\); delete {run} and {tmp_path / 'out' / 'metrics.json'} to train the "
                                         "run afresh, or pass "
                                         "another --output and another --run-name or --storage-path$"):
        checkpoint.resumed_history(config)


def test_an_unreadable_record_is_written_again_naming_the_whole_checkpoint_with_the_most_epochs(tmp_path):
    def saved(run, name, epochs):
        (run / name).mkdir(parents=True)
        with zipfile.ZipFile(run / name / checkpoint.MODEL, "w") as model:
            model.writestr("config.json", "{}")
        (run / name / checkpoint.STATE).write_text(json.dumps({"history": [{"epoch": e + 1} for e in range(epochs)]}))
        np.savez(run / name / checkpoint.BEST, np.zeros(10))

    # Epoch 3 saved twice (a restart from epoch 2's checkpoint saved it again): the newer copy is the one
    # the run went on from. Fewer epochs, or the older copy, would train epochs again or resume a stale one.
    # Four runs under other names: the listing's order goes by the names (a hash of them, on ext4), so that
    # one of them, at least, lists the older copy first.
    for year in range(2000, 2004):
        storage = tmp_path / str(year)
        run = storage / "unet"
        for day, epochs in ((1, 3), (2, 2), (3, 3), (4, 1)):
            saved(run, f"checkpoint_{year}-01-0{day}_00-00-00.000000", epochs)
        # A record that reads is Ray Train's own: wrong in some other way, which a rewrite would only hide.
        (run / checkpoint.RECORD).write_text('{"checkpoint_results": []}')
        assert not checkpoint.rebuilt_record(str(run))
        assert (run / checkpoint.RECORD).read_text() == '{"checkpoint_results": []}'
        (run / checkpoint.RECORD).write_text('{"checkpoint_res')  # cut short by a full disk
        assert checkpoint.rebuilt_record(str(run))
        assert checkpoint.resumed_history(TrainConfig(storage_path=str(storage))) == [{"epoch": e} for e in (1, 2, 3)]
        newest_of_most_epochs = run / f"checkpoint_{year}-01-03_00-00-00.000000"
        assert ray.train.Result.from_path(str(run)).checkpoint.path == str(newest_of_most_epochs)
