"""Write synthetic driving scenes in CARLA's layout: python -m jobs.make_scenes --output DIR --count N."""

import os
import time

from distributed.config import refuse_relative_output, refuse_uri
from jobs import argument_parser, run_command
from unet_core.scenes import write_scenes


def parse_args(argv=None):
    parser = argument_parser("make_scenes", description=__doc__)
    parser.add_argument("--output", required=True,
                        help="directory that receives CameraRGB/ and CameraMask/; frames of the same index "
                        "already there are written over, the others stay")
    parser.add_argument("--count", type=int, default=1000, help="number of frames to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="dataset seed; frame i depends only on (seed, i) (default: %(default)s)")
    parser.add_argument("--start", type=int, default=0,
                        help="index of the first frame, to extend or split a set (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if args.seed < 0 or args.start < 0:
        parser.error("--seed and --start must be >= 0")
    if not args.output.strip():  # "$FRAMES" unset: the scenes would land in the working directory, unsaid
        parser.error("--output is empty (an unset shell variable?); pass the directory to write the scenes into")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output}: a file; it must be a directory (new or existing)")
    return args


def main(argv=None):
    args = parse_args(argv)

    def work():
        refuse_uri("output", args.output)  # written with local file calls: s3://b/x would be ./s3:/b/x
        refuse_relative_output(args.output, "--output")
        started = time.perf_counter()
        names = write_scenes(args.output, args.count, seed=args.seed, start=args.start)
        seconds = time.perf_counter() - started
        print(f"wrote {len(names)} scenes (seed {args.seed}, start {args.start}) to {args.output} "
              f"in {seconds:.1f} s ({len(names) / max(seconds, 1e-9):.1f} frames/s)")
        return 0

    return run_command(work, "every frame written is whole and paired; the same command writes them all again")


if __name__ == "__main__":
    raise SystemExit(main())
