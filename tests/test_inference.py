"""Batch inference on a real local Ray: real PNG/JPEG files in, Parquet and PNG out, read back."""

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from distributed import inference, inference_output, ingest, model_io, runtime
from distributed.config import InferConfig
from distributed.inference import infer
from jobs import infer as infer_job
from unet_core import data, scenes, unet_model
from unet_core.classes import PALETTE, class_names
from tests.conftest import run_sigterm_after_ray_init

SIZE = (32, 48)
SOURCE = (480, 640)  # the size write_scenes renders
BAD_FILES = ("sub/truncated.png", "empty.png", "notes.png", "sub/gone.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    tf.keras.utils.set_random_seed(0)
    unet_model((*SIZE, 3), n_filters=4, n_classes=23).save(directory / "model.keras")
    return directory


def add_bad_files(folder):
    good = (folder / "scene_000000.png").read_bytes()
    (folder / "sub").mkdir(exist_ok=True)
    (folder / BAD_FILES[0]).write_bytes(good[: len(good) // 3])
    (folder / BAD_FILES[1]).write_bytes(b"")
    (folder / BAD_FILES[2]).write_text("not an image, whatever the name says")
    (folder / BAD_FILES[3]).symlink_to(folder / "moved-away.png")  # pyarrow's listing leaves it out


def read_table(folder):
    parts = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(part) for part in parts]) if parts else None


def part_rows(folder):
    return [pq.read_metadata(part).num_rows for part in sorted(folder.glob("*.parquet"))]


def expected_masks(model_path, folder, paths, size=SOURCE):
    """argmax of model.predict on the same preprocessed inputs, resized back with nearest neighbour."""
    model = tf.keras.models.load_model(model_path, compile=False)
    inputs = [data.preprocess_image((folder / path).read_bytes(), path, SIZE)[0] for path in paths]
    predicted = np.argmax(model.predict(np.stack(inputs), verbose=0), axis=-1)
    return {path: data.resize_mask(ids, size) for path, ids in zip(paths, predicted)}


def no_ray(**_):
    raise AssertionError("Ray was started for a job that cannot run")


def all_files(root):
    return sorted(os.path.relpath(os.path.join(here, name), root)
                  for here, _, names in os.walk(root) for name in names)


def test_every_image_lands_once_in_predictions_or_errors_across_a_resumed_run(tmp_path, ray_session, model_dir):
    images = tmp_path / "frames" / "CameraRGB"
    scenes.write_scenes(tmp_path / "frames", 20, seed=1)
    add_bad_files(images)
    os.replace(images / "scene_000001.png", images / "sub" / "scene_000001.png")  # a nested input
    output = tmp_path / "out"
    config = InferConfig(model=str(model_dir / "model.keras"), input=str(images), output=str(output),
                         batch_size=4, rows_per_file=6, overlay=True)

    assert infer(config) == {"ok": 20, "failed": 4, "skipped": 0}
    assert part_rows(output / "predictions") == [6, 6, 6, 2]  # whole parts of 6 rows, not whole batches of 4
    settings = json.loads((output / "output_settings.json").read_text())
    assert settings == {"input": f"local://{os.path.realpath(images)}", "model_input_size": [*SIZE],
                        "model_classes": 23, "formats": ["parquet", "png"], "overlay": True, "output_size": "source"}

    # A killed run: its last Parquet part never committed, a temporary file left in staging.
    last_part = sorted((output / "predictions").glob("*.parquet"))[-1]
    lost = pq.read_table(last_part).num_rows
    last_part.unlink()
    (output / ".staging" / "killed.tmp").write_bytes(b"PAR1 half a parquet part")
    scenes.write_scenes(tmp_path / "frames", 30, seed=1, start=20)

    # Settings that change no result may change between runs into one output.
    assert infer(dataclasses.replace(config, batch_size=5)) == {"ok": 30 + lost, "failed": 4, "skipped": 20 - lost}

    assert sorted(part_rows(output / "predictions")) == [2] + [6] * 8
    good = sorted([f"scene_{i:06d}.png" for i in range(50) if i != 1] + ["sub/scene_000001.png"])
    predictions = read_table(output / "predictions")
    assert sorted(predictions["path"].to_pylist()) == good  # each exactly once
    errors = read_table(output / "errors").to_pylist()
    assert sorted(row["path"] for row in errors) == sorted(BAD_FILES)  # only the latest attempt
    for row in errors:
        assert row["path"] in row["error"]

    expected = expected_masks(model_dir / "model.keras", images, good)
    # The identity that test_a_model_saved_again_keeps_its_identity_and_other_weights_change_it (in
    # tests/test_model_io.py) pins down, of the very file inferred with: rows of another model would be
    # predicted again.
    identity = model_io.model_identity((model_dir / "model.keras").read_bytes(), "model.keras")
    for row in predictions.to_pylist():
        mask_file = output / "masks" / row["path"]
        assert mask_file.read_bytes() == row["mask_png"]
        mask = Image.open(mask_file)
        assert mask.size == (row["width"], row["height"]) == SOURCE[::-1]
        # Read as CameraMask is read: id in R, G = B = 0, opaque.
        channels = np.asarray(mask.convert("RGBA"))
        assert not channels[..., 1:3].any() and (channels[..., 3] == 255).all()
        np.testing.assert_array_equal(channels[..., 0], expected[row["path"]])
        np.testing.assert_array_equal(data.decode_mask(row["mask_png"], row["path"]), expected[row["path"]])
        counts = np.bincount(expected[row["path"]].ravel(), minlength=23)
        assert [row[f"pixels_{name}"] for name in class_names(23)] == counts.tolist()
        assert row["model"] == identity
        # Half the source image, half the palette colour of the class read back from the mask PNG.
        source = np.asarray(Image.open(images / row["path"]).convert("RGB"), np.float64)
        blend = np.round(0.5 * source + 0.5 * PALETTE[channels[..., 0]]).astype(np.uint8)
        overlay = np.asarray(Image.open(output / "overlays" / row["path"]).convert("RGB"))
        assert overlay.shape == (*SOURCE, 3)
        np.testing.assert_array_equal(overlay, blend)

    # Nothing half-written anywhere: staging is empty, every file is complete and readable.
    files = all_files(output)
    assert sorted(f for f in files if f.startswith("masks/")) == [f"masks/{path}" for path in good]
    assert len([f for f in files if f.startswith("overlays/")]) == len(good)
    for name in files:
        assert name.endswith((".png", ".parquet")) or name == "output_settings.json", name
        if name.endswith(".parquet"):
            pq.read_table(output / name)


def test_cli_model_size_png_only_jpeg_input_and_fail_on_error(tmp_path, ray_session, model_dir, capsys,
                                                               monkeypatch):
    root = tmp_path / "frames"  # a CARLA-layout root: its CameraRGB folder is the input
    images = root / "CameraRGB"
    scenes.write_scenes(root, 3)
    Image.open(images / "scene_000002.png").convert("RGB").save(images / "frame.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (images / "notes.txt").write_text("not an input")
    long_name = "a" * 251 + ".jpg"  # the longest a file name may be: its mask, .jpg.png, may not be written
    (images / long_name).write_bytes((images / "frame.jpg").read_bytes())
    output = images / "predicted"  # inside the input: its masks must never become inputs
    argv = ["--model", str(model_dir), "--input", str(root), "--output", str(output), "--batch-size", "2",
            "--output-size", "model", "--formats", "png", "--fail-on-error"]

    assert infer_job.main(argv) == 1
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1]) == {"ok": 4, "failed": 2, "skipped": 0}
    # Every failure named on the console too, and the file that is no image said to be left alone.
    assert f"failed: {images / 'broken.jpg'}: not a readable PNG/JPEG image" in printed.err
    assert f"failed: {images / long_name}: its output cannot be written ([Errno 36] Failed renaming" in printed.err
    assert "File name too long" in printed.err
    assert f"2 image(s) failed: every path and reason is in {output}/errors/*.parquet" in printed.err
    assert ("1 file(s) there are not .png/.jpg/.jpeg images (by their extension, or hidden by a dot leading their "
            "name or a folder's) and are left alone, such as notes.txt") in printed.err
    assert (f"{root}: a CARLA-layout directory, so the frames of its CameraRGB/ are the inputs (their paths "
            f"relative to it) and its CameraMask/ is left alone") in printed.err
    predictions = read_table(output / "predictions")
    assert "mask_png" not in predictions.column_names  # png only: masks are files, not table bytes
    assert set(predictions["width"].to_pylist()) == {SIZE[1]} and set(predictions["height"].to_pylist()) == {SIZE[0]}
    paths = sorted(predictions["path"].to_pylist())
    assert paths == ["frame.jpg", "scene_000000.png", "scene_000001.png", "scene_000002.png"]
    expected = expected_masks(model_dir / "model.keras", images, paths, size=SIZE)
    for path in paths:
        mask = (output / "masks" / inference_output.output_png_name(path)).read_bytes()
        np.testing.assert_array_equal(data.decode_mask(mask, path), expected[path])
    assert not (output / "overlays").exists()
    assert sorted(read_table(output / "errors")["path"].to_pylist()) == [long_name, "broken.jpg"]
    assert os.listdir(output / ".staging") == []  # the unwritable mask's temporary file removed

    # An output from before the settings were recorded: the rerun adopts its own (and another batch size).
    # The input by another name (a symbolic link): the output inside it still holds no inputs.
    (output / "output_settings.json").unlink()
    (tmp_path / "alias").symlink_to(root)
    alias_argv = [str(tmp_path / "alias") if arg == str(root) else arg for arg in argv]
    assert infer_job.main(alias_argv + ["--batch-size", "3"]) == 1  # the failed files are retried, and fail again
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ok": 0, "failed": 2, "skipped": 4}
    assert sorted(read_table(output / "errors")["path"].to_pylist()) == [long_name, "broken.jpg"]
    settings = json.loads((output / "output_settings.json").read_text())
    assert settings == {"input": f"local://{os.path.realpath(images)}", "model_input_size": [*SIZE],
                        "model_classes": 23, "formats": ["png"], "overlay": False, "output_size": "model"}

    # Frames done would keep masks without table bytes or overlays: refused, before Ray starts.
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    assert infer_job.main(argv + ["--formats", "parquet,png", "--overlay"]) == 2
    assert (f"error: {output}: its predictions were made with other settings (--formats png -> parquet,png; "
            f"--overlay not given -> given); rerun with those to complete them, or pass another --output for these"
            in capsys.readouterr().err)
    # Another input's frames of the same names would be skipped as done; another model's masks
    # would come in another size and its table with other columns.
    other = tmp_path / "other"
    scenes.write_scenes(other, 2)
    assert infer_job.main([str(other) if arg == str(root) else arg for arg in argv]) == 2
    assert (f"with other settings (--input local://{os.path.realpath(images)} -> "
            f"local://{os.path.realpath(other / 'CameraRGB')})" in capsys.readouterr().err)
    wider = tmp_path / "wider.keras"
    unet_model((64, 96, 3), n_filters=4, n_classes=30).save(wider)
    assert infer_job.main([str(wider) if arg == str(model_dir) else arg for arg in argv]) == 2
    assert ("with other settings (--model of 32×48 -> 64×96 input size; --model of 23 -> 30 classes)"
            in capsys.readouterr().err)
    # A run killed before its first Parquet part has written files under its settings all the same.
    shutil.rmtree(output / "predictions")
    assert infer_job.main(argv + ["--overlay"]) == 2
    assert "with other settings (--overlay not given -> given)" in capsys.readouterr().err


def test_bad_settings_are_refused_before_any_work(tmp_path, monkeypatch, capsys, model_dir):
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    (tmp_path / "text.keras").write_text("not a model")
    # Saved by Keras 3, TensorFlow's own Keras since 2.16 (`import keras`), in a process of its own.
    keras3 = "import keras; keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(sys.argv[1])"
    subprocess.run([sys.executable, "-c", f"import sys; {keras3}", str(tmp_path / "keras3.keras")], check=True)
    with zipfile.ZipFile(tmp_path / "keras3.keras") as archive:
        version = json.loads(archive.read("metadata.json"))["keras_version"]
    for model, message in (("missing.keras", "not found"),
                           ("text.keras", "tf.keras cannot load this model"),
                           ("keras3.keras", f"saved by Keras {version}, whose files tf.keras (Keras 2, which unet-ray "
                                            f"trains with) cannot read")):
        argv = ["--model", str(tmp_path / model), "--input", str(tmp_path), "--output", str(tmp_path / "out")]
        assert infer_job.main(argv) == 2
        assert f"error: {tmp_path / model}: {message}" in capsys.readouterr().err
    # Inputs the run cannot take, before Ray starts too.
    scenes.write_scenes(tmp_path / "run" / "frames", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")  # the same directory by another name
    (tmp_path / "empty" / "frame.bmp").write_bytes(b"BM")
    for input_dir, output_dir, message in (
        (tmp_path / "run" / "frames", tmp_path / "run", "the output must be another directory than the input "
                                                        "images .*, and not one that holds them"),
        (tmp_path / "run" / "frames", tmp_path / "alias", "the output must be another directory than the input "
                                                          "images .*, and not one that holds them"),
        (tmp_path / "empty", tmp_path / "out", "empty: no .png/.jpg/.jpeg images below it \\(only 1 other "
                                              "file\\(s\\), such as frame.bmp\\)"),
        (tmp_path / "run" / "frames", tmp_path / "text.keras", "text.keras: a file; it must be a directory"),
        (tmp_path / "run" / "frames", tmp_path / "text.keras" / "out", f"{tmp_path / 'text.keras'} is a file, so no "
                                                                       f"output directory can be made below it"),
    ):
        with pytest.raises(ValueError, match=message):
            infer(InferConfig(model=str(model_dir / "model.keras"), input=str(input_dir), output=str(output_dir)))
    with pytest.raises(ValueError, match="formats"):
        InferConfig(model="m.keras", input="in", output="out", formats=("tiff",))
    with pytest.raises(ValueError, match="output_size"):
        InferConfig(model="m.keras", input="in", output="out", output_size="huge")
    with pytest.raises(ValueError, match="model.keras"):
        model_io.model_file(str(tmp_path))
    (tmp_path / "model.keras").write_bytes(b"")
    (tmp_path / "state.json").write_text("{}")  # what every checkpoint of distributed.training holds
    for checkpoint in (tmp_path, tmp_path / "model.keras"):
        with pytest.raises(ValueError, match="of a training checkpoint, whose model.keras holds the raw weights"):
            model_io.model_file(str(checkpoint))


def test_a_model_that_does_not_score_every_pixel_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    # Each loads, and each failed in an actor mid-run (a shape error), or wrote all-zero masks (one class).
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    scenes.write_scenes(tmp_path / "frames", 1)
    rgb = tf.keras.Input((*SIZE, 3))
    models = {
        "classifier": (rgb, tf.keras.layers.Dense(5)(tf.keras.layers.GlobalAveragePooling2D()(rgb)),
                       "gives output of shape \\(None, 5\\), not a score per class for every pixel"),
        "coarse": (rgb, tf.keras.layers.Conv2D(5, 1, strides=2)(rgb),
                   "gives output of shape \\(None, 16, 24, 5\\), not a score per class for every pixel"),
        "one_class": (rgb, tf.keras.layers.Conv2D(1, 1)(rgb), "gives 1 score\\(s\\) per pixel"),
        "gray": (gray := tf.keras.Input((*SIZE, 1)), tf.keras.layers.Conv2D(5, 1)(gray),
                 "takes input of shape \\(None, 32, 48, 1\\), not RGB images"),
    }
    for name, (inputs, outputs, message) in models.items():
        tf.keras.Model(inputs, outputs).save(tmp_path / f"{name}.keras")
        argv = ["--model", str(tmp_path / f"{name}.keras"), "--input", str(tmp_path / "frames"),
                "--output", str(tmp_path / f"out_{name}")]
        assert infer_job.main(argv) == 2, name
        assert re.search(f"error: {re.escape(str(tmp_path / name))}.keras: {message}", capsys.readouterr().err), name


def test_the_driver_hides_the_gpus_before_it_loads_the_model(tmp_path, monkeypatch, model_dir):
    # It only reads the model's shapes; TensorFlow would keep most of a GPU's memory from the actors.
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    scenes.write_scenes(tmp_path / "frames", 1)
    steps, load_model = [], model_io.load_model
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [f"/physical_device:{kind}:0"])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: steps.append(("hide", devices, kind)))
    monkeypatch.setattr(inference, "load_model", lambda path: steps.append("load") or load_model(path))
    config = InferConfig(model=str(model_dir), input=str(tmp_path / "frames"), output=str(tmp_path / "out"))
    with pytest.raises(AssertionError, match="Ray was started"):
        infer(config)
    assert steps == [("hide", [], "GPU"), "load"]

    def initialized(devices, kind):  # a process where TensorFlow already runs: its devices are fixed
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", initialized)
    with pytest.raises(AssertionError, match="Ray was started"):  # on to the work all the same
        infer(config)


def test_a_second_run_into_an_output_a_run_is_writing_into_is_refused_before_ray_starts(tmp_path, monkeypatch,
                                                                                       capsys, model_dir):
    # It would empty the first run's staging folder and commit its parts beside the first's.
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    scenes.write_scenes(tmp_path / "frames", 1)
    first = ingest.hold(*ingest.open_output(str(tmp_path / "out")), "jobs.infer")
    argv = ["--model", str(model_dir), "--input", str(tmp_path / "frames"), "--output", str(tmp_path / "out")]
    assert infer_job.main(argv) == 2
    assert (f"error: {tmp_path / 'out'}: jobs.infer (pid {os.getpid()}) is writing into it; wait for it to "
            f"end, or pass another --output") in capsys.readouterr().err
    first.close()
    with pytest.raises(AssertionError, match="Ray was started"):  # held no longer: on to Ray
        infer_job.main(argv)


def test_the_ledger_is_read_while_the_output_is_held(tmp_path, monkeypatch, model_dir, ray_session):
    # A second run read the done frames before it took the hold: a first run committing its last
    # parts and ending in the meantime (a long listing of a bucket, say) had them predicted again.
    scenes.write_scenes(tmp_path / "frames", 3)
    out = tmp_path / "out"
    first = ingest.hold(*ingest.open_output(str(out)), "jobs.infer")
    done_paths = inference_output.Output.done_paths

    def first_run_ends_meanwhile(self, identity):
        done = done_paths(self, identity)
        (out / "predictions").mkdir(parents=True)
        pq.write_table(pa.table({"path": [f"scene_{i:06d}.png" for i in range(3)], "model": [identity] * 3}),
                       out / "predictions" / "part-first-run.parquet")
        first.close()
        return done

    monkeypatch.setattr(inference_output.Output, "done_paths", first_run_ends_meanwhile)
    config = InferConfig(model=str(model_dir), input=str(tmp_path / "frames"), output=str(out))
    with pytest.raises(ValueError, match="jobs.infer \\(pid [0-9]+\\) is writing into it"):
        infer(config)
    first.close()
    monkeypatch.undo()
    assert infer(config) == {"ok": 3, "failed": 0, "skipped": 0}


def test_an_output_that_cannot_be_made_is_a_bad_flag_named_before_ray_starts(tmp_path, monkeypatch, capsys,
                                                                            model_dir):
    # It was made only once Ray had started, and failed there with a traceback.
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    scenes.write_scenes(tmp_path / "frames", 1)
    argv = ["--model", str(model_dir), "--input", str(tmp_path / "frames"), "--output", "/proc/unet-ray-output"]
    assert infer_job.main(argv) == 2
    assert ("error: --output /proc/unet-ray-output: cannot be made a directory (Cannot create directory "
            "'/proc/unet-ray-output'" in capsys.readouterr().err)


def test_a_run_refused_for_its_cluster_leaves_no_new_output_behind(tmp_path, monkeypatch, model_dir):
    def refused(config, frames):
        raise ValueError("the local Ray this job started holds 0 of the 9 inference actors asked for")

    monkeypatch.setattr(inference, "connect_ray", refused)
    scenes.write_scenes(tmp_path / "frames", 1)
    argv = ["--model", str(model_dir), "--input", str(tmp_path / "frames"), "--output", str(tmp_path / "out")]
    assert infer_job.main(argv) == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # an output that was there before is left as it was
    assert infer_job.main(argv[:-1] + [str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir()


def test_a_store_out_of_reach_is_a_bad_flag_named_before_ray_starts(tmp_path, monkeypatch, capsys, model_dir):
    # pyarrow's OSError ended the job with a traceback and exit 1.
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    scenes.write_scenes(tmp_path / "frames", 1)
    # HDFS fails to open (no JVM here, no server there); S3 at a closed port fails at the output's first probe.
    for flag, uri in (("--input", "hdfs://127.0.0.1:1/frames"),
                      ("--output", "s3://unet-ray-no-such-bucket/x?endpoint_override=127.0.0.1:1")):
        paths = {"--input": str(tmp_path / "frames"), "--output": str(tmp_path / "out"), flag: uri}
        assert infer_job.main(["--model", str(model_dir), *(part for pair in paths.items() for part in pair)]) == 2
        assert f"error: {uri}: cannot be used (" in capsys.readouterr().err


def test_an_input_missing_from_a_bucket_is_named_with_its_scheme(tmp_path, monkeypatch, model_dir, s3_bucket):
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    with pytest.raises(ValueError, match="^s3://unet/frames: not found; --input must be a directory of images"):
        infer(InferConfig(model=str(model_dir), input="s3://unet/frames", output=str(tmp_path / "out")))


def test_a_frame_that_fails_is_named_as_the_user_gave_its_folder(s3_bucket):
    png = inference.encode_png(np.zeros((4, 4, 3), np.uint8))
    for name, content in (("good.png", png), ("broken.png", b"not a PNG")):
        with s3_bucket.open_output_stream(f"unet/frames/{name}") as stream:
            stream.write(content)
    batch = {"path": np.array(["good.png", "broken.png"], object)}

    read = inference.read_images(batch, s3_bucket, "unet/frames", (4, 4), keep_bytes=False)

    assert read["error"][0] == ""
    assert read["error"][1].startswith("s3://unet/frames/broken.png: not a readable PNG/JPEG image")


def test_actors_the_cluster_cannot_hold_are_named_before_ray_data_waits_for_them(ray_session, monkeypatch):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])  # the session's local Ray: no GPU

    def config(num_actors=1, **settings):  # as pool_size leaves --num-actors auto
        return InferConfig(model="m.keras", input="in", output="out", num_actors=num_actors, **settings)

    assert inference.actor_shortfall(config(num_actors=cpus)) is None
    # The session's Ray came from runtime.connect, as a job's own does: no node can join it.
    assert "the local Ray this job started holds 0 of the 1 inference actors asked for (1 CPU + 1 GPU each), " \
           "and no node can join it: lower --num-actors or --cpus-per-actor, or drop --use-gpu" \
           in inference.actor_shortfall(config(use_gpu=True))
    monkeypatch.setattr(runtime, "started_local_ray", False)  # as if joined through RAY_ADDRESS
    warning = inference.actor_shortfall(config(use_gpu=True))
    assert "holds 0 of the 1 inference actors asked for (1 CPU + 1 GPU each" in warning
    assert "with none waits" in warning and "lower --num-actors or --cpus-per-actor, or drop --use-gpu" in warning
    warning = inference.actor_shortfall(config(num_actors=cpus + 1))
    assert f"holds {cpus} of the {cpus + 1} inference actors" in warning and "predicts with those that start" in warning
    assert "drop --use-gpu" not in warning


def test_num_actors_auto_takes_what_the_cluster_holds_and_no_more_than_the_batches(ray_session, monkeypatch):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])  # the session's local Ray, one node: 3, or the machine's cores
    # Counted as a cluster's CPUs, joined through RAY_ADDRESS: on a local Ray of this process's own, no more than
    # the cores (the test below).
    monkeypatch.setattr(runtime, "started_local_ray", False)

    def size(frames, **settings):
        return inference.pool_size(InferConfig(model="m.keras", input="in", output="out", **settings), frames)

    assert size(10_000) == cpus  # one actor of one CPU per CPU: the reads run inside the actors
    assert size(10_000, batch_size=8) == cpus
    assert size(65, batch_size=32) == min(cpus, 3) and size(64, batch_size=32) == 2 and size(1) == 1
    # Reads outside the actors (more CPUs each, or a GPU) keep a CPU of their own.
    assert size(10_000, cpus_per_actor=2) == max(1, (cpus - 1) // 2)
    assert size(10_000, cpus_per_actor=cpus) == 1  # none left for the reads, but one actor is the least
    assert size(10_000, use_gpu=True) == 1  # no GPU here: one, which actor_shortfall then names
    monkeypatch.setattr(inference, "ACTOR_MEMORY", ray.nodes()[0]["Resources"]["memory"] // 2)
    assert size(10_000) == min(cpus, 2)


def fake_local_ray(monkeypatch, cores, gpus=0, own=True):
    """A local Ray of one node as runtime.connect would start it on a machine of `cores` cores (at least the
    CPUs asked for): the node, filled in when connect_ray connects. `own` false: a `ray start` head of `cores`
    CPUs, joined through RAY_ADDRESS."""
    import ray

    node = {"Alive": False, "Resources": {}}

    def connect(num_cpus=None):
        if node["Alive"]:  # as runtime.connect: a Ray already running is joined as it is
            return
        node.update(Alive=True, Resources={"CPU": float(max(cores, (num_cpus or 0) if own else 0)),
                                           "GPU": float(gpus), "memory": float(64 * 2**30)})
        monkeypatch.setattr(runtime, "started_local_ray", own)

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(runtime, "connect", connect)
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(node["Resources"]))
    monkeypatch.setattr(runtime, "check_a_gpu_node", lambda cpus, processes: None)  # its GPUs' TensorFlow sees them
    return node


def test_num_actors_auto_starts_a_local_ray_that_holds_an_actor_and_a_cpu_for_the_reads(monkeypatch):
    # --cpus-per-actor above the cores: the local Ray held the one actor and nothing for the read tasks, which run
    # outside it, and Ray Data waited for ever (2 cores, --cpus-per-actor 3: 1 actor of 3 CPUs on a Ray of 3).
    node = fake_local_ray(monkeypatch, cores=2, gpus=1)
    for use_gpu in (False, True):
        for cpus_per_actor in (1, 2, 3, 4):
            node["Alive"] = False  # each a job of its own, starting its own Ray
            config = inference.connect_ray(InferConfig(model="m.keras", input="in", output="out",
                                                       cpus_per_actor=cpus_per_actor, use_gpu=use_gpu), 10_000)
            # Ray Data fuses its read tasks (1 CPU, no GPU) into actors that ask for the same, and only then.
            reads = 0 if cpus_per_actor == 1 and not use_gpu else 1
            assert config.num_actors >= 1
            assert config.num_actors * cpus_per_actor + reads <= node["Resources"]["CPU"], (cpus_per_actor, use_gpu)


def test_num_actors_auto_takes_no_more_cpus_than_cores_on_a_local_ray_started_with_more(monkeypatch, capsys):
    # jobs.quickstart's training leaves a local Ray of 2 workers + 1 CPUs, for Ray Data beside them: on 2 cores,
    # auto took 3 actors, which oversubscription then warned would share the cores for nothing.
    fake_local_ray(monkeypatch, cores=2)
    runtime.connect(num_cpus=3)
    for cpus_per_actor, actors in ((1, 2), (2, 1)):
        config = inference.connect_ray(InferConfig(model="m.keras", input="in", output="out",
                                                   cpus_per_actor=cpus_per_actor), 10_000)
        assert config.num_actors == actors, cpus_per_actor
    assert "share its cores" not in capsys.readouterr().err


def test_actors_asked_for_beyond_the_batches_to_predict_are_not_started(monkeypatch, capsys):
    # --num-actors 1000 for 40 frames on 2 cores: a local Ray of 1000 CPUs, and a process with a model per actor.
    node = fake_local_ray(monkeypatch, cores=2)
    config = inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", num_actors=1000,
                                               batch_size=32), 40)
    assert config.num_actors == 2 and node["Resources"]["CPU"] == 2
    assert ("--num-actors 1000: 40 frame(s) make 2 batch(es) of --batch-size 32, so 2 actor(s), each more would load "
            "the model for nothing") in capsys.readouterr().err
    node["Alive"] = False
    assert inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", num_actors=2,
                                             batch_size=32), 40).num_actors == 2
    assert "--num-actors" not in capsys.readouterr().err


def test_actors_that_leave_the_reads_no_cpu_on_a_cluster_are_warned_of(monkeypatch, capsys):
    # A head of 2 CPUs reached through RAY_ADDRESS, --cpus-per-actor 2: auto's least, one actor, holds both, and
    # Ray Data waited for a CPU to read on without a word.
    node = fake_local_ray(monkeypatch, cores=2, own=False)

    def warnings(**settings):
        node["Alive"] = False
        inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", **settings), 10_000)
        return capsys.readouterr().err

    assert "read tasks, which run outside actors of 2 CPUs, need one more" in warnings(cpus_per_actor=2)
    assert "take all 2 CPUs" in warnings(cpus_per_actor=2, num_actors=1)
    assert "need one more" not in warnings() + warnings(num_actors=2)  # reads inside actors of one CPU


def test_num_actors_auto_leaves_a_cpu_to_the_reads_of_actors_of_several_cpus_on_a_cluster(monkeypatch, capsys):
    # A head of 4 CPUs joined through RAY_ADDRESS, --cpus-per-actor 2: two actors would hold all four, and Ray
    # Data's read tasks, which run outside actors of 2 CPUs, would wait for a CPU without end.
    fake_local_ray(monkeypatch, cores=4, own=False)
    config = inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", cpus_per_actor=2), 10_000)
    assert config.num_actors == 1
    assert "need one more" not in capsys.readouterr().err


def test_gpu_actors_of_one_cpu_leave_a_cpu_to_the_reads_which_run_outside_them(monkeypatch, capsys):
    # Ray Data fuses the reads into the actors only when both ask for the same resources: an actor of 1 CPU and
    # 1 GPU does not hold the read tasks, which then need a CPU of their own.
    node = fake_local_ray(monkeypatch, cores=2, gpus=2, own=False)  # a GPU head joined through RAY_ADDRESS
    config = inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", use_gpu=True), 10_000)
    assert config.num_actors == 1 and "need one more" not in capsys.readouterr().err
    node["Alive"] = False
    inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", use_gpu=True, num_actors=2), 10_000)
    assert "read tasks, which run outside actors of 1 CPUs and 1 GPU, need one more" in capsys.readouterr().err
    # Its own local Ray of 2 cores and 2 GPUs: a CPU more than the actors hold, so both GPUs get an actor.
    node = fake_local_ray(monkeypatch, cores=2, gpus=2)
    config = inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", use_gpu=True), 10_000)
    assert node["Resources"]["CPU"] == 3 and config.num_actors == 2


def test_actors_asked_for_beyond_the_cluster_are_not_counted_as_taking_the_reads_cpu(monkeypatch, capsys):
    # A head of 3 CPUs, --num-actors 2 --cpus-per-actor 2: one actor starts, and its spare CPU runs the reads.
    # The shortfall is named; telling the user the reads wait would send them lowering flags for nothing.
    fake_local_ray(monkeypatch, cores=3, own=False)
    inference.connect_ray(InferConfig(model="m.keras", input="in", output="out", num_actors=2, cpus_per_actor=2),
                          10_000)
    printed = capsys.readouterr().err
    assert "holds 1 of the 2 inference actors asked for" in printed
    assert "need one more" not in printed


def test_a_local_input_is_warned_of_when_the_actors_wait_for_nodes_the_cluster_must_add(monkeypatch, capsys):
    # One node now, so no other node reads --input yet; but the actors it cannot hold start on nodes an
    # autoscaler adds, which would not find a path local to this one.
    node = fake_local_ray(monkeypatch, cores=2, own=False)
    inference.connect_ray(InferConfig(model="m.keras", input="frames", output="out", num_actors=4), 10_000)
    printed = capsys.readouterr().err
    assert "holds 2 of the 4 inference actors" in printed and "--input frames: local to this node" in printed
    node["Alive"] = False
    inference.connect_ray(InferConfig(model="m.keras", input="frames", output="out", num_actors=2), 10_000)
    assert "local to this node" not in capsys.readouterr().err  # all fit on the one node there is


def test_an_interrupted_run_keeps_the_rows_it_wrote_and_a_rerun_skips_them(tmp_path, ray_session, model_dir,
                                                                          monkeypatch):
    images = tmp_path / "frames" / "CameraRGB"
    scenes.write_scenes(tmp_path / "frames", 8, seed=2)
    config = InferConfig(model=str(model_dir / "model.keras"), input=str(images), output=str(tmp_path / "out"),
                         batch_size=2)  # and 1000 rows per part: none would be committed before the end
    written, write_images = [], inference_output.write_images

    def ctrl_c_at_the_second_batch(output, batch, *rest):
        if written:
            raise KeyboardInterrupt
        written.extend(batch["path"])
        return write_images(output, batch, *rest)

    monkeypatch.setattr(inference_output, "write_images", ctrl_c_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        infer(config)
    assert sorted(read_table(tmp_path / "out" / "predictions")["path"].to_pylist()) == sorted(written)
    monkeypatch.undo()
    assert infer(config) == {"ok": 8 - len(written), "failed": 0, "skipped": len(written)}
    monkeypatch.setattr(inference.runtime, "connect", no_ray)  # all done: no Ray to start, seconds saved
    assert infer(config) == {"ok": 0, "failed": 0, "skipped": 8}


def test_the_console_names_only_the_first_failures_across_batches_and_counts_the_rest(tmp_path, ray_session,
                                                                                     model_dir, monkeypatch, capsys):
    # A million frames of a bad copy would each print a line; errors/ holds every one of them.
    monkeypatch.setattr(inference, "FAILURES_SHOWN", 2)
    scenes.write_scenes(tmp_path / "frames", 1)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "frames" / "CameraRGB" / name).write_bytes(b"not a PNG")
    config = InferConfig(model=str(model_dir), input=str(tmp_path / "frames"), output=str(tmp_path / "out"),
                         batch_size=1, num_actors=1)  # a failure a batch: the lines shown are counted across them

    assert infer(config) == {"ok": 1, "failed": 3, "skipped": 0}
    printed = capsys.readouterr().err
    assert len(re.findall(r"^\[unet-ray\] failed: ", printed, re.MULTILINE)) == 2
    assert "3 image(s) failed (1 not shown above): every path and reason is in" in printed
    assert sorted(read_table(tmp_path / "out" / "errors")["path"].to_pylist()) == ["a.png", "b.png", "c.png"]


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path, model_dir):
    # `kill`, `timeout`, `ray job stop` and schedulers send SIGTERM. In a process of its own: the C++
    # failure-signal handler that Ray and TensorFlow bring would abort it 3 s later (exit 134).
    scenes.write_scenes(tmp_path / "frames", 6, seed=2)
    script = "\n".join([
        "import os, signal, sys",
        "from distributed import inference_output",
        "from jobs import infer",
        "write_images, written = inference_output.write_images, []",
        "def terminated_at_the_second_batch(output, batch, *rest):",
        "    if written:",
        "        os.kill(os.getpid(), signal.SIGTERM)",
        "    written.extend(batch['path'])",
        "    return write_images(output, batch, *rest)",
        "inference_output.write_images = terminated_at_the_second_batch",
        "sys.exit(infer.main(sys.argv[1:]))",
    ])
    out = tmp_path / "out"
    job = subprocess.run([sys.executable, "-c", script, "--model", str(model_dir / "model.keras"),
                          "--input", str(tmp_path / "frames"), "--output", str(out), "--batch-size", "2"],
                         capture_output=True, text=True, timeout=600)
    assert job.returncode == 130, job.stderr[-3000:]
    assert "interrupted: the same command goes on, skipping the images already written" in job.stderr
    masks = sorted(path.name for path in (out / "masks").iterdir())
    assert masks and sorted(read_table(out / "predictions")["path"].to_pylist()) == masks


def test_sigterm_while_ray_starts_exits_130_and_leaves_no_new_output(tmp_path, model_dir):
    # ray.init's own handler exited 15 saying nothing, and absl's before it aborted the process 3 s
    # later (exit 134). Sent just after ray.init, in a process of its own.
    scenes.write_scenes(tmp_path / "frames", 2, seed=2)
    job = run_sigterm_after_ray_init("infer", ["--model", str(model_dir / "model.keras"), "--input",
                                               str(tmp_path / "frames"), "--output", str(tmp_path / "out")])
    assert job.returncode == 130, job.stderr[-3000:]
    assert "interrupted: the same command goes on, skipping the images already written" in job.stderr
    assert sorted(os.listdir(tmp_path)) == ["frames"]  # the new --output it had made, removed


def test_an_output_that_fills_up_stops_the_job_with_one_error_not_a_failure_per_frame(tmp_path, ray_session,
                                                                                     model_dir, monkeypatch, capsys):
    scenes.write_scenes(tmp_path / "frames", 6, seed=2)
    out = tmp_path / "out"
    write, masks = inference_output.Output.write, []

    def full_after_two_masks(self, relative, content):
        if len(masks) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        masks.extend([relative] if relative.startswith("masks/") else [])
        return write(self, relative, content)

    monkeypatch.setattr(inference_output.Output, "write", full_after_two_masks)
    argv = ["--model", str(model_dir / "model.keras"), "--input", str(tmp_path / "frames"), "--output", str(out),
            "--batch-size", "2"]
    assert infer_job.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --output {out}: cannot take more files (No space left on device); the frames committed " in err
    assert "failed:" not in err and not (out / "errors").exists()  # no frame of the rest is blamed
    monkeypatch.undo()
    assert infer(InferConfig(model=str(model_dir / "model.keras"), input=str(tmp_path / "frames"),
                             output=str(out))) == {"ok": 6, "failed": 0, "skipped": 0}


def test_an_output_that_takes_no_files_as_a_run_starts_is_named_before_ray_and_a_finished_one_is_only_read(
        tmp_path, ray_session, model_dir, small_disk, monkeypatch, capsys):
    frames = tmp_path / "frames" / "CameraRGB"
    scenes.write_scenes(tmp_path / "frames", 3, seed=2)
    out = small_disk / "out"
    argv = ["--model", str(model_dir / "model.keras"), "--input", str(frames), "--output", str(out)]
    with open(small_disk / "filler", "wb") as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(2**16))
            filler.flush()
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    # Was a traceback from writing the settings, exit 1, once Ray had started.
    assert infer_job.main(argv) == 2
    assert (f"error: --output {out}: cannot take more files (No space left on device); nothing was predicted: make "
            f"room, then the same command goes on") in capsys.readouterr().err
    assert not out.exists()  # the new output it had made, removed
    os.remove(small_disk / "filler")  # room made
    monkeypatch.undo()
    assert infer_job.main(argv) == 0

    shutil.copy(frames / "scene_000000.png", frames / "later.png")  # a frame added since
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    monkeypatch.setattr(inference.runtime, "connect", no_ray)
    assert infer_job.main(argv) == 2  # as a full disk, and the output as it was
    assert (f"error: --output {out}: cannot take more files (Read-only file system); nothing was predicted"
            in capsys.readouterr().err)
    os.remove(frames / "later.png")
    assert infer_job.main(argv) == 0  # every frame done: a finished output read, never written
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ok": 0, "failed": 0, "skipped": 3}


def test_the_driver_gets_at_most_a_parquet_parts_rows_at_a_time(tmp_path, ray_session, model_dir, monkeypatch):
    # Ray Data would cut any number of inputs into 200 blocks, each back as one batch: 5,000 frames'
    # masks at once from a million, and as many finished frames per actor lost to a crash.
    images = tmp_path / "frames"
    frame = inference.encode_png(np.zeros((*SIZE, 3), np.uint8))
    images.mkdir()
    for index in range(201):  # one more than Ray Data's 200 blocks: one of them would hold two frames
        (images / f"frame_{index:03d}.png").write_bytes(frame)
    batches, write_images = [], inference_output.write_images

    def recording(output, batch, *rest):
        batches.append(len(batch["path"]))
        return write_images(output, batch, *rest)

    monkeypatch.setattr(inference_output, "write_images", recording)
    config = InferConfig(model=str(model_dir / "model.keras"), input=str(images), output=str(tmp_path / "out"),
                         batch_size=1, rows_per_file=1, formats=("parquet",))
    assert infer(config) == {"ok": 201, "failed": 0, "skipped": 0}
    assert sum(batches) == 201 and max(batches) == 1, batches


def test_a_named_pipe_among_the_frames_fails_instead_of_waiting_forever(tmp_path):
    images = tmp_path / "CameraRGB"
    scenes.write_scenes(tmp_path, 1)
    os.mkfifo(images / "pipe.png")
    filesystem, root = ingest.open_root(str(images))
    paths = inference.list_images(filesystem, root)[0]
    read = {}
    reader = threading.Thread(daemon=True, target=lambda: read.update(
        inference.read_images({"path": np.array(paths, object)}, filesystem, root, SIZE, keep_bytes=False)))
    reader.start()
    reader.join(timeout=60)
    if reader.is_alive():  # waiting for a writer: give it one that writes nothing, and the read ends
        os.close(os.open(images / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert read["error"].tolist() == [
        f"{images}/pipe.png: not a regular file (a named pipe, socket or device), so not a frame", ""]


def test_an_input_that_is_a_named_pipe_or_device_is_named_as_such_not_as_missing(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for path in (str(tmp_path / "pipe"), "/dev/null"):  # both there: "not found" sent the user looking for a typo
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: a device, named pipe or socket; --input must be "
                                             f"a directory of images$"):
            inference.list_images(*inference.open_root(path))


def test_two_images_that_would_write_one_mask_file_are_refused_only_when_files_are_written(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "frame.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "frame.jpg.png")
    with pytest.raises(ValueError, match="frame.jpg and frame.jpg.png would both write the mask frame.jpg.png"):
        inference.list_images(*inference.open_root(str(tmp_path)), writes_files=True)  # --formats png or --overlay
    paths, _, _ = inference.list_images(*inference.open_root(str(tmp_path)), writes_files=False)  # Parquet only
    assert paths == ["frame.jpg", "frame.jpg.png"]


def test_an_image_whose_mask_file_would_be_the_folder_of_anothers_is_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "frame.jpg")  # its mask: masks/frame.jpg.png
    (tmp_path / "frame.jpg.png" / "day").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "frame.jpg.png" / "day" / "next.png")  # masks/frame.jpg.png/day/next.png
    with pytest.raises(ValueError, match="^[^ ]*: frame.jpg's mask frame.jpg.png would be a file where "
                                         "frame.jpg.png/day/next.png's mask needs a folder of that name$"):
        inference.list_images(*inference.open_root(str(tmp_path)))
    paths, _, _ = inference.list_images(*inference.open_root(str(tmp_path)), writes_files=False)  # Parquet only
    assert paths == ["frame.jpg", "frame.jpg.png/day/next.png"]


def test_two_images_in_a_bucket_that_would_write_one_mask_file_are_named_with_its_scheme(s3_bucket):
    for name in ("frame.jpg", "frame.jpg.png"):
        with s3_bucket.open_output_stream(f"unet/frames/{name}") as stream:
            stream.write(b"an image")
    with pytest.raises(ValueError, match="^s3://unet/frames: frame.jpg and frame.jpg.png would both write"):
        inference.list_images(*inference.open_root("s3://unet/frames"))


def test_masks_below_the_input_are_never_taken_for_camera_frames(tmp_path):
    # A tree of drives in the CARLA layout, and the output of an earlier run placed inside it.
    for drive in ("town1", "town2/day"):
        scenes.write_scenes(tmp_path / drive, 2)
    (tmp_path / "loose.png").write_bytes((tmp_path / "town1" / "CameraRGB" / "scene_000000.png").read_bytes())
    earlier = tmp_path / "town1" / "predicted"
    (earlier / "masks").mkdir(parents=True)
    (earlier / "masks" / "scene_000000.png").write_bytes(b"a mask")
    (earlier / "output_settings.json").write_text("{}")
    (tmp_path / "lone" / "CameraMask").mkdir(parents=True)  # no CameraRGB beside it: just a folder name
    (tmp_path / "lone" / "CameraMask" / "photo.png").write_bytes(b"an image")

    paths, _, left_out = inference.list_images(*inference.open_root(str(tmp_path)))

    assert paths == ["lone/CameraMask/photo.png", "loose.png", "town1/CameraRGB/scene_000000.png",
                     "town1/CameraRGB/scene_000001.png", "town2/day/CameraRGB/scene_000000.png",
                     "town2/day/CameraRGB/scene_000001.png"]
    assert left_out == ["town1/CameraMask", "town1/predicted", "town2/day/CameraMask"]
    # This run's own output (`skip`), rerun into: left out as well, but not reported as another's masks left alone.
    filesystem, root = inference.open_root(str(tmp_path))
    assert inference.list_images(filesystem, root, skip=f"{root}/town1/predicted") == (
        paths, [], ["town1/CameraMask", "town2/day/CameraMask"])


def test_images_in_hidden_folders_are_no_inputs_and_are_named(tmp_path):
    # A notebook's .ipynb_checkpoints/, a viewer's .thumbnails/: copies and thumbnails of the images,
    # which would each be predicted again (and write masks of their own) if only hidden files were left out.
    scenes.write_scenes(tmp_path, 1)
    frame = (tmp_path / "CameraRGB" / "scene_000000.png").read_bytes()
    for hidden in (".ipynb_checkpoints/scene_000000.png", ".thumbnails/large/scene_000000.png", ".scene.png"):
        (tmp_path / "CameraRGB" / hidden).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "CameraRGB" / hidden).write_bytes(frame)
    (tmp_path / "CameraRGB" / ".DS_Store").write_bytes(b"")
    paths, ignored, _ = inference.list_images(*inference.open_root(str(tmp_path / "CameraRGB")))
    # Named as files left alone (the console counts them), never in silence; a hidden file of another kind is.
    assert (paths, ignored) == (["scene_000000.png"], [".ipynb_checkpoints/scene_000000.png", ".scene.png",
                                                       ".thumbnails/large/scene_000000.png"])


def test_num_actors_is_auto_unless_given():
    def num_actors(*flag):
        return InferConfig(**vars(infer_job.parse_args(["--model", "m", "--input", "in", "--output", "out", *flag]))
                           ).num_actors

    assert num_actors() is None and num_actors("--num-actors", "auto") is None
    assert num_actors("--num-actors", "3") == 3


def test_a_num_actors_that_is_neither_a_number_nor_auto_is_refused_naming_both(capsys):
    with pytest.raises(SystemExit) as exited:
        infer_job.parse_args(["--model", "m", "--input", "in", "--output", "out", "--num-actors", "all"])
    assert exited.value.code == 2
    assert "--num-actors: must be a whole number or auto, got 'all'" in capsys.readouterr().err


def test_jobs_infer_flags_default_to_infer_configs_defaults():
    # Written once, in InferConfig: a default of the command line's own would make the CLI and the API differ.
    given = infer_job.parse_args(["--model", "m", "--input", "in", "--output", "out"])
    assert InferConfig(**vars(given)) == InferConfig(model="m", input="in", output="out")


def test_formats_are_read_as_written_in_a_shell_spaces_and_a_trailing_comma_included(tmp_path):
    # `--formats "parquet, png"` or a list ending in a comma names the same formats: not refused as a format "".
    for given in ("parquet, png", "parquet,png,", " png ,"):
        args = infer_job.parse_args(["--model", "m", "--input", "in", "--output", "out", "--formats", given])
        assert InferConfig(**vars(args)).formats == tuple(part for part in ("parquet", "png") if part in given)


def test_a_folder_holding_camera_rgb_without_camera_mask_is_no_carla_layout_and_is_predicted_whole(tmp_path):
    # Only both folders make a CARLA-layout directory: a folder of images that merely holds one named
    # CameraRGB has every image below it predicted, not those of CameraRGB/ alone.
    (tmp_path / "CameraRGB").mkdir()
    (tmp_path / "other").mkdir()
    filesystem, root = inference.open_root(str(tmp_path))
    assert inference.image_root(filesystem, root) == root
    (tmp_path / "other").rename(tmp_path / "CameraMask")
    assert inference.image_root(filesystem, root) == f"{root}/CameraRGB"


def test_an_input_that_holds_masks_is_refused_naming_the_frames_beside_it(tmp_path):
    # --input given a CARLA layout's CameraMask/ (a slip for CameraRGB/) or an earlier run's output: their PNGs
    # are masks, which would each be "predicted" without a word, as they are left alone below any other input.
    scenes.write_scenes(tmp_path / "drive", 1)
    filesystem, root = inference.open_root(str(tmp_path / "drive" / "CameraMask"))
    with pytest.raises(ValueError, match=f"^{re.escape(root)}: the masks of a CARLA-layout directory, not camera "
                                         f"frames; pass {re.escape(str(tmp_path / 'drive'))} or its CameraRGB"):
        inference.image_root(filesystem, root)
    earlier = tmp_path / "predicted"
    (earlier / "masks").mkdir(parents=True)
    (earlier / "output_settings.json").write_text("{}")
    filesystem, root = inference.open_root(str(earlier))
    with pytest.raises(ValueError, match=f"^{re.escape(root)}: an earlier jobs.infer output, whose PNGs are masks"):
        inference.image_root(filesystem, root)
    (tmp_path / "lone" / "CameraMask").mkdir(parents=True)  # no CameraRGB beside it: just a folder name
    filesystem, root = inference.open_root(str(tmp_path / "lone" / "CameraMask"))
    assert inference.image_root(filesystem, root) == root


def test_the_masks_folder_of_an_earlier_output_is_refused_as_an_input_at_any_depth(tmp_path):
    # An earlier output's masks/ (or a folder in it: masks mirror the input's folders) holds masks as much as
    # the output does; given as --input they were predicted as camera frames without a word.
    earlier = tmp_path / "predicted"
    (earlier / "masks" / "drive1").mkdir(parents=True)
    (earlier / "output_settings.json").write_text("{}")
    for given in (earlier / "masks", earlier / "masks" / "drive1"):
        filesystem, root = inference.open_root(str(given))
        with pytest.raises(ValueError, match=f"^{re.escape(root)}: an earlier jobs.infer output \\(in "
                                             f"{re.escape(str(earlier))}\\), whose PNGs are masks"):
            inference.image_root(filesystem, root)
    scenes.write_scenes(tmp_path / "drive", 1)
    (tmp_path / "drive" / "CameraMask" / "sub").mkdir()
    filesystem, root = inference.open_root(str(tmp_path / "drive" / "CameraMask" / "sub"))
    with pytest.raises(ValueError, match="the masks of a CARLA-layout directory"):
        inference.image_root(filesystem, root)


class RootedAt(pyarrow.fs.LocalFileSystem):
    """A local filesystem whose "/" is `base`: for folders at the root of a machine's disk."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_file_info(self, paths):
        if isinstance(paths, list):
            return [self.get_file_info(path) for path in paths]
        return super().get_file_info(f"{self.base}{paths}")


def test_a_camera_mask_at_the_disks_root_is_refused_naming_the_camera_rgb_beside_it(tmp_path):
    # /CameraMask beside /CameraRGB (mounted so in a container): the advice read "pass  or its CameraRGB/".
    scenes.write_scenes(tmp_path, 1)
    with pytest.raises(ValueError, match="^/CameraMask: the masks of a CARLA-layout directory, not camera frames; "
                                         "pass /CameraRGB$"):
        inference.image_root(RootedAt(str(tmp_path)), "/CameraMask")


def test_ctrl_c_exits_130_and_says_a_rerun_goes_on(tmp_path, monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "infer", interrupted)
    assert infer_job.main(["--model", "m.keras", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 130
    assert "interrupted: the same command goes on, skipping the images already written" in capsys.readouterr().err
