"""What every training path shares: the loss, the compiled model, prediction and scoring.

The Ray Train workers, evaluation, inference and single-process benchmarks call these, so the
model is compiled and scored the same way wherever it runs.
"""

import contextlib

import numpy as np
import tensorflow as tf

from unet_core.metrics import ConfusionMatrix, KerasMeanIoU


def pixel_loss():
    """Per-pixel sparse cross-entropy on logits, as the classic exercise trains with."""
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def cosine_with_warmup(peak_learning_rate, total_steps, warmup_steps):
    """Linear warm-up to the peak, then cosine decay to zero at `total_steps`."""
    return tf.keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak_learning_rate / 10 if warmup_steps else peak_learning_rate,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=peak_learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


@tf.keras.utils.register_keras_serializable(package="unet_core")
class AdamWithAverageWarmup(tf.keras.optimizers.Adam):
    """Adam whose moving average of the weights warms up: its momentum is min(ema_momentum,
    (1 + step) / (10 + step)), the schedule of `tf.train.ExponentialMovingAverage(num_updates=)`.

    tf-keras starts the average at the initial weights and moves it by 1 - ema_momentum a step, so
    after n steps the random initialisation still weighs ema_momentum**n: 0.27 in a 130-step run
    at 0.99. Warmed up, the average follows the last few steps of a short run and is the same
    plain average in a long one (from step 890 on at 0.99).
    """

    def _update_model_variables_moving_average(self, var_list):  # tf-keras's own, with the warm-up
        if not self.use_ema:
            return
        step = tf.cast(self.iterations, tf.float32)
        momentum = tf.minimum(self.ema_momentum, (1.0 + step) / (10.0 + step))

        def update_average(average, variable):
            average.assign(momentum * average + (1.0 - momentum) * variable)

        for variable in var_list:
            average = self._model_variables_moving_average[self._index_dict[self._var_key(variable)]]
            self._distribution_strategy.extended.update(average, update_average, args=(variable,), group=False)


def compile_unet(model, learning_rate=1e-3, jit_compile=False, clip_norm=None, ema_momentum=0.0):
    """Adam + per-pixel cross-entropy; reports pixel accuracy and mean IoU.

    `learning_rate` is a number or a schedule; Keras scales the loss by per-pixel sample
    weights when the dataset yields (image, mask, weights). `jit_compile` has XLA compile the
    training step: on CPU it cannot hold MultiWorkerMirroredStrategy's collectives.
    `clip_norm` caps the global gradient norm; tf-keras clips after the all-reduce, so every
    replica applies the same step. `ema_momentum` > 0 has Adam keep a moving average of the
    weights beside them (warmed up; see `averaged_weights`); it is saved and restored with Adam's
    state.
    """
    optimizer = AdamWithAverageWarmup(
        learning_rate, global_clipnorm=clip_norm or None, use_ema=ema_momentum > 0, ema_momentum=ema_momentum or 0.99
    )
    model.compile(
        optimizer=optimizer,
        loss=pixel_loss(),
        metrics=[
            tf.keras.metrics.SparseCategoricalAccuracy(name="pixel_accuracy"),
            KerasMeanIoU(model.output_shape[-1]),  # one per class the model predicts
        ],
        jit_compile=jit_compile,
    )
    return model


def start_from_class_prior(model, pixel_counts, class_weights=None):
    """Set the logits layer's bias to the log class frequencies of the training masks, each
    class's pixels counted `class_weights` times where the loss weighs them.

    The untrained network then makes the loss's best constant guess instead of a uniform one, so
    the first steps go to the scene rather than to learning how common road and sky are. Under a
    class-weighted loss that guess is the weighted frequency: on the 85 CARLA training frames of
    RESULTS.md, the plain pixel prior left the bias's gradient at 70% of a uniform start's. Every
    count is bumped by one: a class absent from the training masks gets a very low, finite logit.
    """
    counts = np.asarray(pixel_counts, np.float64)
    if class_weights is not None:
        counts = counts * np.asarray(class_weights, np.float64)  # the weights average 1 per pixel: same total
    counts = counts + 1.0
    log_prior = np.log(counts / counts.sum())
    model.layers[-1].bias.assign((log_prior - log_prior.mean()).astype(np.float32))  # softmax ignores the shift
    return model


@contextlib.contextmanager
def averaged_weights(model):
    """Inside the block the model holds its optimizer's moving average of the weights, if it
    keeps one (and has taken a step); on leaving, the raw weights training continues from.

    Works under any distribution strategy: reads and writes happen in cross-replica context, so
    every replica of a mirrored variable gets the same values.
    """
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # fp16 wraps Adam
    if not (getattr(optimizer, "use_ema", False) and getattr(optimizer, "_built", False)):
        yield model
        return
    raw = [variable.numpy() for variable in model.trainable_variables]
    optimizer.finalize_variable_values(model.trainable_variables)
    try:
        yield model
    finally:
        for variable, value in zip(model.trainable_variables, raw):
            variable.assign(value)


def predict_logits_fn(model):
    """A compiled forward pass (inference mode): calling it avoids `model.predict`'s per-call setup."""
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def predict_class_ids_fn(model):
    """`predict_logits_fn` to each pixel's class id (uint8; a model has at most 256 classes): the argmax
    runs in TensorFlow, on every core it has, and a byte per pixel leaves it instead of a float per class."""
    return tf.function(lambda images: tf.cast(tf.argmax(model(images, training=False), axis=-1), tf.uint8),
                       reduce_retracing=True)


def ends_in_softmax(model):
    """Whether `model` outputs probabilities (a final softmax) rather than logits (jobs.train's U-Net gives logits)."""
    final = model.layers[-1]
    while isinstance(final, tf.keras.Model):  # a model wrapped in another
        final = final.layers[-1]
    # A layer's activation, or the op of a TFOpLambda (tf.nn.softmax applied to a tensor).
    function = getattr(final, "activation", None) or getattr(final, "function", None)
    return isinstance(final, tf.keras.layers.Softmax) or function in (tf.keras.activations.softmax, tf.nn.softmax)


def score_batch(logits, true_ids, n_classes, from_logits=True):
    """(summed pixel loss, pixel count, confusion counts) of one batch of logits (or, with
    `from_logits=False`, probabilities) and true masks."""
    true_ids = np.asarray(true_ids).astype(np.int64)
    loss = tf.keras.losses.sparse_categorical_crossentropy(true_ids, logits, from_logits=from_logits)
    confusion = ConfusionMatrix(n_classes).update(true_ids, np.argmax(logits, axis=-1))
    return float(tf.reduce_sum(loss)), true_ids.size, confusion.counts
