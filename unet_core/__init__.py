"""unet_core: the U-Net, its data contract, metrics, plots and synthetic scenes. No Ray here."""

import os

# tf.keras must resolve to tf-keras (Keras 2): Keras 3 breaks MultiWorkerMirroredStrategy.
# TF reads this when tf.keras is first touched, so it must be set before that.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__all__ = ["conv_block", "upsampling_block", "unet_model"]


def __getattr__(name):
    # The model pulls in TensorFlow (seconds to import); data, scenes and plots do not need it.
    if name in __all__:
        from unet_core import model

        return getattr(model, name)
    raise AttributeError(f"module 'unet_core' has no attribute {name!r}")
