"""Keras callbacks: TensorBoard logs of the overparameterized layers of any model.

`OverparamTensorBoard` goes into `model.fit(callbacks=[...])` next to Keras' own
`keras.callbacks.TensorBoard`; pass both the same root folder and TensorBoard shows the Keras
runs `train` and `validation` beside this callback's run `overparam`.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from tf_overparam import diagnostics
from tf_overparam.layers import OverparamDense


def find_overparam_layers(model):
    """Every `OverparamDense` in `model`, searched recursively through nested layers and
    models, in depth-first order, each once."""
    found, seen = [], set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, OverparamDense):
            found.append(layer)
            return
        for child in getattr(layer, "_layers", None) or getattr(layer, "layers", None) or []:
            visit(child)

    visit(model)
    return found


def current_learning_rate(optimizer):
    """The learning rate the optimizer's next step uses (a schedule evaluated at its current
    `iterations`), as a float."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def effective_learning_rate(learning_rate, spectral_norm, depth):
    """`learning_rate * ||W_e||_2 ** (2 - 2 / depth)`: the factor by which a depth-N balanced
    chain scales the step of the end-to-end matrix along W_e itself (eq. 27: for one output
    the update is eta ||w||^{2-2/N} (g + (N-1) <g, w> w / ||w||^2); for several outputs
    ||W_e||_2^{2-2/N} is the preconditioner's eigenvalue / N on the top singular direction,
    eq. 26). Depth 1 gives `learning_rate`. It describes plain gradient descent; momentum and
    adaptive optimizers rescale steps further."""
    return float(learning_rate) * float(spectral_norm) ** (2.0 - 2.0 / depth)


class OverparamTensorBoard(keras.callbacks.Callback):
    """Writes, for every `OverparamDense` of the model, the chain's state to TensorBoard.

    Per layer (tags start with the layer's name, e.g. `fc1/`, or with its `path` when several
    logged layers share a name):
    - `balancedness`: max_j ||F_{j+1} F_{j+1}^T - F_j^T F_j||_F (0 = balanced; the condition
      under which deep gradient descent follows the end-to-end rule, eq. 24);
    - `balancedness_relative`: the same divided by the largest of those Gram norms;
    - `end_to_end_singular_values` (histogram) and `end_to_end_spectral_norm` (scalar): the
      spectrum of the end-to-end kernel F_1 ... F_N;
    - `effective_learning_rate`: the optimizer's current learning rate times
      ||W_e||_2^{2-2/N} (`effective_learning_rate`, the factor of eq. 27).
    All values are computed in float64 by `tf_overparam.diagnostics`.

    The step of every value is the optimizer's step count (`optimizer.iterations`, as for
    Keras' batch-level logs), also in `update_freq="epoch"` mode; the state before training
    is written at the current step when training begins.

    Args:
        log_dir: root folder of the logs (the same as Keras' `TensorBoard` is fine).
        update_freq: "epoch" (at the end of every epoch) or a positive int N (after every
            step whose count is a multiple of N). Every value costs an SVD of each end-to-end
            kernel, so keep N in the tens or hundreds for large layers.
        run_name: subfolder of `log_dir` written to, i.e. the TensorBoard run name; None
            writes to `log_dir` itself.
        histograms: bool, whether to write the singular-value histograms.

    Example:

    >>> model.fit(x, y, callbacks=[keras.callbacks.TensorBoard("logs"),
    ...                            OverparamTensorBoard("logs", update_freq=100)])  # doctest: +SKIP
    """

    def __init__(self, log_dir, update_freq="epoch", run_name="overparam", histograms=True):
        super().__init__()
        if update_freq != "epoch" and (
            isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1
        ):
            raise ValueError(f'`update_freq` must be "epoch" or a positive int, got {update_freq!r}.')
        self.log_dir = os.fspath(log_dir) if run_name is None else os.path.join(os.fspath(log_dir), run_name)
        self.update_freq = update_freq
        self.histograms = histograms
        self._writer = None
        self._layers = []
        self._last_step = None

    def set_model(self, model):
        super().set_model(model)
        self._layers = find_overparam_layers(model)

    def tag(self, layer):
        """The tag prefix of a layer: its name, or its path when the name is not unique."""
        names = [other.name for other in self._layers]
        return layer.name if names.count(layer.name) == 1 else (getattr(layer, "path", None) or layer.name)

    @property
    def layers(self):
        """The `OverparamDense` layers this callback logs."""
        return list(self._layers)

    def on_train_begin(self, logs=None):
        self._layers = find_overparam_layers(self.model)
        self._write()

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch" and self._step() % self.update_freq == 0:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _write(self):
        step = self._step()
        if not self._layers or step == self._last_step:
            return
        self._last_step = step
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        learning_rate = current_learning_rate(self.model.optimizer)
        with self._writer.as_default(step=step):
            for layer in self._layers:
                tag = self.tag(layer)
                balance = diagnostics.balancedness(layer)
                singular_values = diagnostics.end_to_end_singular_values(layer)
                tf.summary.scalar(f"{tag}/balancedness", balance.absolute)
                tf.summary.scalar(f"{tag}/balancedness_relative", balance.relative)
                tf.summary.scalar(f"{tag}/end_to_end_spectral_norm", float(singular_values[0]))
                tf.summary.scalar(
                    f"{tag}/effective_learning_rate",
                    effective_learning_rate(learning_rate, singular_values[0], layer.depth),
                )
                if self.histograms:
                    tf.summary.histogram(f"{tag}/end_to_end_singular_values", np.asarray(singular_values))
        self._writer.flush()
