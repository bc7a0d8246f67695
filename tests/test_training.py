import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import reference_scores
from unet_core import data, scenes, unet_model
from unet_core.augment import class_weights, pixel_weights
from unet_core.metrics import ConfusionMatrix
from unet_core.training import (
    averaged_weights, compile_unet, cosine_with_warmup, ends_in_softmax, pixel_loss, predict_class_ids_fn,
    predict_logits_fn, score_batch, start_from_class_prior,
)

# Half the default size: a quarter of the compute, and the scenes' shapes are still many pixels wide.
SIZE = (48, 64)


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
    model.fit(dataset, epochs=16, verbose=0)

    _, confusion = reference_scores(model, val_images, val_masks, 23)
    majority_rate = np.bincount(val_masks.ravel(), minlength=23).max() / val_masks.size
    assert confusion.pixel_accuracy() > majority_rate + 0.15, (confusion.pixel_accuracy(), majority_rate)
    # Measured: 0.64 against a majority rate of 0.39 (seed 0); the margin leaves room for noise.


def test_score_batch_sums_add_up_to_the_whole_set(scene_arrays):
    _, (images, masks) = scene_arrays
    model = unet_model((*SIZE, 3), n_filters=4)
    loss_sum, pixels, confusion = 0.0, 0, ConfusionMatrix(23)
    for start in range(0, len(images), 5):  # batches of 5 with a short last one
        logits = model.predict(images[start:start + 5], verbose=0)
        batch_loss, batch_pixels, counts = score_batch(logits, masks[start:start + 5], 23)
        loss_sum, pixels, confusion.counts = loss_sum + batch_loss, pixels + batch_pixels, confusion.counts + counts
    expected_loss, expected = reference_scores(model, images, masks, 23)
    assert pixels == confusion.counts.sum() == masks.size
    assert loss_sum / pixels == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_array_equal(confusion.counts, expected.counts)


def test_compile_unet_caps_the_global_gradient_norm_only_when_asked():
    model = unet_model((*SIZE, 3), n_filters=4)
    assert compile_unet(model, clip_norm=1.0).optimizer.get_config()["global_clipnorm"] == 1.0
    for no_cap in (None, 0.0):
        assert compile_unet(model, clip_norm=no_cap).optimizer.get_config()["global_clipnorm"] is None


def test_averaged_weights_holds_the_warmed_up_moving_average_inside_the_block_only(scene_arrays):
    (images, masks), _ = scene_arrays
    tf.keras.utils.set_random_seed(0)
    momentum = 0.2
    model = compile_unet(unet_model((*SIZE, 3), n_filters=4), learning_rate=1e-2, ema_momentum=momentum)
    with averaged_weights(model):  # no step taken yet: nothing to average, the weights stay
        untouched = [w.copy() for w in model.get_weights()]
    expected = [w.copy() for w in untouched]  # Adam's average starts from the initial weights
    # The momentum warms up as (1 + step) / (10 + step): 0.1, then 0.18, then capped at 0.2. Without
    # the warm-up a short run's average would keep momentum**steps of the random initialisation.
    for step, step_momentum in enumerate([0.1, 2 / 11, 0.2]):
        model.train_on_batch(images[step * 8:(step + 1) * 8], masks[step * 8:(step + 1) * 8])
        expected = [step_momentum * e + (1 - step_momentum) * w for e, w in zip(expected, model.get_weights())]
    raw = [w.copy() for w in model.get_weights()]
    assert not all(np.allclose(r, u) for r, u in zip(raw, untouched))

    with averaged_weights(model):
        for average, value in zip(expected, model.get_weights()):
            np.testing.assert_allclose(value, average, rtol=1e-5, atol=1e-6)
    for before, after in zip(raw, model.get_weights()):
        np.testing.assert_array_equal(before, after)  # training goes on from the raw weights


def test_averaged_weights_finds_the_average_under_fp16s_loss_scaling_wrapper():
    # --mixed-precision fp16 wraps Adam in a LossScaleOptimizer: looking only at the wrapper, evaluation scored the
    # raw weights. After one step the warmed-up momentum is 0.1: the average is 0.1 initial + 0.9 raw.
    tf.keras.utils.set_random_seed(0)
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_unet(unet_model((16, 16, 3), n_filters=2, n_classes=3), learning_rate=1e-2, ema_momentum=0.5)
        initial = [w.copy() for w in model.get_weights()]
        optimizer = model.optimizer  # one eager step, as fit takes it: tracing a train step takes seconds
        with tf.GradientTape() as tape:
            loss = optimizer.get_scaled_loss(tf.reduce_mean(model(tf.ones((1, 16, 16, 3)), training=True)))
        gradients = optimizer.get_unscaled_gradients(tape.gradient(loss, model.trainable_variables))
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        raw = [w.copy() for w in model.get_weights()]
        assert not all(np.array_equal(r, i) for r, i in zip(raw, initial))
        with averaged_weights(model):
            for value, first, last in zip(model.get_weights(), initial, raw):
                np.testing.assert_allclose(value, 0.1 * first + 0.9 * last, rtol=1e-5, atol=1e-6)
        for before, after in zip(raw, model.get_weights()):
            np.testing.assert_array_equal(before, after)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_averaged_weights_leaves_a_model_without_an_average_alone(scene_arrays):
    (images, masks), _ = scene_arrays
    model = compile_unet(unet_model((*SIZE, 3), n_filters=4), learning_rate=1e-2)
    model.train_on_batch(images[:8], masks[:8])
    raw = model.get_weights()
    with averaged_weights(model):
        assert all(np.array_equal(a, b) for a, b in zip(raw, model.get_weights()))


def test_the_compiled_mean_iou_counts_every_class_the_model_predicts():
    model = compile_unet(unet_model((*SIZE, 3), n_filters=4, n_classes=30), learning_rate=1e-2)
    masks = np.full((2, *SIZE), 29)  # the model's last class, beyond CARLA's 23
    logs = model.train_on_batch(np.zeros((2, *SIZE, 3), np.float32), masks, return_dict=True)
    # Zero images through fresh zero biases: every logit is 0, so every pixel is predicted class 0.
    (mean_iou,) = [metric for metric in model.metrics if metric.name == "mean_iou"]
    assert mean_iou.counts.shape == (30, 30)
    assert mean_iou.counts.numpy()[29, 0] == mean_iou.counts.numpy().sum() == masks.size  # class 29 counted
    assert logs["mean_iou"] == 0.0


def test_start_from_class_prior_makes_the_bias_predict_the_pixel_frequencies():
    model = unet_model((*SIZE, 3), n_filters=4, n_classes=4)
    initial = model.get_weights()
    counts = np.array([600, 300, 100, 0])
    start_from_class_prior(model, counts)
    bias = model.layers[-1].bias.numpy()
    probabilities = np.exp(bias) / np.exp(bias).sum()
    np.testing.assert_allclose(probabilities, (counts + 1) / (counts + 1).sum(), rtol=1e-5)
    # Every other weight keeps its initialisation: only the starting guess changes.
    bias_index = next(index for index, weight in enumerate(model.weights) if weight is model.layers[-1].bias)
    for index, (before, after) in enumerate(zip(initial, model.get_weights())):
        if index != bias_index:
            np.testing.assert_array_equal(before, after)


def test_under_class_weights_the_prior_bias_is_the_weighted_losss_best_constant_guess():
    model = unet_model((*SIZE, 3), n_filters=4, n_classes=4)
    logits = model.layers[-1]
    logits.kernel.assign(tf.zeros_like(logits.kernel))  # every pixel's logits are the bias alone
    masks = np.repeat(np.arange(4), [600, 300, 100, 0]).reshape(1, 40, 25)
    counts = np.bincount(masks.ravel(), minlength=4)
    weights = class_weights(counts, power=0.5)  # the default recipe's; class 3, absent, weighs 0

    def bias_gradient():  # of the loss training minimises, each pixel weighted as the workers weigh it
        with tf.GradientTape() as tape:
            every_pixel = tf.broadcast_to(logits.bias, (*masks.shape, 4))
            loss = pixel_loss()(masks, every_pixel, sample_weight=pixel_weights(masks, weights))
        return tape.gradient(loss, logits.bias).numpy()

    start_from_class_prior(model, counts, weights)
    # At the weighted loss's minimum over constant guesses, but for the one pixel each count is bumped by.
    assert np.abs(bias_gradient()).max() < 2e-3
    start_from_class_prior(model, counts)  # the plain pixel prior is not, under these weights
    assert np.abs(bias_gradient()).max() > 0.1


def test_the_learning_rate_warms_up_linearly_then_decays_along_a_cosine_to_zero():
    schedule = cosine_with_warmup(2e-3, total_steps=110, warmup_steps=10)
    rates = np.array([float(schedule(step)) for step in range(111)])
    np.testing.assert_allclose(rates[:11], np.linspace(2e-4, 2e-3, 11), rtol=1e-5)  # from a tenth of the peak
    decay = np.arange(101) / 100
    np.testing.assert_allclose(rates[10:], 1e-3 * (1 + np.cos(np.pi * decay)), rtol=1e-4, atol=1e-9)
    assert rates[-1] < 1e-9 and rates[60] == pytest.approx(1e-3, rel=1e-5)  # zero at the end; half way down
    no_warmup = cosine_with_warmup(2e-3, total_steps=100, warmup_steps=0)
    assert float(no_warmup(0)) == pytest.approx(2e-3) and float(no_warmup(50)) == pytest.approx(1e-3, rel=1e-5)


def test_ends_in_softmax_tells_probabilities_from_logits():
    inputs = tf.keras.Input((*SIZE, 3))
    features = tf.keras.layers.Conv2D(4, 1)(inputs)
    assert not ends_in_softmax(unet_model((*SIZE, 3), n_filters=4))  # the U-Net gives logits
    assert ends_in_softmax(tf.keras.Model(inputs, tf.keras.layers.Softmax()(features)))
    assert ends_in_softmax(tf.keras.Model(inputs, tf.keras.layers.Activation("softmax")(features)))
    assert ends_in_softmax(tf.keras.Model(inputs, tf.keras.layers.Conv2D(4, 1, activation="softmax")(inputs)))
    assert not ends_in_softmax(tf.keras.Model(inputs, tf.keras.layers.Conv2D(4, 1, activation="relu")(inputs)))
    assert ends_in_softmax(tf.keras.Model(inputs, tf.nn.softmax(features)))  # an op, not a layer
    wrapped = tf.keras.Sequential([tf.keras.Input((*SIZE, 3)), tf.keras.Model(inputs, tf.nn.softmax(features))])
    assert ends_in_softmax(wrapped)
    assert not ends_in_softmax(tf.keras.Sequential([tf.keras.Input((*SIZE, 3)), unet_model((*SIZE, 3), n_filters=4)]))


def test_class_ids_are_the_argmax_of_the_logits_as_bytes():
    tf.keras.utils.set_random_seed(0)
    model = unet_model((*SIZE, 3), n_filters=4, n_classes=23)
    images = tf.constant(np.random.default_rng(0).random((2, *SIZE, 3), np.float32))
    class_ids = predict_class_ids_fn(model)(images).numpy()
    assert class_ids.dtype == np.uint8 and class_ids.shape == (2, *SIZE)
    np.testing.assert_array_equal(class_ids, np.argmax(predict_logits_fn(model)(images).numpy(), axis=-1))
    assert len(np.unique(class_ids)) > 1  # not a constant map, which would pass whatever the argmax
