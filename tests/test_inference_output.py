"""Where batch inference writes: files whole or not at all, many at a time, and the ledger of what is done."""

import json
import threading
import time

import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

from distributed import inference_output
from distributed.config import InferConfig
from distributed.ingest import open_output


def test_predictions_of_another_model_are_kept_with_a_warning_on_stderr(tmp_path, capsys):
    (tmp_path / "predictions").mkdir()
    models = ["model.keras@sha256:old", "model.keras@sha256:new"]
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "model": models}), tmp_path / "predictions" / "part-0.parquet")

    output = inference_output.Output(*open_output(str(tmp_path)))
    assert output.done_paths("model.keras@sha256:new") == {"a.png", "b.png"}
    printed = capsys.readouterr()
    assert "[unet-ray] warning: 1 prediction(s) in" in printed.err and "came from another model" in printed.err
    assert printed.out == ""
    # Counted as the rows of other models, not of this one: an output all of this model's warns of nothing.
    pq.write_table(pa.table({"path": ["c.png", "d.png"], "model": [models[1]] * 2}),
                   tmp_path / "predictions" / "part-1.parquet")
    output.done_paths("model.keras@sha256:new")
    assert "warning: 1 prediction(s) in" in capsys.readouterr().err
    (tmp_path / "predictions" / "part-0.parquet").unlink()
    output.done_paths("model.keras@sha256:new")
    assert capsys.readouterr().err == ""
    # The same weights copied under another file name: the same model, no warning to predict again.
    output.done_paths("copy@of.keras@sha256:new")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("relative", ["../escape.png", "/etc/escape.png", "a/../../escape.png", "a//b.png", ""])
def test_output_paths_cannot_leave_the_output(relative):
    with pytest.raises(ValueError, match="inside --output"):
        inference_output.output_path("masks", relative)


def test_a_batch_is_written_many_files_at_a_time_and_each_frame_that_cannot_be_is_named(tmp_path, monkeypatch):
    class SlowStore(fsspec.implementations.local.LocalFileSystem):
        """The local disk answering each file opened for writing after 50 ms, as an object store might."""
        lock, open_now, most_open, moves = threading.Lock(), 0, 0, 0

        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode:
                with SlowStore.lock:
                    SlowStore.open_now += 1
                    SlowStore.most_open = max(SlowStore.most_open, SlowStore.open_now)
                time.sleep(0.05)
                with SlowStore.lock:
                    SlowStore.open_now -= 1
            return super()._open(path, mode, **kwargs)

        def mv(self, *args, **kwargs):
            SlowStore.moves += 1
            return super().mv(*args, **kwargs)

    output = inference_output.Output(PyFileSystem(FSSpecHandler(SlowStore())), str(tmp_path))
    output.make()
    names = [f"drive/frame_{index:02d}.png" for index in range(20)] + ["a" * 300 + ".png"]  # a name too long
    batch = {"path": np.array(names, object), "error": np.array([""] * 21, object),
             "mask_png": np.array([name.encode() for name in names], object),
             "overlay_png": np.array([b"overlay of " + name.encode() for name in names], object)}
    config = InferConfig(model="m.keras", input="in", output=str(tmp_path), overlay=True)

    succeeded, reasons = inference_output.write_images(output, batch, config, "in")

    assert succeeded.tolist() == [True] * 20 + [False]
    assert reasons[-1].startswith(f"in/{names[-1]}: its output cannot be written (")  # named as read
    for name in names[:-1]:
        assert (tmp_path / "masks" / name).read_bytes() == name.encode()
        assert (tmp_path / "overlays" / name).read_bytes() == b"overlay of " + name.encode()
    assert SlowStore.most_open > 1  # one file at a time, 40 files would take 2 s of waiting alone
    # Written aside, then renamed into place (no reader sees half a file): 40, and the mask whose
    # name is too long, which fails there.
    assert SlowStore.moves == 41

    # On an object store an upload shows all of the file or none, and a rename is a copy: no staging.
    monkeypatch.setattr(inference_output, "OBJECT_STORES", (output.filesystem.type_name,))
    batch["mask_png"][0] = b"predicted again"
    assert inference_output.write_images(output, batch, config, "in")[0].tolist() == [True] * 20 + [False]
    assert SlowStore.moves == 41 and (tmp_path / "masks" / names[0]).read_bytes() == b"predicted again"


def test_a_directory_another_tool_wrote_is_refused_and_left_alone(tmp_path):
    output = tmp_path / "project"
    (output / "errors").mkdir(parents=True)
    (output / "errors" / "incident.txt").write_text("notes")  # a run empties errors/ at its start
    (output / ".cache").mkdir()
    settings = {"input": "in"}
    with pytest.raises(ValueError, match="project: a directory jobs.infer did not write \\(it holds errors\\); "
                                         "pass a new or empty --output"):
        inference_output.Output(*open_output(str(output))).check_settings(settings)
    assert (output / "errors" / "incident.txt").read_text() == "notes"
    # A new output, an empty one (hidden entries aside), or an older unet-ray's, which recorded no settings.
    (tmp_path / "empty" / ".cache").mkdir(parents=True)
    (tmp_path / "older" / "predictions").mkdir(parents=True)
    (tmp_path / "older" / "masks").mkdir()
    for directory in ("new", "empty", "older"):
        inference_output.Output(*open_output(str(tmp_path / directory))).check_settings(settings)


def test_damaged_output_settings_are_named_by_their_file(tmp_path):
    # A truncated or hand-edited output_settings.json ended jobs.infer with json's bare "Expecting value: line 1
    # column 11 (char 10)", naming no file; a JSON list passed as settings and was overwritten.
    output = inference_output.Output(*open_output(str(tmp_path)))
    for content, reason in (('{"input": ', "Expecting value: line 1 column 11 \\(char 10\\)"),
                            ("[1, 2]", "a JSON list")):
        (tmp_path / inference_output.SETTINGS_FILE).write_text(content)
        with pytest.raises(ValueError, match=f"^{tmp_path}/output_settings.json: not the JSON object of settings "
                                             f"jobs.infer records \\({reason}\\); restore the settings the output "
                                             f"was made with, or pass another --output$"):
            output.check_settings({"input": "in"})


def test_a_setting_an_older_unet_ray_did_not_record_binds_nothing(tmp_path):
    # Refused as changed, from "not recorded" to whatever this run gives, the output could never be completed.
    output = inference_output.Output(*open_output(str(tmp_path)))
    settings = {"input": "local:///frames", "formats": ["parquet", "png"], "output_size": "source"}
    (tmp_path / inference_output.SETTINGS_FILE).write_text(json.dumps({"input": "local:///frames",
                                                                        "formats": ["parquet", "png"]}))
    output.check_settings(settings)
    with pytest.raises(ValueError, match="--formats parquet,png -> png\\)"):  # those it recorded still bind
        output.check_settings({**settings, "formats": ["png"]})


def test_a_png_keeps_its_name_whatever_the_case_of_its_extension_and_a_jpeg_gets_png_appended():
    # FRAME.PNG is an input (extensions are matched in any case); its mask is FRAME.PNG, as CameraMask names it.
    assert inference_output.output_png_name("a/FRAME.PNG") == "a/FRAME.PNG"
    assert inference_output.output_png_name("a/frame.Png") == "a/frame.Png"
    assert inference_output.output_png_name("a/FRAME.JPG") == "a/FRAME.JPG.png"


def test_an_output_in_a_bucket_is_named_with_its_scheme(s3_bucket):
    # Named as pyarrow holds it (unet/out), the refusal sent the user looking for a local folder.
    def put(key, content):
        with s3_bucket.open_output_stream(f"unet/{key}") as stream:
            stream.write(content)

    put("other/notes.txt", b"a tool's notes")
    put("done/output_settings.json", json.dumps({"input": "local:///a"}).encode())
    put("damaged/output_settings.json", b'{"input": ')
    put("damaged/predictions/part-0.parquet", b"not Parquet")
    for key, settings, message in (
            ("other", {"input": "local:///a"}, "s3://unet/other: a directory jobs.infer did not write"),
            ("done", {"input": "local:///b"}, "s3://unet/done: its predictions were made with other settings"),
            ("damaged", {"input": "local:///a"}, "s3://unet/damaged/output_settings.json: not the JSON object")):
        with pytest.raises(ValueError, match=f"^{message}"):
            inference_output.Output(*open_output(f"s3://unet/{key}")).check_settings(settings)
    with pytest.raises(ValueError, match="^s3://unet/damaged/predictions/part-0.parquet: unreadable Parquet part"):
        inference_output.Output(*open_output("s3://unet/damaged")).done_paths("model.keras@sha256:0")


def test_parts_hold_rows_per_file_rows_in_order_and_the_last_holds_the_rest(tmp_path):
    # Batches arrive in any size: a part is cut across them, and no row is lost or repeated at a cut.
    output = inference_output.Output(*open_output(str(tmp_path)))
    output.make()
    writer = inference_output.PartWriter(output, "predictions", rows_per_file=6)
    written = []
    for start, size in ((0, 4), (4, 0), (4, 4), (8, 4), (12, 3)):
        writer.add(pa.table({"path": [f"{index:02d}.png" for index in range(start, start + size)]}))
        written.append(writer.written)
    # A part is committed as soon as its rows are in (at 12 rows, the second), so a run killed later keeps it.
    assert written == [0, 0, 1, 2, 2]  # 15 rows in: two whole parts so far, the other 3 held back
    writer.flush()
    parts = output.parts("predictions")  # in the order committed: their names count up
    assert [pq.read_table(part).num_rows for part in parts] == [6, 6, 3]
    paths = [path for part in parts for path in pq.read_table(part)["path"].to_pylist()]
    assert paths == [f"{index:02d}.png" for index in range(15)]


def test_a_changed_input_in_google_cloud_storage_is_named_gs_as_users_write_it():
    # The settings record pyarrow's gcs://, which no user types: the refusal named the input that way.
    assert (inference_output.describe_change("input", "gcs://bucket/frames", "gcs://bucket/other")
            == "--input gs://bucket/frames -> gs://bucket/other")
