"""Training-time augmentation and class balancing, as tf ops for a tf.data pipeline.

Geometric changes (flip, zoom-crop) are applied to the image and its mask together, the mask
always with nearest neighbour; photometric changes touch the image only. ClassMix pastes whole
classes of one frame onto another, image pixels and mask pixels from the same places. Every
draw is a function of the `seed` passed in (stateless random ops): the same seed gives the same
view, however tf.data schedules the calls, so a resumed run augments as an uninterrupted one.
"""

import numpy as np
import tensorflow as tf


def augment(image, mask, seed, max_zoom=1.25, brightness=0.1, contrast=0.2):
    """The view of a frame that `seed` (int, shape (2,)) picks. image: float (H, W, 3) in [0, 1]; mask: int (H, W)."""
    height, width = image.shape[0], image.shape[1]
    flip_seed, zoom_seed, top_seed, left_seed, brightness_seed, contrast_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 6))
    mask = mask[..., tf.newaxis]
    image, mask = tf.cond(tf.random.stateless_uniform((), flip_seed) < 0.5,
                          lambda: (tf.image.flip_left_right(image), tf.image.flip_left_right(mask)),
                          lambda: (image, mask))

    zoom = tf.random.stateless_uniform((), zoom_seed, 1.0, max_zoom)
    zoomed_size = tf.cast(tf.math.ceil(zoom * tf.constant([height, width], tf.float32)), tf.int32)
    # Unlike the downsizing in data.resize_image, this enlarges by at most max_zoom: nearest would
    # repeat every few rows and columns, a stripe pattern no evaluated frame has.
    image = tf.image.resize(image, zoomed_size, method="bilinear")
    mask = tf.image.resize(mask, zoomed_size, method="nearest")
    top = tf.random.stateless_uniform((), top_seed, 0, zoomed_size[0] - height + 1, tf.int32)
    left = tf.random.stateless_uniform((), left_seed, 0, zoomed_size[1] - width + 1, tf.int32)
    image = image[top : top + height, left : left + width]
    mask = mask[top : top + height, left : left + width]

    image = tf.image.adjust_brightness(image, tf.random.stateless_uniform((), brightness_seed, -brightness, brightness))
    image = tf.image.adjust_contrast(
        image, tf.random.stateless_uniform((), contrast_seed, 1.0 - contrast, 1.0 + contrast))
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, (height, width, 3)), tf.ensure_shape(mask[..., 0], (height, width))


def class_mix(images, masks, seed, probability, n_classes):
    """ClassMix (Olsson et al., 2021) within a batch: with `probability`, a frame gets the pixels
    of the classes in the batch's previous frame, each class taken with probability 1/2 (half of
    them on average, where the paper takes exactly half), pasted with their labels.

    On 85 real frames it is what stopped the model from overfitting (val loss still falling at
    epoch 150 where plain augmentation turned up at epoch 80; RESULTS.md). A batch of one frame
    is its own partner and stays as it is. images: float (B, H, W, 3); masks: int (B, H, W);
    seed: int, shape (2,).
    """
    classes_seed, frames_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    partner_images, partner_masks = tf.roll(images, 1, axis=0), tf.roll(masks, 1, axis=0)
    frames = tf.shape(images)[0]
    chosen_classes = tf.random.stateless_uniform((frames, n_classes), classes_seed) < 0.5
    paste = tf.gather(chosen_classes, tf.cast(partner_masks, tf.int32), batch_dims=1)
    paste &= tf.random.stateless_uniform((frames, 1, 1), frames_seed) < probability
    return tf.where(paste[..., tf.newaxis], partner_images, images), tf.where(paste, partner_masks, masks)


def class_weights(pixel_counts, power=0.5, max_weight=10.0):
    """Per-class loss weights (median frequency / frequency) ** power, clipped; 0 for absent classes.

    `power` 0 gives every class weight 1; 1 is full median-frequency balancing, which on a few
    dozen frames over-rewards classes seen in one frame. Scaled so that the mean weight over the
    pixels is 1: the loss keeps its usual scale. The clip comes first, so a scaled weight may
    end above `max_weight`.
    """
    counts = np.asarray(pixel_counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if not present.any():
        return weights.astype(np.float32)
    frequency = counts[present] / counts.sum()
    weights[present] = np.minimum((np.median(frequency) / frequency) ** power, max_weight)
    pixel_mean = (weights * counts).sum() / counts.sum()
    return (weights / pixel_mean).astype(np.float32)


def pixel_weights(mask, weights):
    """The per-pixel sample weights Keras takes as a third dataset element (class_weight can't: 3-D targets)."""
    return tf.gather(tf.constant(weights), tf.cast(mask, tf.int32))
