"""Ray Data ingest: a CARLA-layout directory or URI → checked, preprocessed train/val datasets;
and the storage every job shares: opening local or bucket paths, listing them, holding an output.

Every pair is decoded once, up front, by the same unet_core function evaluation and inference
use; the preprocessed frames stay in Ray's object store (spilling to disk when large), so epochs
reshuffle rows instead of decoding PNGs again, and a bad file stops the run before any worker
starts rather than in the middle of an epoch.
"""

import contextlib
import dataclasses
import errno
import fcntl
import gc
import hashlib
import os
import sys
import tempfile

import numpy as np
import pyarrow.fs
import ray
from ray.data.expressions import col

from distributed.config import refuse_relative_output
from unet_core import data

ROWS_PER_TASK = 32
# Google Cloud Storage's client retries a failing request for 15 minutes and more (19 here), whatever
# the failure (no network, no credentials, a closed port), so a job given a gs:// path out of reach
# sat silent that long before naming it. Its first request goes through a client that gives up
# after this many seconds.
GCS_PROBE_SECONDS = 20


def open_root(uri):
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/dir."""
    with named_if_unusable(uri):  # pyarrow asks an S3 store for the bucket's region here
        filesystem, root = pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
        if filesystem.type_name == "gcs" and "retry_limit_seconds=" not in uri:  # the user's own limit stands
            probe = f"{uri}{'&' if '?' in uri else '?'}retry_limit_seconds={GCS_PROBE_SECONDS}"
            pyarrow.fs.FileSystem.from_uri(probe)[0].get_file_info(root)
    return filesystem, root.rstrip("/")


@contextlib.contextmanager
def named_if_unusable(uri):
    """An OSError inside (an object store out of reach, a name too long for the filesystem) as a
    ValueError naming `uri`: a path the user gave that cannot be used, not a crash. For opening and
    probing the paths given only: an OSError reading or writing a frame's files fails that frame,
    which the job names in its place."""
    try:
        yield
    # Azure's failures (no credentials, say) come as pyarrow's bare ArrowException, no OSError, and
    # ended the job in a traceback; a URI pyarrow cannot parse comes as ArrowInvalid, which named no flag.
    except (OSError, pyarrow.ArrowException) as error:
        raise ValueError(f"{uri}: cannot be used ({error})") from None


# Failures named on the console one line each: enough to show what is wrong, not a flood when
# thousands of frames fail alike. The job's files (errors/, skipped.json, unreadable.txt) hold every one.
FAILURES_SHOWN = 20
UNREADABLE_FILE = "unreadable.txt"


def unreadable_frames(where, reasons, frame_count, advice, output, hint=""):
    """The ValueError that refuses a set with unreadable frames: the first FAILURES_SHOWN reasons,
    then `hint`, every one written to `output`/unreadable.txt (a wrong --n-classes fails every frame alike)."""
    listing = os.path.join(output, UNREADABLE_FILE)
    with open(listing, "w") as file:
        file.writelines(f"{reason}\n" for reason in reasons)
    shown = "".join(f"\n  {reason}" for reason in reasons[:FAILURES_SHOWN])
    more = f"\n  ... and {len(reasons) - FAILURES_SHOWN} more" if len(reasons) > FAILURES_SHOWN else ""
    return ValueError(f"{where}: {len(reasons)} of {frame_count} frame(s) cannot be read ({advice}; every one is "
                      f"named in {listing}):{shown}{more}{hint}")


def forget_unreadable_frames(output):
    """Remove an earlier refusal's unreadable.txt from `output`, once a run or report goes on."""
    if os.path.exists(os.path.join(output, UNREADABLE_FILE)):
        os.remove(os.path.join(output, UNREADABLE_FILE))


def open_output(uri):
    """`open_root` of an output directory or URI, new or existing; a file there is refused, and so
    is a relative path in a submitted job's working-dir copy."""
    refuse_relative_output(uri, "--output")
    filesystem, root = open_root(uri)
    with named_if_unusable(uri):
        kind = filesystem.get_file_info(root).type
        if kind == pyarrow.fs.FileType.File:
            raise ValueError(f"{uri}: a file; it must be a directory (new or existing)")
        if kind == pyarrow.fs.FileType.Unknown:  # /dev/null, say: listing it as a directory failed with a traceback
            raise ValueError(f"{uri}: a device, named pipe or socket; it must be a directory (new or existing)")
        parent = root
        while "/" in parent.strip("/"):  # the nearest existing folder above a new output: never a file
            parent = parent.rstrip("/").rsplit("/", 1)[0]
            kind = filesystem.get_file_info(parent).type
            if kind == pyarrow.fs.FileType.File:
                raise ValueError(f"{uri}: {parent} is a file, so no output directory can be made below it")
            if kind == pyarrow.fs.FileType.Directory:
                break
        else:  # nothing above exists: in an object store, the bucket
            if not isinstance(filesystem, pyarrow.fs.LocalFileSystem) and (
                    filesystem.get_file_info(parent).type == pyarrow.fs.FileType.NotFound):
                raise ValueError(f"{uri}: bucket {parent.strip('/')} not found (or not visible with these "
                                 f"credentials); create it, or pass another")
    return filesystem, root


def spelled(filesystem, path):
    """A path of `open_root` as a user would give it: local as it is, in an object store with its scheme."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return path
    return as_typed(f"{filesystem.type_name}://{path}")


def as_typed(uri):
    """`type_name://path` (pyarrow's name for its filesystem) as users write it: gs:// for pyarrow's gcs."""
    return f"gs://{uri.removeprefix('gcs://')}" if uri.startswith("gcs://") else uri


# One folder per user: another user's would not be writable (a cluster runs every job as one user).
HOLDS = os.path.join(tempfile.gettempdir(), f"unet-ray-holds-{os.getuid()}")


def hold(filesystem, root, job, instead="another --output"):
    """This process's hold on the output `root` (as `open_output` gives it) until the returned file
    is closed or the process dies. Another job writing there from this machine (a job submitted
    twice: a cluster runs every job's driver on its head) is refused, instead of writing beside the
    first into the same files; `instead`: what to pass to write elsewhere. A local output is known
    by its real path, however it is spelt."""
    place = held_place(filesystem, root)
    os.makedirs(HOLDS, exist_ok=True)
    file = open(os.path.join(HOLDS, hashlib.sha256(place.encode()).hexdigest()[:32] + ".lock"), "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another job"
        file.close()
        raise ValueError(f"{place}: {holder} is writing into it; wait for it to end, or pass {instead}") from None
    file.truncate(0)
    file.write(f"{job} (pid {os.getpid()})")
    file.flush()
    return file


def held_place(filesystem, root):
    """`root` as `hold` knows it: a local one by its real path."""
    local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
    return spelled(filesystem, os.path.realpath(root) if local else root)


def make_directory(path, flag):
    """`os.makedirs(path, exist_ok=True)`, a failure named as a bad value of `flag` (a read-only place, say)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot be made a directory ({error.strerror or error})") from None


@contextlib.contextmanager
def removed_if_left_empty(path):
    """A local output the job makes inside this block is removed again if the job fails or is
    interrupted before writing a file there: an empty folder left behind (a run's empty
    ray_results/, say) reads later as that job's output, and jobs.evaluate would refuse it. So are
    the folders above it that the job makes with it (a/b/ of a new a/b/output), when left empty:
    another job may have made its own output beside this one's meanwhile."""
    missing, above = [], os.path.abspath(path)
    while not os.path.lexists(above):  # the output, then each new folder above it
        missing.append(above)
        above = os.path.dirname(above)
    try:
        yield
    except BaseException:
        if missing:
            own = [directory for directory, _, _ in os.walk(missing[0], topdown=False)]
            for directory in own + missing[1:]:
                with contextlib.suppress(OSError):  # one that is not empty stays, and so do those above it
                    os.rmdir(directory)
        raise


def list_tree(filesystem, directory, recursive=True):
    """FileInfo of everything below `directory`; a file name that is not UTF-8 is a clear error.

    A symbolic link whose target is missing is listed as a file, so that reading it fails and names
    it, like any other unreadable frame: pyarrow's own listing leaves such links out without a word.
    """
    try:
        if recursive and isinstance(filesystem, pyarrow.fs.LocalFileSystem):
            loop = symbolic_link_loop(directory)
            if loop:
                raise ValueError(f"{loop}: a symbolic link to {os.path.realpath(loop)}, a folder on its own path, "
                                 f"so every file below would be listed again and again; remove the link")
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(directory, recursive=recursive))
        for info in found:
            info.path  # pyarrow decodes each name on first use: a bad one fails here, inside the try
    except OSError as error:
        # A folder below that this user may not read (a volume's lost+found, say) ended the job in a
        # traceback. Its frames cannot even be named, so the job cannot go on as if it held none; the
        # error names the folder.
        raise ValueError(f"{directory}: cannot be listed ({error})") from None
    except UnicodeDecodeError as error:
        # The undecodable bytes are the file's whole path: in a tree of many folders, naming only the
        # folder listed would leave the user to search every one of them.
        found_at = error.object.decode("utf-8", "backslashreplace") if isinstance(error.object, bytes) else None
        named = f": {found_at}" if found_at else ""
        raise ValueError(f"{directory}: holds a file name that is not valid UTF-8 ({error}){named}; "
                         f"rename it") from None
    dangling = broken_links(filesystem, directory, found)
    return found + [pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.File) for path in dangling]


def symbolic_link_loop(directory):
    """The first folder below local `directory` that is a link back to a folder on its own path, or None."""
    def walk(folder, above):
        for entry in os.scandir(folder):
            if entry.is_dir():  # following links, as pyarrow's listing does
                real = os.path.realpath(entry.path)
                loop = entry.path if real in above else walk(entry.path, above | {real})
                if loop:
                    return loop
        return None

    return walk(directory, {os.path.realpath(directory)})


def broken_links(filesystem, directory, found):
    """Paths of the dangling symbolic links in `directory` and the folders `found` below it.

    Only a local filesystem has them. One more listing of each folder costs little beside decoding
    its frames: 0.09 s for 100,000 files here, against pyarrow's own 0.23 s.
    """
    if not isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return []
    folders = [directory] + [info.path for info in found if info.type == pyarrow.fs.FileType.Directory]
    return [entry.path for folder in folders for entry in os.scandir(folder)
            if entry.is_symlink() and not os.path.exists(entry.path)]


def list_image_names(filesystem, directory):
    """Names of the frames in one folder of the CARLA layout (see `data.frame_names`); its other
    files are named on stderr, as they take no part."""
    entries = ((info.base_name, info.type == pyarrow.fs.FileType.Directory)
               for info in list_tree(filesystem, directory, recursive=False))
    names, others = data.frame_names(entries, directory)
    if others:
        print(f"[unet-ray] {len(others)} file(s) in {directory} are not {'/'.join(data.IMAGE_EXTENSIONS)} frames "
              f"(by their extension, or hidden by a leading dot) and are left out, such as {', '.join(others[:3])}",
              file=sys.stderr, flush=True)
    return names


def check_layout(uri):
    """(filesystem, root, [its CameraRGB, its CameraMask]); a ValueError unless both are directories."""
    filesystem, root = open_root(uri)
    folders = [f"{root}/{data.IMAGE_DIR}", f"{root}/{data.MASK_DIR}"]
    with named_if_unusable(uri):  # the first request to a bucket: out of reach, it fails here
        given, *found = filesystem.get_file_info([root, *folders])
    if given.type == pyarrow.fs.FileType.NotFound:  # a typo: "its CameraRGB is missing" would send the user there
        raise ValueError(f"{uri}: not found")
    for folder, info in zip(folders, found):
        if info.type != pyarrow.fs.FileType.Directory:
            # The folder of frames itself is the likeliest mistake: name the directory that was meant.
            meant = (f"; a {os.path.basename(root)} folder is not the data: pass the directory that holds "
                     f"{data.IMAGE_DIR}/ and {data.MASK_DIR}/, {os.path.dirname(uri.rstrip('/')) or '.'}"
                     if os.path.basename(root) in (data.IMAGE_DIR, data.MASK_DIR) else "")
            raise ValueError(f"{uri}: not a CARLA-layout directory ({folder}: directory not found){meant}")
    return filesystem, root, folders


def discover_pairs(uri):
    """(filesystem, root, sorted paired names); one ValueError names every unpaired file."""
    filesystem, root, folders = check_layout(uri)
    images, masks = (list_image_names(filesystem, folder) for folder in folders)
    return filesystem, root, data.pair_names(images, masks, uri)


def within(filesystem, path, root_filesystem, root):
    """Whether directory `path` is `root` or lies below it (through symbolic links, locally); both
    as `open_root` gives them."""
    return place_below(filesystem, path, root_filesystem, root) is not None


def place_below(filesystem, path, root_filesystem, root):
    """Where directory `path` lies below `root`, relative to it ("" for `root` itself), else None;
    through symbolic links, locally, so that it holds however either is spelt."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem) and isinstance(root_filesystem, pyarrow.fs.LocalFileSystem):
        path, root = os.path.realpath(path), os.path.realpath(root)
    elif not filesystem.equals(root_filesystem):
        return None
    if path == root:
        return ""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


def check_output_outside(output, uri, flag, files, output_flag="--output"):
    """A ValueError when the directory `output` is `uri`'s or lies below it: `files` would land among
    the frames (and a folder inside CameraRGB/ or CameraMask/ makes the data unreadable)."""
    if within(*open_output(output), *open_root(uri)):
        raise ValueError(f"{output}: inside {flag} ({uri}); {files} would land among its frames: pass "
                         f"{output_flag} outside it")


def check_validation_apart(uri, val_uri):
    """A ValueError when `val_uri` names the same directory as `uri`; a folder below it is fine."""
    (filesystem, root), (val_filesystem, val_root) = open_root(uri), open_root(val_uri)
    if within(filesystem, root, val_filesystem, val_root) and within(val_filesystem, val_root, filesystem, root):
        raise ValueError(f"{val_uri}: the validation directory is the training data ({uri}); scores on frames "
                         f"the model trained on say nothing of new ones: pass another --val-data, or none to "
                         f"validate on a held-out split of --data")


# A place that takes no more files (full, over quota, read-only): no one file's fault, and every
# write after it fails alike, so a job stops with one error that says to make room.
OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_out_of_room(error):
    return isinstance(error, OSError) and error.errno in OUT_OF_ROOM


@contextlib.contextmanager
def stopped_when_out_of_room(place, consequence):
    """An OSError for a `place` that takes no more files, raised inside, becomes one ValueError:
    "<place>: cannot take more files (<why>); <consequence>"."""
    try:
        yield
    except OSError as error:
        if not is_out_of_room(error):
            raise
        raise ValueError(f"{place}: cannot take more files ({os.strerror(error.errno)}); {consequence}") from None


def read_file(filesystem, path):
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        data.refuse_irregular_file(path)
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def read_pair(filesystem, root, name, size, n_classes):
    """One paired frame of a CARLA-layout root on any filesystem → (image, mask) via unet_core.data."""
    image_path, mask_path = f"{root}/{data.IMAGE_DIR}/{name}", f"{root}/{data.MASK_DIR}/{data.mask_name(name)}"
    return data.preprocess_pair(
        read_file(filesystem, image_path), read_file(filesystem, mask_path), image_path, mask_path, size, n_classes
    )


def read_frames(filesystem, root, names, size, n_classes):
    """(images, masks, reasons) of `names`: a frame that cannot be read stays zeros, and its reason
    is in `reasons` ("" for every frame read). What counts as unreadable is decided here only."""
    images = np.zeros((len(names), *size, 3), np.float32)
    masks = np.zeros((len(names), *size), np.uint8)
    reasons = []
    for index, name in enumerate(names):
        try:
            images[index], masks[index] = read_pair(filesystem, root, name, size, n_classes)
            reasons.append("")
        except (ValueError, OSError) as error:
            reasons.append(str(error))
    return images, masks, reasons


def preprocess_batch(batch, filesystem, root, size, n_classes):
    """Names → preprocessed frames; a frame that fails keeps its row, with the reason in `error`."""
    images, masks, reasons = read_frames(filesystem, root, batch["name"], size, n_classes)
    return {"name": batch["name"], "image": images, "mask": masks, "is_val": batch["is_val"], "key": batch["key"],
            "error": np.array(reasons)}


@dataclasses.dataclass(frozen=True)
class FrameList:
    """A run's frames by name, before any is read: `sources` holds (filesystem, root, names,
    validation flags, row keys) per directory listed."""

    where: str
    val_fraction: float | None  # None: validation is a directory of its own (--val-data)
    min_train_frames: int
    sources: list

    def names(self, skipped=()):
        """(training frame names, validation frame names), but for the frames keyed in `skipped`."""
        flagged = [(name, flag) for _, _, names, flags, keys in self.sources
                   for name, flag, key in zip(names, flags, keys) if key not in skipped]
        return [name for name, flag in flagged if not flag], [name for name, flag in flagged if flag]

    def refuse_short_split(self, train, val, skipped=None, more_classes=""):
        """A ValueError if `train` frames are fewer than the workers or `val` is none; `skipped`:
        {name: reason} of the frames that could not be read, once they were."""
        if train >= self.min_train_frames and val > 0:
            return
        split_by, remedy = "", "add frames or lower --num-workers"
        if self.val_fraction is not None:
            split_by = f" at val_fraction={self.val_fraction}"
            remedy = "add frames, lower --num-workers or change --val-fraction"
        counted = f"{train + val} frame(s)"
        if skipped is not None:
            counted = f"{train + val} usable frame(s)" + (
                f" ({len(skipped)} skipped, such as {next(iter(skipped.values()))})" if skipped else "")
        raise ValueError(
            f"{self.where}: {counted} give {train} for training and {val} for validation{split_by}; training needs "
            f"at least {self.min_train_frames} (one frame per worker) and validation at least 1: {remedy}{more_classes}"
        )


def list_frames(uri, val_fraction, split, min_train_frames=1, val_uri=None):
    """The FrameList of a run: validation is a split of `uri` (`val_fraction` of it, picked by
    `split`) or, given `val_uri`, every frame of that directory, and then every frame of `uri` trains.
    Unpaired files, and a split that leaves too few frames to train or validate, are refused here, by
    name, before a frame is decoded. Rows of `val_uri` are keyed by their path, as both directories
    may name frames alike."""
    sources = []
    for source, is_val in [(uri, None)] if val_uri is None else [(uri, False), (val_uri, True)]:
        filesystem, root, names = discover_pairs(source)
        flags = data.validation_flags(names, val_fraction, split) if is_val is None else [is_val] * len(names)
        keys = [f"{source}/{name}" if is_val else name for name in names]
        sources.append((filesystem, root, names, flags, keys))
    frame_list = FrameList(uri if val_uri is None else f"{uri} and {val_uri}",
                           val_fraction if val_uri is None else None, min_train_frames, sources)
    frame_list.refuse_short_split(*(len(names) for names in frame_list.names()))
    return frame_list


def load_frames(frame_list, size, n_classes, output, skip_bad=False):
    """(train dataset, validation dataset, skipped {key: reason}) of a FrameList, every frame decoded
    once. Unless `skip_bad`, unreadable frames raise one ValueError, every one of them listed in
    `output`/unreadable.txt."""
    parts, frame_count = [], 0
    for filesystem, root, names, flags, keys in frame_list.sources:
        items = [{"name": name, "is_val": flag, "key": key} for name, flag, key in zip(names, flags, keys)]
        parts.append(ray.data.from_items(items).map_batches(
            preprocess_batch,
            batch_size=ROWS_PER_TASK,
            fn_kwargs=dict(filesystem=filesystem, root=root, size=tuple(size), n_classes=n_classes),
        ))
        frame_count += len(names)
    frames = (parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])).materialize()
    failed = frames.filter(expr=col("error") != "").select_columns(["key", "error"]).take_all()
    skipped = {row["key"]: row["error"] for row in failed}
    more_classes = data.class_id_hint(skipped.values(), lambda n: f": if those are classes, pass --n-classes {n}")
    if skipped and not skip_bad:
        raise unreadable_frames(frame_list.where, list(skipped.values()), frame_count,
                                "fix them, or pass --skip-bad to train without them", output, more_classes)
    readable, bookkeeping = col("error") == "", ["error", "is_val", "key"]
    train = frames.filter(expr=readable & ~col("is_val")).drop_columns(bookkeeping).materialize()
    val = frames.filter(expr=readable & col("is_val")).drop_columns(bookkeeping).materialize()
    frame_list.refuse_short_split(train.count(), val.count(), skipped, more_classes)
    # Ray Data's executors are left in reference cycles that hold the blocks they read: until a full
    # collection, which need not come while the driver waits in trainer.fit(), every decoded frame
    # would stay in the object store beside train and val.
    del frames
    gc.collect()
    for split_frames in (train, val):
        # Both are in memory now. Training reads them again every epoch (validation whole, on every
        # worker), and a progress bar for each of those reads only buries the epoch's own line.
        split_frames.context.enable_progress_bars = False
    return train, val, skipped


def class_pixel_counts(frames, n_classes):
    """Pixels per class over preprocessed frames, counted where the blocks live (for loss weights)."""
    per_block = frames.map_batches(
        lambda batch: {"counts": np.bincount(batch["mask"].ravel(), minlength=n_classes)[None, :n_classes]},
        batch_size=None,
    )
    return sum(row["counts"] for row in per_block.iter_rows()).astype(np.int64)
