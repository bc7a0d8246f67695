"""A failure injected into training, to prove on a real cluster that a run recovers from its
checkpoints (`TrainConfig.fail_once_at_epoch`; the tests set it)."""

import pyarrow.fs
import tensorflow as tf

from distributed import ingest


class FailOnce(tf.keras.callbacks.Callback):
    """Makes the last worker crash mid-epoch, once per run, to prove that training recovers from
    checkpoints (on a lone worker too: it is the last)."""

    def __init__(self, config, rank, world_size):
        super().__init__()
        self.rank = rank
        self.fails_here = rank == world_size - 1
        self.fail_epoch = config.fail_once_at_epoch
        # In the run's storage, which every node reaches (a cloud URI on a cluster). Looked up
        # once: a restarted worker builds a new callback.
        self.filesystem, run_root = ingest.open_root(config.run_storage)
        self.marker = f"{run_root}/injected_failure"
        self.failed_before = self.filesystem.get_file_info(self.marker).type != pyarrow.fs.FileType.NotFound
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        if self.fails_here and self.epoch == self.fail_epoch and not self.failed_before:
            with self.filesystem.open_output_stream(self.marker):
                pass
            raise RuntimeError(f"injected failure on rank {self.rank} in epoch {self.epoch}")
