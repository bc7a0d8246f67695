import numpy as np
import pytest
import tensorflow as tf

from unet_core import data, scenes, unet_model
from unet_core.training import compile_unet, evaluate_arrays

SIZE = (96, 128)


@pytest.fixture(scope="module")
def scene_arrays(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    scenes.write_scenes(str(root / "train"), 64, seed=11)
    scenes.write_scenes(str(root / "val"), 16, seed=12)
    train = data.load_pairs(str(root / "train"), SIZE, 23)
    val = data.load_pairs(str(root / "val"), SIZE, 23)
    return train[:2], val[:2]


def test_small_unet_learns_generated_scenes(scene_arrays):
    (train_images, train_masks), (val_images, val_masks) = scene_arrays
    tf.keras.utils.set_random_seed(0)
    model = compile_unet(unet_model((*SIZE, 3), n_filters=8), learning_rate=3e-3)
    dataset = tf.data.Dataset.from_tensor_slices((train_images, train_masks)).shuffle(64, seed=0).batch(8)
    model.fit(dataset, epochs=12, verbose=0)

    _, confusion = evaluate_arrays(model, val_images, val_masks, 23)
    majority_rate = np.bincount(val_masks.ravel(), minlength=23).max() / val_masks.size
    assert confusion.pixel_accuracy() > majority_rate + 0.15, (confusion.pixel_accuracy(), majority_rate)
    # Measured: 0.61 against a majority rate of 0.39 (seed 0); the margin leaves room for noise.


def test_evaluate_arrays_counts_every_pixel_once(scene_arrays):
    _, (images, masks) = scene_arrays
    model = unet_model((*SIZE, 3), n_filters=4)
    loss, confusion = evaluate_arrays(model, images, masks, 23, batch_size=5)
    assert confusion.counts.sum() == masks.size
    logits = model.predict(images, verbose=0)
    expected = tf.keras.losses.sparse_categorical_crossentropy(masks, logits, from_logits=True)
    assert loss == pytest.approx(float(tf.reduce_mean(expected)), rel=1e-5)
    assert confusion.pixel_accuracy() == pytest.approx(float((logits.argmax(-1) == masks).mean()))


def test_compile_unet_caps_the_global_gradient_norm_only_when_asked():
    model = unet_model((*SIZE, 3), n_filters=4)
    assert compile_unet(model, clip_norm=1.0).optimizer.get_config()["global_clipnorm"] == 1.0
    for no_cap in (None, 0.0):
        assert compile_unet(model, clip_norm=no_cap).optimizer.get_config()["global_clipnorm"] is None
