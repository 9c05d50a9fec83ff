"""The per-batch record of a fit: a metric of the latest batch's cross-entropy and a callback
that keeps every batch's loss, cross-entropy, learning rate and time (Keras and TensorFlow)."""

import time

import keras
import tensorflow as tf

from experiments.mnist_cnn.curves import batch_values_from_running_means


@keras.saving.register_keras_serializable(package="tf_overparam_experiments")
class BatchCrossEntropy(keras.metrics.Metric):
    """The mean softmax cross-entropy (from logits) of the latest batch only, not a running
    mean. In `fit` it is the data term of that batch's loss, before the step."""

    def __init__(self, name="batch_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.value = self.add_variable(shape=(), initializer="zeros", aggregation="mean", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):
        losses = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        self.value.assign(keras.ops.cast(keras.ops.mean(losses), self.value.dtype))

    def result(self):
        return keras.ops.copy(self.value)  # a snapshot: convert_to_tensor would alias the variable

    def reset_state(self):
        self.value.assign(0.0)


class BatchRecorder(keras.callbacks.Callback):
    """Records every training batch's loss (full objective, from Keras' running mean; see
    `batch_values_from_running_means`) and cross-entropy (`BatchCrossEntropy`), its learning
    rate and wall time, and writes them to TensorBoard at step = optimizer steps taken."""

    def __init__(self, log_dir=None):
        super().__init__()
        self.log_dir = log_dir
        self.loss, self.cross_entropy, self.learning_rate, self.seconds = [], [], [], []
        self._writer = None
        self._epoch_means = []

    def on_train_begin(self, logs=None):
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_means = []

    def on_train_batch_begin(self, batch, logs=None):
        self.learning_rate.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)
        if len(self._epoch_means) != batch:
            raise RuntimeError("BatchRecorder needs every batch (steps_per_execution=1).")
        self._epoch_means.append(float(logs["loss"]))
        loss = float(batch_values_from_running_means(self._epoch_means)[-1])
        cross_entropy = float(logs["batch_cross_entropy"])
        self.loss.append(loss)
        self.cross_entropy.append(cross_entropy)
        if self._writer is not None:
            with self._writer.as_default(step=len(self.loss)):
                tf.summary.scalar("batch_loss", loss)
                tf.summary.scalar("batch_cross_entropy", cross_entropy)
                tf.summary.scalar("learning_rate", self.learning_rate[-1])

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
