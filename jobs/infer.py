"""Batch inference on Ray: python -m jobs.infer --model M --input DIR/URI --output DIR.

Writes predictions/*.parquet, masks/, errors/*.parquet (and overlays/) under --output; a rerun
skips the images already predicted there and retries the failed ones, and must keep their
--formats, --overlay and --output-size. The last line printed is a JSON summary
{"ok": N, "failed": N, "skipped": N}.
"""

import argparse
import json
import sys

from distributed.config import FORMATS, OUTPUT_SIZES, InferConfig


def formats(text):
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jobs.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file, or a training run's --output directory")
    parser.add_argument("--input", required=True, help="directory or URI of PNG/JPEG images (searched recursively)")
    parser.add_argument("--output", required=True, help="directory or URI for the results")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-actors", type=int, default=1, help="model replicas, one per Ray actor")
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--overlay", action="store_true", help="also write masks blended over the images")
    parser.add_argument("--formats", type=formats, default=FORMATS,
                        help="parquet (mask bytes in the table), png (masks/ files), or both: parquet,png")
    parser.add_argument("--fail-on-error", action="store_true",
                        help="exit 1 when any image failed (unreadable, or its files unwritable)")
    parser.add_argument("--output-size", choices=OUTPUT_SIZES, default="source",
                        help="masks at each image's own size (source) or at the model's input size")
    parser.add_argument("--rows-per-file", type=int, default=1000,
                        help="rows per Parquet part (the last part of a run may hold fewer)")
    return parser.parse_args(argv)


def main(argv=None):
    try:
        config = InferConfig(**vars(parse_args(argv)))
        from distributed import inference  # TensorFlow and Ray: seconds to import, so after the flags

        summary = inference.infer(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the same command goes on, skipping the images already written", file=sys.stderr)
        return 130  # the shell's code for a job ended by Ctrl-C
    print(json.dumps(summary), flush=True)
    return 1 if config.fail_on_error and summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
