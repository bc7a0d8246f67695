"""Score a model on labelled frames: python -m jobs.evaluate --model M --data DIR --output OUT.

Prints a per-class IoU table; the last line printed is the metrics as one JSON object. Writes
metrics.json, per_class_iou.csv, per_frame.csv, confusion_matrix.png, previews.png and
worst_frames.png (the frames of lowest pixel accuracy: mislabelled pairs and unseen kinds of
scene show up there) into --output.
"""

import argparse
import dataclasses
import json
import sys

from distributed.config import SPLITS, EvaluateConfig
from jobs import argument_parser, run_command


def parse_args(argv=None):
    parser = argument_parser("evaluate", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file, or a training run's --output directory")
    parser.add_argument("--data", required=True, help="CARLA-layout directory or URI (CameraRGB/, CameraMask/)")
    parser.add_argument("--output", required=True, help="directory for the report")
    defaults = {field.name: field.default for field in dataclasses.fields(EvaluateConfig)}  # written once, there
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="frames per model call (default: %(default)s)")
    parser.add_argument("--split", choices=SPLITS,
                        help="score only the frames this split holds out for validation, as jobs.train does with "
                             "the same --split and --val-fraction (default: every frame)")
    parser.add_argument("--val-fraction", type=float,
                        help=f"with --split (default: {defaults['val_fraction']}, as jobs.train)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    def work():
        if args.val_fraction is not None and args.split is None:
            raise ValueError("--val-fraction has no effect without --split: pass both, or neither")
        given = {key: value for key, value in vars(args).items() if value is not None}
        config = EvaluateConfig(**given)
        from distributed import evaluation  # TensorFlow and Ray: seconds to import, so after the flags

        metrics = evaluation.evaluate(config)
        print(evaluation.iou_table(metrics))
        print(json.dumps(metrics), flush=True)
        return 0

    return run_command(work, "the same command scores the frames again")


if __name__ == "__main__":
    sys.exit(main())
