"""The settings of a run: `TrainConfig` (one dataclass from the command line to every Ray worker),
`InferConfig` and `EvaluateConfig`. TensorFlow and Ray are not imported here, so a bad flag fails in
milliseconds."""

import dataclasses
import math
import os
from dataclasses import dataclass

from unet_core import check_input_size
from unet_core.data import MAX_CLASSES, SPLITS, validation_flags
from unet_core.scenes import scene_name

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "off", "bf16", "fp16")
FORMATS = ("parquet", "png")
OUTPUT_SIZES = ("source", "model")
DEFAULT_STORAGE = "ray_results"  # Ray Train's checkpoints, under --output unless --storage-path is given


class SettingError(ValueError):
    """A bad value of one setting. It names the field; a command names the field's flag instead,
    as its user typed that."""

    def __init__(self, field, problem):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def as_flag(self):
        return f"--{self.field.replace('_', '-')} {self.problem}"


def refuse_uri(field, path):
    """For a path read or written with local file calls: a URI there would name a local folder
    such as ./s3:/bucket/..., never the bucket."""
    if path is not None and "://" in path:
        raise SettingError(field, f"{path}: must be a local path, not a URI (URIs are for --data, --val-data, "
                                  f"--storage-path, and jobs.infer's --input and --output)")


def refuse_empty(config, remedies):
    """An empty path (`--data "$FRAMES"` with FRAMES unset) names the working directory: its images
    were predicted, or it took the output or the checkpoints, without a word. `remedies`: field →
    what to do instead."""
    for field, remedy in remedies.items():
        value = getattr(config, field)
        if value is not None and not value.strip():
            raise SettingError(field, f"is empty (an unset shell variable?); {remedy}")


def job_working_copy():
    """The copy of `ray job submit --working-dir` this process runs in, or None: Ray deletes it."""
    cwd = os.getcwd()
    marker = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"
    return cwd if marker in cwd + os.sep else None


def refuse_relative_output(path, flag):
    """A relative output of a submitted job would land in its working-dir copy, and be lost with it."""
    copy = job_working_copy()
    if copy and "://" not in path and not os.path.isabs(path):
        raise ValueError(f"{flag} {path}: a relative path, so inside this job's copy of --working-dir ({copy}), "
                         f"which Ray deletes; pass an absolute path (on the head node) or a bucket URI")


def refuse_missing_relative_input(path, flag):
    """A relative input that a submitted job cannot find: it points into the job's copy of --working-dir,
    which holds the checkout alone (not the data beside it that the user's shell sees), so a bare
    "not found" there names a file the user can see exists."""
    copy = job_working_copy()
    if copy and path and "://" not in path and not os.path.isabs(path) and not os.path.exists(path):
        raise ValueError(f"{flag} {path}: not found in this job's copy of --working-dir ({copy}), where a relative "
                         f"path points; pass an absolute path (on the head node) or a URI")


class TrainingFailed(RuntimeError):
    """A worker died or raised, and Ray Train ran out of restarts (`--max-failures`). Here, beside
    SettingError, so that a command catches it without importing TensorFlow or Ray."""


@dataclass
class TrainConfig:
    """Defaults are the `default` preset; `TrainConfig.from_preset("classic")` is the exercise's."""

    data: str | None = None  # CARLA-layout directory or URI; None = generate scenes into `output`
    # A CARLA-layout directory or URI to validate on; every frame of `data` then trains, and
    # `val_fraction` and `split` go unused. None: validate on a split of `data`.
    val_data: str | None = None
    output: str = "runs/unet"
    run_name: str = "unet"
    storage_path: str | None = None  # Ray Train's checkpoints; None = `output`/DEFAULT_STORAGE
    epochs: int = 250
    batch_size: int = 8  # per worker; the global batch is this × num_workers
    # One worker with both cores beats two with one each on a 2-core machine (XLA, no all-reduce);
    # on a cluster, one worker per GPU (--num-workers N --use-gpu).
    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: bool = False
    image_size: tuple[int, int] = (96, 128)
    n_filters: int = 32
    n_classes: int = 23
    val_fraction: float = 0.2
    # tail: the last frames by sorted name validate. Frames of a drive are a sequence whose
    # neighbours look alike, so only a held-out stretch says how the model does on roads it has
    # not seen; hash (a stable pseudo-random pick by name) suits sets of independent frames.
    split: str = "tail"
    # The recipe (see PRESETS): optimiser schedule, augmentation, class balancing, early stopping.
    learning_rate: float = 2e-3
    lr_schedule: str = "cosine"  # LR_SCHEDULES; the cosine decay starts with a linear warm-up
    # None: a thirtieth of the epochs (8 of 250), the share every measured recipe used, so that
    # `--epochs N` alone keeps the schedule's shape; short runs still warm up for one epoch.
    warmup_epochs: int | None = None
    # Without BatchNorm the peak rate can throw the first epochs off (X60's val accuracy fell from
    # 0.67 to 0.37 by epoch 5 on real frames); capping the gradient norm makes that dip far
    # shallower (0.78 at epoch 5 in X60c, RESULTS.md). 0: no cap.
    clip_norm: float = 1.0
    # Validation, checkpoint selection and the exported model use an exponential moving average
    # of the weights (Adam's `use_ema`): in four runs each scored both ways, its best pixel accuracy
    # was 0.008-0.011 above the raw weights', its best mIoU -0.003 to +0.011 (RESULTS.md).
    # 0: the raw weights. It averages over ~1/(1-m) steps, fewer early on: the momentum warms up
    # (unet_core.training.AdamWithAverageWarmup), so short runs gain from it too (RESULTS.md).
    ema_momentum: float = 0.99
    # Start the logits' bias at the log class frequencies of the training masks (RESULTS.md).
    prior_bias: bool = True
    augment: bool = True
    # Chance that a training frame gets half the classes of another frame pasted in (ClassMix;
    # needs `augment`): the regulariser that let long runs on 85 frames keep improving. 0: off.
    class_mix: float = 0.5
    class_weight_power: float = 0.5  # 0: plain loss; >0: per-pixel weights from class frequencies
    early_stopping_patience: int = 0  # epochs without a better val mIoU before stopping; 0: never
    max_failures: int = 0
    seed: int = 0
    # PRECISIONS; auto: bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else off
    mixed_precision: str = "auto"
    # XLA-compile the training step of a lone worker (XLA on CPU cannot compile MWMS's all-reduce),
    # on CPU in float32 only (XLA would compute bfloat16 in float32)
    jit_compile: bool = True
    # A worker whose training shard is at most this big (MiB, as float32 images and uint8 masks) reads
    # it once and feeds every epoch from memory; larger shards stream from Ray Data every epoch. 0: always stream.
    cache_shard_mb: int = 1024
    skip_bad: bool = False
    scene_count: int = 256  # frames generated when no --data is given
    keep_checkpoints: int = 2  # the K most recent; each carries the best epoch's weights so far
    checkpoint_every: int = 10  # and at the last epoch: what a restart resumes from
    # Fault injection for tests: the last worker raises once during this epoch (1-based); a marker file
    # in the run's storage keeps it from failing again after the restart.
    fail_once_at_epoch: int | None = None

    def __post_init__(self):
        self.image_size = tuple(self.image_size)
        refuse_empty(self, {"data": "leave the flag out to generate scenes",
                            "val_data": "leave the flag out to validate on a split of --data",
                            "output": f"leave the flag out for {TrainConfig.output}",
                            "storage_path": f"leave the flag out for OUTPUT/{DEFAULT_STORAGE}"})
        refuse_uri("output", self.output)  # model.keras, metrics.json, the plots: written as local files
        for field in dataclasses.fields(self):  # argparse's float() takes "nan" and "inf"
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingError(field.name, f"must be a finite number, got {value}")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("split", SPLITS), ("mixed_precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise SettingError(name, f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise SettingError("mixed_precision", "fp16 needs --use-gpu: a CPU computes float16 in software, "
                                                  "slower than float32; on CPUs pass auto (bf16 where the CPU "
                                                  "computes it natively) or off")
        if not 0.0 < self.val_fraction < 1.0:
            raise SettingError("val_fraction", f"must be between 0 and 1, got {self.val_fraction}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise SettingError("ema_momentum", f"must be 0 (no average) or in (0, 1), got {self.ema_momentum}")
        if self.cache_shard_mb < 0:
            raise SettingError("cache_shard_mb", f"must be 0 (always stream) or positive, got {self.cache_shard_mb}")
        if not 0.0 <= self.class_mix <= 1.0:
            raise SettingError("class_mix", f"must be a probability in [0, 1], got {self.class_mix}")
        if self.clip_norm < 0:
            raise SettingError("clip_norm", f"must be 0 (no cap) or positive, got {self.clip_norm}")
        if len(self.image_size) != 2:
            raise SettingError("image_size", f"must be a height and a width, got {self.image_size}")
        try:  # here, not in a worker after decoding the data
            check_input_size(*self.image_size, what="image_size")
        except ValueError as error:
            raise SettingError("image_size", str(error).removeprefix("image_size ")) from None
        if self.learning_rate <= 0:
            raise SettingError("learning_rate", f"must be positive, got {self.learning_rate}")
        if self.class_weight_power < 0:
            raise SettingError("class_weight_power",
                               f"must be 0 (plain loss) or positive, got {self.class_weight_power}")
        if self.early_stopping_patience < 0:
            raise SettingError("early_stopping_patience", f"must be 0 (never stop) or positive, "
                                                          f"got {self.early_stopping_patience}")
        if (not self.run_name or self.run_name.strip() != self.run_name or "/" in self.run_name
                or self.run_name in (".", "..")):
            # Ray Train would invent a new name each time (resuming nothing) or nest the run's folder.
            raise SettingError("run_name", f"must be a folder name, not empty, . or .., and without '/' or "
                                           f"surrounding spaces; got {self.run_name!r}")
        if not 0 <= self.seed < 2**32:  # the range tf.keras.utils.set_random_seed takes, in every worker
            raise SettingError("seed", f"must be from 0 to 2**32 - 1, got {self.seed}")
        if self.max_failures < -1:
            raise SettingError("max_failures", f"must be -1 (no limit), 0 or positive, got {self.max_failures}")
        for name in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "n_filters",
                     "checkpoint_every", "keep_checkpoints", "scene_count"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.data is None:  # said now, not once Ray has started and the scenes are written
            self.check_scene_count()
        if self.n_classes < 2:
            raise SettingError("n_classes", f"must be at least 2 (a background and one class), got {self.n_classes}")
        if self.n_classes > MAX_CLASSES:
            raise SettingError("n_classes", f"must be at most {MAX_CLASSES}: masks are stored as 8-bit class ids, "
                                            f"got {self.n_classes}")
        if self.fail_once_at_epoch is not None and not 1 <= self.fail_once_at_epoch <= self.epochs:
            raise SettingError("fail_once_at_epoch",
                               f"must be an epoch from 1 to {self.epochs}, got {self.fail_once_at_epoch}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise SettingError("warmup_epochs", f"must be at least 0 and less than epochs ({self.epochs}), "
                                            f"got {self.warmup_epochs}; leave it unset for a thirtieth of the epochs")

    def check_scene_count(self):
        """Enough generated scenes for a training frame per worker and a validation frame."""
        names = [scene_name(index) for index in range(self.scene_count)]
        val = 0 if self.val_data is not None else sum(validation_flags(names, self.val_fraction, self.split))
        train = self.scene_count - val
        if train < self.num_workers or (val == 0 and self.val_data is None):
            raise SettingError("scene_count", f"{self.scene_count}: the generated scenes give {train} for training "
                                              f"and {val} for validation; training needs at least {self.num_workers} "
                                              f"(one frame per worker) and validation at least 1: generate more")

    @property
    def resolved_warmup_epochs(self):
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return min(max(1, round(self.epochs / 30)), self.epochs - 1)

    @property
    def resolved_storage_path(self):
        if self.storage_path is None:
            return os.path.abspath(os.path.join(self.output, DEFAULT_STORAGE))
        # A bucket's trailing "/" would make "<uri>//<run name>", an empty key S3 refuses.
        return self.storage_path.rstrip("/") if "://" in self.storage_path else os.path.abspath(self.storage_path)

    @property
    def run_storage(self):
        """Ray Train's folder of this run's checkpoints and their record."""
        return f"{self.resolved_storage_path}/{self.run_name}"

    @property
    def storage_flag(self):
        """What names the checkpoint folder in a message: the flag given, or, without it, where it lies."""
        return "--storage-path" if self.storage_path is not None else "--output's checkpoints"

    def new_run_flags(self, output_has_results):
        """What to pass to start a new run instead of resuming this one. Another --output does only with the
        default --storage-path: given one, a run into another --output resumes the same checkpoints. An --output
        that holds results (`output_has_results`, its metrics.json) is refused to a new run: then it takes
        another --output too (run_directory.check_output_is_this_runs)."""
        if output_has_results:
            given = self.storage_path is not None
            return "another --output" + (" and another --run-name or --storage-path" if given else "")
        return f"another --run-name or --{'storage-path' if self.storage_path is not None else 'output'}"

    def to_train_afresh(self, output_has_results):
        """What to delete to train this run afresh: its checkpoints, and the record of results in --output
        (metrics.json) that a new run is refused to replace; never all of --output, which may hold --data,
        evaluations and inference outputs."""
        also = f" and {os.path.join(self.output, 'metrics.json')}" if output_has_results else ""
        return f"delete {self.run_storage}{also}"

    @classmethod
    def from_preset(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def smoke(self):
        """A tiny version of this run that trains in seconds: for local checks and tests."""
        epochs = min(self.epochs, 3)
        warmup_epochs = None if self.warmup_epochs is None else min(self.warmup_epochs, epochs - 1)
        # No XLA: compiling the training step took 17-22 s of a float32 smoke run's first epoch on a Zen 3
        # (5 s without), for 3 epochs of tiny steps it cannot speed up.
        return dataclasses.replace(
            self, image_size=(32, 48), n_filters=4, batch_size=4, scene_count=24, keep_checkpoints=1,
            epochs=epochs, warmup_epochs=warmup_epochs, jit_compile=False,
        )

    def to_dict(self):
        return dataclasses.asdict(self)


# Recipes by name. `default` (the dataclass defaults) is the best recipe found on held-out real
# CARLA frames (RESULTS.md), sized to ~15 minutes of training on the project's 2-core CPU with
# native bfloat16 (AMX: 2.8 s per epoch of the 85 frames, 250 epochs in 14 minutes): batch 8,
# flips/zoom/brightness, ClassMix, square-root class balancing, cosine decay over 250 epochs after
# 8 of warm-up, gradient norm capped at 1 (no late gain, but no collapse in the first epochs),
# logits' bias started at the class prior, scored on a moving average of the weights. The budget
# is optimizer steps: a CPU without native bfloat16 (float32, 14.5 s an epoch on a Zen 3) fits about
# 160 epochs of a network half as wide in that time (--n-filters 16: 0.867-0.875 / 0.222-0.234 against
# 0.863-0.864 / 0.210-0.212 for --epochs 60, and R8's 0.896 / 0.276 in bfloat16).
# `classic` is the Keras exercise: constant Adam 1e-3, 40 epochs, no augmentation, batch 32
# (per worker: global 32 on the default single worker), raw weights, default initialisation.
PRESETS = {
    "default": {},
    "classic": dict(epochs=40, batch_size=32, learning_rate=1e-3, lr_schedule="constant", warmup_epochs=0,
                    augment=False, class_mix=0.0, class_weight_power=0.0, early_stopping_patience=0,
                    mixed_precision="off", clip_norm=0.0, ema_momentum=0.0, prior_bias=False),
}


@dataclass
class InferConfig:
    """The settings of a batch-inference job (`jobs.infer`, `distributed.inference.infer`)."""

    model: str  # a .keras file, or a training run's output directory holding model.keras
    input: str  # directory or URI of PNG/JPEG images, listed recursively
    output: str  # directory or URI receiving predictions/, errors/, masks/, overlays/
    batch_size: int = 32
    num_actors: int | None = None  # None (--num-actors auto): as many as the cluster holds; see inference.pool_size
    cpus_per_actor: int = 1
    use_gpu: bool = False
    overlay: bool = False
    # parquet: the masks' PNG bytes go into the predictions table; png: into masks/ files.
    # The predictions table is written either way: it records what is done.
    formats: tuple[str, ...] = FORMATS
    fail_on_error: bool = False
    output_size: str = "source"  # source: masks at each image's own size; model: at the model's input size
    rows_per_file: int = 1000

    def __post_init__(self):
        self.formats = tuple(self.formats)
        refuse_empty(self, dict.fromkeys(("model", "input", "output"), "pass a path"))
        refuse_uri("model", self.model)  # TensorFlow loads it from a local file
        if not self.formats or not set(self.formats) <= set(FORMATS):
            raise SettingError("formats", f"must be one or more of {', '.join(FORMATS)}; "
                                          f"got {','.join(self.formats) or 'none'}")
        if self.output_size not in OUTPUT_SIZES:
            raise SettingError("output_size", f"must be source or model, got {self.output_size!r}")
        counts = ("batch_size", "cpus_per_actor", "rows_per_file")
        for name in counts if self.num_actors is None else ("num_actors", *counts):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")


@dataclass
class EvaluateConfig:
    """The settings of an evaluation report (`jobs.evaluate`, `distributed.evaluation.evaluate`)."""

    model: str  # a .keras file, or a training run's output directory holding model.keras
    data: str  # CARLA-layout directory or URI
    output: str  # directory for the report
    batch_size: int = 32
    # None: every frame of `data`. A split: only the frames it holds out for validation, as
    # jobs.train with the same --split and --val-fraction does.
    split: str | None = None
    val_fraction: float = 0.2

    def __post_init__(self):
        refuse_empty(self, dict.fromkeys(("model", "data", "output"), "pass a path"))
        for field in ("model", "output"):  # the model loads from, and the report goes to, local files
            refuse_uri(field, getattr(self, field))
        if self.batch_size < 1:
            raise SettingError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.split is not None and self.split not in SPLITS:
            raise SettingError("split", f"must be one of {', '.join(SPLITS)}; got {self.split!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise SettingError("val_fraction", f"must be between 0 and 1, got {self.val_fraction}")
