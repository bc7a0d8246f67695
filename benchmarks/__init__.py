"""Speed benchmarks: `python -m benchmarks.run [--quick] [--tiny]` (method in BENCHMARKS.md).

Every figure compares alternatives measured side by side in the same run, on the same data and
model, interleaved and repeated; the harness prints one JSON line per figure.
"""

import os

# As unet_core does: tf.keras must be tf-keras (Keras 2), and TF must read this before tf.keras.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
