"""Ray Data ingest on a real local Ray: the class counts the recipe takes from the training frames."""

import numpy as np
import pytest
import ray

from distributed import ingest


@pytest.fixture(scope="module")
def frames(ray_session):
    rng = np.random.default_rng(0)
    images = rng.random((10, 8, 16, 3)).astype(np.float32)
    masks = rng.integers(0, 5, (10, 8, 16)).astype(np.uint8)
    rows = [{"image": image, "mask": mask} for image, mask in zip(images, masks)]
    return ray.data.from_items(rows, override_num_blocks=3), masks


def test_class_pixel_counts_equal_numpy_over_every_pixel(frames):
    dataset, masks = frames
    assert ingest.class_pixel_counts(dataset, 6).tolist() == np.bincount(masks.ravel(), minlength=6).tolist()
