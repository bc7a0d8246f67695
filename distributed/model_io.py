"""The .keras file a training run exports, as inference and evaluation take it: found behind
--model, loaded in safe mode, named by its content, and checked to map RGB images to a score per
class for every pixel."""

import hashlib
import io
import json
import os
import zipfile

import tensorflow as tf

from distributed import checkpoint

MODEL_FILE = "model.keras"


def model_file(path):
    """The .keras file behind --model: the file itself, or model.keras in a run's output directory."""
    if not os.path.exists(path):  # a typo: "not a .keras model file" would send the user looking at its contents
        raise ValueError(f"{path}: not found")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isfile(os.path.join(folder, checkpoint.STATE)):
        raise ValueError(f"{path}: of a training checkpoint, whose {MODEL_FILE} holds the raw weights training goes on "
                         f"from (not the best epoch's, nor their moving average); pass the run's --output directory "
                         f"or its {MODEL_FILE}, which jobs.train exports")
    candidate = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    if not candidate.endswith(".keras") or not os.path.isfile(candidate):
        raise ValueError(f"{path}: not a .keras model file, nor a directory holding {MODEL_FILE}")
    return candidate


def load_model(path):
    """A saved model in safe mode, for prediction (no optimizer state)."""
    try:
        return tf.keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # whatever the loader trips on (h5py's OSError, a bad zip, ...), the file is bad
        version = saved_by_keras(path)
        if version and not version.startswith("2."):
            raise ValueError(f"{path}: saved by Keras {version}, whose files tf.keras (Keras 2, which unet-ray "
                             f"trains with) cannot read; save the model from tf.keras, as jobs.train exports it "
                             f"({type(error).__name__}: {error})") from error
        raise ValueError(f"{path}: tf.keras cannot load this model: {type(error).__name__}: {error}") from error


def saved_by_keras(path):
    """The Keras version a .keras zip's metadata.json names, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            return str(json.loads(archive.read("metadata.json")).get("keras_version"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def model_identity(model_bytes, path):
    """Names the network and weights that made a prediction, wherever the file was copied to and
    however often they were exported again."""
    return f"{os.path.basename(path)}@sha256:{model_digest(model_bytes)}"


def weights_of(identity):
    """The part of a `model_identity` that names the network and weights: a copy of the file under
    another name is the same model."""
    return identity.rpartition("@")[2]


def model_digest(model_bytes):
    """sha256 of a .keras zip's members but metadata.json, in name order; of the whole file otherwise."""
    if not zipfile.is_zipfile(io.BytesIO(model_bytes)):
        return hashlib.sha256(model_bytes).hexdigest()  # an HDF5 model named .keras, which tf.keras loads too
    digest = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(model_bytes)) as archive:
        for name in sorted(archive.namelist()):
            # metadata.json holds the time the model was saved, which changes no prediction.
            if name != "metadata.json":
                content = archive.read(name)
                # Each name and length first, so that no two different archives hash alike.
                digest.update(f"{name}\n{len(content)}\n".encode())
                digest.update(content)
    return digest.hexdigest()


def model_geometry(model, path):
    """((height, width) the model takes, number of classes it predicts), once it is known to map a
    batch of RGB images to a score per class for every pixel, as jobs.train's U-Net does: any
    other model that loads would fail in an actor mid-run, or write masks that mean nothing."""
    inputs, outputs = model.input_shape, model.output_shape
    if not (isinstance(inputs, tuple) and len(inputs) == 4 and inputs[-1] == 3):
        raise ValueError(f"{path}: takes input of shape {inputs}, not RGB images (None, height, width, 3); "
                         f"pass a segmentation model such as jobs.train exports")
    height, width = inputs[1:3]
    if not height or not width:
        raise ValueError(f"{path}: input shape {inputs} has no fixed height and width to resize images to")
    if not (isinstance(outputs, tuple) and len(outputs) == 4 and outputs[1:3] == (height, width)):
        raise ValueError(f"{path}: gives output of shape {outputs}, not a score per class for every pixel "
                         f"(None, {height}, {width}, classes); pass a segmentation model such as jobs.train exports")
    n_classes = outputs[-1]
    if not n_classes or n_classes < 2:
        raise ValueError(f"{path}: gives {n_classes} score(s) per pixel, so a mask's argmax would always be 0; "
                         f"a segmentation model scores 2 or more classes")
    if n_classes > 256:
        raise ValueError(f"{path}: {n_classes} classes do not fit the 8-bit class ids of a mask PNG")
    return (height, width), n_classes
