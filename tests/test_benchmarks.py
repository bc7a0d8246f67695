"""The benchmark harness: the FLOP counter, and --tiny runs printing all eight figures (no timings checked)."""

import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import INFERENCE_FIGURES, TRAINING_FIGURES
from tests.test_model import CLASSIC_UNET

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"train_vs_keras", "mwms_2x1_vs_1x2", "train_flops_vs_peak", "bf16_vs_fp32", "xla_vs_graph",
           "shard_memory_vs_stream",
           "infer_vs_predict", "infer_memory_5000_vs_500"}


def test_flop_counter_gives_15_1_gflop_per_default_training_image():
    from benchmarks import flops
    from distributed.config import TrainConfig
    from unet_core import unet_model

    defaults = TrainConfig()
    assert defaults.image_size == (96, 128) and defaults.n_filters == 32
    model = unet_model((*defaults.image_size, 3), defaults.n_filters, defaults.n_classes)
    assert flops.training_flops_per_image(model) / 1e9 == pytest.approx(15.1, abs=0.2)
    # Forward, from the exercise's layer table: a kernel of k²·Cin·Cout weights (its parameters less its Cout
    # biases) multiplies and adds once per output pixel, per input pixel for a stride-2 transposed convolution.
    expected = 0
    for kind, (height, width, channels_out), parameters in CLASSIC_UNET:
        if kind in ("Conv2D", "Conv2DTranspose"):
            pixels = height * width // (4 if kind == "Conv2DTranspose" else 1)
            expected += 2 * pixels * (parameters - channels_out) + height * width * channels_out
    assert flops.forward_flops_per_image(model) == expected


def test_the_predict_baseline_keeps_class_ids_as_infer_does_not_every_score():
    import numpy as np

    from benchmarks import inference
    from unet_core import unet_model

    model = unet_model((32, 48, 3), n_filters=4, n_classes=23)
    images = np.random.default_rng(0).random((3, 32, 48, 3), np.float32)
    class_ids = inference.class_ids_model(model).predict(images, verbose=0)
    assert class_ids.dtype == np.uint8 and class_ids.shape == (3, 32, 48)
    np.testing.assert_array_equal(class_ids, np.argmax(model.predict(images, verbose=0), axis=-1))


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--tiny"], "argument --tiny: not allowed with argument --quick"),
    (["--infer-cpus-per-actor", "0"], "--infer-cpus-per-actor must be at least 1"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--train-frames", "1"], "--train-frames must be at least 2 for mwms_2x1_vs_1x2: one frame per worker"),
])
def test_the_harness_refuses_a_size_it_cannot_honour(argv, message, capsys):
    from benchmarks import run

    with pytest.raises(SystemExit) as refused:
        run.parse_args(argv)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_the_harness_refuses_an_out_it_cannot_append_to_before_measuring(tmp_path, capsys):
    from benchmarks import run

    for out, reason in ((tmp_path / "missing" / "figures.jsonl", "No such file or directory"),
                        (tmp_path, "Is a directory")):
        with pytest.raises(SystemExit) as refused:
            run.parse_args(["--out", str(out), "--cache", str(tmp_path / "cache")])
        assert refused.value.code == 2 and f"--out {out}: cannot append to it ({reason})" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before anything was made


def test_the_harness_takes_an_out_inside_the_work_dir_or_cache_it_makes(tmp_path):
    from benchmarks import run

    for flag in ("--work-dir", "--cache"):
        out = tmp_path / flag.strip("-") / "figures.jsonl"  # the folder is new: the command makes it
        args = run.parse_args([flag, str(out.parent), "--out", str(out)] + (["--cache", str(tmp_path / "c")]
                                                                            if flag == "--work-dir" else []))
        assert args.out == str(out) and out.is_file()


def test_a_refused_command_leaves_nothing_it_made_behind(tmp_path, capsys):
    from benchmarks import run

    (tmp_path / "afile").write_text("")
    missing = tmp_path / "missing" / "figures.jsonl"
    for argv, reason in ((["--work-dir", str(tmp_path / "afile")], "cannot make a directory there (File exists)"),
                         (["--out", str(missing)], "cannot append to it (No such file or directory)")):
        with pytest.raises(SystemExit) as refused:  # refused for the flag given, once --cache was made
            run.parse_args(["--cache", str(tmp_path / "new" / "cache")] + argv)
        assert refused.value.code == 2 and f"{argv[0]} {argv[1]}: {reason}" in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as refused:  # nor an empty --out, when --cache is refused
        run.parse_args(["--cache", str(tmp_path / "afile"), "--out", str(tmp_path / "figures.jsonl")])
    assert refused.value.code == 2
    assert f"--cache {tmp_path / 'afile'}: cannot make a directory there (Not a directory)" in capsys.readouterr().err
    assert not (tmp_path / "figures.jsonl").exists()


def test_the_harness_refuses_a_cache_or_work_dir_that_cannot_be_a_directory(tmp_path, capsys):
    from benchmarks import run

    (tmp_path / "afile").write_text("")
    for flag, reason in (("--cache", "Not a directory"), ("--work-dir", "File exists")):
        with pytest.raises(SystemExit) as refused:
            run.parse_args([flag, str(tmp_path / "afile")])
        assert refused.value.code == 2
        assert f"{flag} {tmp_path / 'afile'}: cannot make a directory there ({reason})" in capsys.readouterr().err


@pytest.mark.parametrize("argv, most", [(["--infer-cpus-per-actor", "8"], 0), (["--infer-num-actors", "4"], 3)])
def test_the_harness_refuses_more_inference_actors_than_its_local_ray_holds(argv, most, tmp_path, monkeypatch, capsys):
    from benchmarks import run

    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as refused:  # not once the training figures have run, naming jobs.infer's flags
        run.parse_args(argv + ["--cache", str(tmp_path / "cache")])
    assert refused.value.code == 2
    assert f"holds 3 CPUs (2 cores + 1), so {most} actor(s) at most" in capsys.readouterr().err
    # Figures that start no actor of infer_vs_predict's take the flags as they are.
    others = tuple(name for name in run.FIGURES if name != "infer_vs_predict")
    assert run.parse_args(argv + ["--only", ",".join(others), "--cache", str(tmp_path / "cache")]).only == others


def test_a_cache_that_fills_while_frames_render_is_one_line_naming_it(small_disk, tmp_path, capsys):
    from benchmarks import run

    # 18 frames of 640x480 do not fit in 2 MiB.
    code = run.main(["--tiny", "--only", "bf16_vs_fp32", "--cache", str(small_disk), "--work-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"[bench] --cache {small_disk}: cannot write the frames there ([Errno 28] No space left on device" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("native", [False, True])
def test_bf16_vs_fp32_is_measured_by_default_only_where_the_cpu_computes_bfloat16(native, small_disk, tmp_path,
                                                                                 monkeypatch, capsys):
    from benchmarks import run
    from distributed import runtime

    monkeypatch.setattr(runtime, "cpu_computes_bfloat16", lambda: native)  # the rule --mixed-precision auto uses
    others = tuple(name for name in run.FIGURES if name != "bf16_vs_fp32")
    assert run.parse_args([]).only == (run.FIGURES if native else others)
    assert run.parse_args(["--only", "bf16_vs_fp32"]).only == ("bf16_vs_fp32",)  # asked for, measured anyway
    # Said as the run starts (here one that stops at once: its cache takes no frames).
    assert run.main(["--tiny", "--cache", str(small_disk), "--work-dir", str(tmp_path)]) == 2
    said = "[bench] left out bf16_vs_fp32: this CPU has no native bfloat16 (AVX512-BF16 or AMX); --only names it"
    assert (said in capsys.readouterr().err) is not native


def test_ctrl_c_exits_130_with_a_word_and_no_traceback(tmp_path, monkeypatch, capsys):
    from benchmarks import frames, run

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(frames, "ensure_frames", interrupted)
    try:
        code = run.main(["--tiny", "--only", "infer_memory_5000_vs_500", "--cache", str(tmp_path / "cache")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left benchmarks.run as a traceback")
    assert code == 130 and "interrupted: the figures printed are whole" in capsys.readouterr().err


def test_a_ray_address_no_cluster_answers_at_is_one_line_naming_it(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--tiny", "--only", "bf16_vs_fp32",
             "--cache", str(tmp_path / "cache")],
            cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=300,
        )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"[bench] RAY_ADDRESS={address}: no Ray cluster answers there (Connection refused)" in completed.stderr
    assert "Traceback" not in completed.stderr and completed.stdout == ""


@pytest.mark.parametrize("flag", ["--cache", "--out", "--work-dir"])
def test_the_harness_refuses_an_empty_path(flag, tmp_path, monkeypatch, capsys):
    from benchmarks import run

    # An empty --cache put the frames here; an empty --out wrote no file, unsaid; an empty --work-dir had the
    # scratch space the flag keeps be a temporary one, removed at the end.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        run.parse_args(["--cache", str(tmp_path / "cache"), flag, ""])
    assert refused.value.code == 2 and f"{flag} is empty (an unset shell variable?)" in capsys.readouterr().err


def test_a_failing_training_alternative_loses_only_the_figures_that_need_it(tmp_path, monkeypatch, capsys):
    from benchmarks import training
    from benchmarks.common import PROFILES
    from unet_core import scenes

    tiny = PROFILES["tiny"]
    scenes.write_scenes(tmp_path, tiny.train_frames + tiny.val_frames, seed=0)

    def product_fails(*args, **kwargs):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(training, "ray_run", product_fails)  # the Ray Train alternatives; Keras and peak run
    records = training.measure(tiny, str(tmp_path), str(tmp_path / "work"), 2, ["train_flops_vs_peak", "bf16_vs_fp32"],
                               lambda line: None)
    by_name = {record["name"]: record for record in records}
    assert by_name["train_flops_vs_peak"] == {"name": "train_flops_vs_peak", "ratio": None,
                                              "error": "ray_1x2: RuntimeError: the cluster went away"}
    assert by_name["bf16_vs_fp32"]["ratio"] > 0  # measured all the same
    assert "RuntimeError: the cluster went away" in capsys.readouterr().err  # the traceback, for the reader

    # Such a figure fails the command as a figure that raised does.
    from benchmarks import frames, run
    from distributed import runtime

    monkeypatch.setattr(frames, "ensure_frames", lambda *args: None)
    monkeypatch.setattr(frames, "view", lambda cache, count: str(tmp_path))
    monkeypatch.setattr(runtime, "connect", lambda **kwargs: None)
    monkeypatch.setattr(runtime, "configure_tensorflow_threads", lambda cores: None)  # TF runs here already
    assert run.main(["--tiny", "--only", "train_flops_vs_peak", "--cache", str(tmp_path / "cache")]) == 1
    output = capsys.readouterr()
    assert json.loads(output.out)["error"] == "ray_1x2: RuntimeError: the cluster went away"
    assert "[bench] failed: train_flops_vs_peak" in output.err


def test_a_kept_work_dir_never_hands_one_profile_the_model_of_another(tmp_path):
    import dataclasses

    from benchmarks import inference
    from benchmarks.common import PROFILES
    from distributed import model_io

    tiny = PROFILES["tiny"]
    larger = dataclasses.replace(tiny, image_size=(64, 96), n_filters=8)  # as --quick after --tiny, smaller
    for profile in (tiny, larger, tiny):
        model = model_io.load_model(inference.save_model(profile, str(tmp_path)))
        assert model.input_shape[1:3] == profile.image_size, profile


def test_the_harness_has_the_eight_figures_in_its_two_groups():
    assert set(TRAINING_FIGURES) | set(INFERENCE_FIGURES) == FIGURES
    assert len(TRAINING_FIGURES) + len(INFERENCE_FIGURES) == len(FIGURES)


# The training figures, then the inference ones: two runs, which pytest -n can hand to two workers. The second
# measures memory after disconnecting the Ray it predicted on, as a whole run does.
@pytest.mark.parametrize("figures", [TRAINING_FIGURES, INFERENCE_FIGURES], ids=["training", "inference"])
def test_a_tiny_run_of_each_group_prints_its_figures_with_a_numeric_ratio(figures, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--only", ",".join(figures),
         "--cache", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
         "--out", str(tmp_path / "figures.jsonl")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    records = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]  # stdout: JSON only
    assert [record["name"] for record in records] == list(figures)
    for record in records:
        assert isinstance(record["ratio"], (int, float)) and math.isfinite(record["ratio"]), record
        assert record["ratio"] > 0 and record["goal"] and record["config"]["profile"] == "tiny", record
    saved = [json.loads(line) for line in (tmp_path / "figures.jsonl").read_text().splitlines()]
    assert saved == records
    by_name = {record["name"]: record for record in records}
    if figures == TRAINING_FIGURES:
        assert "fp32_final_loss" in by_name["bf16_vs_fp32"] and "bf16_final_loss" in by_name["bf16_vs_fp32"]
        assert by_name["xla_vs_graph"]["xla_used"], by_name["xla_vs_graph"]  # tiny is float32, one worker
        assert by_name["shard_memory_vs_stream"]["feeds_as_labelled"], by_name["shard_memory_vs_stream"]
        # Training only: the product's own validation seconds taken out.
        keras = by_name["train_vs_keras"]
        assert keras["ratio_train_only"] > keras["ratio"] > 0 < keras["ray_train_val_seconds"], keras
    else:
        memory = by_name["infer_memory_5000_vs_500"]
        assert memory["frames_small"] < memory["frames_large"]
        costs = by_name["infer_vs_predict"]["cpu_ms_per_image"]
        steps = ["decode", "resize_and_scale", "mask_to_source_size", "class_counts", "encode_mask_png"]
        assert all(costs[step] > 0 for step in steps + ["decode_with_pillow"]), costs
        assert costs["product_total"] == pytest.approx(sum(costs[step] for step in steps), abs=1e-3)


def test_a_training_run_left_in_a_kept_work_dir_is_never_resumed(tmp_path, monkeypatch):
    from benchmarks import training
    from benchmarks.common import PROFILES
    from distributed import training as product

    # What an interrupted benchmark left: train resumed its checkpoint and returned that run's epochs as measured.
    left = tmp_path / "ray" / "ray_1x2-r0"
    left.mkdir(parents=True)
    (left / "checkpoint").write_text("")
    found = []

    def fake_train(config):
        found.append(os.path.exists(config.output))
        os.makedirs(config.output, exist_ok=True)
        row = {"epoch_seconds": 2.0, "val_seconds": 0.5, "loss": 1.0, "pixel_accuracy": 0.5, "mean_iou": 0.1,
               "val_loss": 1.0, "val_mean_iou": 0.1, "weights_in_sync": True, "jit_compile": False,
               "shard_in_memory": True}
        return [row, row]

    monkeypatch.setattr(product, "train", fake_train)
    run = training.ray_run(PROFILES["tiny"], str(tmp_path / "frames"), str(tmp_path), 1, 2, "off", False, "ray_1x2-r0")
    assert found == [False] and not left.exists() and run["images_per_s"] == [8.0]


def test_a_memory_run_left_in_a_kept_work_dir_is_not_resumed(tmp_path, monkeypatch):
    from benchmarks import frames, inference, memory
    from benchmarks.common import PROFILES

    profile = PROFILES["tiny"]
    for count in profile.memory_frames:  # as a failed or interrupted run left them: the job skipped their frames
        (tmp_path / f"memory-{count}-r0").mkdir()
    found = []

    def fake_run_sampled(command, log_path, env=None):
        output = command[command.index("--output") + 1]
        found.append(os.path.exists(output))
        os.makedirs(output, exist_ok=True)
        count = int(os.path.basename(output).split("-")[1])
        return {"returncode": 0, "seconds": 1.0, "peak_rss_mb": 100.0 + count, "peak_pss_mb": 50.0,
                "max_processes": 3, "summary": {"ok": count}}

    monkeypatch.setattr(frames, "view", lambda cache, count: str(tmp_path / "frames"))
    monkeypatch.setattr(inference, "save_model", lambda profile, work: "model.keras")
    monkeypatch.setattr(memory, "run_sampled", fake_run_sampled)
    record = inference.infer_memory(profile, str(tmp_path / "cache"), str(tmp_path), lambda message: None)
    assert found == [False, False] and record["ratio"] == pytest.approx(124 / 108)


def test_every_pair_of_alternatives_swaps_which_runs_first_from_one_round_to_the_next():
    # Always timing one of a figure's pair first would hand it the warm (or the cold) machine every round.
    from benchmarks.common import PROFILES, alternated
    from benchmarks.training import alternatives_for

    alternatives, needs, _, _ = alternatives_for(TRAINING_FIGURES, PROFILES["full"], 2)
    rounds = [alternated(alternatives, round_index) for round_index in range(4)]
    assert all(sorted(order) == sorted(alternatives) for order in rounds) and len(alternatives) == 8
    for figure, compared in needs.items():
        for first, second in itertools.combinations(compared, 2):
            firsts = [order.index(first) < order.index(second) for order in rounds]
            assert firsts == [firsts[0], not firsts[0]] * 2, (figure, first, second)


def test_a_ratio_over_nothing_measured_is_no_number_rather_than_an_error():
    from benchmarks.common import ratio
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, 0.0) is None and ratio(3.0, None) is None and ratio(None, 2.0) is None


def test_ensure_frames_renders_only_the_missing_frames_in_runs_of_at_most_chunk(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from benchmarks import frames
    directory = tmp_path / "frames"
    for index in (0, 1, 2, 7):  # cached; frame 3 lost its mask, so it renders again
        for sub in ("CameraRGB", "CameraMask"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
            (directory / sub / f"scene_{index:06d}.png").write_bytes(b"")
    (directory / "CameraRGB" / "scene_000003.png").write_bytes(b"")
    rendered = []

    class InProcessPool:  # records the chunks instead of spawning processes to render them
        def __init__(self, processes):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, function, chunks):
            rendered.extend(chunks)

    monkeypatch.setattr(frames.multiprocessing, "get_context", lambda method: SimpleNamespace(Pool=InProcessPool))
    monkeypatch.setattr(frames, "CHUNK", 2)
    assert frames.ensure_frames(str(tmp_path), 9, log=lambda line: None) == str(directory)
    assert rendered == [(str(directory), 3, 2), (str(directory), 5, 2), (str(directory), 8, 1)]
