"""python -m jobs.quickstart: the whole product on this machine in a few minutes.

Generates synthetic CARLA scenes, trains the U-Net on 2 Ray workers, batch-infers masks for
frames the model never saw, and evaluates them — then says where every artifact is.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

from distributed.config import EvaluateConfig, InferConfig, TrainConfig, refuse_relative_output, refuse_uri
from jobs import argument_parser, run_command
from unet_core.data import IMAGE_DIR


def parse_args(argv=None):
    parser = argument_parser("quickstart", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/quickstart",
                        help="directory for the scenes, the run, the masks and the report (default: %(default)s)")
    parser.add_argument("--epochs", type=int, help="default: 4, or 3 with --smoke")
    parser.add_argument("--scene-count", type=int,
                        help="frames to train and validate on; default: 256, or 24 with --smoke")
    parser.add_argument("--new-frames", type=int, default=32,
                        help="unseen frames to infer and evaluate (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model and data: about a minute instead of several (flags given still apply)")
    args = parser.parse_args(argv)
    if not args.output.strip():  # made absolute, it would name the working directory: the run would land there
        parser.error("--output is empty (an unset shell variable?); leave the flag out for "
                     f"{parser.get_default('output')}")
    if args.new_frames < 1:  # --epochs and --scene-count are TrainConfig's to check
        parser.error(f"--new-frames must be at least 1, got {args.new_frames}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return run_command(lambda: run(args), "the same command goes on where it stopped (training resumes from its "
                                          "last checkpoint; inference skips the images already written)")


def train_config(args, output):
    """The quickstart's run, shrunk by --smoke, then --epochs and --scene-count if given."""
    # Two workers, to show data-parallel training (MultiWorkerMirroredStrategy) at work; a lone
    # worker would train faster here (README, Training).
    config = TrainConfig(output=os.path.join(output, "train"), epochs=4, num_workers=2, cpus_per_worker=1,
                         batch_size=4, scene_count=256)
    config = config.smoke() if args.smoke else config
    given = {"epochs": args.epochs, "scene_count": args.scene_count}
    return dataclasses.replace(config, **{key: value for key, value in given.items() if value is not None})


def forget_predictions_beyond(new_frames, count, inferred):
    """Before a rerun with fewer --new-frames drops the extra frames, drop the predictions: inference
    would keep the earlier run's rows and masks of those frames beside this run's. In this order, a
    run stopped between the two still finds more frames than it wants, and does it again."""
    images = os.path.join(new_frames, IMAGE_DIR)
    if os.path.isdir(images) and len(os.listdir(images)) > count and os.path.exists(inferred):
        shutil.rmtree(inferred)


def forget_predictions_of_another_model(inferred, model):
    """Before inference with a model a rerun has trained further (more --epochs), drop the predictions
    of the model before: inference keeps and skips those, so the masks would be another model's than
    the one the summary names and the evaluation scores."""
    from distributed import ingest, inference_output, model_io

    try:
        made_by = inference_output.Output(*ingest.open_root(inferred)).models()
    except ValueError:
        return  # a damaged part: jobs.infer names it, and says how to go on
    if not made_by:
        return
    with open(model, "rb") as file:
        identity = model_io.model_identity(file.read(), model)
    if {model_io.weights_of(made) for made in made_by} - {model_io.weights_of(identity)}:
        shutil.rmtree(inferred)


def run(args):
    started = time.time()
    # Checked as given: made absolute, s3://b/x would name a local folder ./s3:/b/x.
    refuse_uri("output", args.output)
    refuse_relative_output(args.output, "--output")
    output = os.path.abspath(args.output)
    config = train_config(args, output)
    # TensorFlow and Ray take seconds to import: after the flags are checked.
    from distributed import evaluation, run_directory
    from distributed.inference import infer
    from distributed.training import train

    run_directory.check_run_identity(config, new_run="another --output")  # train() would name --run-name too
    train(config)

    new_frames, inferred = os.path.join(output, "new_frames"), os.path.join(output, "inference")
    forget_predictions_beyond(new_frames, args.new_frames, inferred)
    # Another seed: unseen scenes.
    run_directory.write_scene_set(new_frames, args.new_frames, config.seed + 1)
    model = os.path.join(config.output, "model.keras")
    forget_predictions_of_another_model(inferred, model)
    summary = infer(InferConfig(model=model, input=os.path.join(new_frames, IMAGE_DIR), output=inferred,
                                overlay=True))
    report = EvaluateConfig(model=model, data=new_frames, output=os.path.join(output, "evaluation"))
    metrics = evaluation.evaluate(report)
    print(evaluation.iou_table(metrics))
    scores = f"pixel accuracy {metrics['pixel_accuracy']:.3f}, mIoU {metrics['mean_iou']:.3f}"
    print(f"""
quickstart finished in {time.time() - started:.0f} s
  training curves   {config.output}/curves.png, {config.output}/tensorboard/ (written as each epoch ended)
  previews          {config.output}/previews.png  (input | true | predicted)
  model             {model}
  predictions       {output}/inference/predictions/*.parquet  ({summary['ok'] + summary['skipped']} frames)
  masks, overlays   {output}/inference/masks/, {output}/inference/overlays/
  evaluation        {output}/evaluation/  ({scores})""")
    print(json.dumps({"pixel_accuracy": metrics["pixel_accuracy"], "mean_iou": metrics["mean_iou"], **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
