"""python -m jobs.train: train the U-Net on Ray (local, or the cluster in RAY_ADDRESS).

The last line printed is the metrics of the epoch model.keras holds (the best val mIoU) as one
JSON object, with the number of epochs trained.
"""

import argparse
import dataclasses
import json
import sys

from distributed.config import LR_SCHEDULES, PRECISIONS, PRESETS, SPLITS, SettingError, TrainConfig
from jobs import argument_parser, run_command


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser():
    presets = {name: TrainConfig.from_preset(name) for name in PRESETS}
    parser = argument_parser("train", description=__doc__)
    parser.set_defaults(**{field: None for field in presets["default"].to_dict()})

    # What a flag whose default is None stands for when left out ("None" read as a value to pass).
    left_out = {"data": "scenes generated into OUTPUT", "storage_path": "OUTPUT/ray_results",
                "val_data": "a split of --data", "warmup_epochs": "a thirtieth of --epochs"}

    def with_default(flag, help_text):
        """The help text, then the flag's default, and the classic preset's value where it differs."""
        field = flag.removeprefix("--").replace("-", "_")
        default, classic = getattr(presets["default"], field), getattr(presets["classic"], field)
        shown = f"default: {left_out[field] if default is None else default}"
        shown += f"; --preset classic: {classic}" if classic != default else ""
        return f"{help_text} ({shown})".strip()

    def option(flag, help_text="", **kwargs):
        parser.add_argument(flag, help=with_default(flag, help_text), **kwargs)

    option("--data", "CARLA-layout directory or URI (s3://, gs://, ...)")
    option("--output", "run directory")
    option("--run-name", "rerun with the same name and storage path to resume")
    option("--storage-path", "where Ray Train keeps checkpoints; s3:// or gs:// on a cluster")
    option("--num-workers", type=int)
    option("--cpus-per-worker", type=int)
    option("--use-gpu", "one GPU per worker", action="store_true", default=None)
    option("--image-size", metavar=("H", "W"), type=int, nargs=2)
    option("--n-filters", type=int)
    option("--n-classes", type=int)
    option("--val-data", "CARLA-layout directory or URI to validate on; every frame of --data then trains")
    option("--val-fraction", type=float)
    option("--split", "hash: stable random by name; tail: last frames by name", choices=SPLITS)
    option("--max-failures", "worker failures to recover from; -1: no limit", type=int)
    option("--seed", type=int)
    option("--mixed-precision", "auto: bf16 on hardware with native bfloat16", choices=PRECISIONS)
    option("--jit-compile", "XLA-compile the training step of a lone worker; on CPU in float32 only",
           action=argparse.BooleanOptionalAction)
    option("--cache-shard-mb", "a worker holds its training shard in memory up to this size; 0: stream every epoch",
           type=int)
    option("--skip-bad", "train without unreadable frames (listed in OUTPUT/skipped.json)", action="store_true",
           default=None)
    option("--scene-count", "frames to generate when --data is not given", type=int)
    option("--checkpoint-every", "epochs between checkpoints; the last epoch always saves one", type=int)
    recipe = parser.add_argument_group("recipe (set together by --preset; any flag overrides it)")
    recipe.add_argument("--preset", choices=tuple(PRESETS), default="default", help="(default: %(default)s)")
    for flag, kwargs in (
        ("--epochs", dict(type=int)),
        ("--batch-size", dict(type=int, help="per worker")),
        ("--learning-rate", dict(type=float)),
        ("--lr-schedule", dict(choices=LR_SCHEDULES)),
        ("--warmup-epochs", dict(type=int, help="before the cosine decay")),
        ("--clip-norm", dict(type=float, help="cap on the global gradient norm; 0: none")),
        ("--ema-momentum", dict(type=float, help="score and export a moving average of the weights; 0: raw")),
        ("--prior-bias", dict(action=argparse.BooleanOptionalAction,
                              help="start the logits' bias at the log class frequencies")),
        ("--augment", dict(action=argparse.BooleanOptionalAction)),
        ("--class-mix", dict(type=float,
                             help="chance a frame gets another's classes pasted in (with --augment); 0: off")),
        ("--class-weight-power", dict(type=float, help="0: plain loss")),
        ("--early-stopping-patience", dict(type=int, help="0: never")),
    ):
        recipe.add_argument(flag, **{**kwargs, "help": with_default(flag, kwargs.get("help", ""))})
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model and data, no XLA: a run in under a minute, mostly Ray and TensorFlow "
                             "starting (flags given still apply)")
    return parser


def config_from_args(args):
    """The preset, shrunk by --smoke, then every flag given: a flag always wins."""
    overrides = {key: value for key, value in vars(args).items()
                 if value is not None and key not in ("smoke", "preset")}
    config = TrainConfig.from_preset(args.preset)
    # First: --smoke's shorter run could refuse such a flag for another reason, hiding this one.
    refuse_flags_without_effect(args, dataclasses.replace(config, **{
        key: value for key, value in overrides.items() if key in ("val_data", "lr_schedule", "augment", "data")}))
    try:
        return dataclasses.replace(config.smoke() if args.smoke else config, **overrides)
    except SettingError as error:
        if args.smoke and args.epochs is None and error.field == "warmup_epochs":
            # The epochs it names came from --smoke, not from a flag the user gave.
            raise SettingError(error.field, f"{error.problem} (--smoke trains {config.smoke().epochs} epochs; "
                                            f"give --epochs for more)") from None
        if args.smoke and args.scene_count is None and error.field == "scene_count":
            # So do the scenes: `--smoke --num-workers 20` was refused as "--scene-count 24", a flag not given.
            raise SettingError(error.field, f"{error.problem} (--smoke generates {config.smoke().scene_count}; "
                                            f"give --scene-count for more)") from None
        raise


def refuse_flags_without_effect(args, config):
    """A flag the run would ignore is a mistake in the command: refused, so it is not believed.
    `config` needs only the settings that decide it (--val-data, --lr-schedule, --augment, --data)."""
    def from_preset(setting, field):  # named as the user gave it: the flag, or the preset that set it
        return setting if getattr(args, field) is not None else f"--preset {args.preset} ({setting})"

    for flag, given, ignored_with in (
        ("--val-fraction", args.val_fraction, config.val_data and "--val-data (every frame of --data trains)"),
        ("--split", args.split, config.val_data and "--val-data (every frame of --data trains)"),
        ("--warmup-epochs", args.warmup_epochs,
         config.lr_schedule == "constant" and from_preset("--lr-schedule constant", "lr_schedule")),
        ("--class-mix", args.class_mix, not config.augment and from_preset("--no-augment", "augment")),
        ("--scene-count", args.scene_count, config.data and "--data (scenes are generated only without it)"),
    ):
        if given and ignored_with:
            raise ValueError(f"{flag} has no effect with {ignored_with}: pass one or the other")


def main(argv=None):
    def work():
        config = config_from_args(parse_args(argv))
        # Imported once the flags are good: TensorFlow and Ray take seconds to import.
        from distributed import training

        history = training.train(config)
        best = history[training.best_epoch_index(history)]
        print(json.dumps({**{key: value for key, value in best.items() if not isinstance(value, dict)},
                          "epochs_trained": len(history)}))
        return 0

    return run_command(work, "the same command resumes from the run's last checkpoint (one every "
                             "--checkpoint-every epochs), or starts afresh if none was saved yet")


if __name__ == "__main__":
    sys.exit(main())
