"""The run's settings from the command line: presets, overrides and refused values."""

import importlib
import os
import pathlib
import re

import pytest

from distributed.config import EvaluateConfig, InferConfig, TrainConfig
from jobs.train import build_parser, config_from_args, parse_args


def test_default_recipe_and_classic_preset():
    default = config_from_args(parse_args([]))
    assert default == TrainConfig()
    assert (default.epochs, default.resolved_warmup_epochs, default.batch_size, default.clip_norm,
            default.augment) == (250, 8, 8, 1.0, True)
    assert (default.ema_momentum, default.prior_bias, default.split) == (0.99, True, "tail")
    classic = config_from_args(parse_args(["--preset", "classic"]))
    # The exercise: constant Adam 1e-3, batch 32, 40 epochs, plain loss, no augmentation, no cap.
    assert (classic.epochs, classic.batch_size, classic.learning_rate) == (40, 32, 1e-3)
    assert classic.lr_schedule == "constant"
    assert (classic.augment, classic.class_weight_power, classic.clip_norm) == (False, 0.0, 0.0)
    assert (classic.ema_momentum, classic.prior_bias) == (0.0, False)  # raw weights, default init


def test_flags_override_the_preset():
    config = config_from_args(parse_args(["--preset", "classic", "--clip-norm", "0.5", "--epochs", "3",
                                          "--ema-momentum", "0.9"]))
    assert (config.clip_norm, config.epochs, config.batch_size, config.ema_momentum) == (0.5, 3, 32, 0.9)
    assert config_from_args(parse_args(["--cache-shard-mb", "0"])).cache_shard_mb == 0
    assert config_from_args(parse_args(["--val-data", "held_out"])).val_data == "held_out"


def test_bad_values_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="clip_norm"):
        TrainConfig(clip_norm=-1.0)
    with pytest.raises(ValueError, match="ema_momentum"):
        TrainConfig(ema_momentum=1.0)
    with pytest.raises(ValueError, match="cache_shard_mb"):
        TrainConfig(cache_shard_mb=-1)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        TrainConfig.from_preset("fast")
    # Refused before Ray starts, not in a worker after the data is decoded.
    with pytest.raises(ValueError, match="image_size must be a height and a width, got \\(96,\\)"):
        TrainConfig(image_size=(96,))
    for bad, hint in (([100, 128], "96×128"), ((0, 128), "16×128")):
        with pytest.raises(ValueError, match=f"image_size height and width must be positive multiples of 16 .*"
                                             f"; try {hint}"):
            TrainConfig(image_size=bad)
    with pytest.raises(ValueError, match="n_classes must be at most 256: masks are stored as 8-bit"):
        TrainConfig(n_classes=300)
    with pytest.raises(ValueError, match="n_classes must be at least 2 \\(a background and one class\\), got 1"):
        TrainConfig(n_classes=1)
    for epoch in (0, 251):
        with pytest.raises(ValueError, match=f"fail_once_at_epoch must be an epoch from 1 to 250, got {epoch}"):
            TrainConfig(fail_once_at_epoch=epoch)
    for field, value in (("learning_rate", 0.0), ("class_weight_power", -0.5), ("early_stopping_patience", -1),
                         ("max_failures", -2), ("scene_count", 0), ("keep_checkpoints", 0),
                         ("class_mix", 1.5)):  # a chance: above 1, ClassMix would silently act as 1
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value})
    for field, value, allowed in (("split", "random", "hash, tail"), ("lr_schedule", "step", "constant, cosine"),
                                  ("mixed_precision", "fp8", "auto, off, bf16, fp16")):
        with pytest.raises(ValueError, match=f"{field} must be one of {allowed}; got '{value}'"):
            TrainConfig(**{field: value})
    # Emulated on a CPU, float16 trains slower than float32; on GPUs it is what T4s and V100s compute fast.
    with pytest.raises(ValueError, match="^mixed_precision fp16 needs --use-gpu: a CPU computes float16 in software"):
        TrainConfig(mixed_precision="fp16")
    assert TrainConfig(mixed_precision="fp16", use_gpu=True).mixed_precision == "fp16"
    for field in ("learning_rate", "clip_norm", "class_weight_power", "class_mix", "val_fraction"):
        for value in (float("nan"), float("inf")):  # argparse's float() takes both
            with pytest.raises(ValueError, match=f"{field} must be a finite number, got {value}"):
                TrainConfig(**{field: value})
    for name in ("", " unet", "runs/unet", ".", ".."):  # "..": the checkpoints would land beside the run's folder
        with pytest.raises(ValueError, match=f"run_name must be a folder name, not empty, \\. or \\.\\., and without "
                                             f"'/' or surrounding spaces; got {re.escape(repr(name))}"):
            TrainConfig(run_name=name)
    for seed in (-5, 2**32):  # a worker's tf.keras.utils.set_random_seed would fail, after Ray and the data
        with pytest.raises(ValueError, match=f"seed must be from 0 to 2\\*\\*32 - 1, got {seed}"):
            TrainConfig(seed=seed)
    # An unset shell variable: --storage-path "" put the checkpoints in the working directory, --data ""
    # was named as ": not a CARLA-layout directory".
    for flag in ("--data", "--val-data", "--output", "--storage-path"):
        with pytest.raises(ValueError, match=f"{flag[2:].replace('-', '_')} is empty \\(an unset shell variable\\?\\); "
                                             f"leave the flag out"):
            config_from_args(parse_args([f"{flag}=", *(["--data", "frames"] if flag == "--val-data" else [])]))
    assert TrainConfig(image_size=[32, 48]).image_size == (32, 48)
    # jobs.infer's `--formats ""` (an unset shell variable) gives none: no mask would be written anywhere.
    with pytest.raises(ValueError, match="formats must be one or more of parquet, png; got none"):
        InferConfig(model="m.keras", input="in", output="out", formats=())


def test_a_relative_storage_path_is_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    # Ray Train's workers run elsewhere (their own working directories): a relative path would name another folder.
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(storage_path="checkpoints").run_storage == f"{tmp_path}/checkpoints/unet"
    assert TrainConfig(output="runs/a").run_storage == f"{tmp_path}/runs/a/ray_results/unet"
    assert TrainConfig(storage_path="s3://bucket/runs/").run_storage == "s3://bucket/runs/unet"


def test_a_val_fraction_that_leaves_no_frame_on_one_side_is_refused_for_given_data_too():
    # With --data (no generated scenes to count), nothing else refuses it before Ray starts and the
    # frames are decoded; 1 validates every frame and trains on none, 0 validates none.
    for fraction in (0.0, 1.0):
        for make in (lambda: TrainConfig(data="frames", val_fraction=fraction),
                     lambda: EvaluateConfig(model="run", data="frames", output="report", split="tail",
                                            val_fraction=fraction)):
            with pytest.raises(ValueError, match=f"val_fraction must be between 0 and 1, got {fraction}"):
                make()


def test_a_uri_is_refused_where_only_local_files_are_written_or_read():
    # Written or read with local file calls, a URI made a folder ./s3:/bucket/... in the working directory.
    for make, field in ((lambda uri: TrainConfig(output=uri), "output"),
                        (lambda uri: InferConfig(model=uri, input="s3://b/in", output="s3://b/out"), "model"),
                        (lambda uri: EvaluateConfig(model=uri, data="s3://b/frames", output="report"), "model"),
                        (lambda uri: EvaluateConfig(model="run", data="s3://b/frames", output=uri), "output")):
        for uri in ("s3://b/run", "file:///tmp/run"):
            with pytest.raises(ValueError, match=f"{field} {re.escape(uri)}: must be a local path, not a URI"):
                make(uri)
    # A bucket's trailing "/" made "s3://b/checkpoints//unet", an empty key S3 refuses.
    assert TrainConfig(storage_path="s3://b/checkpoints/").resolved_storage_path == "s3://b/checkpoints"


def test_a_flag_the_run_would_ignore_is_refused():
    for flags, message in (
        (["--val-data", "v", "--val-fraction", "0.5"], "--val-fraction has no effect with --val-data"),
        (["--val-data", "v", "--split", "hash"], "--split has no effect with --val-data"),
        (["--lr-schedule", "constant", "--warmup-epochs", "5"], "--warmup-epochs has no effect with --lr-schedule "
                                                                 "constant"),
        (["--preset", "classic", "--warmup-epochs", "5"], "--warmup-epochs has no effect with --preset classic "
                                                          "\\(--lr-schedule constant\\)"),
        (["--preset", "classic", "--class-mix", "0.5"], "--class-mix has no effect with --preset classic "
                                                        "\\(--no-augment\\)"),
        (["--no-augment", "--class-mix", "0.9"], "--class-mix has no effect with --no-augment"),
        # --smoke's 3 epochs would refuse 3 warm-up epochs on their own, a less apt reason.
        (["--smoke", "--lr-schedule", "constant", "--warmup-epochs", "3"], "--warmup-epochs has no effect with "
                                                                           "--lr-schedule constant"),
        (["--scene-count", "50"], "--scene-count has no effect with --data \\(scenes are generated only without it\\)"),
    ):
        with pytest.raises(ValueError, match=f"{message}.*: pass one or the other"):
            config_from_args(parse_args(["--data", "d", *flags]))
    # The same flags where they act, or given as what the run does anyway.
    assert config_from_args(parse_args(["--data", "d", "--val-data", "v"])).val_data == "v"
    given = config_from_args(parse_args(["--preset", "classic", "--lr-schedule", "cosine", "--warmup-epochs", "5"]))
    assert (given.lr_schedule, given.warmup_epochs) == ("cosine", 5)
    assert config_from_args(parse_args(["--no-augment", "--class-mix", "0"])).class_mix == 0
    assert config_from_args(parse_args(["--scene-count", "50"])).scene_count == 50


def test_smoke_shrinks_the_run_but_every_given_flag_wins():
    smoke = config_from_args(parse_args(["--smoke"]))
    assert (smoke.image_size, smoke.n_filters, smoke.batch_size, smoke.epochs) == ((32, 48), 4, 4, 3)
    assert smoke.jit_compile is False  # compiling would take most of the run
    assert config_from_args(parse_args(["--smoke", "--jit-compile"])).jit_compile is True
    given = config_from_args(parse_args(["--smoke", "--batch-size", "2", "--image-size", "64", "96",
                                         "--epochs", "5"]))
    assert (given.image_size, given.n_filters, given.batch_size, given.epochs) == ((64, 96), 4, 2, 5)
    # A flag --smoke's epochs refuse says so: the user gave no --epochs.
    with pytest.raises(ValueError, match="warmup_epochs must be at least 0 and less than epochs \\(3\\).* \\(--smoke "
                                         "trains 3 epochs; give --epochs for more\\)"):
        config_from_args(parse_args(["--smoke", "--warmup-epochs", "3"]))
    assert config_from_args(parse_args(["--smoke", "--warmup-epochs", "3", "--epochs", "4"])).warmup_epochs == 3
    # And the scenes it generates: 24, too few for 20 workers.
    with pytest.raises(ValueError, match="^scene_count 24: .* generate more \\(--smoke generates 24; give "
                                         "--scene-count for more\\)$"):
        config_from_args(parse_args(["--smoke", "--num-workers", "20"]))
    assert config_from_args(parse_args(["--smoke", "--num-workers", "20", "--scene-count", "40"])).scene_count == 40


def test_warm_up_is_a_thirtieth_of_the_epochs_unless_given():
    # Every measured recipe warmed up for ~1/30 of its epochs (2 of 60, 8 of 250, 16 of 500).
    assert [TrainConfig(epochs=n).resolved_warmup_epochs for n in (1, 2, 4, 60, 250, 500)] == [0, 1, 1, 2, 8, 17]
    assert TrainConfig(epochs=500, warmup_epochs=16).resolved_warmup_epochs == 16
    assert config_from_args(parse_args(["--epochs", "5"])).resolved_warmup_epochs == 1
    assert config_from_args(parse_args(["--smoke"])).resolved_warmup_epochs == 1
    assert config_from_args(parse_args(["--smoke", "--warmup-epochs", "2"])).resolved_warmup_epochs == 2
    with pytest.raises(ValueError, match="warmup_epochs must be at least 0 and less than epochs \\(5\\), got 8"):
        TrainConfig(epochs=5, warmup_epochs=8)


def test_too_few_generated_scenes_for_the_workers_and_the_split_are_refused_as_the_scene_count():
    with pytest.raises(ValueError, match="scene_count 2: the generated scenes give 1 for training and 1 for "
                                         "validation; training needs at least 2"):
        TrainConfig(scene_count=2, num_workers=2)
    with pytest.raises(ValueError, match="give 4 for training and 0 for validation"):
        TrainConfig(scene_count=4, split="hash", val_fraction=0.01)
    assert TrainConfig(scene_count=3, num_workers=2).scene_count == 3
    assert TrainConfig(scene_count=2, num_workers=2, val_data="held_out").scene_count == 2  # every scene trains
    assert TrainConfig(data="frames", scene_count=1, num_workers=2).data == "frames"  # no scenes generated


def test_help_gives_every_flags_default_and_the_classic_presets_value():
    helps = {action.option_strings[0]: action.help for action in build_parser()._actions}
    assert len(helps) > 30
    for flag, help_text in helps.items():
        if flag not in ("-h", "--smoke"):
            assert "(default: " in help_text, (flag, help_text)
            assert "None" not in help_text, (flag, help_text)  # read as a value to pass, which argparse refuses
    assert helps["--epochs"] == "(default: 250; --preset classic: 40)"
    assert helps["--warmup-epochs"] == "before the cosine decay (default: a thirtieth of --epochs; --preset classic: 0)"
    assert helps["--augment"] == "(default: True; --preset classic: False)"
    assert helps["--seed"] == "(default: 0)"  # the same in both presets


def test_every_flag_the_readme_gives_jobs_train_exists(capsys):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Training"):readme.index("Speed figures")]  # then other commands
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    known = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    given = {f"--{name}" for name in re.findall(r"--(?:\[no-\])?([a-z][a-z-]*)", section)}
    assert len(given) > 20 and given <= known, sorted(given - known)


def test_a_submitted_job_refuses_a_relative_output_that_ray_would_delete_with_its_working_dir(
        tmp_path, monkeypatch, capsys):
    from distributed import evaluation, inference, runtime, training
    from jobs import make_scenes, quickstart

    monkeypatch.setattr(runtime, "connect", lambda **_: pytest.fail("Ray was started"))
    copy = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)  # where `ray job submit --working-dir .` runs the job's command
    message = f"--output runs/x: a relative path, so inside this job's copy of --working-dir \\({copy}\\)"
    with pytest.raises(ValueError, match=message):
        training.train(TrainConfig(output="runs/x"))
    with pytest.raises(ValueError, match="--storage-path ckpt: a relative path"):
        training.train(TrainConfig(output=str(tmp_path / "run"), storage_path="ckpt"))
    with pytest.raises(ValueError, match=message):
        inference.infer(InferConfig(model="m.keras", input="frames", output="runs/x"))
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate(EvaluateConfig(model="m.keras", data="frames", output="runs/x"))
    assert quickstart.main(["--smoke", "--output", "runs/x"]) == 2  # it makes the output absolute itself
    assert make_scenes.main(["--count", "1", "--output", "runs/x"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert os.listdir(copy) == []
    # An absolute output passes (and the run fails later, on its missing data).
    with pytest.raises(ValueError, match="--data frames: not found in this job's copy of --working-dir"):
        training.train(TrainConfig(output=str(tmp_path / "run"), data="frames"))


def test_a_submitted_job_says_a_relative_input_it_cannot_find_was_looked_for_in_its_working_dir_copy(
        tmp_path, monkeypatch):
    # `--data ../shared/data/carla` or `--model runs/x/model.keras` exist where the user typed them, but the job
    # runs in Ray's copy of the checkout: "not found" alone, or "not a .keras model file", names no reason.
    from distributed import evaluation, inference, runtime, training
    from unet_core import scenes

    monkeypatch.setattr(runtime, "connect", lambda **_: pytest.fail("Ray was started"))
    copy = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    scenes.write_scenes(str(tmp_path / "frames"), 2)
    out, missing = str(tmp_path / "out"), str(tmp_path / "missing.keras")  # absolute: not what is tested here
    where = f": not found in this job's copy of --working-dir \\({re.escape(str(copy))}\\), where a relative path"
    for run, flag, path in (
        (lambda: training.train(TrainConfig(output=out, data="../data")), "--data", "../data"),
        (lambda: training.train(TrainConfig(output=out, data=str(tmp_path / "frames"), val_data="val")),
         "--val-data", "val"),
        (lambda: inference.infer(InferConfig(model="runs/x/model.keras", input="in", output=out)), "--model",
         "runs/x/model.keras"),
        (lambda: inference.infer(InferConfig(model=missing, input="../in", output=out)), "--input", "../in"),
        (lambda: evaluation.evaluate(EvaluateConfig(model="runs/x", data="d", output=out)), "--model", "runs/x"),
        (lambda: evaluation.evaluate(EvaluateConfig(model=missing, data="../d", output=out)), "--data", "../d"),
    ):
        with pytest.raises(ValueError, match=f"^{flag} {re.escape(path)}{where}"):
            run()
    assert not os.path.exists(out)
    (copy / "frames").mkdir()  # a relative path into the checkout itself is found there, and used
    with pytest.raises(ValueError, match="frames: not a CARLA-layout directory"):
        training.train(TrainConfig(output=out, data="frames"))


@pytest.mark.parametrize("job", ["quickstart", "make_scenes"])
def test_a_job_writing_local_files_refuses_a_uri_for_its_output(job, tmp_path, monkeypatch, capsys):

    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(f"jobs.{job}").main(["--output", "s3://bucket/x"]) == 2
    assert "error: --output s3://bucket/x: must be a local path, not a URI" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # not ./s3:/bucket/x


@pytest.mark.parametrize("job, flags", [("infer", ("--model", "--input", "--output")),
                                        ("evaluate", ("--model", "--data", "--output"))])
def test_an_empty_path_given_to_jobs_infer_or_evaluate_is_refused_not_taken_for_the_working_directory(
        job, flags, tmp_path, monkeypatch, capsys):
    # `--input "$FRAMES"` with FRAMES unset: the working directory's images were predicted without a word.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "frame.png").write_bytes(b"")
    for flag in flags:
        paths = {**dict.fromkeys(flags, "somewhere"), flag: ""}
        assert importlib.import_module(f"jobs.{job}").main([part for pair in paths.items() for part in pair]) == 2
        assert f"error: {flag} is empty (an unset shell variable?); pass a path" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["frame.png"]
