"""The inference figures: end-to-end batch inference vs bare model.predict, and its peak memory
(`python -m benchmarks.run --only infer_vs_predict,infer_memory_5000_vs_500` runs only these).

The model is an untrained U-Net of the profile's size (weights do not change the cost), saved as
a .keras file as training would leave it. Inputs are generated 640x480 scenes from the cache.
"""

import io
import json
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from benchmarks import frames, memory
from benchmarks.common import alternated, median, ratio, rounded
from distributed import inference, inference_output, model_io, runtime
from distributed.config import FORMATS, InferConfig
from unet_core import data, unet_model


def save_model(profile, work):
    # Named by its shape: a --work-dir kept from another profile (--tiny, then --quick) holds another network,
    # which predict refused or jobs.infer ran, measuring the wrong model without a word.
    height, width = profile.image_size
    path = os.path.join(work, f"model-{height}x{width}-{profile.n_filters}f-{profile.n_classes}c.keras")
    if not os.path.exists(path):
        tf.keras.utils.set_random_seed(profile.seed)
        unet_model((*profile.image_size, 3), profile.n_filters, profile.n_classes).save(path)
        tf.keras.backend.clear_session()
    return path


def preloaded_images(input_dir, size):
    """Every input decoded and preprocessed exactly as `read_images` does, as one tensor."""
    names = sorted(name for name in os.listdir(input_dir) if data.is_image_name(name))
    images = np.stack([data.preprocess_image(data.read_bytes(os.path.join(input_dir, name)),
                                             os.path.join(input_dir, name), size)[0] for name in names])
    return tf.constant(images)


def per_image_costs(input_dir, size, n_classes, sample=50):
    """CPU milliseconds per frame of each step of batch inference other than the model, one thread.

    The product's steps, as `read_images` and `Predictor` run them, on the first `sample` frames
    (their true masks stand in for predictions, so the PNGs compress as real ones do); beside
    them, Pillow decoding the same files, which `unet_core.data` did before it took libspng.
    """
    names = sorted(name for name in os.listdir(input_dir) if data.is_image_name(name))[:sample]
    contents = [data.read_bytes(os.path.join(input_dir, name)) for name in names]
    masks_dir = os.path.join(os.path.dirname(input_dir), data.MASK_DIR)
    masks = [data.resize_mask(data.decode_mask(data.read_bytes(os.path.join(masks_dir, name)), name), size)
             for name in names]
    source = data.decode_image(contents[0], names[0]).shape[:2]
    source_masks = [data.resize_mask(ids, source) for ids in masks]
    steps = {
        "decode": (lambda content: data.decode_image(content, "frame.png"), contents),
        "decode_with_pillow": (lambda content: np.asarray(Image.open(io.BytesIO(content)).convert("RGB")), contents),
        "resize_and_scale": (lambda rgb: data.resize_image(rgb, size),
                             [data.decode_image(content, "frame.png") for content in contents]),
        "mask_to_source_size": (lambda ids: data.resize_mask(ids, source), masks),
        "class_counts": (lambda ids: data.resized_mask_counts(ids, source, n_classes), masks),
        "encode_mask_png": (inference.encode_mask, source_masks),
    }
    costs = {}
    for name, (step, inputs) in steps.items():
        started = time.perf_counter()
        for item in inputs:
            step(item)
        costs[name] = (time.perf_counter() - started) / len(inputs) * 1e3
    costs["product_total"] = sum(value for name, value in costs.items() if name != "decode_with_pillow")
    return costs


def class_ids_model(model):
    """`model` ending in each pixel's class id, as a uint8 mask: what infer keeps of a prediction. Bare
    `model.predict` on the model itself would gather every score of every frame (5,000 frames at 96×128×23
    are 5.6 GB of float32), a cost infer never pays."""
    return tf.keras.Model(model.inputs, tf.cast(tf.argmax(model.outputs[0], axis=-1), tf.uint8))


def time_predict(model, images, batch_size):
    started = time.perf_counter()
    model.predict(images, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_s": len(images) / seconds}


def time_infer(config, count):
    """One `infer` run; also notes when each output batch reaches the driver (to leave out start-up).

    `infer` writes every batch it receives with `write_images`; wrapping that module function
    records (time, rows) per batch without changing what runs.
    """
    arrivals, original = [], inference_output.write_images

    def recording(output, batch, *rest):
        arrivals.append((time.perf_counter(), len(batch["path"])))
        return original(output, batch, *rest)

    inference_output.write_images = recording
    try:
        started = time.perf_counter()
        summary = inference.infer(config)
        seconds = time.perf_counter() - started
    finally:
        inference_output.write_images = original
    if summary["ok"] != count:
        raise RuntimeError(f"infer predicted {summary} of {count} frames")
    steady = None
    if len(arrivals) > 1 and arrivals[-1][0] > arrivals[0][0]:
        steady = sum(rows for _, rows in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])
    return {
        "seconds": seconds,
        "images_per_s": count / seconds,
        "first_output_seconds": arrivals[0][0] - started if arrivals else None,
        "steady_images_per_s": steady,
        "batches": len(arrivals),
    }


def infer_vs_predict(profile, cache, work, cores, log, num_actors, cpus_per_actor):
    count, batch_size = profile.infer_frames, profile.batch_size
    input_dir = os.path.join(frames.view(cache, count), data.IMAGE_DIR)
    model_path = save_model(profile, work)
    model = class_ids_model(model_io.load_model(model_path))
    images = preloaded_images(input_dir, profile.image_size)
    model.predict(images[:batch_size], batch_size=batch_size, verbose=0)  # builds the predict function
    runs = {"predict": [], "infer": []}
    for round_index in range(profile.infer_repeats):
        for name in alternated(["predict", "infer"], round_index):
            log(f"[bench] inference round {round_index + 1}/{profile.infer_repeats}: {name}")
            if name == "predict":
                runs[name].append(time_predict(model, images, batch_size))
            else:
                output = os.path.join(work, f"infer-r{round_index}")
                shutil.rmtree(output, ignore_errors=True)
                config = InferConfig(model=model_path, input=input_dir, output=output, batch_size=batch_size,
                                     num_actors=num_actors, cpus_per_actor=cpus_per_actor)
                runs[name].append(time_infer(config, count))
            log(f"[bench]   {json.dumps(rounded(runs[name][-1], 3))}")
    # What a rerun into the same output costs: it finds every frame done.
    started = time.perf_counter()
    rerun = inference.infer(config)
    rerun_seconds = time.perf_counter() - started
    costs = per_image_costs(input_dir, profile.image_size, profile.n_classes)
    predict_ips = median([run["images_per_s"] for run in runs["predict"]])
    infer_ips = median([run["images_per_s"] for run in runs["infer"]])
    steady_ips = median([run["steady_images_per_s"] for run in runs["infer"]])
    return {
        "name": "infer_vs_predict",
        "ratio": ratio(infer_ips, predict_ips),
        "ratio_excluding_startup": ratio(steady_ips, predict_ips),
        "infer_images_per_s": infer_ips,
        "infer_steady_images_per_s": steady_ips,
        "predict_images_per_s": predict_ips,
        "infer_seconds": [run["seconds"] for run in runs["infer"]],
        "infer_first_output_seconds": [run["first_output_seconds"] for run in runs["infer"]],
        "predict_seconds": [run["seconds"] for run in runs["predict"]],
        "round_ratios": [ratio(i["images_per_s"], p["images_per_s"]) for i, p in zip(runs["infer"], runs["predict"])],
        # With the cores shared and the actors' forward pass as fast as predict, the ratio is at
        # most about m / (m + product_total / cores), m = predict_ms_per_image.
        "cpu_ms_per_image": costs,
        "predict_ms_per_image": 1e3 / predict_ips,
        "rerun_seconds": rerun_seconds,
        "rerun": rerun,
        "method": ("infer = distributed.inference.infer wall time (list PNGs -> read + preprocess tasks -> "
                   "Predictor actors -> Parquet + mask PNGs committed), including actor start and model load "
                   "but not ray.init (Ray already runs in this process); ratio_excluding_startup counts the "
                   "images after the first output batch over the time from first to last output batch (an upper "
                   "bound: reading runs ahead while the actor starts). "
                   "predict = model.predict of the model ending in argmax (uint8 class ids, as infer keeps) on the "
                   "same frames preloaded and preprocessed as one tensor, after a warm-up call. Interleaved, median "
                   "over rounds. rerun: infer again into the same output, all frames already done."),
        "goal": ">= 0.9",
        "config": {
            "profile": profile.name, "frames": count, "source_size": [480, 640],
            "image_size": list(profile.image_size), "n_filters": profile.n_filters, "batch_size": batch_size,
            "num_actors": num_actors, "cpus_per_actor": cpus_per_actor, "predict_threads": cores,
            "formats": list(FORMATS), "output_size": "source", "repeats": profile.infer_repeats,
        },
    }


def infer_memory(profile, cache, work, log):
    """Peak memory of `python -m jobs.infer` (its whole process tree) on a small and a large input."""
    small, large = profile.memory_frames
    model_path = save_model(profile, work)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # its own local Ray
    env.update(runtime.WORKER_ENV)
    runs = {small: [], large: []}
    command = None
    for round_index in range(profile.memory_repeats):
        for count in alternated([small, large], round_index):
            input_dir = os.path.join(frames.view(cache, count), data.IMAGE_DIR)
            output = os.path.join(work, f"memory-{count}-r{round_index}")
            # Left in a kept --work-dir by a run that failed or was interrupted: the job would skip the frames
            # done there, and this figure failed in every later run for predicting fewer than `count`.
            shutil.rmtree(output, ignore_errors=True)
            command = [sys.executable, "-m", "jobs.infer", "--model", model_path, "--input", input_dir,
                       "--output", output, "--batch-size", str(profile.batch_size)]
            log(f"[bench] memory round {round_index + 1}/{profile.memory_repeats}: jobs.infer on {count} frames")
            result = memory.run_sampled(command, output + ".log", env=env)
            if result["returncode"] != 0 or result["summary"].get("ok") != count:
                raise RuntimeError(f"jobs.infer on {count} frames failed: {result}; log in {output}.log")
            shutil.rmtree(output, ignore_errors=True)
            log(f"[bench]   peak RSS {result['peak_rss_mb']:.0f} MB, PSS {result['peak_pss_mb']:.0f} MB, "
                f"{result['seconds']:.1f} s, {result['max_processes']} processes")
            runs[count].append(result)

    def peak(count, key):
        return median([run[key] for run in runs[count]])

    note = ""
    if (small, large) != (500, 5000):
        note = f" ({profile.name} profile: {large} vs {small} frames, not 5000 vs 500)"
    return {
        "name": "infer_memory_5000_vs_500",
        "ratio": ratio(peak(large, "peak_rss_mb"), peak(small, "peak_rss_mb")),
        "ratio_pss": ratio(peak(large, "peak_pss_mb"), peak(small, "peak_pss_mb")),
        "frames_small": small,
        "frames_large": large,
        "peak_rss_mb_small": peak(small, "peak_rss_mb"),
        "peak_rss_mb_large": peak(large, "peak_rss_mb"),
        "peak_pss_mb_small": peak(small, "peak_pss_mb"),
        "peak_pss_mb_large": peak(large, "peak_pss_mb"),
        "seconds_small": peak(small, "seconds"),
        "seconds_large": peak(large, "seconds"),
        "max_processes": max(run["max_processes"] for group in runs.values() for run in group),
        "method": ("peak over the run of the summed VmRSS (ratio) and Pss (ratio_pss) of the job's whole "
                   "process tree (driver, its local Ray: GCS, raylet, workers, actors), sampled every 0.2 s "
                   "from /proc; median over rounds; each run starts its own Ray, so start-up memory is in "
                   f"both{note}"),
        "command": " ".join(command[:2] + ["jobs.infer", "--model", "MODEL", "--input", "DIR", "--output", "OUT",
                                           "--batch-size", str(profile.batch_size)]),
        "goal": "<= 1.2",
        "config": {
            "profile": profile.name, "frames": [small, large], "source_size": [480, 640],
            "image_size": list(profile.image_size), "n_filters": profile.n_filters,
            "batch_size": profile.batch_size, "num_actors": "auto", "cpus_per_actor": 1,
            "repeats": profile.memory_repeats,
        },
    }
