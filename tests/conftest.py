import io
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REAL_CARLA = Path(__file__).resolve().parents[2] / "shared" / "data" / "carla"


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pair(root, name, image, mask):
    """Write an image and a mask array as PNGs in the CARLA layout under `root`."""
    for sub, array in (("CameraRGB", image), ("CameraMask", mask)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / sub / name)


def carla_mask(class_ids):
    """Class ids → an RGBA mask as CARLA writes it: id in R, G = B = 0, alpha 255."""
    height, width = class_ids.shape
    mask = np.zeros((height, width, 4), np.uint8)
    mask[..., 0], mask[..., 3] = class_ids, 255
    return mask


def reference_scores(model, images, masks, n_classes):
    """Mean pixel loss and confusion matrix of `model` over in-memory arrays, by plain Keras
    `predict` and its loss: a yardstick for the product's own scoring loops, not a copy of them."""
    import tensorflow as tf

    from unet_core.metrics import ConfusionMatrix

    logits = model.predict(images, batch_size=8, verbose=0)
    loss = tf.keras.losses.sparse_categorical_crossentropy(masks, logits, from_logits=True)
    return float(tf.reduce_mean(loss)), ConfusionMatrix(n_classes).update(masks, logits.argmax(-1))


def run_sigterm_after_ray_init(job, args):
    """Run `python -m jobs.<job> args` in a session of its own, sending it SIGTERM just as ray.init
    returns, and waiting 4 s after the job ends before exiting with its code: past the alarm that
    absl's failure-signal handler sets (an abort, exit 134), unless cancelled."""
    script = "\n".join([
        "import os, signal, sys, time",
        "import ray",
        f"from jobs import {job}",
        "init = ray.init",
        "def init_then_sigterm(*args, **kwargs):",
        "    started = init(*args, **kwargs)",
        "    os.kill(os.getpid(), signal.SIGTERM)",
        "    return started",
        "ray.init = init_then_sigterm",
        f"code = {job}.main(sys.argv[1:])",
        "time.sleep(4)",
        "sys.exit(code)",
    ])
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          start_new_session=True)


@pytest.fixture(scope="session")
def real_carla():
    if not REAL_CARLA.is_dir():
        pytest.skip(f"real CARLA frames not found at {REAL_CARLA}")
    return REAL_CARLA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: starting Ray costs seconds."""
    from distributed import runtime

    runtime.connect(num_cpus=3)
    yield


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, ray_session):
    """`python -m jobs.quickstart --smoke --epochs 2`, run once for the session: tests/test_quickstart.py
    checks its artifacts and console, and the two-worker test of tests/test_distributed_training.py
    the training run inside it, which is that test's own smoke run (it checks the TrainConfig is), so
    the suite trains it once, not twice. Returns the output, the exit code, what reached stdout and
    stderr, and train()'s config, return value and the Ctrl-C handler before and after it."""
    import contextlib
    import signal
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from distributed import training
    from jobs import quickstart
    from unet_core import scenes

    output = tmp_path_factory.mktemp("quickstart")
    # Left by an earlier run with --new-frames 7: the frames, and its predictions of the two this run drops.
    dropped = scenes.write_scenes(output / "new_frames", 7, seed=1)[5:]
    (output / "inference" / "masks").mkdir(parents=True)
    for name in dropped:
        (output / "inference" / "masks" / name).write_bytes(b"an earlier run's mask")
    (output / "inference" / "predictions").mkdir()
    pq.write_table(pa.table({"path": dropped, "model": ["earlier"] * 2}),
                   output / "inference" / "predictions" / "earlier.parquet")
    run, train = SimpleNamespace(output=output), training.train

    def recorded(config):
        run.config, run.ctrl_c_before = config, signal.getsignal(signal.SIGINT)
        run.history = train(config)
        run.ctrl_c_after = signal.getsignal(signal.SIGINT)
        return run.history

    # As capsys would: Ray prints the workers' forwarded lines to whatever sys.stdout and sys.stderr are.
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(training, "train", recorded)
        run.code = quickstart.main(["--output", str(output), "--smoke", "--epochs", "2", "--new-frames", "5"])
    run.out, run.err = out.getvalue(), err.getvalue()
    return run


@pytest.fixture
def small_disk(tmp_path):
    """A filesystem of its own, 2 MiB (tmpfs): too small for one smoke checkpoint (~2.8 MB). Needs the right to
    mount (root, as in this project's CI)."""
    path = tmp_path / "small_disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def s3_bucket(monkeypatch):
    """A bucket `unet` on a local S3 (moto's server, in a thread): the s3:// paths a cluster user
    gives, read and written through pyarrow as on AWS. Returns pyarrow's S3 filesystem."""
    import logging
    import urllib.request

    import boto3
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in this process, across servers: every test starts from none.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
    for name, value in (("AWS_ENDPOINT_URL", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket="unet")
    yield pyarrow.fs.FileSystem.from_uri("s3://unet")[0]
    server.stop()


# Fixtures that start a Ray head or train a run, once per pytest process: under pytest -n (pytest-xdist,
# --dist loadgroup) the tests that use one go to the same worker, so the suite pays for it once, not per worker.
SHARED_BY_ONE_WORKER = ("quickstart_run", "ray_head")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture in SHARED_BY_ONE_WORKER:
            if fixture in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(fixture))
