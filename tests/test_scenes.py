import numpy as np
import pytest
from PIL import Image

from jobs import make_scenes
from unet_core import scenes
from unet_core.classes import CLASS_IDS, N_CLASSES

FRAMES = 20
SEED = 3
REQUIRED = ("sky", "road", "road_line", "sidewalk", "building", "vegetation", "pole", "vehicle", "pedestrian")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """20 frames written once; yields (root, names, images HxWx4 stack, masks HxWx4 stack)."""
    root = tmp_path_factory.mktemp("scenes")
    names = scenes.write_scenes(root, FRAMES, seed=SEED)
    images, masks = [], []
    for name in names:
        with Image.open(root / "CameraRGB" / name) as image, Image.open(root / "CameraMask" / name) as mask:
            assert (image.size, image.mode, mask.size, mask.mode) == ((640, 480), "RGBA", (640, 480), "RGBA")
            images.append(np.asarray(image))
            masks.append(np.asarray(mask))
    return root, names, np.stack(images), np.stack(masks)


def file_bytes(root, sub, name):
    return (root / sub / name).read_bytes()


def test_files_follow_the_carla_layout(dataset):
    root, names, images, masks = dataset
    assert names == [f"scene_{index:06d}.png" for index in range(FRAMES)]
    for sub in ("CameraRGB", "CameraMask"):
        assert sorted(path.name for path in (root / sub).iterdir()) == names  # no temporary files left
    assert (images[..., 3] == 255).all()
    assert (masks[..., 1] == 0).all() and (masks[..., 2] == 0).all() and (masks[..., 3] == 255).all()
    assert masks[..., 0].max() < N_CLASSES


def test_render_scene_returns_rgb_and_class_ids_of_the_requested_size():
    rgb, class_ids = scenes.render_scene(np.random.default_rng(0), height=120, width=200)
    assert rgb.shape == (120, 200, 3) and rgb.dtype == np.uint8
    assert class_ids.shape == (120, 200) and class_ids.dtype == np.uint8
    assert class_ids.max() < N_CLASSES


def test_every_listed_class_appears(dataset):
    present = set(np.unique(dataset[3][..., 0]))
    missing = [name for name in REQUIRED if CLASS_IDS[name] not in present]
    assert not missing, f"classes never drawn in {FRAMES} frames: {missing}"


def test_every_pixel_of_a_scene_has_a_class_none_is_unlabeled(dataset):
    # Sky is the backdrop and the ground covers the rest; the car's shadow darkens the road but leaves it road.
    assert (dataset[3][..., 0] != CLASS_IDS["unlabeled"]).all()


def test_layout_is_a_road_scene(dataset):
    class_ids = dataset[3][..., 0]
    ground = [CLASS_IDS[name] for name in ("road", "road_line", "sidewalk", "terrain")]
    assert not np.isin(class_ids[:, 0], ground).any(), "ground in the top row"
    assert (class_ids[:, -1] != CLASS_IDS["sky"]).all(), "sky in the bottom row"
    road = np.isin(class_ids[:, -40:, 280:360], [CLASS_IDS["road"], CLASS_IDS["road_line"]])
    assert road.mean() > 0.6, "the road should fill the bottom middle of most frames"


def test_colour_varies_within_each_class(dataset):
    _, _, images, masks = dataset
    rgb, class_ids = images[..., :3].reshape(-1, 3), masks[..., 0].ravel()
    for name in REQUIRED:
        colours = rgb[class_ids == CLASS_IDS[name]].astype(np.float32)
        assert colours.std(axis=0).max() > 8, f"{name} is nearly one flat colour"
    for name in ("road", "sky"):  # and from frame to frame, not only from noise
        means = [images[i][masks[i][..., 0] == CLASS_IDS[name], :3].mean(axis=0) for i in range(FRAMES)]
        assert np.std(means, axis=0).max() > 10, f"{name} has the same colour in every frame"


def test_colour_alone_does_not_give_the_class(dataset):
    """Even a lookup table fitted on these very pixels (colour bin → commonest class) is often wrong."""
    _, _, images, masks = dataset
    rgb, class_ids = images[..., :3].reshape(-1, 3) // 16, masks[..., 0].ravel()
    bins = (rgb[:, 0].astype(np.int64) * 16 + rgb[:, 1]) * 16 + rgb[:, 2]
    counts = np.zeros((16**3, N_CLASSES), np.int64)
    np.add.at(counts, (bins, class_ids), 1)
    accuracy = counts.max(axis=1).sum() / class_ids.size
    assert accuracy < 0.9, f"colour predicts the class for {accuracy:.0%} of pixels"


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset, tmp_path):
    root = dataset[0]
    scenes.write_scenes(tmp_path / "again", 2, seed=SEED)
    scenes.write_scenes(tmp_path / "other", 2, seed=SEED + 1)
    for name in ("scene_000000.png", "scene_000001.png"):
        for sub in ("CameraRGB", "CameraMask"):
            assert file_bytes(tmp_path / "again", sub, name) == file_bytes(root, sub, name)
            assert file_bytes(tmp_path / "other", sub, name) != file_bytes(root, sub, name)


def test_a_frame_does_not_depend_on_count_or_start(dataset, tmp_path):
    root = dataset[0]
    names = scenes.write_scenes(tmp_path, 2, seed=SEED, start=7)
    assert names == ["scene_000007.png", "scene_000008.png"]
    for name in names:
        for sub in ("CameraRGB", "CameraMask"):
            assert file_bytes(tmp_path, sub, name) == file_bytes(root, sub, name)


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    def fail(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(scenes.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        scenes.write_scenes(tmp_path, 1)
    assert list((tmp_path / "CameraRGB").iterdir()) == []


def test_cli_writes_the_same_scenes(dataset, tmp_path, capsys):
    output = tmp_path / "cli"
    assert make_scenes.main(["--output", str(output), "--count", "2", "--seed", str(SEED), "--start", "4"]) == 0
    assert "wrote 2 scenes" in capsys.readouterr().out
    for name in ("scene_000004.png", "scene_000005.png"):
        for sub in ("CameraRGB", "CameraMask"):
            assert file_bytes(output, sub, name) == file_bytes(dataset[0], sub, name)


def test_cli_rejects_no_scenes_a_negative_seed_and_an_output_that_is_a_file(tmp_path, capsys):
    for count in ("0", "-1"):
        with pytest.raises(SystemExit):
            make_scenes.main(["--output", str(tmp_path), "--count", count])
        assert f"--count must be at least 1, got {count}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_scenes.main(["--output", str(tmp_path), "--seed", "-1"])
    assert "--seed and --start must be >= 0" in capsys.readouterr().err
    (tmp_path / "frames").write_text("")
    with pytest.raises(SystemExit):
        make_scenes.main(["--output", str(tmp_path / "frames"), "--count", "1"])
    assert f"--output {tmp_path / 'frames'}: a file; it must be a directory" in capsys.readouterr().err


def test_cli_refuses_an_empty_output_before_writing_into_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        make_scenes.main(["--output", "", "--count", "1"])
    assert refused.value.code == 2 and "--output is empty (an unset shell variable?)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_names_an_output_that_cannot_hold_the_layout_and_exits_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "CameraRGB").write_text("")  # a file where the folder goes
    for output, reason in ((tmp_path / "afile" / "sub", "Not a directory"), (tmp_path / "frames", "File exists")):
        assert make_scenes.main(["--output", str(output), "--count", "1"]) == 2
        assert f"error: {output}: cannot hold CameraRGB/ ({reason})" in capsys.readouterr().err


def test_ctrl_c_between_an_image_and_its_mask_leaves_every_frame_paired(tmp_path, monkeypatch, capsys):
    save, calls = scenes._save_atomically, []

    def interrupted_at_the_second_mask(pixels, path):
        calls.append(path.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        save(pixels, path)

    monkeypatch.setattr(scenes, "_save_atomically", interrupted_at_the_second_mask)
    assert make_scenes.main(["--output", str(tmp_path), "--count", "3"]) == 130
    assert "interrupted: every frame written is whole and paired" in capsys.readouterr().err
    listed = {sub: sorted(path.name for path in (tmp_path / sub).iterdir()) for sub in ("CameraRGB", "CameraMask")}
    assert listed == {"CameraRGB": ["scene_000000.png"], "CameraMask": ["scene_000000.png"]}
    # Written again over a whole set, an interrupted mask keeps the pair: its old mask stays.
    monkeypatch.setattr(scenes, "_save_atomically", save)
    scenes.write_scenes(tmp_path, 3)
    monkeypatch.setattr(scenes, "_save_atomically", interrupted_at_the_second_mask)
    calls.clear()
    assert make_scenes.main(["--output", str(tmp_path), "--count", "3"]) == 130
    assert all(len(list((tmp_path / sub).iterdir())) == 3 for sub in ("CameraRGB", "CameraMask"))


def test_ctrl_c_over_another_seeds_set_never_pairs_an_image_with_the_old_mask(tmp_path, monkeypatch, capsys):
    scenes.write_scenes(tmp_path, 2, seed=0)
    save = scenes._save_atomically

    def interrupted_at_the_first_mask(pixels, path):
        if path.parent.name == "CameraMask":
            raise KeyboardInterrupt
        save(pixels, path)

    monkeypatch.setattr(scenes, "_save_atomically", interrupted_at_the_first_mask)
    assert make_scenes.main(["--output", str(tmp_path), "--count", "2", "--seed", "1"]) == 130
    # Frame 0's image of seed 1 beside its mask of seed 0 would train on wrong labels without a word.
    assert not (tmp_path / "CameraRGB" / "scene_000000.png").exists()
    assert (tmp_path / "CameraMask" / "scene_000000.png").exists()  # the old mask stays, unpaired: training names it
