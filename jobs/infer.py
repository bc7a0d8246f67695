"""Batch inference on Ray: python -m jobs.infer --model M --input DIR/URI --output DIR.

Writes under --output: predictions/*.parquet whatever --formats (a row per image, the record a
rerun goes by; the mask's PNG bytes in it with --formats parquet), masks/ with --formats png (the
default is both), errors/*.parquet when an image failed, and overlays/ with --overlay. A rerun
skips the images already predicted there and retries the failed ones, and must keep their
--input, --formats, --overlay, --output-size and a model of the same input size and classes.
The last line printed is a JSON summary {"ok": N, "failed": N, "skipped": N}.
"""

import argparse
import dataclasses
import json
import sys

from distributed.config import OUTPUT_SIZES, InferConfig
from jobs import argument_parser, run_command


def formats(text):
    return tuple(part.strip() for part in text.split(",") if part.strip())


def actors(text):
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None


def parse_args(argv=None):
    parser = argument_parser("infer", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file, or a training run's --output directory")
    parser.add_argument("--input", required=True, help="directory or URI of PNG/JPEG images (searched recursively)")
    parser.add_argument("--output", required=True, help="directory or URI for the results")
    # The defaults are InferConfig's, written once there.
    defaults = {field.name: field.default for field in dataclasses.fields(InferConfig)}
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="images per model call (default: %(default)s)")
    parser.add_argument("--num-actors", type=actors, default=defaults["num_actors"],
                        help="model replicas, one per Ray actor, or auto: one per --cpus-per-actor CPUs (per GPU "
                             "with --use-gpu) of the nodes alive when the job starts, at most one per batch "
                             "(default: auto)")
    parser.add_argument("--cpus-per-actor", type=int, default=defaults["cpus_per_actor"],
                        help="CPUs each actor asks Ray for, and the TensorFlow threads it runs (default: %(default)s)")
    parser.add_argument("--formats", type=formats, default=defaults["formats"],
                        help=f"parquet (mask bytes in the table), png (masks/ files), or both: parquet,png "
                             f"(default: {','.join(defaults['formats'])})")
    parser.add_argument("--output-size", choices=OUTPUT_SIZES, default=defaults["output_size"],
                        help="masks at each image's own size (source) or at the model's input size "
                             "(default: %(default)s)")
    parser.add_argument("--rows-per-file", type=int, default=defaults["rows_per_file"],
                        help="rows per Parquet part; the last part of a run may hold fewer (default: %(default)s)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--overlay", action="store_true", help="also write masks blended over the images")
    parser.add_argument("--fail-on-error", action="store_true",
                        help="exit 1 when any image failed (unreadable, or its files unwritable)")
    return parser.parse_args(argv)


def main(argv=None):
    def work():
        config = InferConfig(**vars(parse_args(argv)))
        from distributed import inference  # TensorFlow and Ray: seconds to import, so after the flags

        summary = inference.infer(config)
        print(json.dumps(summary), flush=True)
        return 1 if config.fail_on_error and summary["failed"] else 0

    return run_command(work, "the same command goes on, skipping the images already written")


if __name__ == "__main__":
    sys.exit(main())
