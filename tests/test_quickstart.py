import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import quickstart


def test_quickstart_runs_the_product_end_to_end(quickstart_run):
    # --smoke --epochs 2 --new-frames 5 into a directory with 7 frames in new_frames/, and predictions
    # of the two it drops (conftest.py).
    tmp_path, console = quickstart_run.output, quickstart_run.out + quickstart_run.err
    assert quickstart_run.code == 0, console[-5000:]
    # The summary is the job's last line of its own; Ray may still stream a worker's or actor's
    # log line to the driver's stdout after it, so the test finds it rather than taking the last.
    printed = quickstart_run.out.strip().splitlines()
    # Ray Train's placement-group cleaner warns every second on a local Ray unless silenced; Ray
    # Train and Ray Data log five lines of their own every epoch unless silenced. The epoch's own
    # line shows that the workers' console does reach this one.
    assert "[unet-ray] epoch 2/2" in console
    assert "Failed to query Ray Train Controller actor state" not in console
    assert "Reporting training result" not in console and "Dataset val_" not in console
    summary = json.loads(next(line for line in reversed(printed) if line.startswith('{"pixel_accuracy"')))
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    # The evaluation's own figures, not merely numbers in range, and every new frame inferred.
    assert summary == {"pixel_accuracy": report["pixel_accuracy"], "mean_iou": report["mean_iou"],
                       "ok": 5, "failed": 0, "skipped": 0}
    for path in ("train/model.keras", "train/curves.png", "train/previews.png", "evaluation/metrics.json"):
        assert os.path.exists(tmp_path / path), path
    assert ["tfevents" in name for name in os.listdir(tmp_path / "train" / "tensorboard")] == [True]
    assert f"{tmp_path}/train/tensorboard/ (written as each epoch ended)" in console
    assert report["frames"] == 5
    assert len(os.listdir(tmp_path / "new_frames" / "CameraMask")) == 5
    # Inference and evaluation score frames the model never saw: none of the new frames is any
    # training scene (generated ones with the same seed would repeat them, name for name).
    scenes_dir = tmp_path / "train" / "scenes" / "CameraRGB"
    trained_on = [np.asarray(Image.open(path)) for path in sorted(scenes_dir.iterdir())]
    assert len(trained_on) == 24  # --smoke's scene count: the scenes were found where the run writes them
    for path in sorted((tmp_path / "new_frames" / "CameraRGB").iterdir()):
        new_frame = np.asarray(Image.open(path))
        assert not any(np.array_equal(new_frame, scene) for scene in trained_on), f"{path.name} is a training scene"
    table = pq.read_table(tmp_path / "inference" / "predictions")
    frames = sorted(os.listdir(tmp_path / "new_frames" / "CameraRGB"))
    assert sorted(table["path"].to_pylist()) == frames
    assert sorted(os.listdir(tmp_path / "inference" / "masks")) == frames


def test_quickstart_refuses_empty_counts_before_any_work(tmp_path, capsys):
    for flag in ("--epochs", "--scene-count", "--new-frames"):
        try:  # argparse's refusal (SystemExit) or TrainConfig's (exit status 2)
            code = quickstart.main(["--output", str(tmp_path), flag, "0"])
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_quickstart_refuses_an_empty_output_before_any_work(tmp_path, monkeypatch, capsys):
    from distributed import training

    monkeypatch.setattr(training, "train", lambda config: pytest.fail(f"trained into {config.output}"))
    monkeypatch.chdir(tmp_path)  # '' made absolute: the run would have gone here
    with pytest.raises(SystemExit) as refused:
        quickstart.main(["--output", "", "--smoke"])
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert "--output is empty (an unset shell variable?); leave the flag out for runs/quickstart" in error
    assert list(tmp_path.iterdir()) == []


def test_smoke_shrinks_the_run_but_flags_given_still_apply():
    smoke = quickstart.train_config(quickstart.parse_args(["--smoke"]), "out")
    assert (smoke.epochs, smoke.scene_count, smoke.n_filters) == (3, 24, 4)
    asked = quickstart.train_config(quickstart.parse_args(["--smoke", "--epochs", "5", "--scene-count", "40"]), "out")
    assert (asked.epochs, asked.scene_count, asked.n_filters) == (5, 40, 4)
    full = quickstart.train_config(quickstart.parse_args([]), "out")
    assert (full.epochs, full.scene_count, full.n_filters, full.num_workers) == (4, 256, 32, 2)


def test_ctrl_c_exits_130_and_says_a_rerun_goes_on(tmp_path, monkeypatch, capsys):
    from distributed import training

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert quickstart.main(["--output", str(tmp_path), "--smoke"]) == 130
    assert "interrupted: the same command goes on where it stopped" in capsys.readouterr().err


def test_sigterm_after_training_exits_130_and_says_a_rerun_goes_on(tmp_path):
    # In a process of its own, where Ray runs as training leaves it: Ray's handlers would end a SIGTERM
    # (`ray job stop`, `timeout`) in exit 15 and a C++ abort 3 s later instead.
    script = "\n".join([
        "import os, signal, sys, time",
        "from distributed import evaluation, inference, runtime, training",
        "from jobs import quickstart",
        "training.train = lambda config: runtime.connect(num_cpus=1)",
        "inference.infer = lambda config: {'ok': 1, 'failed': 0, 'skipped': 0}",
        "def terminated(config):",
        "    os.kill(os.getpid(), signal.SIGTERM)",
        "    time.sleep(60)",
        "evaluation.evaluate = terminated",
        "sys.exit(quickstart.main(sys.argv[1:]))",
    ])
    job = subprocess.run([sys.executable, "-c", script, "--output", str(tmp_path), "--smoke", "--new-frames", "1"],
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 130, job.stderr[-3000:]
    assert "SIGTERM received" not in job.stderr
    assert "interrupted: the same command goes on where it stopped" in job.stderr


def test_a_rerun_with_another_network_is_told_to_pass_another_output(tmp_path, monkeypatch, capsys):
    from distributed import run_directory, training

    monkeypatch.setattr(training, "train", lambda config: pytest.fail("trained over another run"))
    full = quickstart.train_config(quickstart.parse_args([]), str(tmp_path))
    run_directory.record_run_identity(full, "204 training / 52 validation frames, names sha256:0123456789abcdef")
    os.makedirs(os.path.join(full.resolved_storage_path, full.run_name, "checkpoint_2026-12-05_10-00-00.000000"))
    assert quickstart.main(["--output", str(tmp_path), "--smoke"]) == 2
    error = capsys.readouterr().err
    assert "trained with other settings" in error and "n_filters 32 -> 4" in error
    assert error.rstrip().endswith("or pass another --output to start a new run")  # it has no --run-name


def test_a_rerun_that_trained_the_model_further_predicts_the_new_frames_again(tmp_path):
    # A rerun with more --epochs exports another model: inference kept and skipped the earlier
    # model's masks, which the summary then gave as this model's, beside an evaluation of the new one.
    import pyarrow as pa
    import tensorflow as tf

    from distributed import model_io
    from unet_core import unet_model

    unet_model((32, 48, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    identity = model_io.model_identity((tmp_path / "model.keras").read_bytes(), "model.keras")
    inferred = tmp_path / "inference"
    (inferred / "predictions").mkdir(parents=True)
    (inferred / "masks").mkdir()
    pq.write_table(pa.table({"path": ["a.png"], "model": [identity]}), inferred / "predictions" / "part-0.parquet")
    quickstart.forget_predictions_of_another_model(str(inferred), str(tmp_path / "model.keras"))
    assert (inferred / "predictions" / "part-0.parquet").exists()  # the same model's: kept, and skipped

    tf.keras.utils.set_random_seed(1)  # trained further: other weights
    unet_model((32, 48, 3), n_filters=4, n_classes=23).save(tmp_path / "model.keras")
    quickstart.forget_predictions_of_another_model(str(inferred), str(tmp_path / "model.keras"))
    assert not inferred.exists()
    quickstart.forget_predictions_of_another_model(str(inferred), str(tmp_path / "model.keras"))  # none: nothing
    (inferred / "predictions").mkdir(parents=True)
    (inferred / "predictions" / "part-1.parquet").write_bytes(b"PAR1 cut short")
    quickstart.forget_predictions_of_another_model(str(inferred), str(tmp_path / "model.keras"))  # raised ArrowInvalid
    assert (inferred / "predictions" / "part-1.parquet").exists()  # left for jobs.infer to name, with what to do
