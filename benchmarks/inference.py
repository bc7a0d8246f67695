"""Batch-inference throughput: python -m benchmarks.inference [--frames 200] [--num-actors 1].

Renders synthetic 640×480 frames and saves an untrained U-Net of the training defaults (weights
do not change the cost), then times one `infer` run into a fresh output and a second run that
finds everything done. Prints one JSON line with frames per second.
"""

import argparse
import json
import os
import tempfile
import time

from distributed import inference, runtime
from distributed.config import TrainConfig
from unet_core import scenes, unet_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--overlay", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    defaults = TrainConfig()
    with tempfile.TemporaryDirectory() as directory:
        model_path = os.path.join(directory, "model.keras")
        unet_model((*defaults.image_size, 3), defaults.n_filters, defaults.n_classes).save(model_path)
        scenes.write_scenes(os.path.join(directory, "frames"), args.frames)
        config = inference.InferConfig(
            model=model_path, input=os.path.join(directory, "frames", "CameraRGB"),
            output=os.path.join(directory, "out"), batch_size=args.batch_size, num_actors=args.num_actors,
            cpus_per_actor=args.cpus_per_actor, overlay=args.overlay,
        )
        runtime.connect(num_cpus=args.num_actors * args.cpus_per_actor + 1)
        started = time.perf_counter()
        first = inference.infer(config)
        predict_seconds = time.perf_counter() - started
        started = time.perf_counter()
        second = inference.infer(config)
        resume_seconds = time.perf_counter() - started
    print(json.dumps({
        "frames": args.frames, "num_actors": args.num_actors, "cpus_per_actor": args.cpus_per_actor,
        "batch_size": args.batch_size, "overlay": args.overlay, "first_run": first, "rerun": second,
        "seconds": round(predict_seconds, 2), "frames_per_second": round(args.frames / predict_seconds, 2),
        "rerun_seconds": round(resume_seconds, 2),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
