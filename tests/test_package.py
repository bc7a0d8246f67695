import os
import subprocess
import sys


def run_python(code):
    # Without the test session's TF_USE_LEGACY_KERAS (conftest sets it): the package must set it itself.
    environment = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=environment).stdout


def test_importing_unet_core_does_not_import_ray():
    code = (
        "import sys, unet_core, unet_core.data, unet_core.metrics, unet_core.plots, "
        "unet_core.scenes, unet_core.training\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    assert run_python(code).strip() == "[]"


def test_tf_keras_is_the_legacy_keras_2():
    # Keras 3 breaks MultiWorkerMirroredStrategy; importing unet_core must select tf-keras.
    code = "import unet_core, tensorflow as tf; print(tf.keras.__name__, tf.keras.layers.Conv2D.__module__)"
    assert "tf_keras" in run_python(code)
