"""Score a model on labelled frames: python -m jobs.evaluate --model M --data DIR --output OUT.

Prints a per-class IoU table; the last line printed is the metrics as one JSON object. Writes
metrics.json, per_class_iou.csv, per_frame.csv, confusion_matrix.png, previews.png and
worst_frames.png (the frames of lowest pixel accuracy: mislabelled pairs and unseen kinds of
scene show up there) into --output.
"""

import argparse
import json
import sys

from jobs import run_command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file, or a training run's --output directory")
    parser.add_argument("--data", required=True, help="CARLA-layout directory or URI (CameraRGB/, CameraMask/)")
    parser.add_argument("--output", required=True, help="directory for the report")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per model call (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from distributed import evaluation  # TensorFlow and Ray: seconds to import, so after the flags

    def work():
        metrics = evaluation.evaluate(args.model, args.data, args.output, args.batch_size)
        print(evaluation.iou_table(metrics))
        print(json.dumps(metrics), flush=True)
        return 0

    return run_command(work, "the same command scores the frames again")


if __name__ == "__main__":
    sys.exit(main())
