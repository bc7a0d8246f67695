"""The run directory: generated scenes, and which reruns may resume a run."""

import dataclasses
import errno
import json
import os
import shutil

import numpy as np
import pytest
import ray
import tensorflow as tf

from distributed import progress, run_directory
from distributed.config import TrainConfig
from unet_core import unet_model

FRAMES = "2 training / 1 validation frames, names sha256:0123456789abcdef"


def test_generated_scenes_are_exactly_scene_count_on_a_rerun(tmp_path):
    larger = TrainConfig(output=str(tmp_path), scene_count=5)
    directory = run_directory.generate_scenes(larger)
    assert len(os.listdir(os.path.join(directory, "CameraRGB"))) == 5
    smaller = run_directory.generate_scenes(TrainConfig(output=str(tmp_path), scene_count=3))
    expected = [f"scene_{index:06d}.png" for index in range(3)]
    for folder in ("CameraRGB", "CameraMask"):
        assert sorted(os.listdir(os.path.join(smaller, folder))) == expected


def test_a_rerun_resumes_only_on_the_same_frames_and_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("frames")
    first = TrainConfig(data="frames", output="run", epochs=2)
    run_directory.check_run_identity(first)  # nothing recorded yet: a new run
    run_directory.record_run_identity(first, FRAMES)
    recorded = tmp_path / "run" / "ray_results" / "unet" / run_directory.IDENTITY_FILE
    assert recorded.exists()
    # Stopped before its first checkpoint: nothing to resume, so a corrected rerun starts afresh.
    run_directory.check_run_identity(TrainConfig(data="other_frames", output="run", image_size=(64, 96)))
    (recorded.parent / "checkpoint_2026-12-04_10-00-00.000000").mkdir()
    # More epochs, another cluster shape or learning rate, the same data by absolute path, URI or link: a resume.
    os.symlink(tmp_path / "frames", tmp_path / "linked")
    for data in (str(tmp_path / "frames"), f"file://{tmp_path / 'frames'}/", "linked"):
        run_directory.check_run_identity(TrainConfig(data=data, output="run", epochs=5, num_workers=2,
                                                     learning_rate=1e-3))
    with pytest.raises(ValueError, match=r"run 'unet' there trained with other settings \(data .*other_frames"):
        run_directory.check_run_identity(TrainConfig(data="other_frames", output="run"))
    with pytest.raises(ValueError, match=r"image_size \[96, 128\] -> \[64, 96\]; n_filters 32 -> 8\)"):
        run_directory.check_run_identity(TrainConfig(data="frames", output="run", image_size=(64, 96), n_filters=8))
    with pytest.raises(ValueError, match="'24 generated scenes, seed 0'"):
        run_directory.check_run_identity(TrainConfig(output="run").smoke())
    # Another momentum keeps Adam's slots; none at all would drop every one of them on loading.
    run_directory.check_run_identity(TrainConfig(data="frames", output="run", ema_momentum=0.999))
    with pytest.raises(ValueError, match=r"weight_average 'on \(--ema-momentum > 0\)' -> 'off \(--ema-momentum 0\)'"):
        run_directory.check_run_identity(TrainConfig(data="frames", output="run", ema_momentum=0.0))
    # Another run name is another run.
    run_directory.check_run_identity(TrainConfig(output="run", run_name="scenes").smoke())
    assert not (tmp_path / "run" / "ray_results" / "scenes").exists()  # checking writes nothing


def test_an_output_holding_another_runs_results_is_refused_not_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = TrainConfig(data="frames", output="run")
    run_directory.check_output_is_this_runs(first)  # a new --output
    run_directory.record_run_identity(first, FRAMES)  # as every run does before its first epoch
    os.makedirs("run", exist_ok=True)
    progress.write_metrics("run", [{"epoch": 1, "val_mean_iou": 0.5}])
    run_directory.check_output_is_this_runs(first)  # its own results: a resume, or an export again
    for other in (dataclasses.replace(first, run_name="other"), dataclasses.replace(first, storage_path="elsewhere")):
        with pytest.raises(ValueError, match="^run: holds the results of another run \\(metrics.json, model.keras\\), "
                                             f"which run '{other.run_name}' would replace: pass another --output"):
            run_directory.check_output_is_this_runs(other)


def test_a_bucket_given_with_or_without_its_trailing_slash_is_the_same_data(tmp_path, monkeypatch):
    # A shell's completion adds the slash, a rerun typed by hand drops it: refusing that resume would
    # send the user to start the run afresh over a spelling.
    monkeypatch.chdir(tmp_path)
    run_directory.record_run_identity(TrainConfig(data="s3://unet/frames/", output="run"), FRAMES)
    (tmp_path / "run" / "ray_results" / "unet" / "checkpoint_2026-12-04_10-00-00.000000").mkdir()
    run_directory.check_run_identity(TrainConfig(data="s3://unet/frames", output="run"), FRAMES)
    with pytest.raises(ValueError, match=r"data 's3://unet/frames/' -> 's3://unet/frames_2'"):
        run_directory.check_run_identity(TrainConfig(data="s3://unet/frames_2", output="run"), FRAMES)


def test_a_refused_rerun_is_told_the_flags_that_start_a_new_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ({}, {"storage_path": str(tmp_path / "checkpoints")}):
        config = TrainConfig(data="frames", output="run", **given)
        run_directory.record_run_identity(config, FRAMES)
        os.mkdir(f"{config.run_storage}/checkpoint_2026-12-04_10-00-00.000000")
    with pytest.raises(ValueError, match=r"pass another --run-name or --output to start a new run$"):
        run_directory.check_run_identity(TrainConfig(data="frames", output="run", n_filters=8))
    # The checkpoints of a --storage-path given stay the run's whatever the --output: another one was refused again.
    with pytest.raises(ValueError, match=r"pass another --run-name or --storage-path to start a new run$"):
        run_directory.check_run_identity(TrainConfig(data="frames", output="another", n_filters=8,
                                                     storage_path=str(tmp_path / "checkpoints")))


def new_run_checks(config):
    """The checks a new run's settings pass before Ray starts, as training.check_paths runs them."""
    run_directory.check_output_is_this_runs(config)
    run_directory.check_run_identity(config, FRAMES)


@pytest.mark.parametrize("storage", [None, "checkpoints"])
def test_the_new_run_a_refusal_advises_past_an_output_with_results_is_let_through(tmp_path, monkeypatch, storage):
    # An --output with results is refused to a new run: the advice, another --run-name, was refused in turn.
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data="frames", output="run", storage_path=storage, n_filters=8)
    run_directory.record_run_identity(dataclasses.replace(config, n_filters=32), FRAMES)
    os.mkdir(f"{config.run_storage}/checkpoint_2026-12-04_10-00-00.000000")
    os.makedirs("run", exist_ok=True)
    progress.write_metrics("run", [{"epoch": 1, "val_mean_iou": 0.5}])
    advice = "another --output" + (" and another --run-name or --storage-path" if storage else "")
    with pytest.raises(ValueError, match=f"n_filters 32 -> 8\\); rerun with its settings to resume it, or pass "
                                         f"{advice} to start a new run$"):
        new_run_checks(config)
    with pytest.raises(ValueError, match="holds the results of another run"):
        new_run_checks(dataclasses.replace(config, run_name="fresh"))
    new_run_checks(dataclasses.replace(config, output="another", run_name="fresh" if storage else config.run_name))
    # And what it says to delete to train the run afresh there: the same command then starts anew, and the
    # rest of --output (its data, say, or an evaluation) stays.
    os.makedirs("run/frames/CameraRGB")
    assert config.to_train_afresh(True) == f"delete {config.run_storage} and run/metrics.json"
    for path in config.to_train_afresh(True).removeprefix("delete ").split(" and "):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    new_run_checks(config)
    assert os.path.isdir("run/frames/CameraRGB")


def test_a_validation_directory_makes_the_split_settings_free_to_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_directory.record_run_identity(TrainConfig(data="frames", val_data="held_out", output="run"), FRAMES)
    (tmp_path / "run" / "ray_results" / "unet" / "checkpoint_2026-12-04_10-00-00.000000").mkdir()
    run_directory.check_run_identity(TrainConfig(data="frames", val_data="held_out", output="run",
                                                 split="hash", val_fraction=0.3))
    with pytest.raises(ValueError, match=r"val_data .*held_out' -> None"):
        run_directory.check_run_identity(TrainConfig(data="frames", output="run"))


def test_checkpoints_of_an_older_unet_ray_are_refused_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "ray_results" / "unet" / "checkpoint_2026-12-01_10-00-00.000000").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"checkpoints of a run without {run_directory.IDENTITY_FILE} \\(an older "
                                         "unet-ray wrote them, or the file was deleted\\)"):
        run_directory.check_run_identity(TrainConfig(data="frames", output="run"))
    run_directory.check_run_identity(TrainConfig(data="frames", output="run", run_name="fresh"))


def test_a_rerun_resumes_only_on_the_same_frames_of_its_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data="frames", output="run")
    identity = run_directory.frames_identity

    before = identity(["a.png", "b.png"], ["c.png"])
    assert before.startswith("2 training / 1 validation frames, names sha256:")
    assert identity(["b.png", "a.png"], ["c.png"]) == before  # listed or decoded, in any order
    assert identity(["a.png"], ["b.png", "c.png"]) != identity(["a.png", "b.png"], ["c.png"])
    assert identity(["a.png"], ["b.png"]) != identity(["b.png"], ["a.png"])  # the same counts, the other split
    run_directory.record_run_identity(config, before)
    (tmp_path / "run" / "ray_results" / "unet" / "checkpoint_2026-12-04_10-00-00.000000").mkdir()
    run_directory.check_run_identity(config)  # the settings alone, before the data is listed
    run_directory.check_run_identity(config, before)
    # A frame added after the tail split's last one: c.png, which validated, would now train.
    with pytest.raises(ValueError, match="frames '2 training / 1 validation frames, names sha256:.*' -> "
                                         "'3 training / 1 validation frames"):
        run_directory.check_run_identity(config, identity(["a.png", "b.png", "c.png"], ["d.png"]))
    # Recorded by a unet-ray that did not record frames or the weight average: nothing to compare them with.
    recorded = tmp_path / "run" / "ray_results" / "unet" / run_directory.IDENTITY_FILE
    recorded.write_text(recorded.read_text().replace('"frames"', '"not_frames"').replace('"weight_average"', '"x"'))
    run_directory.check_run_identity(dataclasses.replace(config, ema_momentum=0.0),
                                     identity(["a.png", "b.png", "c.png"], ["d.png"]))


def test_only_a_metrics_json_of_one_dict_marks_an_evaluation_report(tmp_path):
    # jobs.train refuses an --output holding a report: taking its own run directory for one would refuse every resume.
    for name, metrics in (("run", [{"epoch": 1, "val_mean_iou": 0.2}]), ("report", {"mean_iou": 0.2})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "empty").mkdir()
    assert [run_directory.is_evaluation_report(str(tmp_path / name)) for name in ("run", "report", "empty")] == [
        False, True, False]


def test_a_run_that_goes_on_keeps_no_earlier_list_of_skipped_or_unreadable_frames(tmp_path):
    (tmp_path / "unreadable.txt").write_text("frames/CameraRGB/a.png: truncated\n")  # an earlier refusal's
    run_directory.write_skipped(str(tmp_path), {"a.png": "truncated"})
    assert json.loads((tmp_path / "skipped.json").read_text()) == {"a.png": "truncated"}
    assert not (tmp_path / "unreadable.txt").exists()
    run_directory.write_skipped(str(tmp_path), {})
    assert os.listdir(tmp_path) == []


def test_the_export_writes_tensorboard_as_it_writes_metrics_json(tmp_path, ray_session):
    # A rerun that trains no epoch (a finished run exported again) reports none to Ray Train's controller, which
    # writes TensorBoard as epochs end: a new --output had no TensorBoard, and the run's own drew epochs 3 and 4,
    # which the checkpoint exported (of epoch 2) does not hold.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distributed import progress

    config = TrainConfig(output=str(tmp_path / "run")).smoke()
    height, width = config.image_size
    frames = ray.data.from_items([{"name": "a.png", "image": np.zeros((height, width, 3), np.float32),
                                   "mask": np.zeros((height, width), np.uint8)}])
    weights = unet_model((*config.image_size, 3), config.n_filters, config.n_classes).get_weights()
    history = [{"epoch": epoch, "val_mean_iou": epoch / 10} for epoch in (1, 2, 3, 4)]
    for output, earlier in ((tmp_path / "new", []), (tmp_path / "run", history)):
        output.mkdir()
        if earlier:
            aborted = progress.EpochsToDisk(str(output), resumed=[])
            for row in earlier:
                aborted.after_report(None, [row], checkpoint=None)
        run_directory.write(dataclasses.replace(config, output=str(output)), history[:2], weights, frames)
        accumulator = EventAccumulator(str(output / progress.TENSORBOARD))
        accumulator.Reload()
        assert [(event.step, round(event.value, 6)) for event in accumulator.Scalars("val_mean_iou")] == [
            (1, 0.1), (2, 0.2)]


def test_an_output_that_fills_up_at_the_export_is_one_error_and_leaves_no_half_written_model(tmp_path,
                                                                                               monkeypatch):
    config = TrainConfig(output=str(tmp_path)).smoke()
    weights = unet_model((*config.image_size, 3), config.n_filters, config.n_classes).get_weights()

    def full_midway(model, path, **kwargs):
        with open(path, "wb") as file:
            file.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.keras.Model, "save", full_midway)
    with pytest.raises(ValueError, match=f"--output {tmp_path}: cannot take more files \\(No space left on device\\)"
                                         ".* make room, then the same command writes them again"):
        run_directory.write(config, [], weights, None)
    assert os.listdir(tmp_path) == []
