"""Ray Train's TensorFlow backend, from a module that imports no TensorFlow.

Ray Train's controller unpickles the trainer's backend config. Ray's own, `TensorflowConfig`, lives
in `ray.train.tensorflow`, whose `__init__` imports TensorFlow, so every run's controller held it in
memory on the driver's node for the whole run (706 MB against 212 MB, BENCHMARKS.md), though the
controller never runs a model. This backend does on the workers what Ray's does: it writes the
TF_CONFIG that MultiWorkerMirroredStrategy reads, and selects tf-keras.
"""

import json
import os

import ray
from ray._common.network_utils import build_address
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework  # Ray is pinned to 2.60 (pyproject.toml)


class TensorflowClusterConfig(BackendConfig):
    """`TensorflowTrainer(tensorflow_config=TensorflowClusterConfig())`: as Ray's `TensorflowConfig`."""

    @property
    def backend_cls(self):
        return TensorflowClusterBackend

    @property
    def framework(self):  # Ray's dashboard and state API name the run's framework from it
        return TrainingFramework.TENSORFLOW


class TensorflowClusterBackend(Backend):
    def on_start(self, worker_group, backend_config):
        addresses = worker_group.execute(worker_address)
        # Awaited together, so that a worker failing its setup fails the start, as with Ray's backend.
        ray.get([worker_group.execute_single_async(rank, set_tf_config, addresses, rank)
                 for rank in range(len(worker_group))])


def worker_address():
    """host:port on which this worker's TensorFlow server will listen (a free port on its node)."""
    return build_address(*get_address_and_port())


def set_tf_config(addresses, rank):
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # as Ray's: the job's runtime env and unet_core set it too
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank}})
