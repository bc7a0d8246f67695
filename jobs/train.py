"""python -m jobs.train: train the U-Net on Ray (local, or the cluster in RAY_ADDRESS)."""

import argparse
import json
import sys

from distributed.config import TrainConfig


def parse_args(argv=None):
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    parser.add_argument("--data", help="CARLA-layout directory or URI (s3://, gs://, ...); "
                        "default: generate synthetic scenes into the run directory")
    parser.add_argument("--output", default=defaults.output, help="run directory (default: %(default)s)")
    parser.add_argument("--run-name", default=defaults.run_name, help="rerun with the same name to resume")
    parser.add_argument("--storage-path", help="where Ray Train keeps checkpoints; use s3:// or gs:// "
                        "on a cluster (default: OUTPUT/ray_results)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per worker")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--cpus-per-worker", type=int, default=defaults.cpus_per_worker)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=defaults.image_size)
    parser.add_argument("--n-filters", type=int, default=defaults.n_filters)
    parser.add_argument("--n-classes", type=int, default=defaults.n_classes)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--max-failures", type=int, default=defaults.max_failures)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--mixed-precision", choices=("off", "bf16", "fp16"), default=defaults.mixed_precision)
    parser.add_argument("--skip-bad", action="store_true", help="train without unreadable frames "
                        "(listed in OUTPUT/skipped.json) instead of stopping")
    parser.add_argument("--scene-count", type=int, default=defaults.scene_count,
                        help="frames to generate when --data is not given")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data: a run in seconds")
    return parser.parse_args(argv)


def config_from_args(args):
    fields = {key: value for key, value in vars(args).items() if key != "smoke"}
    config = TrainConfig(**fields)
    return config.smoke() if args.smoke else config


def main(argv=None):
    from distributed.training import train

    try:
        config = config_from_args(parse_args(argv))
        history = train(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: value for key, value in history[-1].items() if not isinstance(value, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
