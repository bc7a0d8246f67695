"""Generated CARLA-layout frames, cached across benchmark runs.

`scenes.write_scenes` renders about 20 frames/s per core, so the frames (seed 0, frame i
depends only on i) are generated once into the cache and reused; a benchmark that needs the
first N frames gets a directory of hard links to them (`view`), which costs no disk space.
"""

import multiprocessing
import os
import shutil
import tempfile

from unet_core import data, scenes

DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "unet-ray-bench-cache")
SEED = 0
CHUNK = 50


def _render(arguments):
    directory, start, count = arguments
    scenes.write_scenes(directory, count, seed=SEED, start=start)
    return count


def ensure_frames(cache, count, log=print):
    """Frames 0 .. count-1 under `cache`/frames (rendered in parallel, only those missing)."""
    directory = os.path.join(cache, "frames")
    missing = [index for index in range(count) if not all(os.path.exists(os.path.join(
        directory, sub, scenes.scene_name(index))) for sub in (data.IMAGE_DIR, data.MASK_DIR))]
    if missing:
        log(f"[bench] rendering {len(missing)} frame(s) into {directory} (cached for later runs)")
        chunks, start = [], None
        for position, index in enumerate(missing):
            if start is None:
                start = index
            last = position + 1 == len(missing) or missing[position + 1] != index + 1 or index + 1 - start == CHUNK
            if last:
                chunks.append((directory, start, index + 1 - start))
                start = None
        # spawn: the caller may already run TensorFlow's threads, which do not survive a fork.
        with multiprocessing.get_context("spawn").Pool(max(1, os.cpu_count() or 1)) as pool:
            pool.map(_render, chunks)
    return directory


def view(cache, count):
    """A CARLA-layout directory holding exactly frames 0 .. count-1 (hard links into the cache)."""
    frames = ensure_frames(cache, count)
    target = os.path.join(cache, "views", f"n{count}")
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".n{count}-", dir=os.path.dirname(target))
    for sub in (data.IMAGE_DIR, data.MASK_DIR):
        os.makedirs(os.path.join(staging, sub))
        for index in range(count):
            source = os.path.join(frames, sub, scenes.scene_name(index))
            destination = os.path.join(staging, sub, scenes.scene_name(index))
            try:
                os.link(source, destination)
            except OSError:  # another filesystem: copy instead
                shutil.copyfile(source, destination)
    try:
        os.rename(staging, target)
    except OSError:  # a concurrent run made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
