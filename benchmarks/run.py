"""Speed benchmarks: python -m benchmarks.run [--quick] [--tiny] [--only NAMES] [--cache DIR].

Prints one JSON line per figure on stdout (progress and Ray's logs go to stderr), each with
"name", "ratio", the measured values, "method", "goal", "config", the machine and its load:

  train_vs_keras            Ray Train 1 worker × all cores ÷ plain Keras fit, images/s
  mwms_2x1_vs_1x2           Ray Train 2 workers × 1 thread ÷ 1 worker × 2 threads, images/s
  train_flops_vs_peak       achieved training FLOP/s (Ray Train) ÷ fp32 matmul peak FLOP/s
  bf16_vs_fp32              mixed_bfloat16 ÷ float32 training images/s, and final losses
  xla_vs_graph              Ray Train 1 worker × all cores, XLA-compiled ÷ not, images/s
  shard_memory_vs_stream    Ray Train 1 worker, training shard held in memory ÷ streamed every epoch
  infer_vs_predict          distributed.inference.infer ÷ bare model.predict, images/s
  infer_memory_5000_vs_500  peak memory of `python -m jobs.infer` on 5000 frames ÷ on 500

No flag: the full run (tens of minutes on 2 cores; use a quiet machine). --quick: the same model
and batch with fewer frames, epochs and rounds (about 10 minutes; the memory figure compares
1000 with 100 frames). --tiny: a tiny model and image size, seconds per figure, for the smoke
test only: its numbers mean nothing. Generated frames are cached in --cache across runs. Without
--only, bf16_vs_fp32 is left out on a CPU without native bfloat16, where it would emulate it.
The method of every figure is in BENCHMARKS.md.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import traceback

from benchmarks import frames
from benchmarks.common import INFERENCE_FIGURES, PROFILES, TRAINING_FIGURES, machine, rounded

FIGURES = TRAINING_FIGURES + INFERENCE_FIGURES


def figure_names(text):
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FIGURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown figure(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(FIGURES)}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 10 minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="tiny model and data: for the smoke test only")
    parser.add_argument("--only", type=figure_names,
                        help="comma-separated figure names (default: all, but bf16_vs_fp32 only on a CPU that "
                             "computes bfloat16 natively)")
    parser.add_argument("--cache", default=frames.DEFAULT_CACHE,
                        help="generated frames, kept across runs (default: %(default)s)")
    parser.add_argument("--work-dir", help="scratch space, kept (training run directories are deleted as each "
                                           "run ends); default: a temporary directory, removed at the end")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    overrides = parser.add_argument_group("override the profile")
    overrides.add_argument("--repeats", type=int, help="rounds of the training alternatives")
    overrides.add_argument("--epochs", type=int, help="epochs per training run (the first is not counted)")
    overrides.add_argument("--train-frames", type=int, help="training images per epoch")
    overrides.add_argument("--infer-frames", type=int)
    overrides.add_argument("--infer-repeats", type=int)
    overrides.add_argument("--memory-frames", type=int, nargs=2, metavar=("SMALL", "LARGE"))
    overrides.add_argument("--product-bf16", action=argparse.BooleanOptionalAction,
                           help="also time Ray Train with --mixed-precision bf16")
    parser.add_argument("--infer-num-actors", type=int,
                        help="default: the cores divided by --infer-cpus-per-actor, as jobs.infer's --num-actors "
                             "auto on its own local Ray (one actor per core)")
    parser.add_argument("--infer-cpus-per-actor", type=int,
                        help="default: all cores divided among the actors")
    args = parser.parse_args(argv)
    args.left_out = None
    if args.only is None:
        args.only = FIGURES
        from distributed import runtime

        if not runtime.cpu_computes_bfloat16():  # as --mixed-precision auto decides
            # Emulated, bfloat16 took 12x as long per epoch (AVX2 EPYC), one Keras run of --quick over 10 minutes
            # on a Zen 3 (70 s in float32): for a precision the product never picks on such a CPU.
            args.left_out = "bf16_vs_fp32: this CPU has no native bfloat16 (AVX512-BF16 or AMX); --only names it"
            args.only = tuple(name for name in FIGURES if name != "bf16_vs_fp32")
    if args.epochs is not None and args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is never counted")
    for name in ("repeats", "train_frames", "infer_frames", "infer_repeats", "infer_num_actors",
                 "infer_cpus_per_actor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.memory_frames and not 0 < args.memory_frames[0] < args.memory_frames[1]:
        parser.error("--memory-frames needs 0 < SMALL < LARGE")
    if "mwms_2x1_vs_1x2" in args.only and args.train_frames == 1:  # failed once the 1-worker run was measured
        parser.error("--train-frames must be at least 2 for mwms_2x1_vs_1x2: one frame per worker")
    # The local Ray that main starts holds cores + 1 CPUs: actors beyond it never start, and infer refused them
    # only once the figures before had run, naming jobs.infer's flags, which this command does not have.
    cores = os.cpu_count() or 1
    args.infer_num_actors = actors = args.infer_num_actors or max(1, cores // (args.infer_cpus_per_actor or 1))
    args.infer_cpus_per_actor = cpus_per_actor = args.infer_cpus_per_actor or max(1, cores // actors)
    # Only infer_vs_predict's actors: the memory figure runs jobs.infer with its own --num-actors auto.
    if "infer_vs_predict" in args.only and not os.environ.get("RAY_ADDRESS") and actors > (cores + 1) // cpus_per_actor:
        parser.error(f"--infer-num-actors {actors} × --infer-cpus-per-actor {cpus_per_actor}: the local Ray "
                     f"holds {cores + 1} CPUs ({cores} cores + 1), so {(cores + 1) // cpus_per_actor} actor(s) at "
                     f"most; lower either flag")
    # "$DIR" unset: the working directory, or no file; an empty --work-dir, a temporary one removed at the end
    for flag, path in (("--cache", args.cache), ("--out", args.out), ("--work-dir", args.work_dir)):
        if path is not None and not path.strip():
            parser.error(f"{flag} is empty (an unset shell variable?); pass a path or leave the flag out")
    # Made here, not as the frames render in spawned processes or the run starts (a file or a read-only place
    # there ended the command in a traceback); before --out is opened, which may lie inside either.
    made = []  # what this command made, removed if it is refused after all: a refused command leaves nothing behind

    def refuse(message):
        for directory in reversed(made):
            shutil.rmtree(directory, ignore_errors=True)
        parser.error(message)

    for flag, path, directory in (("--cache", args.cache, os.path.join(args.cache, "frames")),
                                  ("--work-dir", args.work_dir, args.work_dir)):
        if not path:
            continue
        if new := first_missing(directory):
            made.append(new)  # before makedirs, which may fail with part of it made
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:
            refuse(f"{flag} {path}: cannot make a directory there ({error.strerror or error})")
    if args.out:  # opened only as each figure ends: a bad path would end the run after its first measurement
        try:
            with open(args.out, "a"):
                pass
        except OSError as error:
            refuse(f"--out {args.out}: cannot append to it ({error.strerror or error})")
    return args


def first_missing(directory):
    """The outermost folder of `directory` that does not exist yet (what makedirs would make), or None."""
    directory, missing = os.path.abspath(directory), None
    while not os.path.lexists(directory):
        directory, missing = os.path.dirname(directory), directory
    return missing


def build_profile(args):
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    changes = {field: getattr(args, field) for field in (
        "repeats", "epochs", "train_frames", "infer_frames", "infer_repeats", "product_bf16")
        if getattr(args, field) is not None}
    if args.memory_frames:
        changes["memory_frames"] = tuple(args.memory_frames)
    return dataclasses.replace(profile, **changes)


def frames_needed(profile, figures):
    counts = []
    if set(figures) & set(TRAINING_FIGURES):
        counts.append(profile.train_frames + profile.val_frames)
    if "infer_vs_predict" in figures:
        counts.append(profile.infer_frames)
    if "infer_memory_5000_vs_500" in figures:
        counts.extend(profile.memory_frames)
    return counts


def main(argv=None):
    args = parse_args(argv)
    profile = build_profile(args)
    figures = [name for name in FIGURES if name in args.only]
    cores = os.cpu_count() or 1
    description = machine()
    load_at_start = os.getloadavg()[0]
    stdout = sys.stdout
    failed = []

    def log(message):
        print(message, file=sys.stderr, flush=True)

    def emit(record):
        record = {**record, "machine": description, "load_average_1m": [load_at_start, os.getloadavg()[0]]}
        line = json.dumps(rounded(record))
        print(line, file=stdout, flush=True)
        if args.out:
            with open(args.out, "a") as file:
                file.write(line + "\n")

    def stage(names, measure):
        try:
            records = measure()
        except Exception as error:  # noqa: BLE001  one broken figure must not hide the others
            traceback.print_exc()
            failed.extend(names)
            records = [{"name": name, "ratio": None, "error": f"{type(error).__name__}: {error}"} for name in names]
        else:  # a figure measure() gave up on itself
            failed.extend(record["name"] for record in records if "error" in record)
        for record in records:
            emit(record)

    work = args.work_dir or tempfile.mkdtemp(prefix="unet-ray-bench-")
    os.makedirs(work, exist_ok=True)
    log(f"[bench] profile {profile.name}: {', '.join(figures)}; frames cache {args.cache}; work {work}")
    if args.left_out:
        log(f"[bench] left out {args.left_out}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
            # Frames first: rendering runs in spawned processes, before TensorFlow starts its threads.
            try:
                frames.ensure_frames(args.cache, max(frames_needed(profile, figures)), log)
            except OSError as error:  # was the rendering pool's traceback, and no line for any figure
                log(f"[bench] --cache {args.cache}: cannot write the frames there ({error}); make room or pass "
                    f"another --cache")
                return 2  # as the jobs' out-of-room at start: the place given cannot serve, nothing was measured
            from distributed import runtime

            # This process's Keras and predict baselines get all cores, as the 1-worker runs do.
            runtime.configure_tensorflow_threads(cores)
            if set(figures) & {*TRAINING_FIGURES, "infer_vs_predict"}:
                try:
                    runtime.connect(num_cpus=cores + 1)
                except ValueError as error:  # a RAY_ADDRESS no cluster answers at: was a traceback
                    log(f"[bench] {error}")
                    return 2

            training = [name for name in TRAINING_FIGURES if name in figures]
            if training:
                from benchmarks import training as training_figures

                view = frames.view(args.cache, profile.train_frames + profile.val_frames)
                stage(training, lambda: training_figures.measure(profile, view, work, cores, training, log))
            from benchmarks import inference

            if "infer_vs_predict" in figures:
                stage(["infer_vs_predict"], lambda: [inference.infer_vs_predict(
                    profile, args.cache, work, cores, log, args.infer_num_actors, args.infer_cpus_per_actor)])
            if "infer_memory_5000_vs_500" in figures:
                runtime.disconnect()  # the job starts its own Ray; this one's idle processes only take memory
                stage(["infer_memory_5000_vs_500"], lambda: [inference.infer_memory(profile, args.cache, work, log)])
    except KeyboardInterrupt:  # Ctrl-C: the commands' exit 130 and a word, not Ray's traceback
        log("interrupted: the figures printed are whole; the frames rendered stay in --cache for the next run")
        return 130
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        log(f"[bench] failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
