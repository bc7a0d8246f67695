"""Where batch inference writes: the masks' and overlays' PNG files, each whole or not at all,
and the Parquet tables of predictions and errors, the ledger of which inputs are done.

The driver writes everything here, a batch at a time, as the batches come back from the actors.
"""

import contextlib
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from distributed.ingest import as_typed, is_out_of_room, spelled
from distributed.model_io import weights_of

# Temporary files live here until renamed into place; a run starts by emptying it.
STAGING = ".staging"
# The output settings the predictions were made with, which a rerun into the output must keep.
SETTINGS_FILE = "output_settings.json"
# Files the driver writes at once. An object store answers each request in tens of milliseconds:
# one at a time, a million frames' masks and overlays would take a day to upload.
WRITERS = 16
OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow's names of the filesystems whose uploads are atomic


def output_png_name(relative):
    """The name of an input's mask and overlay: a PNG's own, a JPEG's with `.png` appended (x.jpg →
    x.jpg.png, where CameraMask/ would hold x.png), so that x.jpg beside x.png keep apart."""
    return relative if relative.lower().endswith(".png") else relative + ".png"


def output_path(folder, relative):
    """`folder/relative` inside the output; refuses any path that could lead out of it."""
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{relative}: not a plain relative path (absolute, or with an empty, '.' or '..' part); "
                         f"its output would not stay inside --output/{folder}")
    return f"{folder}/{relative}"


def write_images(output, batch, config, source):
    """Write the PNG files of each frame predicted, `WRITERS` at a time; returns (succeeded, reason)
    per row, once every file of the batch is written. `source`: the input folder the batch's
    paths are relative to, as the user spells it, which a reason names the frame by.

    A frame whose files cannot be written (a name too long for the filesystem, say) fails with
    the reason, into errors/ like an unreadable one, instead of ending the job.
    """
    reasons = batch["error"].astype(object)
    columns = ([("masks", "mask_png")] if "png" in config.formats else []) + (
        [("overlays", "overlay_png")] if config.overlay else [])

    def write_frame(index):
        relative = batch["path"][index]
        try:
            for folder, column in columns:
                output.write(output_path(folder, output_png_name(relative)), batch[column][index])
        except OSError as error:
            if is_out_of_room(error):  # the job stops: errors/ would fill with the rest of the input
                raise
            return f"{source}/{relative}: its output cannot be written ({error})"
        return ""

    written = np.flatnonzero(reasons == "")
    if columns:
        with ThreadPoolExecutor(max_workers=WRITERS) as pool:
            reasons[written] = list(pool.map(write_frame, written))
    return reasons == "", reasons


def prediction_table(batch, succeeded, identity, names, with_masks):
    columns = {
        "path": pa.array(batch["path"][succeeded], pa.string()),
        "width": pa.array(batch["width"][succeeded], pa.int32()),
        "height": pa.array(batch["height"][succeeded], pa.int32()),
    }
    if with_masks:
        columns["mask_png"] = pa.array(list(batch["mask_png"][succeeded]), pa.binary())
    pixels = batch["pixels"][succeeded]
    for index, name in enumerate(names):
        columns[f"pixels_{name}"] = pa.array(pixels[:, index], pa.int64())
    columns["model"] = pa.array([identity] * len(pixels), pa.string())
    return pa.table(columns)


class Output:
    """The output directory or URI: atomic writes, the ledger of inputs already done, and the
    output settings they were done with."""

    def __init__(self, filesystem, root):
        self.filesystem, self.root = filesystem, root
        self.staging = f"{root}/{STAGING}"
        self.named = spelled(filesystem, root)  # as the user gives it: a bucket's with its scheme
        self.folders = set()

    def predictions(self, columns):
        """`columns` of each committed predictions part; parts are only ever renamed in whole."""
        for path in self.parts("predictions"):
            try:
                yield pq.read_table(path, columns=columns, filesystem=self.filesystem)
            except (pa.ArrowInvalid, OSError) as error:
                raise ValueError(f"{spelled(self.filesystem, path)}: unreadable Parquet part ({error}); delete it to "
                                 f"predict its inputs again") from None

    def models(self):
        """The identities (`model_io.model_identity`) of the models the predictions came from."""
        return {model for table in self.predictions(["model"]) for model in table["model"].to_pylist()}

    def done_paths(self, identity):
        """Input paths in the committed predictions parts."""
        done, by_other_models = set(), 0
        for table in self.predictions(["path", "model"]):
            done.update(table["path"].to_pylist())
            same = pc.ends_with(table["model"], "@" + weights_of(identity))
            by_other_models += pc.sum(pc.invert(same)).as_py() or 0
        if by_other_models:
            print(f"[unet-ray] warning: {by_other_models} prediction(s) in {self.named} came from another "
                  f"model; they are kept and skipped (use a new --output to predict them again)", file=sys.stderr,
                  flush=True)
        return done

    def check_settings(self, settings):
        """Refuse a rerun with other settings: the frames done would be skipped and keep their files,
        so the output would end up mixed (mask sizes, table columns), or, from another input, frames
        that share a done frame's path would be skipped unpredicted. Files are written from the
        start of a run, so a run killed before its first Parquet part binds the output too."""
        path = f"{self.root}/{SETTINGS_FILE}"
        if self.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
            self.check_is_new()
            return
        with self.filesystem.open_input_stream(path) as stream:
            content = stream.read()
        try:
            recorded = json.loads(content)
            if not isinstance(recorded, dict):
                raise ValueError(f"a JSON {type(recorded).__name__}")
        except ValueError as error:  # edited by hand, say: json's own message names no file
            reason = f"not the JSON object of settings jobs.infer records ({error})"
            raise ValueError(f"{self.named}/{SETTINGS_FILE}: {reason}; restore the settings the output was made "
                             f"with, or pass another --output") from None
        # A setting an older unet-ray did not record is unknown: refusing would strand the output.
        changed = [describe_change(name, recorded[name], value)
                   for name, value in settings.items() if name in recorded and recorded[name] != value]
        if changed:
            raise ValueError(f"{self.named}: its predictions were made with other settings ({'; '.join(changed)}); "
                             f"rerun with those to complete them, or pass another --output for these")

    def check_is_new(self):
        """An output without settings must be new, empty, or one an older unet-ray wrote (it has
        predictions/): a run would empty another tool's errors/ and overwrite its masks/."""
        selector = pyarrow.fs.FileSelector(self.root, allow_not_found=True)
        entries = sorted(info.base_name for info in self.filesystem.get_file_info(selector)
                         if not info.base_name.startswith("."))
        if entries and "predictions" not in entries:
            raise ValueError(f"{self.named}: a directory jobs.infer did not write (it holds {', '.join(entries[:3])}"
                             f"{', ...' if len(entries) > 3 else ''}); pass a new or empty --output")

    def record_settings(self, settings):
        self.write(SETTINGS_FILE, json.dumps(settings, indent=2).encode())

    def make(self):
        """Make the output directory and its staging folder, which every local write goes through."""
        self.filesystem.create_dir(self.staging, recursive=True)

    def start_run(self):
        """Drop what a killed run left in staging, and the errors of the last run: they are retried."""
        for folder in (self.staging, f"{self.root}/errors"):
            self.filesystem.delete_dir_contents(folder, missing_dir_ok=True)

    def parts(self, folder):
        selector = pyarrow.fs.FileSelector(f"{self.root}/{folder}", allow_not_found=True)
        return sorted(info.path for info in self.filesystem.get_file_info(selector)
                      if info.base_name.endswith(".parquet") and not info.base_name.startswith("."))

    def write(self, relative, content):
        """Write under a temporary name, then rename: no reader ever sees a partial file. An object
        store's upload shows the whole file or none by itself, and its rename is a copy."""
        path = f"{self.root}/{relative}"
        if self.filesystem.type_name in OBJECT_STORES:
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(content)
            return
        temporary = f"{self.staging}/{uuid.uuid4().hex}.tmp"
        folder = path.rsplit("/", 1)[0]
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(content)
            if folder not in self.folders:
                self.filesystem.create_dir(folder, recursive=True)
                self.folders.add(folder)
            self.filesystem.move(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):  # never made, when the output is full or read-only
                self.filesystem.delete_file(temporary)
            raise


def describe_change(name, recorded, value):
    """A changed setting as the command line gives it: `--formats png -> parquet,png`."""
    if name == "input":  # recorded as pyarrow names its filesystem
        return f"--input {as_typed(str(recorded))} -> {as_typed(str(value))}"
    if name.startswith("model_"):
        what = name.removeprefix("model_").replace("_", " ")
        return f"--model of {flag_value(recorded)} -> {flag_value(value)} {what}"
    return f"--{name.replace('_', '-')} {flag_value(recorded)} -> {flag_value(value)}"


def flag_value(value):
    """A recorded setting as the command line gives it."""
    if isinstance(value, bool):
        return "given" if value else "not given"
    if isinstance(value, list):
        return "×".join(map(str, value)) if all(isinstance(part, int) for part in value) else ",".join(value)
    return value


class PartWriter:
    """Commits rows as Parquet parts of `rows_per_file` rows each; a run's last part may hold fewer."""

    def __init__(self, output, folder, rows_per_file):
        self.output, self.folder, self.rows_per_file = output, folder, rows_per_file
        # Unique per run, so a rerun never replaces the parts an earlier run committed.
        self.prefix = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.tables, self.rows, self.written = [], 0, 0

    def add(self, table):
        if table.num_rows:
            self.tables.append(table)
            self.rows += table.num_rows
        while self.rows >= self.rows_per_file:
            self.commit(self.rows_per_file)

    def flush(self):
        if self.rows:
            self.commit(self.rows)

    def commit(self, rows):
        """Write the first `rows` rows collected as the next part; keep the others for the next."""
        collected = pa.concat_tables(self.tables)
        buffer = pa.BufferOutputStream()
        pq.write_table(collected.slice(0, rows), buffer)
        self.output.write(f"{self.folder}/{self.prefix}-{self.written:05d}.parquet", buffer.getvalue())
        self.tables = [collected.slice(rows)] if rows < self.rows else []
        self.rows, self.written = self.rows - rows, self.written + 1
