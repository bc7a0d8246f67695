"""The training figures, measured together: every alternative runs once per round, rounds repeat.

Alternatives (only those the selected figures need are run):
  keras_fp32, keras_bf16  plain Keras `model.fit` in this process, on the training frames
                          preloaded as arrays (tf.data from memory), all cores' threads;
  ray_1xN, ray_2xM        the product: `distributed.training.train` (Ray Data ingest -> Ray Train
                          TensorflowTrainer; MultiWorkerMirroredStrategy across two workers),
                          N = all cores in one worker, or two workers of M = N/2 cores each;
                          jit_compile=False, as the Keras side is not XLA-compiled and two
                          workers cannot be;
  ray_1xN_bf16            the product with --mixed-precision bf16 (jit_compile=False too);
  ray_1xN_xla             ray_1xN with jit_compile=True, the product's default;
  ray_1xN_stream          ray_1xN with cache_shard_mb=0: the training shard streamed from Ray
                          Data every epoch instead of held in the worker's memory;
  peak                    the fp32 matmul peak (benchmarks.flops.matmul_peak).
Throughput counts steady-state epochs only: the first epoch of every run (tracing, compiling,
oneDNN kernel selection) is dropped. The product's figure is `epoch_seconds` exactly as the
training reports it per epoch (subtracting nothing), which includes scoring the validation
frames once; the profile keeps them few (`val_frames`).
"""

import math
import os
import shutil
import time
import traceback

import numpy as np
import tensorflow as tf

from benchmarks import flops
from benchmarks.common import TRAINING_FIGURES, alternated, median, ratio
from distributed.config import TrainConfig
from unet_core import data, unet_model
from unet_core.training import compile_unet


class EpochTimer(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def val_fraction(profile):
    return profile.val_frames / (profile.train_frames + profile.val_frames)


def layouts(cores):
    """(workers, CPUs each) of the one-worker and the two-worker runs on this machine."""
    return (1, cores), (2, max(1, cores // 2))


def split_arrays(directory, profile):
    """The frames preprocessed exactly as ingest does, split exactly as the product splits them."""
    images, masks, names = data.load_pairs(directory, profile.image_size, profile.n_classes)
    is_val = np.array(data.validation_flags(names, val_fraction(profile), "tail"))
    if (~is_val).sum() != profile.train_frames or is_val.sum() != profile.val_frames:
        raise RuntimeError(f"{directory}: split gives {(~is_val).sum()} / {is_val.sum()} frames, "
                           f"expected {profile.train_frames} / {profile.val_frames}")
    return (images[~is_val], masks[~is_val]), (images[is_val], masks[is_val])


def keras_run(profile, train, precision):
    """Plain Keras fit on in-memory arrays; the same model, compile, batch and seed as the product."""
    images, masks = train
    tf.keras.backend.clear_session()
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        tf.keras.utils.set_random_seed(profile.seed)
        model = compile_unet(unet_model((*profile.image_size, 3), profile.n_filters, profile.n_classes),
                             profile.learning_rate)
        dataset = (tf.data.Dataset.from_tensor_slices((images, masks))
                   .shuffle(len(images), seed=profile.seed, reshuffle_each_iteration=True)
                   .batch(profile.batch_size)
                   .prefetch(tf.data.AUTOTUNE))
        timer = EpochTimer()
        history = model.fit(dataset, epochs=profile.epochs, verbose=0, callbacks=[timer]).history
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    return {
        "epoch_seconds": timer.seconds,
        "images_per_s": [len(images) / seconds for seconds in timer.seconds[1:]],
        "loss": history["loss"][-1],
        "pixel_accuracy": history["pixel_accuracy"][-1],
        "mean_iou": history["mean_iou"][-1],
    }


def ray_run(profile, frames_dir, work, workers, cpus_per_worker, precision, jit_compile, tag, stream=False):
    """One whole product training run in a fresh run directory; per-epoch figures from its metrics."""
    from distributed.training import train

    output = os.path.join(work, "ray", tag)
    config = TrainConfig(
        data=frames_dir, output=output, run_name=tag, epochs=profile.epochs, batch_size=profile.batch_size,
        num_workers=workers, cpus_per_worker=cpus_per_worker, image_size=profile.image_size,
        n_filters=profile.n_filters, n_classes=profile.n_classes, val_fraction=val_fraction(profile),
        split="tail", learning_rate=profile.learning_rate, seed=profile.seed, mixed_precision=precision,
        jit_compile=jit_compile, keep_checkpoints=1,
        # The same plain training step and initialisation as the Keras side: no augmentation,
        # weights, schedule, gradient cap, weight average or prior bias.
        augment=False, class_weight_power=0.0, lr_schedule="constant", warmup_epochs=0, clip_norm=0.0,
        ema_momentum=0.0, prior_bias=False, cache_shard_mb=0 if stream else TrainConfig.cache_shard_mb,
    )
    # A kept --work-dir may hold this run from an interrupted benchmark: train would resume its checkpoint and
    # return the old run's epochs as measured now (or count this run's compiling epoch after them).
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    try:
        history = train(config)  # the same rows as the run's metrics.json
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(output, ignore_errors=True)
    seconds = [row["epoch_seconds"] for row in history]
    val_seconds = [row["val_seconds"] for row in history]
    images = workers * (profile.train_frames // workers)  # Ray's equal split: rows every epoch sees
    last = history[-1]
    return {
        "epoch_seconds": seconds,
        "images_per_s": [images / value for value in seconds[1:]],
        "train_only_images_per_s": [images / (total - val) for total, val in zip(seconds[1:], val_seconds[1:])],
        "val_seconds": val_seconds,
        "loss": last["loss"], "pixel_accuracy": last["pixel_accuracy"], "mean_iou": last["mean_iou"],
        "val_loss": last["val_loss"], "val_mean_iou": last["val_mean_iou"],
        "weights_in_sync": last["weights_in_sync"], "wall_seconds": wall,
        "jit_compile": all(row["jit_compile"] for row in history),  # the product may decline XLA
        "shard_in_memory": all(row["shard_in_memory"] for row in history),
    }


def peak_run(profile):
    best, rates = flops.matmul_peak(profile.peak_size, profile.peak_chain, profile.peak_calls)
    return {"best": best, "rates": rates}


def alternatives_for(figures, profile, cores):
    (one, one_cpus), (two, two_cpus) = layouts(cores)
    ray_one, ray_two = f"ray_{one}x{one_cpus}", f"ray_{two}x{two_cpus}"
    needs = {
        "train_vs_keras": ["keras_fp32", ray_one],
        "mwms_2x1_vs_1x2": [ray_one, ray_two],
        "train_flops_vs_peak": [ray_one, "peak"],
        "bf16_vs_fp32": ["keras_fp32", "keras_bf16"] + ([ray_one, f"{ray_one}_bf16"] if profile.product_bf16 else []),
        "xla_vs_graph": [ray_one, f"{ray_one}_xla"],
        "shard_memory_vs_stream": [ray_one, f"{ray_one}_stream"],
    }
    needs = {figure: needs[figure] for figure in figures}
    wanted = {alternative for alternatives in needs.values() for alternative in alternatives}
    order = ["keras_fp32", ray_one, "keras_bf16", ray_two, f"{ray_one}_xla", f"{ray_one}_stream", f"{ray_one}_bf16",
             "peak"]
    return [alternative for alternative in order if alternative in wanted], needs, ray_one, ray_two


def measure(profile, frames_dir, work, cores, figures, log):
    """Run the rounds and return one record per selected training figure; a figure whose alternative
    failed gets a record with `error`, the others are measured still."""
    alternatives, needs, ray_one, ray_two = alternatives_for(figures, profile, cores)
    (one, one_cpus), (two, two_cpus) = layouts(cores)
    train = None
    if any(name.startswith("keras") for name in alternatives):
        train, _ = split_arrays(frames_dir, profile)
    runners = {
        "keras_fp32": lambda r: keras_run(profile, train, "off"),
        "keras_bf16": lambda r: keras_run(profile, train, "bf16"),
        ray_one: lambda r: ray_run(profile, frames_dir, work, one, one_cpus, "off", False, f"{ray_one}-r{r}"),
        ray_two: lambda r: ray_run(profile, frames_dir, work, two, two_cpus, "off", False, f"{ray_two}-r{r}"),
        f"{ray_one}_bf16": lambda r: ray_run(profile, frames_dir, work, one, one_cpus, "bf16", False,
                                             f"{ray_one}-bf16-r{r}"),
        f"{ray_one}_xla": lambda r: ray_run(profile, frames_dir, work, one, one_cpus, "off", True,
                                            f"{ray_one}-xla-r{r}"),
        f"{ray_one}_stream": lambda r: ray_run(profile, frames_dir, work, one, one_cpus, "off", False,
                                               f"{ray_one}-stream-r{r}", stream=True),
        "peak": lambda r: peak_run(profile),
    }
    runs, errors = {name: [] for name in alternatives}, {}
    for round_index in range(profile.repeats):
        for name in alternated(alternatives, round_index):
            if name in errors:  # failed in an earlier round: its figures are lost anyway
                continue
            log(f"[bench] training round {round_index + 1}/{profile.repeats}: {name}")
            try:
                runs[name].append(runners[name](round_index))
            except Exception as error:  # noqa: BLE001  one broken alternative must not hide the other figures
                traceback.print_exc()
                errors[name] = f"{name}: {type(error).__name__}: {error}"
                continue
            log(f"[bench]   {summary(runs[name][-1])}")

    model = unet_model((*profile.image_size, 3), profile.n_filters, profile.n_classes)
    context = Context(profile, runs, ray_one, ray_two, flops.training_flops_per_image(model), cores)
    tf.keras.backend.clear_session()
    builders = {"train_vs_keras": context.train_vs_keras, "mwms_2x1_vs_1x2": context.mwms,
                "train_flops_vs_peak": context.flops_vs_peak, "bf16_vs_fp32": context.bf16,
                "xla_vs_graph": context.xla, "shard_memory_vs_stream": context.shard_memory}
    records = []
    for figure in (figure for figure in TRAINING_FIGURES if figure in figures):
        failed = [errors[name] for name in needs[figure] if name in errors]
        records.append({"name": figure, "ratio": None, "error": "; ".join(failed)} if failed else builders[figure]())
    return records


def summary(run):
    if "best" in run:
        return f"peak {run['best'] / 1e9:.1f} GFLOP/s"
    return (f"epoch seconds {[round(value, 2) for value in run['epoch_seconds']]}, steady images/s "
            f"{median(run['images_per_s']) or float('nan'):.2f}, final loss {run['loss']:.4f}")


def pooled(runs, key="images_per_s"):
    return [value for run in runs for value in run[key]]


def round_ratios(numerator_runs, denominator_runs):
    return [ratio(median(a["images_per_s"]), median(b["images_per_s"]))
            for a, b in zip(numerator_runs, denominator_runs)]


class Context:
    """Turns the rounds' runs into the figures' JSON records."""

    def __init__(self, profile, runs, ray_one, ray_two, train_flops, cores):
        self.profile, self.runs, self.ray_one, self.ray_two = profile, runs, ray_one, ray_two
        self.train_flops, self.cores = train_flops, cores

    def config(self, **extra):
        p = self.profile
        return {
            "profile": p.name, "image_size": list(p.image_size), "n_filters": p.n_filters,
            "batch_size_per_worker": p.batch_size, "train_frames_per_epoch": p.train_frames,
            "val_frames": p.val_frames, "epochs_per_run": p.epochs, "steady_epochs_counted_per_run": p.epochs - 1,
            "repeats": p.repeats, "data": "generated 640x480 CARLA-layout scenes, preprocessed to image_size",
            **extra,
        }

    def ips(self, name):
        return median(pooled(self.runs[name])) if self.runs.get(name) else None

    def train_vs_keras(self):
        ray_runs, keras_runs = self.runs[self.ray_one], self.runs["keras_fp32"]
        ray_ips, keras_ips = self.ips(self.ray_one), self.ips("keras_fp32")
        train_only_ips = median(pooled(ray_runs, "train_only_images_per_s"))
        return {
            "name": "train_vs_keras",
            "ratio": ratio(ray_ips, keras_ips),
            "ray_train_images_per_s": ray_ips,
            "keras_fit_images_per_s": keras_ips,
            "round_ratios": round_ratios(ray_runs, keras_runs),
            "ratio_train_only": ratio(train_only_ips, keras_ips),
            "ray_train_val_seconds": median([value for run in ray_runs for value in run["val_seconds"][1:]]),
            "ray_train_epoch_seconds": [run["epoch_seconds"] for run in ray_runs],
            "keras_fit_epoch_seconds": [run["epoch_seconds"] for run in keras_runs],
            "ray_train_run_wall_seconds": [run["wall_seconds"] for run in ray_runs],
            "method": (f"images/s over steady epochs (first epoch of every run dropped), median over epochs and "
                       f"rounds. Ray Train: 1 worker x {self.cores} CPUs, its reported epoch_seconds as is, which "
                       f"include validating {self.profile.val_frames} frames once per epoch (nothing subtracted). "
                       f"Keras: model.fit in the driver process, {self.cores} threads, tf.data from in-memory "
                       f"arrays of the same frames, no validation. ratio_train_only subtracts from every "
                       f"Ray Train epoch the validation seconds the product reports for it (val_seconds)."),
            "goal": ">= 0.95",
            "config": self.config(layout=f"1x{self.cores}"),
        }

    def mwms(self):
        two_runs, one_runs = self.runs[self.ray_two], self.runs[self.ray_one]
        return {
            "name": "mwms_2x1_vs_1x2",
            "ratio": ratio(self.ips(self.ray_two), self.ips(self.ray_one)),
            f"images_per_s_{self.ray_two[4:]}": self.ips(self.ray_two),
            f"images_per_s_{self.ray_one[4:]}": self.ips(self.ray_one),
            "round_ratios": round_ratios(two_runs, one_runs),
            "epoch_seconds_two_workers": [run["epoch_seconds"] for run in two_runs],
            "epoch_seconds_one_worker": [run["epoch_seconds"] for run in one_runs],
            "weights_in_sync_two_workers": all(run["weights_in_sync"] for run in two_runs),
            "method": ("the product's training path (Ray Train; two workers all-reduce under "
                       "MultiWorkerMirroredStrategy, one worker runs without a strategy), same global "
                       "images per epoch; two workers take half each with per-worker batch "
                       f"{self.profile.batch_size}; steady-epoch epoch_seconds (incl. validation)"),
            "goal": ">= 0.85",
            "config": self.config(layouts=[self.ray_two[4:], self.ray_one[4:]]),
        }

    def flops_vs_peak(self):
        peaks = [run["best"] for run in self.runs["peak"]]
        peak = max(peaks)
        achieved = self.train_flops * self.ips(self.ray_one)
        keras_ips, bf16_ips = self.ips("keras_fp32"), self.ips(f"{self.ray_one}_bf16")
        p = self.profile
        return {
            "name": "train_flops_vs_peak",
            "ratio": ratio(achieved, peak),
            "achieved_gflops": achieved / 1e9,
            "peak_gflops": peak / 1e9,
            "peak_gflops_per_round": [value / 1e9 for value in peaks],
            "training_gflop_per_image": self.train_flops / 1e9,
            "ray_train_images_per_s": self.ips(self.ray_one),
            "keras_fit_ratio": ratio(self.train_flops * keras_ips, peak) if keras_ips else None,
            # The product's default on CPUs with native bfloat16 (--mixed-precision auto), against
            # the same fp32 peak: what a user's run reaches on this machine.
            "ray_train_bf16_ratio": ratio(self.train_flops * bf16_ips, peak) if bf16_ips else None,
            "method": (f"achieved = training FLOPs per image (layer count, training = 3 x forward) x the "
                       f"1x{self.cores} Ray Train images/s (its epoch_seconds include validation, whose FLOPs "
                       f"are not counted: a slight underestimate); peak = best of {p.peak_calls} calls per round "
                       f"of one tf.function chaining {p.peak_chain} fp32 {p.peak_size}x{p.peak_size} matmuls"),
            "goal": ">= 0.75",
            "config": self.config(layout=f"1x{self.cores}", peak_matmul=[p.peak_chain, p.peak_size]),
        }

    def bf16(self):
        fp32_runs, bf16_runs = self.runs["keras_fp32"], self.runs["keras_bf16"]
        steps = self.profile.epochs * math.ceil(self.profile.train_frames / self.profile.batch_size)
        final = {}
        for label, runs in (("fp32", fp32_runs), ("bf16", bf16_runs)):
            for key in ("loss", "pixel_accuracy", "mean_iou"):
                final[f"{label}_final_{key}"] = median([run[key] for run in runs])
        record = {
            "name": "bf16_vs_fp32",
            "ratio": ratio(self.ips("keras_bf16"), self.ips("keras_fp32")),
            "fp32_images_per_s": self.ips("keras_fp32"),
            "bf16_images_per_s": self.ips("keras_bf16"),
            "round_ratios": round_ratios(bf16_runs, fp32_runs),
            **final,
            "loss_relative_change": ratio(final["bf16_final_loss"] - final["fp32_final_loss"],
                                          final["fp32_final_loss"]),
            "steps": steps,
            "method": ("plain Keras fit, mixed_bfloat16 policy (logits layer stays float32) vs float32; same "
                       "seed, initial weights and data order; accuracy impact = final training loss / pixel "
                       f"accuracy / mIoU after the same {steps} steps (a short run: small differences are noise)"),
            "goal": ">= 1.8 on CPUs with AVX512-BF16 or AMX; final loss within a few % of fp32",
            "config": self.config(policy="mixed_bfloat16"),
        }
        product_bf16 = self.runs.get(f"{self.ray_one}_bf16")
        if product_bf16:
            product_fp32 = self.runs[self.ray_one]
            record["product"] = {
                "ratio": ratio(self.ips(f"{self.ray_one}_bf16"), self.ips(self.ray_one)),
                "fp32_images_per_s": self.ips(self.ray_one),
                "bf16_images_per_s": self.ips(f"{self.ray_one}_bf16"),
                **{f"{label}_final_{key}": median([run[key] for run in runs])
                   for label, runs in (("fp32", product_fp32), ("bf16", product_bf16))
                   for key in ("loss", "pixel_accuracy", "val_loss", "val_mean_iou")},
                "method": f"Ray Train 1x{self.cores}, --mixed-precision bf16 vs off, steady-epoch epoch_seconds",
            }
        return record

    def xla(self):
        xla_runs, graph_runs = self.runs[f"{self.ray_one}_xla"], self.runs[self.ray_one]
        return {
            "name": "xla_vs_graph",
            "ratio": ratio(self.ips(f"{self.ray_one}_xla"), self.ips(self.ray_one)),
            "xla_images_per_s": self.ips(f"{self.ray_one}_xla"),
            "graph_images_per_s": self.ips(self.ray_one),
            "round_ratios": round_ratios(xla_runs, graph_runs),
            "epoch_seconds_xla": [run["epoch_seconds"] for run in xla_runs],
            "epoch_seconds_graph": [run["epoch_seconds"] for run in graph_runs],
            "xla_used": all(run["jit_compile"] for run in xla_runs),
            "method": (f"the product, Ray Train 1 worker x {self.cores} CPUs, float32, TrainConfig.jit_compile True "
                       "(the default: training step XLA-compiled) vs False (a tf.function graph, as in the other "
                       "Ray Train figures); steady-epoch epoch_seconds (incl. validation, never XLA-compiled), "
                       "the first epoch, which compiles, dropped"),
            "goal": ">= 1.3 on CPU",
            "config": self.config(layout=f"1x{self.cores}"),
        }

    def shard_memory(self):
        memory_runs, stream_runs = self.runs[self.ray_one], self.runs[f"{self.ray_one}_stream"]
        return {
            "name": "shard_memory_vs_stream",
            "ratio": ratio(self.ips(self.ray_one), self.ips(f"{self.ray_one}_stream")),
            "memory_images_per_s": self.ips(self.ray_one),
            "stream_images_per_s": self.ips(f"{self.ray_one}_stream"),
            "round_ratios": round_ratios(memory_runs, stream_runs),
            "epoch_seconds_memory": [run["epoch_seconds"] for run in memory_runs],
            "epoch_seconds_stream": [run["epoch_seconds"] for run in stream_runs],
            "first_epoch_seconds_memory": median([run["epoch_seconds"][0] for run in memory_runs]),
            "first_epoch_seconds_stream": median([run["epoch_seconds"][0] for run in stream_runs]),
            "feeds_as_labelled": (all(run["shard_in_memory"] for run in memory_runs)
                                  and not any(run["shard_in_memory"] for run in stream_runs)),
            "method": (f"the product, Ray Train 1 worker x {self.cores} CPUs, float32, no XLA: the training shard "
                       "read once into the worker's memory (the default, cache_shard_mb 1024) vs streamed from "
                       "Ray Data every epoch (cache_shard_mb 0); steady-epoch epoch_seconds (incl. validation), "
                       "the first epoch dropped from the ratio and reported apart"),
            "goal": "> 1 (informational)",
            "config": self.config(layout=f"1x{self.cores}"),
        }
