"""distributed: everything that runs on Ray — ingest, training, batch inference."""

import unet_core  # noqa: F401  (selects tf-keras before anything can touch tf.keras)
