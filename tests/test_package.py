import os
import subprocess
import sys

import pytest


def run_python(code):
    # Without the test session's TF_USE_LEGACY_KERAS (conftest sets it): the package must set it itself.
    environment = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=environment).stdout


def test_importing_unet_core_selects_tf_keras_and_never_imports_ray():
    # Keras 3 breaks MultiWorkerMirroredStrategy: importing unet_core must select tf-keras, the
    # Keras 2 of TensorFlow's own minor version. One process for both: each import of TF costs seconds.
    code = (
        "import sys, unet_core, unet_core.data, unet_core.metrics, unet_core.plots, "
        "unet_core.scenes, unet_core.training\n"
        "import tensorflow as tf\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
        "print(tf.keras.__name__, tf.keras.layers.Conv2D.__module__)"
    )
    ray_modules, keras = run_python(code).strip().splitlines()[-2:]
    assert ray_modules == "[]"
    assert "tf_keras" in keras


@pytest.mark.parametrize("job, argv, message", [
    # Named as the flag the user typed, not as the TrainConfig or InferConfig field behind it.
    ("train", ["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
    ("train", ["--image-size", "100", "128"], "error: --image-size height and width must be positive multiples "
                                              "of 16 (the encoder pools four times), got 100×128; try 96×128."),
    ("infer", ["--model", "m", "--input", "i", "--output", "o", "--formats", "tiff"],
     "error: --formats must be one or more of parquet, png; got tiff"),
    ("infer", ["--model", "m", "--input", "i", "--output", "o", "--num-actors", "0"],
     "error: --num-actors must be at least 1, got 0"),
    ("evaluate", ["--model", "m", "--data", "d", "--output", "o", "--batch-size", "0"],
     "--batch-size must be at least 1, got 0"),
    ("quickstart", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("quickstart", ["--scene-count", "2"], "--scene-count 2: the generated scenes give 1 for training and 1 for "
                                           "validation; training needs at least 2 (one frame per worker) and "
                                           "validation at least 1: generate more"),
    # argparse's own refusals (and --help below) end in SystemExit, which must pass through unchanged.
    ("train", ["--epochs", "x"], "error: argument --epochs: invalid int value: 'x'"),
    ("infer", ["--num-actors", "x"], "error: argument --num-actors: must be a whole number or auto, got 'x'"),
])
def test_a_job_refuses_a_bad_flag_before_importing_tensorflow_or_ray(job, argv, message):
    # Both take seconds to import and log a screenful; a typo should cost neither.
    finished = run_job(job, argv)
    assert finished.returncode == 2
    assert finished.stderr.strip().endswith(message)
    assert finished.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("job", ["train", "infer", "evaluate", "quickstart", "make_scenes"])
def test_every_job_prints_its_help_and_exits_0(job):
    finished = run_job(job, ["--help"])
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"usage: python -m jobs.{job}") and "--output" in finished.stdout
    assert finished.stdout.strip().splitlines()[-1] == "[]"  # neither TensorFlow nor Ray imported


@pytest.mark.parametrize("job, argv", [
    ("train", ["--epoch", "3"]),
    ("infer", ["--model", "m", "--input", "i", "--output", "o", "--batch", "4"]),
    ("evaluate", ["--model", "m", "--data", "d", "--output", "o", "--batch", "4"]),
    ("quickstart", ["--out", "x"]),
    ("make_scenes", ["--output", "o", "--count", "1", "--see", "2"]),
])
def test_a_job_takes_no_abbreviated_flag(job, argv):
    # argparse would take `--epoch 3` for `--epochs 3`: a typo must not start a run.
    finished = run_job(job, argv)
    assert finished.returncode == 2 and f"unrecognized arguments: {' '.join(argv[-2:])}" in finished.stderr


def test_a_console_script_names_itself_in_its_usage():
    script = os.path.join(os.path.dirname(sys.executable), "unet-train")
    finished = subprocess.run([script, "--epochz", "1"], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2
    assert finished.stderr.startswith("usage: unet-train ") and "unet-train: error: unrecognized" in finished.stderr


def run_job(job, argv):
    """`jobs.<job>.main(argv)` in a process of its own; stdout's last line lists TensorFlow and Ray if imported."""
    code = (f"import sys\nfrom jobs import {job}\ntry:\n    code = {job}.main({argv!r})\n"
            f"except SystemExit as exit:\n    code = exit.code\n"
            f"print(sorted({{'tensorflow', 'ray'}} & set(sys.modules)))\nsys.exit(code)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
