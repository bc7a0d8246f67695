"""The exported .keras file: its identity by content, and the shapes a segmentation model must have."""

import hashlib
import io
import os
import time
import zipfile

import pytest
import tensorflow as tf

from distributed import model_io
from unet_core import unet_model

SIZE = (32, 48)


def test_a_model_saved_again_keeps_its_identity_and_other_weights_change_it(tmp_path):
    tf.keras.utils.set_random_seed(1)
    model = unet_model((*SIZE, 3), n_filters=4, n_classes=23)
    saved = {}
    for name in ("first", "again", "other_weights", "legacy_h5"):
        (tmp_path / name).mkdir()
        saved[name] = tmp_path / name / "model.keras"
    model.save(saved["first"])
    time.sleep(1.1)  # metadata.json's date_saved counts seconds
    model.save(saved["again"])
    model.set_weights([weights + 0.5 for weights in model.get_weights()])
    model.save(saved["other_weights"])
    model.save(tmp_path / "legacy.h5")
    os.replace(tmp_path / "legacy.h5", saved["legacy_h5"])  # HDF5 under a .keras name: tf.keras loads it too
    model_io.load_model(saved["legacy_h5"])

    identity = {name: model_io.model_identity(path.read_bytes(), str(path)) for name, path in saved.items()}
    assert saved["first"].read_bytes() != saved["again"].read_bytes()
    assert identity["first"] == identity["again"]
    assert identity["other_weights"] != identity["first"]
    legacy_digest = hashlib.sha256(saved["legacy_h5"].read_bytes()).hexdigest()
    assert identity["legacy_h5"] == f"model.keras@sha256:{legacy_digest}"  # not a zip: the whole file


def test_a_model_of_256_classes_fits_a_mask_png_and_one_more_does_not(tmp_path):
    # Class ids 0-255: exactly what an 8-bit mask holds.
    for n_classes in (256, 257):
        inputs = tf.keras.Input((8, 8, 3))
        model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(n_classes, 1)(inputs))
        if n_classes == 256:
            assert model_io.model_geometry(model, "m.keras") == ((8, 8), 256)
        else:
            with pytest.raises(ValueError, match="257 classes do not fit the 8-bit class ids of a mask PNG"):
                model_io.model_geometry(model, "m.keras")


def test_archives_whose_members_join_to_the_same_bytes_have_different_identities():
    # A digest of the members' bytes alone, one after another, would name these archives alike: predictions of
    # one model would be taken for the other's on a rerun, and skipped without the other-model warning.
    def archive(members):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as file:
            for name, content in members.items():
                file.writestr(name, content)
        return buffer.getvalue()

    split_here = archive({"config.json": b"{}", "model.weights.h5": b"weights"})
    split_there = archive({"config.json": b"{}w", "model.weights.h5": b"eights"})
    renamed = archive({"config.json": b"{}", "other.weights.h5": b"weights"})
    digests = {model_io.model_digest(content) for content in (split_here, split_there, renamed)}
    assert len(digests) == 3


def test_a_model_without_a_fixed_input_size_is_refused():
    # Every frame is resized to the model's input size: without one, each would fail in the read tasks mid-run.
    inputs = tf.keras.Input((None, None, 3))
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(5, 1)(inputs))
    with pytest.raises(ValueError, match="m.keras: input shape \\(None, None, None, 3\\) has no fixed height and "
                                         "width to resize images to"):
        model_io.model_geometry(model, "m.keras")
