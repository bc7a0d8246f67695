"""What every figure shares: the size profiles, medians, the machine's description."""

import os
import statistics
from dataclasses import dataclass

# The figures, in the order a run measures them.
TRAINING_FIGURES = ("train_vs_keras", "mwms_2x1_vs_1x2", "train_flops_vs_peak", "bf16_vs_fp32", "xla_vs_graph",
                    "shard_memory_vs_stream")
INFERENCE_FIGURES = ("infer_vs_predict", "infer_memory_5000_vs_500")


@dataclass(frozen=True)
class Profile:
    """How big one benchmark run is. `full` is the default, `quick` and `tiny` shrink it."""

    name: str
    image_size: tuple[int, int]
    n_filters: int
    batch_size: int  # per worker, as in TrainConfig
    train_frames: int  # images per epoch (all workers together)
    val_frames: int  # validated once per epoch by the Ray Train path (kept small on purpose)
    epochs: int  # per run; the first (tracing/compiling) epoch is never counted
    repeats: int  # rounds of every alternative, interleaved
    peak_size: int  # the fp32 matmul peak: `peak_chain` chained size×size matmuls in one tf.function
    peak_chain: int
    peak_calls: int  # timed calls per round (after one warm-up); the best counts
    # Bulk inference is for millions of frames: enough of them that ~10 s of actor start-up and
    # model loading weighs as little as it does in real use.
    infer_frames: int
    infer_repeats: int
    memory_frames: tuple[int, int]  # (small, large) input counts of the inference memory figure
    memory_repeats: int
    product_bf16: bool  # also time Ray Train with --mixed-precision bf16 (one more run per round)
    n_classes: int = 23
    learning_rate: float = 1e-3
    seed: int = 0


PROFILES = {
    "full": Profile(
        name="full", image_size=(96, 128), n_filters=32, batch_size=32, train_frames=256, val_frames=16,
        epochs=5, repeats=3, peak_size=2048, peak_chain=8, peak_calls=5, infer_frames=5000, infer_repeats=3,
        memory_frames=(500, 5000), memory_repeats=2, product_bf16=True,
    ),
    "quick": Profile(
        name="quick", image_size=(96, 128), n_filters=32, batch_size=32, train_frames=128, val_frames=8,
        epochs=3, repeats=2, peak_size=2048, peak_chain=8, peak_calls=5, infer_frames=1000, infer_repeats=2,
        memory_frames=(100, 1000), memory_repeats=1, product_bf16=False,
    ),
    "tiny": Profile(
        name="tiny", image_size=(32, 48), n_filters=4, batch_size=4, train_frames=16, val_frames=2,
        epochs=2, repeats=1, peak_size=512, peak_chain=4, peak_calls=2, infer_frames=16, infer_repeats=1,
        memory_frames=(8, 24), memory_repeats=1, product_bf16=False,
    ),
}


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rounded(value, digits=4):
    """Floats rounded for the JSON lines, recursively."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def alternated(items, round_index):
    """The alternatives in order, reversed every other round: every two of them swap which runs first, so
    neither of a figure's pair always gets the warm (or the cold) machine. (Rotating by one place a round
    left most pairs of seven or eight alternatives in one order in every round.)"""
    return list(items) if round_index % 2 == 0 else list(items)[::-1]


def machine():
    """CPU model, cores and memory, read from /proc."""
    model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    memory_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "avx512f": "avx512f" in flags.split(),
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "amx_bf16": "amx_bf16" in flags.split(),
    }
