"""The evaluation job on generated frames: its report against a direct ConfusionMatrix computation."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from distributed import evaluation, progress
from distributed.config import DEFAULT_STORAGE, EvaluateConfig
from jobs import evaluate as evaluate_job
from unet_core import data, plots, scenes, unet_model
from unet_core.classes import class_names
from unet_core.metrics import ConfusionMatrix

SIZE = (32, 48)


def test_evaluate_reports_the_confusion_matrix_metrics(tmp_path, capsys):
    tf.keras.utils.set_random_seed(0)
    model_path = tmp_path / "model.keras"
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(model_path)
    scenes.write_scenes(tmp_path / "frames", 7)
    output = tmp_path / "report"

    # Batches of 3 over 7 frames: a short last batch, and previews gathered across batches.
    code = evaluate_job.main(["--model", str(model_path), "--data", str(tmp_path / "frames"),
                              "--output", str(output), "--batch-size", "3"])

    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(printed[-1])
    table = [line.split() for line in printed[:-1]]  # the table comes first
    images, masks, names = data.load_pairs(tmp_path / "frames", SIZE, 23)
    model = tf.keras.models.load_model(model_path, compile=False)
    logits = model.predict(images, verbose=0).astype(np.float64)
    predicted = np.argmax(logits, axis=-1)
    confusion = ConfusionMatrix(23).update(masks, predicted)
    expected = confusion.summary()
    assert metrics["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert metrics["mean_iou"] == pytest.approx(expected["mean_iou"])
    assert metrics["mean_iou_truth_classes"] == pytest.approx(expected["mean_iou_truth_classes"])  # RESULTS.md's
    assert metrics["per_class_iou"] == pytest.approx(expected["iou_per_class"])
    assert metrics["frames"] == 7
    # The printed table: a row per class scored, then the mean IoU and the pixel accuracy.
    assert table[0] == ["class", "IoU"] and [row[0] for row in table[1:-1]] == list(expected["iou_per_class"])
    assert [float(row[1]) for row in table[1:-1]] == pytest.approx(list(expected["iou_per_class"].values()),
                                                                   abs=5e-5)
    assert table[-1][0] == "mean" and table[-1][2:4] == ["pixel", "accuracy"]
    assert float(table[-1][1]) == pytest.approx(expected["mean_iou"], abs=5e-5)
    assert float(table[-1][4]) == pytest.approx(expected["pixel_accuracy"], abs=5e-5)
    # Softmax cross-entropy per pixel, from first principles: log-sum-exp of the logits less the
    # true class's logit, averaged over every pixel of every frame (batches of 3 weigh by pixels).
    top = logits.max(axis=-1, keepdims=True)
    log_normaliser = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
    true_logit = np.take_along_axis(logits, masks[..., None].astype(np.int64), axis=-1)[..., 0]
    assert metrics["loss"] == pytest.approx(np.mean(log_normaliser - true_logit), rel=1e-4)

    assert json.loads((output / "metrics.json").read_text()) == metrics
    with open(output / "per_class_iou.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 23
    assert [int(row["true_pixels"]) for row in rows] == confusion.counts.sum(axis=1).tolist()
    assert [int(row["predicted_pixels"]) for row in rows] == np.bincount(predicted.ravel(), minlength=23).tolist()
    # IoU by set arithmetic on the pixels; a class neither in the truth nor predicted has none.
    for class_id, row in enumerate(rows):
        truth, guess = masks == class_id, predicted == class_id
        union = (truth | guess).sum()
        if union:
            assert row["iou"] and float(row["iou"]) == pytest.approx((truth & guess).sum() / union), row
        else:
            assert row["iou"] == "", row
    for name in ("confusion_matrix.png", "previews.png", "worst_frames.png"):
        assert (output / name).stat().st_size > 0

    # Every frame once in per_frame.csv, scored alone; metrics name the six worst, worst first.
    with open(output / "per_frame.csv", newline="") as file:
        per_frame = {row["name"]: row for row in csv.DictReader(file)}
    assert sorted(per_frame) == sorted(names)
    accuracy = {}
    for name, mask, prediction in zip(names, masks, predicted):
        frame = ConfusionMatrix(23).update(mask, prediction)
        accuracy[name] = frame.pixel_accuracy()
        assert float(per_frame[name]["pixel_accuracy"]) == pytest.approx(accuracy[name])
        assert float(per_frame[name]["mean_iou_truth_classes"]) == pytest.approx(frame.mean_iou(frame.truth_classes()))
    # Worst first; among equal accuracies (an untrained model ties often) the later name first.
    worst = sorted(accuracy, key=lambda n: (-accuracy[n], n), reverse=True)[:6]
    assert list(metrics["worst_frames"]) == worst
    assert list(metrics["worst_frames"].values()) == pytest.approx(sorted(accuracy.values())[:6])
    # worst_frames.png draws exactly those frames, worst first: pixel for pixel the figure of their own
    # images, true masks and predictions with their accuracies. A file merely written (size > 0) would
    # pass with any frames in it, such as the previews' first six.
    rows = [names.index(name) for name in worst]
    plots.save_previews(images[rows], masks[rows], predicted[rows], tmp_path / "expected_worst.png",
                        [f"{name}: {accuracy[name]:.3f}" for name in worst], class_names(23))
    with Image.open(output / "worst_frames.png") as drawn, Image.open(tmp_path / "expected_worst.png") as expected:
        assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    # previews.png: the first six frames, gathered across the batches of 3 and no more (a figure of every frame
    # would grow with the set, which is scored a batch at a time to keep memory flat).
    plots.save_previews(images[:6], masks[:6], predicted[:6], tmp_path / "expected_previews.png", names[:6],
                        class_names(23))
    with Image.open(output / "previews.png") as drawn, Image.open(tmp_path / "expected_previews.png") as expected:
        assert np.array_equal(np.asarray(drawn), np.asarray(expected))

    # Its own report is no training run's: the same command may write it again.
    assert evaluate_job.main(["--model", str(model_path), "--data", str(tmp_path / "frames"),
                              "--output", str(output)]) == 0
    assert json.loads((output / "metrics.json").read_text())["pixel_accuracy"] == metrics["pixel_accuracy"]


def test_evaluate_names_every_unreadable_frame_and_writes_no_report(tmp_path, capsys):
    tf.keras.utils.set_random_seed(0)
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 5)
    (tmp_path / "frames" / "CameraRGB" / "scene_000001.png").write_bytes(b"")
    mask = tmp_path / "frames" / "CameraMask" / "scene_000004.png"
    mask.write_bytes(mask.read_bytes()[:100])

    # Batches of 2: the bad frames sit in the first and the last batch.
    code = evaluate_job.main(["--model", str(tmp_path), "--data", str(tmp_path / "frames"),
                              "--output", str(tmp_path / "report"), "--batch-size", "2"])

    assert code == 2
    error = capsys.readouterr().err
    assert "2 of 5 frame(s) cannot be read" in error
    assert "CameraRGB/scene_000001.png: empty file" in error and "CameraMask/scene_000004.png" in error
    assert os.listdir(tmp_path / "report") == ["unreadable.txt"]  # no half-written report, only what to fix


def test_a_failure_midway_leaves_the_last_report_as_it_was(tmp_path, monkeypatch):
    tf.keras.utils.set_random_seed(0)
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 3)
    report = tmp_path / "report"
    report.mkdir()
    (report / "per_frame.csv").write_text("the last report\n")

    def fails(*_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(evaluation.ingest, "read_frames", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluation.evaluate(EvaluateConfig(str(tmp_path), str(tmp_path / "frames"), str(report)))
    assert os.listdir(report) == ["per_frame.csv"] and (report / "per_frame.csv").read_text() == "the last report\n"
    # Ctrl-C midway into a new --output: no empty report left behind, where a rerun would look for one.
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation.ingest, "read_frames", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(EvaluateConfig(str(tmp_path), str(tmp_path / "frames"), str(tmp_path / "new")))
    assert not (tmp_path / "new").exists() and os.listdir(report) == ["per_frame.csv"]


def report_files(report):
    return {name: (report / name).read_bytes() for name in sorted(os.listdir(report))}


def test_a_disk_that_fills_as_the_report_is_written_keeps_the_last_report_whole(tmp_path, small_disk, capsys):
    # The files were written in place one after another: a full disk left the new metrics.json beside the last
    # report's previews, and a traceback.
    tf.keras.utils.set_random_seed(0)
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 4)
    scenes.write_scenes(tmp_path / "other", 4, seed=1)
    report = small_disk / "report"
    args = ["--model", str(tmp_path / "model.keras"), "--output", str(report)]
    assert evaluate_job.main([*args, "--data", str(tmp_path / "frames")]) == 0
    last = report_files(report)
    room = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "filler", "wb") as filler:  # room for about half of another report
        filler.write(b"\0" * (room - sum(map(len, last.values())) // 2))
    capsys.readouterr()

    assert evaluate_job.main([*args, "--data", str(tmp_path / "other")]) == 2
    assert (f"--output {report}: cannot take more files (No space left on device); the last report there is kept: "
            f"make room, then the same command scores the frames again") in capsys.readouterr().err
    assert report_files(report) == last
    (small_disk / "filler").unlink()  # room made: the same command goes on
    assert evaluate_job.main([*args, "--data", str(tmp_path / "other")]) == 0
    assert json.loads((report / "metrics.json").read_text())["data"] == str(tmp_path / "other")


def test_an_output_that_takes_no_files_is_named_and_the_last_report_kept(tmp_path, monkeypatch):
    tf.keras.utils.set_random_seed(0)
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 2)
    report = tmp_path / "report"
    config = EvaluateConfig(str(tmp_path / "model.keras"), str(tmp_path / "frames"), str(report))
    evaluation.evaluate(config)
    last = report_files(report)

    def read_only(confusion, path, names):  # as a read-only mount answers (root, as in CI, may write anywhere)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(evaluation.plots, "save_confusion_matrix", read_only)
    with pytest.raises(ValueError, match=f"^--output {report}: the report cannot be written there \\(\\[Errno 13\\] "
                                         f"Permission denied: '{report}/.*'\\); the last report there is kept$"):
        evaluation.evaluate(config)
    assert report_files(report) == last


def test_a_model_that_predicts_nan_is_refused_not_scored_as_class_0(tmp_path):
    model = unet_model((*SIZE, 3), n_filters=4, n_classes=23)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, np.full_like(bias, np.nan)])
    model.save(tmp_path / "diverged.keras")
    scenes.write_scenes(tmp_path / "frames", 2)
    with pytest.raises(ValueError, match=f"^--model {tmp_path / 'diverged.keras'}: predicts NaN or infinite scores "
                                         f"\\(on scene_000000.png and others\\): its weights have diverged"):
        evaluation.evaluate(EvaluateConfig(str(tmp_path / "diverged.keras"), str(tmp_path / "frames"),
                                           str(tmp_path / "report")))
    assert not (tmp_path / "report").exists()


def test_an_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation.model_io, "load_model", lambda path: pytest.fail("the model was loaded"))
    (tmp_path / "report").write_text("notes")
    with pytest.raises(ValueError, match="report: a file; it must be a directory"):
        evaluation.evaluate(EvaluateConfig(str(tmp_path / "model.keras"), str(tmp_path / "frames"),
                                           str(tmp_path / "report")))
    (tmp_path / "model.keras").write_bytes(b"not loaded")
    scenes.write_scenes(tmp_path / "frames", 1)
    with pytest.raises(ValueError, match="--output /proc/report: cannot be made a directory \\(No such file"):
        evaluation.evaluate(EvaluateConfig(str(tmp_path / "model.keras"), str(tmp_path / "frames"), "/proc/report"))


def test_data_in_a_store_out_of_reach_is_a_bad_flag_not_a_crash(tmp_path, capsys):
    # pyarrow's OSError (no JVM here for HDFS, no server there) ended the job with a traceback and exit 1.
    argv = ["--model", str(tmp_path / "model.keras"), "--data", "hdfs://127.0.0.1:1/frames",
            "--output", str(tmp_path / "report")]
    assert evaluate_job.main(argv) == 2
    assert "error: hdfs://127.0.0.1:1/frames: cannot be used (" in capsys.readouterr().err


def test_a_mistyped_model_or_data_or_a_model_that_cannot_serve_leaves_no_empty_report_behind(tmp_path):
    (tmp_path / "run").mkdir()  # a run directory without its model.keras
    scenes.write_scenes(tmp_path / "frames", 1)
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    (tmp_path / "text.keras").write_text("not a model")
    rgb = tf.keras.Input((*SIZE, 3))
    tf.keras.Model(rgb, tf.keras.layers.GlobalAveragePooling2D()(rgb)).save(tmp_path / "pooling.keras")
    for model, frames, error in ((tmp_path / "run", tmp_path / "frames", "nor a directory holding model.keras"),
                                 (tmp_path / "rum" / "model.keras", tmp_path / "frames", "rum/model.keras: not found$"),
                                 (tmp_path / "model.keras", tmp_path / "frames" / "CameraRGB", "not a CARLA-layout"),
                                 (tmp_path / "text.keras", tmp_path / "frames", "tf.keras cannot load this model"),
                                 (tmp_path / "pooling.keras", tmp_path / "frames", "not a score per class for every")):
        with pytest.raises(ValueError, match=error):
            evaluation.evaluate(EvaluateConfig(str(model), str(frames), str(tmp_path / "report")))
        assert not (tmp_path / "report").exists()


def test_class_ids_beyond_the_model_name_the_number_of_classes_they_need(tmp_path, capsys):
    unet_model((*SIZE, 3), n_filters=4, n_classes=5).save(tmp_path / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 2)
    code = evaluate_job.main(["--model", str(tmp_path), "--data", str(tmp_path / "frames"),
                              "--output", str(tmp_path / "report")])
    assert code == 2
    error = capsys.readouterr().err
    assert "2 of 2 frame(s) cannot be read" in error and "scene_000001.png: mask has class id" in error
    assert ", the model predicts 5 classes: score a model trained with --n-classes " in error
    listing = (tmp_path / "report" / "unreadable.txt").read_text().splitlines()
    assert [line.split(": mask has class id")[0] for line in listing] == [
        str(tmp_path / "frames" / "CameraMask" / f"scene_00000{index}.png") for index in range(2)]
    # Scored with a model that takes them, the report no longer carries the stale list.
    unet_model((*SIZE, 3), n_filters=4).save(tmp_path / "model.keras")
    assert evaluate_job.main(["--model", str(tmp_path), "--data", str(tmp_path / "frames"),
                              "--output", str(tmp_path / "report")]) == 0
    assert not (tmp_path / "report" / "unreadable.txt").exists()


def test_an_output_inside_the_data_or_a_run_directory_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation.model_io, "load_model", lambda path: pytest.fail("the model was loaded"))
    scenes.write_scenes(tmp_path / "frames", 1)
    (tmp_path / "run").mkdir()
    progress.write_metrics(str(tmp_path / "run"), [{"epoch": 1, "loss": 1.0, "val_mean_iou": 0.1}])
    (tmp_path / "training" / DEFAULT_STORAGE).mkdir(parents=True)  # a run still training: checkpoints only
    refused = "a training run's directory; the report's metrics.json and previews.png would replace the run's own"
    for output, message in (
        (tmp_path / "frames", "frames: inside --data"),
        (tmp_path / "frames" / "CameraRGB", "CameraRGB: inside --data .*: pass --output outside it"),
        (tmp_path / "run", f"run: {refused}: pass another --output, such as .*run/evaluation"),
        (tmp_path / "training", f"training: {refused}"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluation.evaluate(EvaluateConfig(str(tmp_path / "run"), str(tmp_path / "frames"), str(output)))
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.csv", "metrics.json"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())[0]["epoch"] == 1
    assert sorted(os.listdir(tmp_path / "frames")) == ["CameraMask", "CameraRGB"]


def test_a_split_scores_only_the_frames_training_holds_out(tmp_path, capsys):
    tf.keras.utils.set_random_seed(0)
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 10)
    names = sorted(os.listdir(tmp_path / "frames" / "CameraRGB"))
    held_out = [name for name, is_val in zip(names, data.validation_flags(names, 0.3, "tail")) if is_val]
    assert held_out == names[-3:]  # the tail: the last 30% by name
    for folder in ("CameraRGB", "CameraMask"):  # the same frames alone in a directory of their own
        (tmp_path / "tail" / folder).mkdir(parents=True)
        for name in held_out:
            os.link(tmp_path / "frames" / folder / name, tmp_path / "tail" / folder / name)

    assert evaluate_job.main(["--model", str(tmp_path / "model.keras"), "--data", str(tmp_path / "frames"),
                              "--output", str(tmp_path / "split"), "--split", "tail", "--val-fraction", "0.3"]) == 0
    assert "scoring the 3 of 10 frames that --split tail --val-fraction 0.3 holds out" in capsys.readouterr().out
    split = json.loads((tmp_path / "split" / "metrics.json").read_text())
    alone = evaluation.evaluate(EvaluateConfig(str(tmp_path / "model.keras"), str(tmp_path / "tail"),
                                               str(tmp_path / "alone")))
    assert (split["frames"], split["split"]) == (3, {"split": "tail", "val_fraction": 0.3})
    for key in ("loss", "pixel_accuracy", "mean_iou", "per_class_iou", "worst_frames"):
        assert split[key] == alone[key], key
    with open(tmp_path / "split" / "per_frame.csv") as file:
        assert [row["name"] for row in csv.DictReader(file)] == held_out

    assert evaluate_job.main(["--model", str(tmp_path / "model.keras"), "--data", str(tmp_path / "frames"),
                              "--output", str(tmp_path / "x"), "--val-fraction", "0.3"]) == 2
    assert "--val-fraction has no effect without --split" in capsys.readouterr().err


def test_a_split_that_holds_out_no_frame_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    # Scoring no frame failed later, in a traceback from drawing an empty figure.
    monkeypatch.setattr(evaluation.model_io, "load_model", lambda path: pytest.fail("the model was loaded"))
    (tmp_path / "model.keras").write_bytes(b"never loaded")
    scenes.write_scenes(tmp_path / "frames", 2)
    with pytest.raises(ValueError, match="frames: --split hash --val-fraction 0.01 holds out none of its 2 "
                                         "frame\\(s\\)$"):
        evaluation.evaluate(EvaluateConfig(str(tmp_path / "model.keras"), str(tmp_path / "frames"),
                                           str(tmp_path / "report"), split="hash", val_fraction=0.01))
    assert not (tmp_path / "report").exists()


def test_jobs_evaluate_scores_32_frames_per_call_and_every_frame_by_default():
    args = evaluate_job.parse_args(["--model", "m.keras", "--data", "frames", "--output", "report"])
    assert (args.batch_size, args.split, args.val_fraction) == (32, None, None)


def test_a_model_ending_in_a_softmax_is_scored_on_its_probabilities(tmp_path):
    tf.keras.utils.set_random_seed(0)
    logits_model = unet_model((*SIZE, 3), n_filters=4)
    kernel, bias = logits_model.layers[-1].get_weights()
    bias[0] = 12.0  # confident logits (class 0, mostly wrong), so that reading them wrongly shows
    logits_model.layers[-1].set_weights([kernel, bias])
    (tmp_path / "logits").mkdir()
    (tmp_path / "probabilities").mkdir()
    logits_model.save(tmp_path / "logits" / "model.keras")
    tf.keras.Model(logits_model.input, tf.keras.layers.Softmax()(logits_model.output)).save(
        tmp_path / "probabilities" / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 2)
    reports = [evaluation.evaluate(EvaluateConfig(str(tmp_path / kind), str(tmp_path / "frames"),
                                                  str(tmp_path / f"report-{kind}")))
               for kind in ("logits", "probabilities")]
    # Read as logits, probabilities in [0, 1] gave a loss near log(23) = 3.1 whatever the model.
    assert reports[0]["loss"] > 5
    assert reports[1]["loss"] == pytest.approx(reports[0]["loss"], rel=1e-4)
    assert reports[1]["pixel_accuracy"] == reports[0]["pixel_accuracy"]


def test_a_second_evaluation_into_an_output_one_is_writing_into_is_refused(tmp_path, monkeypatch, capsys):
    # Both wrote per_frame.csv.tmp: one crashed, and the report left mixed one's metrics with the other's frames.
    from distributed import ingest

    monkeypatch.setattr(evaluation.model_io, "load_model", lambda path: pytest.fail("the model was loaded"))
    unet_model((*SIZE, 3), n_filters=4).save(tmp_path / "model.keras")
    scenes.write_scenes(tmp_path / "frames", 1)
    first = ingest.hold(*ingest.open_output(str(tmp_path / "report")), "jobs.evaluate")
    argv = ["--model", str(tmp_path), "--data", str(tmp_path / "frames"), "--output", str(tmp_path / "report")]
    assert evaluate_job.main(argv) == 2
    assert (f"error: {tmp_path / 'report'}: jobs.evaluate (pid {os.getpid()}) is writing into it; wait for it to "
            f"end, or pass another --output") in capsys.readouterr().err
    first.close()
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):  # held no longer: on to the model
        evaluate_job.main(argv)
