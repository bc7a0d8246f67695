import numpy as np
import pytest
import tensorflow as tf

from unet_core.augment import augment, class_mix, class_weights, pixel_weights


def key(first, second=0):
    """A seed for the stateless augmentation ops."""
    return tf.constant([first, second], tf.int64)


def blocky_frame(seed):
    """A mask of 8×8-pixel blocks of class ids, and an image whose red channel encodes the id."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 23, (12, 16)), np.ones((8, 8), np.int64)).astype(np.uint8)
    image = np.dstack([mask / 22.0, rng.random(mask.shape), np.zeros(mask.shape)]).astype(np.float32)
    return image, mask


@pytest.mark.parametrize("seed", range(6))
def test_image_and_mask_move_together(seed):
    image, mask = blocky_frame(seed)
    # Photometric changes off: the red channel must still spell out the mask after flip and zoom.
    out_image, out_mask = augment(tf.constant(image), tf.constant(mask), key(seed), brightness=0.0, contrast=0.0)
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    assert out_image.shape == (96, 128, 3) and out_mask.shape == (96, 128) and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= set(np.unique(mask))  # nearest neighbour: no invented ids
    # Away from block edges bilinear and nearest agree, so the decoded ids match the mask there.
    uniform = np.ones_like(out_mask, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            uniform[1:-1, 1:-1] &= out_mask[1:-1, 1:-1] == out_mask[1 + dy : 95 + dy, 1 + dx : 127 + dx]
    uniform[[0, -1], :] = uniform[:, [0, -1]] = False
    decoded = np.rint(out_image[..., 0] * 22).astype(np.uint8)
    assert uniform.mean() > 0.5
    np.testing.assert_array_equal(decoded[uniform], out_mask[uniform])


def test_augmentation_varies_and_flips():
    image, mask = blocky_frame(0)
    views = [augment(tf.constant(image), tf.constant(mask), key(seed), max_zoom=1.0, brightness=0.0,
                     contrast=0.0)[1].numpy() for seed in range(16)]
    flipped = [np.array_equal(view, mask[:, ::-1]) for view in views]
    unchanged = [np.array_equal(view, mask) for view in views]
    assert any(flipped) and any(unchanged) and all(f or u for f, u in zip(flipped, unchanged))


def test_every_view_zooms_in_and_a_zoom_never_adds_an_edge():
    # A zoom factor drawn from [1, 2) enlarges by more than a pixel every time, so no view is the frame or its
    # mirror; cropping a magnified mask can only show fewer id changes along a row, never more.
    _, mask = blocky_frame(4)
    edges = (mask[:, 1:] != mask[:, :-1]).sum()
    for seed in range(8):
        _, view = augment(tf.zeros((96, 128, 3)), tf.constant(mask), key(seed), max_zoom=2.0, brightness=0.0,
                          contrast=0.0)
        view = view.numpy()
        assert not np.array_equal(view, mask) and not np.array_equal(view, mask[:, ::-1])
        assert (view[:, 1:] != view[:, :-1]).sum() < edges


def test_brightness_and_contrast_vary_within_their_ranges_and_leave_the_mask():
    # A mirror-symmetric image in [0.3, 0.7], unzoomed: flips leave it, and no value reaches a clip.
    half = np.random.default_rng(0).uniform(0.3, 0.7, (96, 64, 3)).astype(np.float32)
    image, mask = np.concatenate([half, half[:, ::-1]], axis=1), blocky_frame(1)[1]
    shifts, factors = [], []
    for seed in range(40):
        out_image, out_mask = (out.numpy() for out in augment(tf.constant(image), tf.constant(mask), key(seed),
                                                               max_zoom=1.0))
        assert np.array_equal(out_mask, mask) or np.array_equal(out_mask, mask[:, ::-1])
        # Per channel, brightness b then contrast c about the channel mean: out = c (in - mean) + mean + b.
        centred, centred_out = image - image.mean((0, 1)), out_image - out_image.mean((0, 1))
        factor = (centred * centred_out).sum() / (centred**2).sum()
        np.testing.assert_allclose(centred_out, factor * centred, atol=1e-5)
        shift = out_image.mean((0, 1)) - image.mean((0, 1))
        np.testing.assert_allclose(shift, shift[0], atol=1e-5)  # one brightness for every channel
        shifts.append(shift[0])
        factors.append(factor)
    assert -0.1 <= min(shifts) < -0.05 and 0.05 < max(shifts) <= 0.1  # brightness ±0.1
    assert 0.8 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.2  # contrast ±20%
    extreme, _ = augment(tf.constant(image * 2 - 0.5), tf.constant(mask), key(1), brightness=0.5, contrast=0.5)
    assert 0.0 <= extreme.numpy().min() and extreme.numpy().max() <= 1.0


def test_a_seed_picks_one_view_and_another_seed_another():
    image, mask = (tf.constant(array) for array in blocky_frame(2))
    first, again, other = (augment(image, mask, seed)[0].numpy() for seed in (key(5, 7), key(5, 7), key(5, 8)))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    images, masks = (tf.constant(np.stack([array] * 2)) for array in blocky_frame(3))
    images = tf.concat([images[:1], images[1:] * 0.5], axis=0)  # two frames, so there is something to paste
    mixed = [class_mix(images, masks, seed, 1.0, 23)[0].numpy() for seed in (key(1), key(1), key(2))]
    np.testing.assert_array_equal(mixed[0], mixed[1])
    assert not np.array_equal(mixed[0], mixed[2])


def test_class_weights_favour_rare_classes_and_keep_the_mean():
    counts = np.array([0, 1000, 100, 10, 0])
    weights = class_weights(counts, power=0.5, max_weight=100.0)
    assert weights[0] == 0 and weights[4] == 0
    assert weights[3] > weights[2] > weights[1] > 0
    assert weights[2] / weights[1] == pytest.approx(np.sqrt(10), rel=1e-5)
    assert (weights * counts).sum() / counts.sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(class_weights(counts, power=0.0)[1:4], 1.0, rtol=1e-6)


def test_class_weights_are_clipped():
    # The median class gets 1 before normalising; the rarest would get 1000 and is clipped to 5.
    weights = class_weights(np.array([1_000_000, 1_000, 1]), power=1.0, max_weight=5.0)
    assert weights[2] / weights[1] == pytest.approx(5.0, rel=1e-5)


def test_pixel_weights_look_up_each_pixel():
    mask = tf.constant([[0, 2], [1, 2]], tf.uint8)
    weights = pixel_weights(mask, [0.5, 1.0, 4.0])
    np.testing.assert_allclose(weights.numpy(), [[0.5, 4.0], [1.0, 4.0]])


def test_class_mix_pastes_image_and_mask_pixels_from_the_same_places_of_the_previous_frame():
    frames = [blocky_frame(seed) for seed in range(4)]
    images = np.stack([image for image, _ in frames])
    masks = np.stack([mask for _, mask in frames])
    mixed = class_mix(tf.constant(images), tf.constant(masks), key(0), 1.0, 23)
    mixed_images, mixed_masks = (out.numpy() for out in mixed)
    partner_images, partner_masks = np.roll(images, 1, axis=0), np.roll(masks, 1, axis=0)
    pasted = (mixed_images != images).any(axis=-1)
    np.testing.assert_array_equal(mixed_images[pasted], partner_images[pasted])
    np.testing.assert_array_equal(mixed_masks[pasted], partner_masks[pasted])
    np.testing.assert_array_equal(mixed_masks[~pasted], masks[~pasted])
    for frame in range(4):  # whole classes move: a class of the partner is pasted everywhere or nowhere
        for class_id in np.unique(partner_masks[frame]):
            where = partner_masks[frame] == class_id
            assert pasted[frame][where].all() or not pasted[frame][where].any()
        assert 0.1 < pasted[frame].mean() < 0.9
    unchanged = class_mix(tf.constant(images), tf.constant(masks), key(0), 0.0, 23)
    np.testing.assert_array_equal(unchanged[1].numpy(), masks)
