"""Ray Data ingest on a real local Ray: train and validation frames, and the class counts the recipe takes."""

import errno
import gc
import os
import re
import threading

import numpy as np
import pyarrow.fs
import pytest
import ray
from PIL import Image

from distributed import ingest
from unet_core import data, scenes


@pytest.fixture(scope="module")
def frames(ray_session):
    rng = np.random.default_rng(0)
    images = rng.random((10, 8, 16, 3)).astype(np.float32)
    masks = rng.integers(0, 5, (10, 8, 16)).astype(np.uint8)
    rows = [{"image": image, "mask": mask} for image, mask in zip(images, masks)]
    return ray.data.from_items(rows, override_num_blocks=3), masks


def test_class_pixel_counts_equal_numpy_over_every_pixel(frames):
    dataset, masks = frames
    assert ingest.class_pixel_counts(dataset, 6).tolist() == np.bincount(masks.ravel(), minlength=6).tolist()


def test_a_validation_directory_validates_whole_while_every_frame_of_data_trains(tmp_path, ray_session):
    # Both directories name their frames scene_000000.png, ...: the rows must not mix them up.
    scenes.write_scenes(str(tmp_path / "train"), 5, seed=1)
    scenes.write_scenes(str(tmp_path / "val"), 3, seed=2)
    frame_list = ingest.list_frames(str(tmp_path / "train"), 0.5, "tail", val_uri=str(tmp_path / "val"))
    train, val, skipped = ingest.load_frames(frame_list, (32, 48), 23, str(tmp_path))
    assert skipped == {}
    assert sorted(train.to_pandas()["name"]) == [f"scene_{i:06d}.png" for i in range(5)]
    rows = val.take_all()
    assert sorted(row["name"] for row in rows) == [f"scene_{i:06d}.png" for i in range(3)]
    expected, _, names = data.load_pairs(str(tmp_path / "val"), (32, 48), 23)
    for row in rows:
        np.testing.assert_array_equal(row["image"], expected[names.index(row["name"])])


def test_an_unreadable_validation_frame_is_named_by_its_path(tmp_path, ray_session):
    scenes.write_scenes(str(tmp_path / "train"), 4, seed=1)
    scenes.write_scenes(str(tmp_path / "val"), 2, seed=2)
    mask = tmp_path / "val" / "CameraMask" / "scene_000001.png"
    mask.write_bytes(mask.read_bytes()[:100])
    frame_list = ingest.list_frames(str(tmp_path / "train"), 0.5, "tail", val_uri=str(tmp_path / "val"))
    with pytest.raises(ValueError, match="1 of 6 frame\\(s\\) cannot be read") as error:
        ingest.load_frames(frame_list, (32, 48), 23, str(tmp_path))
    assert str(mask) in str(error.value)
    _, val, skipped = ingest.load_frames(frame_list, (32, 48), 23, str(tmp_path), skip_bad=True)
    assert list(skipped) == [f"{tmp_path / 'val'}/scene_000001.png"] and val.count() == 1
    # The frames the run trains on, as its record names them: the training frame of the same name stays.
    assert frame_list.names(skipped) == ([f"scene_{i:06d}.png" for i in range(4)], ["scene_000000.png"])


def test_class_ids_beyond_n_classes_suggest_the_number_of_classes(tmp_path, ray_session, monkeypatch):
    scenes.write_scenes(str(tmp_path), 3, seed=1)
    highest = max(int(data.decode_mask((tmp_path / "CameraMask" / name).read_bytes(), name).max())
                  for name in os.listdir(tmp_path / "CameraMask"))
    hint = f"the masks hold class ids up to {highest}: if those are classes, pass --n-classes {highest + 1}$"
    # A wrong --n-classes fails every frame alike: the error names a few, the output's file every one.
    monkeypatch.setattr(ingest, "FAILURES_SHOWN", 2)
    with pytest.raises(ValueError, match=f"3 of 3 frame\\(s\\) cannot be read (.|\n)*{hint}") as error:
        ingest.load_frames(ingest.list_frames(str(tmp_path), 0.5, "tail"), (32, 48), 5, str(tmp_path))
    listing = (tmp_path / "unreadable.txt").read_text().splitlines()
    assert f"every one is named in {tmp_path / 'unreadable.txt'}):" in str(error.value)
    assert str(error.value).count("mask has class id") == 2 and "\n  ... and 1 more\n" in str(error.value)
    assert [line.split(": mask has class id")[0] for line in sorted(listing)] == [
        f"{tmp_path}/CameraMask/scene_00000{index}.png" for index in range(3)]
    with pytest.raises(ValueError, match=f"0 usable frame\\(s\\) \\(3 skipped, such as {tmp_path}/CameraMask/"
                                         f"scene_000000.png: mask has class id (.|\\n)*{hint}"):
        ingest.load_frames(ingest.list_frames(str(tmp_path), 0.5, "tail"), (32, 48), 5, str(tmp_path), skip_bad=True)


def test_mask_ids_no_model_can_have_are_not_answered_with_a_number_of_classes_the_flag_refuses(tmp_path, ray_session):
    scenes.write_scenes(str(tmp_path), 2, seed=1)
    mask = tmp_path / "CameraMask" / "scene_000001.png"  # 16-bit instance ids (class × 1000 + instance), say
    instances = data.decode_mask(mask.read_bytes(), str(mask)).astype(np.uint16) * 1000 + 7
    Image.fromarray(instances).save(mask)
    with pytest.raises(ValueError) as error:
        ingest.load_frames(ingest.list_frames(str(tmp_path), 0.5, "tail"), (32, 48), 23, str(tmp_path))
    assert f"the masks hold ids up to {int(instances.max())}, beyond the 256 classes a model can have: no class " \
           f"ids (instance ids, say); save masks of class ids below 256" in str(error.value)
    assert "--n-classes" not in str(error.value)  # it said "pass --n-classes 22008", which the flag refuses


def test_the_split_asked_for_picks_the_validation_frames(tmp_path, ray_session):
    # The tail split exists for sequences, whose neighbouring frames look alike: a split that fell back to
    # the hash would validate on near-copies of training frames and flatter the score.
    scenes.write_scenes(str(tmp_path / "frames"), 10, seed=1)
    names = [f"scene_{i:06d}.png" for i in range(10)]
    by_hash = [name for name, is_val in zip(names, data.validation_flags(names, 0.3, "hash")) if is_val]
    assert by_hash != names[-3:]  # the two splits pick different frames here
    for split, expected in (("tail", names[-3:]), ("hash", by_hash)):
        train, val, _ = ingest.load_frames(ingest.list_frames(str(tmp_path / "frames"), 0.3, split), (32, 48), 23,
                                           str(tmp_path))
        assert sorted(val.to_pandas()["name"]) == expected
        assert sorted(train.to_pandas()["name"]) == sorted(set(names) - set(expected))


def test_too_few_frames_for_a_split_is_a_clear_error_by_name_before_any_is_read(tmp_path, ray_session, monkeypatch):
    scenes.write_scenes(str(tmp_path / "one"), 1, seed=1)
    scenes.write_scenes(str(tmp_path / "val"), 1, seed=2)
    monkeypatch.setattr(ingest, "read_frames", None)  # listed, split and refused: nothing read
    with pytest.raises(ValueError, match="^[^ ]*/one: 1 frame\\(s\\) give 0 for training and 1 for validation at "
                                         "val_fraction=0.5; .*change --val-fraction$"):
        ingest.list_frames(str(tmp_path / "one"), 0.5, "tail")
    with pytest.raises(ValueError, match="2 frame\\(s\\) give 1 for training and 1 for validation; training needs at "
                                         "least 2 \\(one frame per worker\\) .*add frames or lower --num-workers$"):
        ingest.list_frames(str(tmp_path / "one"), 0.5, "tail", min_train_frames=2, val_uri=str(tmp_path / "val"))
    monkeypatch.undo()
    # --skip-bad leaving no validation frame, once read: every epoch would be scored on nothing.
    (tmp_path / "val" / "CameraRGB" / "scene_000000.png").write_bytes(b"")
    frame_list = ingest.list_frames(str(tmp_path / "one"), 0.5, "tail", val_uri=str(tmp_path / "val"))
    with pytest.raises(ValueError, match="1 usable frame\\(s\\) \\(1 skipped, .*give 1 for training and 0 for "
                                         "validation; .*validation at least 1: add frames"):
        ingest.load_frames(frame_list, (32, 48), 23, str(tmp_path), skip_bad=True)


def test_a_folder_inside_the_layout_is_refused_not_passed_over(tmp_path):
    scenes.write_scenes(str(tmp_path), 2)
    (tmp_path / "CameraRGB" / ".ipynb_checkpoints").mkdir()  # hidden: left alone, as hidden files are
    assert ingest.discover_pairs(str(tmp_path))[2] == ["scene_000000.png", "scene_000001.png"]
    (tmp_path / "CameraRGB" / "more").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path}/CameraRGB/more: a folder; CameraRGB and CameraMask hold "
                                         "frames only"):
        ingest.discover_pairs(str(tmp_path))


def test_a_directory_beside_the_data_whose_name_begins_like_it_is_not_inside_it(tmp_path):
    # "Inside" goes by whole folders: /d/frames_run is no folder of /d/frames, however its name
    # begins. A prefix of the path alone refused an output or checkpoints kept beside the data.
    scenes.write_scenes(str(tmp_path / "frames"), 2)
    (tmp_path / "frames_run").mkdir()
    local = pyarrow.fs.LocalFileSystem()
    assert ingest.place_below(local, str(tmp_path / "frames_run"), local, str(tmp_path / "frames")) is None
    assert ingest.place_below(local, str(tmp_path / "frames" / "run"), local, str(tmp_path / "frames")) == "run"
    ingest.check_output_outside(str(tmp_path / "frames_run"), str(tmp_path / "frames"), "--data", "the run's files")
    with pytest.raises(ValueError, match="frames/run: inside --data"):
        ingest.check_output_outside(str(tmp_path / "frames" / "run"), str(tmp_path / "frames"), "--data", "files")


def test_a_validation_directory_below_the_data_is_not_taken_for_the_data_itself(tmp_path):
    # Only the same directory is refused: a held-out set kept in a folder of --data shares none of its frames
    # (--data's frames are those of its own CameraRGB/ only).
    scenes.write_scenes(str(tmp_path / "frames"), 2)
    scenes.write_scenes(str(tmp_path / "frames" / "held_out"), 1)
    ingest.check_validation_apart(str(tmp_path / "frames"), str(tmp_path / "frames" / "held_out"))
    with pytest.raises(ValueError, match="the validation directory is the training data"):
        ingest.check_validation_apart(str(tmp_path / "frames"), f"{tmp_path / 'frames'}/")


def test_a_camera_folder_that_is_a_file_is_no_carla_layout(tmp_path):
    # An archive of the frames not unpacked yet, saved as CameraRGB: the layout is what is wrong, and
    # naming it so sends the user to the right place, not to why a "folder" cannot be listed.
    scenes.write_scenes(str(tmp_path), 1)
    for folder in ("CameraRGB", "CameraMask"):
        os.rename(tmp_path / folder, tmp_path / "unpacked")
        (tmp_path / folder).write_bytes(b"PK\x03\x04 an archive")
        with pytest.raises(ValueError, match=f"^{tmp_path}: not a CARLA-layout directory \\({tmp_path}/{folder}: "
                                             f"directory not found\\)$"):
            ingest.discover_pairs(str(tmp_path))
        os.remove(tmp_path / folder)
        os.rename(tmp_path / "unpacked", tmp_path / folder)


def test_a_refused_job_is_told_the_holder_of_now_not_of_an_earlier_job(tmp_path):
    # The hold's file stays behind, named after the output: a later job's name and pid replace the
    # earlier one's, or the refusal would name a job long gone (a pid the user might then kill).
    place = ingest.open_output(str(tmp_path / "out"))
    ingest.hold(*place, "jobs.evaluate").close()
    held = ingest.hold(*place, "jobs.train")
    with pytest.raises(ValueError, match=f"^{tmp_path}/out: jobs.train \\(pid {os.getpid()}\\) is writing into it; "):
        ingest.hold(*place, "jobs.infer")
    held.close()


def test_files_that_are_no_frames_are_named_not_passed_over_in_silence(tmp_path, capsys):
    scenes.write_scenes(str(tmp_path), 2)
    (tmp_path / "CameraRGB" / "scene_000001.png").rename(tmp_path / "CameraRGB" / "scene_000001.bmp")
    (tmp_path / "CameraMask" / "scene_000001.png").rename(tmp_path / "CameraMask" / "scene_000001.bmp")
    (tmp_path / "CameraRGB" / "notes.txt").write_text("not a frame")
    (tmp_path / "CameraRGB" / ".DS_Store").write_bytes(b"")  # hidden, and no frame by its name: left alone
    (tmp_path / "CameraMask" / "._scene_000000.png").write_bytes(b"\0\5\26\7")  # macOS's copy of its metadata
    assert ingest.discover_pairs(str(tmp_path))[2] == ["scene_000000.png"]
    printed = capsys.readouterr().err.splitlines()
    assert printed == [f"[unet-ray] 2 file(s) in {tmp_path}/CameraRGB are not .png/.jpg/.jpeg frames (by their "
                       f"extension, or hidden by a leading dot) and are left out, such as notes.txt, scene_000001.bmp",
                       f"[unet-ray] 2 file(s) in {tmp_path}/CameraMask are not .png/.jpg/.jpeg frames (by their "
                       f"extension, or hidden by a leading dot) and are left out, such as ._scene_000000.png, "
                       f"scene_000001.bmp"]


def test_a_jpeg_image_reads_with_the_png_mask_of_its_stem(tmp_path):
    scenes.write_scenes(str(tmp_path), 2)
    image = tmp_path / "CameraRGB" / "scene_000001.png"
    Image.open(image).convert("RGB").save(image.with_suffix(".jpg"), quality=95)
    image.unlink()
    filesystem, root, names = ingest.discover_pairs(str(tmp_path))
    assert names == ["scene_000000.png", "scene_000001.jpg"]
    _, masks, reasons = ingest.read_frames(filesystem, root, names, (32, 48), 23)
    assert reasons == ["", ""]
    expected = data.resize_mask(data.decode_mask((tmp_path / "CameraMask" / "scene_000001.png").read_bytes(), ""),
                                (32, 48))
    np.testing.assert_array_equal(masks[1], expected)


def test_a_dangling_symbolic_link_is_a_frame_that_cannot_be_read_not_one_passed_over(tmp_path):
    scenes.write_scenes(str(tmp_path), 2)
    for folder in (data.IMAGE_DIR, data.MASK_DIR):
        (tmp_path / folder / "gone.png").symlink_to(tmp_path / "moved-away.png")
    filesystem, root, names = ingest.discover_pairs(str(tmp_path))
    assert names == ["gone.png", "scene_000000.png", "scene_000001.png"]
    _, _, reasons = ingest.read_frames(filesystem, root, names, (32, 48), 23)
    assert f"'{tmp_path}/CameraRGB/gone.png'" in reasons[0] and "No such file" in reasons[0]
    assert reasons[1:] == ["", ""]


def test_a_symbolic_link_back_up_its_own_path_is_named_and_other_linked_folders_are_followed(tmp_path):
    (tmp_path / "frames" / "day").mkdir(parents=True)
    (tmp_path / "frames" / "day" / "a.png").write_bytes(b"frame")
    (tmp_path / "frames" / "also_day").symlink_to(tmp_path / "frames" / "day")  # no loop: followed
    found = ingest.list_tree(*ingest.open_root(str(tmp_path / "frames")))
    assert sorted(info.path[len(str(tmp_path)) + 1:] for info in found if info.type == pyarrow.fs.FileType.File) == [
        "frames/also_day/a.png", "frames/day/a.png"]
    # pyarrow would follow it 40 links deep, listing each file once per turn (2^40 times with two
    # such links): refused before listing.
    (tmp_path / "frames" / "day" / "up").symlink_to(tmp_path / "frames")
    with pytest.raises(ValueError, match=f"/up: a symbolic link to {tmp_path}/frames, a folder on its own path, so "
                                         f"every file below would be listed again and again; remove the link"):
        ingest.list_tree(*ingest.open_root(str(tmp_path / "frames")))


def test_a_file_name_that_is_not_utf8_or_a_missing_folder_is_named(tmp_path):
    scenes.write_scenes(str(tmp_path), 1)
    with open(bytes(tmp_path / "CameraMask") + b"/\xff.png", "wb"):
        pass
    with pytest.raises(ValueError, match=f"{tmp_path}/CameraMask: holds a file name that is not valid UTF-8 .*; "
                                         "rename it"):
        ingest.discover_pairs(str(tmp_path))
    with pytest.raises(ValueError, match=f"^{tmp_path}/missing: not found$"):  # not "its CameraRGB is missing"
        ingest.discover_pairs(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"^{tmp_path}/empty: not a CARLA-layout directory \\({tmp_path}/empty/"
                                         "CameraRGB: directory not found\\)$"):
        ingest.discover_pairs(str(tmp_path / "empty"))


def test_a_folder_below_that_cannot_be_listed_is_named_not_a_traceback(tmp_path, monkeypatch):
    # jobs.infer --input over a volume whose lost+found (mode 700, root's) the user may not read.
    scenes.write_scenes(str(tmp_path / "frames"), 1)
    locked = tmp_path / "frames" / "lost+found"
    locked.mkdir()
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it all the same: deny it as the kernel does any other user
        scandir = os.scandir

        def denied(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return scandir(path)

        monkeypatch.setattr(ingest.os, "scandir", denied)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'frames'))}: cannot be listed \\("
                                         f"\\[Errno 13\\] Permission denied: '{re.escape(str(locked))}'\\)$"):
        ingest.list_tree(*ingest.open_root(str(tmp_path / "frames")))
    locked.chmod(0o700)  # for pytest to remove it


def test_a_camera_rgb_or_camera_mask_folder_given_as_the_data_names_the_directory_meant(tmp_path):
    # `--data carla/CameraRGB`, the folder of frames itself: said so, with the path to pass instead.
    scenes.write_scenes(str(tmp_path / "carla"), 1)
    for given in (f"{tmp_path}/carla/CameraRGB", f"{tmp_path}/carla/CameraMask/"):
        folder = given.rstrip("/").rsplit("/", 1)[1]
        with pytest.raises(ValueError, match=f"; a {folder} folder is not the data: pass the directory that holds "
                                             f"CameraRGB/ and CameraMask/, {tmp_path}/carla$"):
            ingest.discover_pairs(given)
    with pytest.raises(ValueError, match=r"directory not found\)$"):  # no such advice for any other folder
        ingest.discover_pairs(str(tmp_path))


def test_a_file_name_that_is_not_utf8_deep_in_a_tree_is_named_by_its_path(tmp_path):
    # jobs.infer lists its --input recursively: the folder given can hold thousands of folders.
    (tmp_path / "frames" / "day" / "cam").mkdir(parents=True)
    (tmp_path / "frames" / "a.png").write_bytes(b"frame")
    with open(bytes(tmp_path / "frames" / "day" / "cam") + b"/caf\xe9.png", "wb"):
        pass
    with pytest.raises(ValueError, match=f"{tmp_path}/frames: holds a file name that is not valid UTF-8 \\(.*\\): "
                                         f"{tmp_path}/frames/day/cam/caf\\\\xe9.png; rename it"):
        ingest.list_tree(*ingest.open_root(str(tmp_path / "frames")))


def test_an_output_in_a_missing_bucket_or_below_an_object_is_refused(s3_bucket):
    with s3_bucket.open_output_stream("unet/notes.txt") as stream:
        stream.write(b"a file, not a folder")
    assert ingest.open_output("s3://unet/runs/new")[1] == "unet/runs/new"
    assert ingest.spelled(*ingest.open_root("s3://unet/runs/new/")) == "s3://unet/runs/new"
    assert ingest.spelled(*ingest.open_root("/data/frames/")) == "/data/frames"
    assert ingest.spelled(pyarrow.fs.GcsFileSystem(anonymous=True), "frames/x.png") == "gs://frames/x.png"  # not gcs://
    assert ingest.open_output("s3://unet")[1] == "unet"
    for uri, message in (("s3://nosuch/out", "s3://nosuch/out: bucket nosuch not found"),
                         ("s3://unet/notes.txt", "s3://unet/notes.txt: a file; it must be a directory"),
                         ("s3://unet/notes.txt/out", "unet/notes.txt is a file, so no output directory can be made")):
        with pytest.raises(ValueError, match=message):
            ingest.open_output(uri)


def test_an_output_that_is_a_device_or_named_pipe_is_refused_as_no_directory(tmp_path):
    # jobs.infer --output /dev/null ended in a traceback (NotADirectoryError) listing it as a directory.
    os.mkfifo(tmp_path / "pipe")
    for path in ("/dev/null", str(tmp_path / "pipe")):
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: a device, named pipe or socket; it must be "
                                             f"a directory \\(new or existing\\)$"):
            ingest.open_output(path)


def test_a_store_out_of_reach_is_named_with_pyarrows_reason_not_a_crash():
    # pyarrow's OSError ended jobs.infer and jobs.evaluate with a traceback (exit 1).
    # A closed port: S3 is opened without a request, and the output's first probe fails (after pyarrow's retries).
    closed = "s3://unet-ray-no-such-bucket/x?endpoint_override=127.0.0.1:1"
    for check in (ingest.open_output, ingest.discover_pairs):  # an output's probe, the data's first listing
        with pytest.raises(ValueError, match=f"^{re.escape(closed)}: cannot be used \\(.*NETWORK_CONNECTION"):
            check(closed)
    # Opening HDFS fails at once: without a JVM here, without a server there.
    with pytest.raises(ValueError, match="^hdfs://127.0.0.1:1/frames: cannot be used \\("):
        ingest.open_root("hdfs://127.0.0.1:1/frames")
    # Azure without credentials fails with pyarrow's bare ArrowException, which ended jobs.infer in a traceback.
    azure = "abfs://frames@unetraynosuchaccount.dfs.core.windows.net/x"
    for check in (ingest.open_output, ingest.discover_pairs):
        with pytest.raises(ValueError, match=f"^{re.escape(azure)}: cannot be used \\(.*Failed to get token"):
            check(azure)
    # A path pyarrow cannot parse as a URI (spaces must be %20 there) is named as one the user gave.
    with pytest.raises(ValueError, match="^s3://unet/my frames: cannot be used \\(Cannot parse URI"):
        ingest.open_root("s3://unet/my frames")


def test_a_google_cloud_store_out_of_reach_is_named_in_seconds_not_after_a_quarter_hour(monkeypatch):
    # Google's client retries a failing request for 15 minutes and more: jobs.infer --input gs://... with no
    # network (or no credentials) sat silent that long. A closed port fails alike, and the same way.
    monkeypatch.setattr(ingest, "GCS_PROBE_SECONDS", 3)  # the product's 20 s, shortened for the suite
    closed = "gs://unet-ray-no-such-bucket/x?endpoint_override=127.0.0.1:1&scheme=http"
    errors = {}

    def check(name, function):
        try:
            function(closed)
        except ValueError as error:
            errors[name] = str(error)

    checks = [threading.Thread(target=check, args=(name, function), daemon=True)
              for name, function in (("output", ingest.open_output), ("data", ingest.discover_pairs))]
    for thread in checks:  # side by side: the test waits for one probe's retries, not two
        thread.start()
    for thread in checks:
        thread.join(timeout=90)  # the probe gives up after GCS_PROBE_SECONDS
        assert not thread.is_alive(), "still retrying"
    for name in ("output", "data"):
        assert errors[name].startswith(f"{closed}: cannot be used (google::cloud::Status(UNAVAILABLE: Retry policy "
                                       f"exhausted"), errors[name]


def test_no_execution_is_left_holding_the_decoded_frames(tmp_path, ray_session):
    # Left to the cycle collector, which may not run during a whole training, the executors kept
    # every decoded frame in the object store beside train and val.
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    def executors():
        return [found for found in gc.get_objects() if isinstance(found, StreamingExecutor)]

    scenes.write_scenes(str(tmp_path), 4, seed=1)
    gc.collect()
    earlier = {id(executor) for executor in executors()}  # held by other tests' datasets, still alive
    gc.disable()
    try:
        ingest.load_frames(ingest.list_frames(str(tmp_path), 0.5, "tail"), (32, 48), 23, str(tmp_path))
        assert not [executor for executor in executors() if id(executor) not in earlier]
    finally:
        gc.enable()


def test_a_failed_job_removes_only_an_output_it_made_itself(tmp_path):
    # A folder the user made beforehand (to hold the report, or a mount point) is theirs, empty or not.
    (tmp_path / "made_by_the_user").mkdir()
    for output in (tmp_path / "made_by_the_user", tmp_path / "report"):
        with pytest.raises(RuntimeError, match="model refused"):
            with ingest.removed_if_left_empty(str(output)):
                output.mkdir(exist_ok=True)
                raise RuntimeError("model refused")
    assert os.listdir(tmp_path) == ["made_by_the_user"]
    # And the folders it made above a new output, up to the first that was there.
    nested = tmp_path / "made_by_the_user" / "new" / "newer" / "report"
    with pytest.raises(RuntimeError, match="model refused"):
        with ingest.removed_if_left_empty(str(nested)):
            nested.mkdir(parents=True)
            raise RuntimeError("model refused")
    assert os.listdir(tmp_path) == ["made_by_the_user"] and os.listdir(tmp_path / "made_by_the_user") == []
    # But not another job's output, made beside this one's in a folder both needed, empty as it still is.
    beside = tmp_path / "made_by_the_user" / "new" / "another_report"
    with pytest.raises(RuntimeError, match="model refused"):
        with ingest.removed_if_left_empty(str(nested)):
            nested.mkdir(parents=True)
            beside.mkdir()
            raise RuntimeError("model refused")
    assert os.listdir(tmp_path / "made_by_the_user" / "new") == ["another_report"]


def test_a_place_that_takes_no_more_files_full_over_quota_or_read_only_stops_the_job_with_one_error():
    # Every later write fails alike, so a restart would too: one error that says to make room, not Ray Train's retries.
    for code, why in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                      (errno.EROFS, "Read-only file system")):
        with pytest.raises(ValueError, match=f"^--output /runs/a: cannot take more files \\({why}\\); make room$"):
            with ingest.stopped_when_out_of_room("--output /runs/a", "make room"):
                raise OSError(code, why)
    with pytest.raises(OSError, match="Input/output error"):  # one file's failure: not about room
        with ingest.stopped_when_out_of_room("--output /runs/a", "make room"):
            raise OSError(errno.EIO, "Input/output error")
