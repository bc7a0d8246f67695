"""A worker's training shard as one tf.data pipeline over every remaining epoch: each epoch one
pass over the shard, reshuffled and augmented with seeds of (worker, epoch, position).

The shard is read once into the worker's memory when it fits within `--cache-shard-mb` (then a
resumed or restarted worker feeds exactly what it would have fed without the break), and
streamed from Ray Data again every epoch when it does not.
"""

import numpy as np
import tensorflow as tf

from unet_core import augment


def training_batches(train_shard, config, first_epoch, rank, class_weights, in_memory):
    """This worker's batches for epochs `first_epoch` on, with per-pixel loss weights when
    `class_weights` is given. Augmented within each pass, every epoch holds exactly
    ceil(rows / batch) batches. `in_memory`: 1.22× the images/s of streaming the shard from Ray
    Data every epoch, on 2 cores (BENCHMARKS.md).
    """
    if in_memory:
        images, masks = read_into_memory(train_shard)

        def epoch_frames(epoch):
            # A stateless permutation: Dataset.shuffle cannot take a per-epoch seed tensor once
            # the worker has set a global seed.
            seed = tf.stack([tf.constant(worker_seed(config, rank), tf.int64), epoch])
            order = tf.random.experimental.stateless_shuffle(tf.range(images.shape[0]), seed)
            # A gather, not images[row]: after a scatter, reading the whole variable copies it.
            return tf.data.Dataset.from_tensor_slices(order).map(
                lambda row: (tf.gather(images, row), tf.gather(masks, row)))
    else:
        height, width = config.image_size
        signature = (tf.TensorSpec((None, height, width, 3), tf.float32),
                     tf.TensorSpec((None, height, width), tf.uint8))

        def one_pass(epoch):
            return train_shard.iter_batches(
                batch_size=config.batch_size, batch_format="numpy",
                local_shuffle_buffer_size=max(4 * config.batch_size, 64),
                local_shuffle_seed=worker_seed(config, rank) + int(epoch) * 10,
            )

        def epoch_frames(epoch):
            return tf.data.Dataset.from_generator(
                lambda epoch: ((batch["image"], batch["mask"]) for batch in one_pass(epoch)),
                args=(epoch,), output_signature=signature,
            ).unbatch()

    # Each frame's view and each batch's ClassMix draw from a seed of (worker, epoch, position):
    # a resumed or restarted worker with its shard in memory feeds what it would have fed
    # without the break (a streamed shard's order depends on how Ray Data hands over blocks).
    worker_key = tf.constant([worker_seed(config, rank), 0], tf.int64)
    fold_in = tf.random.experimental.stateless_fold_in

    def epoch_batches(epoch):
        frame_key, batch_key = tf.unstack(tf.random.experimental.stateless_split(fold_in(worker_key, epoch), 2))
        dataset = epoch_frames(epoch)
        if config.augment:
            dataset = dataset.enumerate().map(
                lambda index, frame: augment.augment(*frame, fold_in(frame_key, index)),
                num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.batch(config.batch_size)
        if config.augment and config.class_mix:
            dataset = dataset.enumerate().map(lambda index, batch: augment.class_mix(
                *batch, fold_in(batch_key, index), config.class_mix, config.n_classes))
        return dataset

    dataset = tf.data.Dataset.range(first_epoch, config.epochs).flat_map(epoch_batches)
    if class_weights is not None:
        dataset = dataset.map(lambda image, mask: (image, mask, augment.pixel_weights(mask, class_weights)))
    return dataset.prefetch(tf.data.AUTOTUNE)


def worker_seed(config, rank):
    """A seed of each worker's own, the same on a restart: its shuffles, augmentation and dropout draw from it."""
    return config.seed * 1_000 + rank


def read_into_memory(train_shard):
    """(images, masks) of one whole pass over a worker's shard, as variables in frame-name order:
    Ray Data hands blocks over in no fixed order, and the epochs' permutations must not depend on it.

    Each block is copied to its rows, into variables whose memory is only taken as rows fill, so
    the worker holds the shard once, not once per copy: a tf.constant of it kept two copies, and
    tf.data copied a captured constant once more when it rewrote the pipeline (a variable it
    passes by handle). The blocks are read in place, in Ray's object store (`block_arrays`).
    """
    parts = [block_arrays(batch) for table in train_shard.iter_batches(batch_size=None, batch_format="pyarrow")
             for batch in table.to_batches()]
    names = np.concatenate([part["name"] for part in parts])
    position = np.empty(len(names), np.int64)
    position[np.argsort(names, kind="stable")] = np.arange(len(names))
    with tf.device("CPU:0"):  # tf.data runs on the host, GPU worker or not
        held = {column: tf.Variable(tf.raw_ops.Empty(shape=(len(names), *parts[0][column].shape[1:]),
                                                      dtype=parts[0][column].dtype, init=False), trainable=False)
                 for column in ("image", "mask")}
        start = 0
        while parts:
            part = parts.pop(0)
            rows = position[start:start + len(part["name"]), None]
            for column, variable in held.items():
                variable.scatter_nd_update(rows, part[column])
            start += len(rows)
    return held["image"], held["mask"]


def block_arrays(batch):
    """A record batch of a shard's block as numpy arrays, the images and masks views of the
    block's buffers in Ray's object store (shared memory the store already counts).

    Not Ray Data's numpy batches: those are copies in pyarrow's memory pool (a batch's blocks, or
    a block's chunks, joined into one array), and the pool (mimalloc) kept the pages of that copy
    of the whole shard after it was let go, until Ray Data next allocated in it at the first
    epoch's validation: one more shard's worth of private memory through epoch 1. A record
    batch's columns are single chunks, viewed as they are.
    """
    return {"name": batch.column("name").to_numpy(zero_copy_only=False),
            **{column: batch.column(column).to_numpy_ndarray() for column in ("image", "mask")}}


def fits_in_memory(rows, config):
    """Whether a worker's training shard (float32 images, uint8 masks) is within `cache_shard_mb`."""
    height, width = config.image_size
    return rows * height * width * (3 * 4 + 1) <= config.cache_shard_mb * 2**20
