"""A worker's shard as batches (distributed/shard.py), from real Ray Data iterators on a local Ray."""

import numpy as np
import pyarrow
import pytest
import ray
import tensorflow as tf

from distributed.config import TrainConfig
from distributed.shard import fits_in_memory, read_into_memory, training_batches


@pytest.mark.parametrize("augment, in_memory", [(False, False), (True, False), (False, True), (True, True)])
def test_every_epoch_feeds_each_frame_once_in_a_new_order(ray_session, augment, in_memory):
    # Frame i is an image of constant value i / 100 and a mask of constant class i % 23 (both
    # survive flips and zoom-crops), so a batch tells which frames it holds.
    frames = 42
    rows = [{"name": f"{i:06d}.png", "image": np.full((16, 16, 3), i / 100, np.float32),
             "mask": np.full((16, 16), i % 23, np.uint8)} for i in range(frames)]
    # A DataIterator as a worker's get_dataset_shard gives, without a split coordinator to start.
    shard = ray.data.from_items(rows).iterator()
    # ClassMix off: it pastes one frame's classes into another, and these one-class frames whole
    # (tests/test_augment.py checks it).
    config = TrainConfig(image_size=(16, 16), batch_size=4, epochs=4, augment=augment, class_mix=0.0)
    # As every worker does; the default global seed, 0, is one that Dataset.shuffle cannot take
    # beside a seed tensor.
    tf.keras.utils.set_random_seed(config.seed)

    batches = list(training_batches(shard, config, first_epoch=1, rank=0, class_weights=[1.0] * 23,
                                    in_memory=in_memory))

    assert len(batches) == 3 * 11  # epochs 2..4, ceil(42 / 4) batches each
    ids = [[int(i) for i in batch[1][:, 0, 0].numpy()] for batch in batches]
    assert all(len(batch[2].shape) == 3 for batch in batches)  # per-pixel loss weights ride along
    passes = [sum(ids[epoch * 11:(epoch + 1) * 11], []) for epoch in range(3)]
    for seen in passes:
        assert sorted(seen) == sorted(i % 23 for i in range(frames))
    if not augment:  # the image still tells the exact frame: each once per epoch, reshuffled
        images = [round(float(v) * 100) for batch in batches for v in batch[0][:, 0, 0, 0].numpy()]
        epochs = [images[k * frames:(k + 1) * frames] for k in range(3)]
        assert all(sorted(epoch) == list(range(frames)) for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs}) == 3  # no two epochs in the same order


def test_each_worker_draws_its_own_augmentation(ray_session):
    rng = np.random.default_rng(0)
    rows = [{"name": "000000.png", "image": rng.random((16, 16, 3), np.float32),
             "mask": np.arange(256, dtype=np.uint8).reshape(16, 16) % 23}]
    config = TrainConfig(image_size=(16, 16), batch_size=1, epochs=6, class_mix=0.0)

    def views(rank):
        shard = ray.data.from_items(rows).iterator()
        batches = training_batches(shard, config, first_epoch=0, rank=rank, class_weights=None, in_memory=True)
        return np.stack([images.numpy() for images, _ in batches])

    epochs = views(0)
    assert np.array_equal(views(0), epochs)  # a restarted worker draws the same again
    assert not np.array_equal(views(1), epochs)
    assert not np.array_equal(epochs[0], epochs[1])  # a new view every epoch


def test_each_frame_of_an_epoch_draws_its_own_augmentation(ray_session):
    # Four copies of one frame: one view drawn for the whole epoch would feed the same flip, zoom and
    # brightness four times, a quarter of the variety augmentation is for.
    image = np.random.default_rng(0).random((16, 16, 3), np.float32)
    rows = [{"name": f"{i:06d}.png", "image": image, "mask": np.zeros((16, 16), np.uint8)} for i in range(4)]
    config = TrainConfig(image_size=(16, 16), batch_size=4, epochs=1, class_mix=0.0)
    shard = ray.data.from_items(rows).iterator()
    [(views, _)] = list(training_batches(shard, config, 0, 0, class_weights=None, in_memory=True))
    views = views.numpy()
    assert all(not np.array_equal(views[a], views[b]) for a in range(4) for b in range(a + 1, 4))


def test_a_resumed_worker_feeds_its_uninterrupted_batches_class_mix_included(ray_session):
    # Frame i: a constant image i / 10, class i on the top half and i + 6 on the bottom.
    rows = [{"name": f"{i:06d}.png", "image": np.full((16, 16, 3), i / 10, np.float32),
             "mask": np.repeat(np.array([i, i + 6], np.uint8), 8)[:, None].repeat(16, axis=1)} for i in range(6)]
    config = TrainConfig(image_size=(16, 16), batch_size=3, epochs=4, class_mix=1.0)

    def batches(first_epoch):
        shard = ray.data.from_items(rows).iterator()
        return [tuple(part.numpy() for part in batch)
                for batch in training_batches(shard, config, first_epoch, 0, class_weights=None, in_memory=True)]

    uninterrupted, resumed = batches(0), batches(2)
    assert len(uninterrupted) == 8 and len(resumed) == 4  # 2 batches an epoch
    for (images, masks), (images_again, masks_again) in zip(uninterrupted[4:], resumed):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(masks, masks_again)
    # ClassMix did paste: some frame holds pixels of two frames.
    assert any(len(np.unique(image)) > 1 for images, _ in uninterrupted for image in images)


def test_without_augmentation_class_mix_pastes_nothing(ray_session):
    # ClassMix is part of augmentation: --no-augment with the default recipe's --class-mix must feed the frames as
    # they are, not mixed (jobs.train refuses --class-mix beside --no-augment only when it is given).
    rows = [{"name": f"{i:06d}.png", "image": np.full((16, 16, 3), i / 10, np.float32),
             "mask": np.repeat(np.array([i, i + 6], np.uint8), 8)[:, None].repeat(16, axis=1)} for i in range(6)]
    config = TrainConfig(image_size=(16, 16), batch_size=3, epochs=1, augment=False, class_mix=1.0)
    shard = ray.data.from_items(rows).iterator()
    fed = [(image, mask) for images, masks in training_batches(shard, config, 0, 0, None, in_memory=True)
           for image, mask in zip(images.numpy(), masks.numpy())]
    assert len(fed) == 6
    for image, mask in fed:  # frame i whole: image i / 10 everywhere, class i on top and i + 6 below
        i = round(float(image[0, 0, 0]) * 10)
        np.testing.assert_array_equal(image, np.full((16, 16, 3), i / 10, np.float32))
        np.testing.assert_array_equal(mask, rows[i]["mask"])


def test_a_shard_read_into_memory_is_in_frame_name_order(ray_session):
    # Whatever order the blocks arrive in, the epochs' permutations start from the same array.
    names = [f"{i:06d}.png" for i in np.random.default_rng(0).permutation(20)]
    rows = [{"name": name, "image": np.full((2, 2, 3), int(name[:6]), np.float32),
             "mask": np.full((2, 2), int(name[:6]), np.uint8)} for name in names]
    shard = ray.data.from_items(rows, override_num_blocks=5).iterator()

    images, masks = read_into_memory(shard)

    assert images[:, 0, 0, 0].numpy().tolist() == list(range(20))
    assert masks[:, 0, 0].numpy().tolist() == list(range(20))


class AllocatedWhenRead:
    """A shard's iterator that notes pyarrow's allocated bytes once the whole pass is handed over."""

    def __init__(self, iterator):
        self.iterator, self.allocated = iterator, None

    def iter_batches(self, **kwargs):
        yield from self.iterator.iter_batches(**kwargs)
        self.allocated = pyarrow.total_allocated_bytes()


def test_a_shard_is_read_in_place_not_copied_into_pyarrows_memory_pool(ray_session):
    # Ray Data's numpy batches were copies there (the rows of several blocks, or of a block's
    # chunks, joined), and after they were let go the pool kept their pages until the first
    # epoch's validation: one more shard's worth of a worker's memory. A block of two chunks,
    # as the decoded frames' blocks are.
    names = [f"{i:06d}.png" for i in np.random.default_rng(0).permutation(40)]
    rows = [{"name": name, "image": np.full((32, 32, 3), int(name[:6]), np.float32),
             "mask": np.full((32, 32), int(name[:6]), np.uint8)} for name in names]
    table = pyarrow.concat_tables(ray.get(ray.data.from_items(rows, override_num_blocks=2).to_arrow_refs()))
    assert table.column("image").num_chunks == 2
    shard = AllocatedWhenRead(ray.data.from_arrow(table).iterator())
    before = pyarrow.total_allocated_bytes()

    images, masks = read_into_memory(shard)

    assert shard.allocated - before < 40 * 32 * 32 * 13 // 10  # a tenth of the shard
    assert images[:, 0, 0, 0].numpy().tolist() == list(range(40))
    assert masks[:, 0, 0].numpy().tolist() == list(range(40))


def test_a_shard_is_held_in_memory_only_up_to_the_configured_size():
    config = TrainConfig(image_size=(96, 128), cache_shard_mb=1)
    frame_bytes = 96 * 128 * 13  # float32 RGB image + uint8 mask
    assert fits_in_memory(2**20 // frame_bytes, config)
    assert not fits_in_memory(2**20 // frame_bytes + 1, config)
    assert not fits_in_memory(1, TrainConfig(cache_shard_mb=0))
