"""unet_core: the U-Net, its data contract, metrics, plots and synthetic scenes. No Ray here."""

import os

# tf.keras must resolve to tf-keras (Keras 2): Keras 3 breaks MultiWorkerMirroredStrategy.
# TF reads this when tf.keras is first touched, so it must be set before that.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__all__ = ["conv_block", "upsampling_block", "unet_model"]

# The encoder halves height and width four times, so both must divide by 2**4. Here, not in
# model.py, so that a run's settings are checked without importing TensorFlow.
DOWNSAMPLING_FACTOR = 16


def check_input_size(height, width, what="unet_model input"):
    """A ValueError unless the U-Net takes `height` × `width` images."""
    if min(height, width) < DOWNSAMPLING_FACTOR or height % DOWNSAMPLING_FACTOR or width % DOWNSAMPLING_FACTOR:
        def near(side):
            return max(round(side / DOWNSAMPLING_FACTOR), 1) * DOWNSAMPLING_FACTOR

        raise ValueError(
            f"{what} height and width must be positive multiples of {DOWNSAMPLING_FACTOR} (the encoder pools "
            f"four times), got {height}×{width}; try {near(height)}×{near(width)}."
        )


def __getattr__(name):
    # The model pulls in TensorFlow (seconds to import); data, scenes and plots do not need it.
    if name in __all__:
        from unet_core import model

        return getattr(model, name)
    raise AttributeError(f"module 'unet_core' has no attribute {name!r}")
