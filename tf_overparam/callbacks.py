"""Keras callbacks: TensorBoard logs of the overparameterized layers of any model.

`OverparamTensorBoard` goes into `model.fit(callbacks=[...])` next to Keras' own
`keras.callbacks.TensorBoard`; pass both the same root folder and TensorBoard shows the Keras
runs `train` and `validation` beside this callback's run `overparam`.
"""

import os

import keras

from tf_overparam import diagnostics, hessian
from tf_overparam._keras_compat import sublayers
from tf_overparam.diagnostics import effective_learning_rate  # noqa: F401  (also importable from here)
from tf_overparam.layers import registry
from tf_overparam.validation import check_positive_int


def _summary():
    """`tf.summary`, imported when a TensorBoard writer is first used: `SharpnessLogger` and
    `find_overparam_layers` need no TensorFlow."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "tf_overparam.callbacks writes TensorBoard logs through tf.summary, which needs TensorFlow: "
            "pip install tf_overparam[tensorflow]"
        ) from error
    return tf.summary


def find_overparam_layers(model):
    """Every overparameterized layer (`OverparamDense`, and any registered overparameterized
    layer) in `model`, searched recursively through nested layers and models, in depth-first
    order, each once."""
    found, seen = [], set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if registry.is_overparam(layer):
            found.append(layer)
            return
        for child in sublayers(layer):
            visit(child)

    visit(model)
    return found


def current_learning_rate(optimizer):
    """The learning rate the optimizer's next step uses (a schedule evaluated at its current
    `iterations`), as a float."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def write_chain_summaries(factors, step, learning_rate=None, depth=None, prefix="", histograms=True):
    """Writes the state of one chain to the default `tf.summary` writer, at `step`.

    The one TensorBoard writer of the library (`OverparamTensorBoard` and the gas sensor
    experiment both use it). Tags, each after `prefix` (e.g. "fc1/"):
    - `balancedness`: max_j ||F_{j+1} F_{j+1}^T - F_j^T F_j||_F (0 = balanced; the condition
      under which deep gradient descent follows the end-to-end rule, eq. 24);
    - `balancedness_relative`: the same divided by the largest of those Gram norms;
    - `end_to_end_spectral_norm` (scalar) and `end_to_end_singular_values` (histogram, if
      `histograms`): the spectrum of the end-to-end kernel F_1 ... F_N;
    - `effective_learning_rate` (if `learning_rate` is given): learning_rate *
      ||W_e||_2^{2-2/N}, the factor of eq. 27 (`diagnostics.effective_learning_rate`).
    All values are computed in float64 by `tf_overparam.diagnostics`.

    Args:
        factors: a overparameterized layer or a list of factor matrices, input side first.
        step: int, the summary step.
        learning_rate: float or None.
        depth: the depth N of the effective learning rate; default the number of factors
            (give it when a single matrix emulates a depth-N chain).
        prefix: tag prefix.
        histograms: bool, whether to write the singular-value histogram.

    Returns:
        True if written; False (nothing written) when the factors are not finite.
    """
    try:
        chain = diagnostics.chain_factors(factors)
    except diagnostics.NonFiniteError:
        return False
    summary = _summary()
    depth = len(chain) if depth is None else depth
    balance = diagnostics.balancedness(chain)
    singular_values = diagnostics.end_to_end_singular_values(chain)
    summary.scalar(f"{prefix}balancedness", balance.absolute, step=step)
    summary.scalar(f"{prefix}balancedness_relative", balance.relative, step=step)
    summary.scalar(f"{prefix}end_to_end_spectral_norm", float(singular_values[0]), step=step)
    if learning_rate is not None:
        summary.scalar(
            f"{prefix}effective_learning_rate",
            diagnostics.effective_learning_rate(learning_rate, singular_values[0], depth),
            step=step,
        )
    if histograms:
        summary.histogram(f"{prefix}end_to_end_singular_values", singular_values, step=step)
    return True


def _matrix_chains(model):
    return [layer for layer in find_overparam_layers(model) if all(len(f.shape) == 2 for f in layer.factors)]


class OverparamTensorBoard(keras.callbacks.Callback):
    """Writes, for every overparameterized layer of the model, the chain's state to TensorBoard
    (`write_chain_summaries`).

    Per layer, the tags of `write_chain_summaries`, each after the layer's name (e.g.
    `fc1/balancedness`), or its `path` when several logged layers share a name. Layers whose
    factors are not matrices (a spatial convolution chain) are not logged; a layer whose
    factors turned non-finite is skipped at that step.

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
        if update_freq != "epoch":
            try:
                update_freq = check_positive_int(update_freq, "update_freq")
            except ValueError:
                raise ValueError(f'`update_freq` must be "epoch" or a positive int, got {update_freq!r}.') from None
        self.log_dir = os.fspath(log_dir) if run_name is None else os.path.join(os.fspath(log_dir), run_name)
        self.update_freq = update_freq
        self.histograms = histograms
        self._writer = None
        self._logged_layers = []
        self._last_step = None

    def set_model(self, model):
        super().set_model(model)
        self._logged_layers = _matrix_chains(model)

    def tag(self, layer):
        """The tag prefix of a layer: its name, or its path when the name is not unique."""
        names = [other.name for other in self._logged_layers]
        return layer.name if names.count(layer.name) == 1 else (getattr(layer, "path", None) or layer.name)

    @property
    def layers(self):
        """The overparameterized layers this callback logs."""
        return list(self._logged_layers)

    def on_train_begin(self, logs=None):
        self._logged_layers = _matrix_chains(self.model)
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
        if not self._logged_layers or step == self._last_step:
            return
        self._last_step = step
        if self._writer is None:
            self._writer = _summary().create_file_writer(self.log_dir)
        learning_rate = current_learning_rate(self.model.optimizer)
        with self._writer.as_default():
            for layer in self._logged_layers:
                write_chain_summaries(
                    layer, step, learning_rate, prefix=f"{self.tag(layer)}/", histograms=self.histograms
                )
        self._writer.flush()


class SharpnessLogger(keras.callbacks.Callback):
    """Logs the sharpness of the loss on a fixed batch (`diagnostics.sharpness`, the largest
    eigenvalue of its Hessian) and the learning rate times it, into the logs of `model.fit`.

    With full-batch gradient descent, `lr_x_sharpness` crossing 2 marks the edge of stability:
    on a quadratic GD diverges exactly there, and on a deep model the sharpness rises during
    training until it meets 2 / lr (Cohen et al., ICLR 2021). Other optimizers have other
    thresholds (heavy-ball momentum beta: 2 + 2 beta); the value is logged all the same.

    Keys added to the logs dict: `sharpness` and `lr_x_sharpness`; the learning rate is the one
    the next step uses (a schedule evaluated at the current step). Every callback after this
    one in `callbacks=[...]` sees them: Keras' `TensorBoard` (as `batch_sharpness`, ... with an
    int `update_freq`; `epoch_...` in "epoch" mode) and `History` (in "epoch" mode). Put this
    callback before `keras.callbacks.TensorBoard`. The values are also kept in `history`.
    No `tf.summary` is needed: it runs on any backend `diagnostics.sharpness` supports.

    Args:
        x, y: the batch the Hessian is taken on, fixed through training: the whole training
            set for full-batch gradient descent, a probe batch otherwise.
        every: "epoch" (at the end of every epoch) or a positive int N (after every step whose
            count is a multiple of N). Each value costs `iterations` Hessian-vector products,
            about two gradients each, on the batch.
        loss, iterations, seed: as for `diagnostics.sharpness` (None: the compiled objective).

    Attributes:
        history: dict of lists `step`, `learning_rate`, `sharpness`, `lr_x_sharpness`, one entry
            per value logged; `step` is the optimizer's step count.

    Example:

    >>> model.fit(x, y, batch_size=len(x), callbacks=[SharpnessLogger(x, y, every=10),
    ...                                               keras.callbacks.TensorBoard("logs", update_freq=10)])  # doctest: +SKIP
    """

    def __init__(self, x, y, every="epoch", loss=None, iterations=20, seed=0):
        super().__init__()
        if every != "epoch":
            try:
                every = check_positive_int(every, "every")
            except ValueError:
                raise ValueError(f'`every` must be "epoch" or a positive int, got {every!r}.') from None
        self.x, self.y, self.every = x, y, every
        # The rest is checked against the model when training begins (`sharpness_arguments`).
        self.iterations = check_positive_int(iterations, "iterations")
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.loss = loss
        self._product = None
        self.history = {"step": [], "learning_rate": [], "sharpness": [], "lr_x_sharpness": []}

    def on_train_begin(self, logs=None):
        model = self.model
        loss, self._iterations, self._seed = diagnostics.sharpness_arguments(
            model, self.x, self.y, self.loss, self.iterations, self.seed
        )
        # Built once: the product reads the variables' current values at every call.
        self._product = hessian.hessian_vector_product(model, self.x, self.y, loss)
        self._shapes = [tuple(v.shape) for v in model.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        if self.every != "epoch":
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if step % self.every == 0:
                self._log(step, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.every == "epoch":
            self._log(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)), logs)

    def _log(self, step, logs):
        # First `self.model`: on JAX, reading it brings the variables up to date mid-epoch.
        learning_rate = current_learning_rate(self.model.optimizer)
        value = hessian.top_eigenpair(self._product, self._shapes, self._iterations, self._seed).value
        entry = {
            "step": step,
            "learning_rate": learning_rate,
            "sharpness": value,
            "lr_x_sharpness": learning_rate * value,
        }
        for key, item in entry.items():
            self.history[key].append(item)
        if logs is not None:
            logs["sharpness"] = value
            logs["lr_x_sharpness"] = learning_rate * value
