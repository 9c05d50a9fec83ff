"""The README's usage example runs as written and does what its comments say."""

import contextlib
import io
import pathlib
import re

import keras
import numpy as np

import tf_overparam as to

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks():
    # The JAX example (marked `<!-- jax-example -->`) runs in tests/test_backends.py, without TensorFlow.
    return re.findall(r"(?<!<!-- jax-example -->\n)```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _run_readme(seed=0):
    """Executes the README's ```python blocks, in order, in one namespace; returns it and stdout."""
    blocks = _python_blocks()
    assert len(blocks) >= 2
    keras.utils.set_random_seed(seed)  # the example draws Glorot kernels and shuffles batches
    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # noqa: S102 - our own README
    return namespace, printed.getvalue()


def test_readme_usage_example_runs_and_holds():
    namespace, printed = _run_readme()

    model, plain, deep, shallow = (namespace[k] for k in ("model", "plain", "deep", "shallow"))
    x, y = namespace["x"], namespace["y"]
    layer = model.layers[0]
    assert isinstance(layer, to.OverparamDense) and layer.depth == 3
    assert [tuple(f.shape) for f in layer.factors] == [(8, 1), (1, 1), (1, 1)]

    # "stays ~balanced under gradient descent": Balanced start (relative < 1e-5), 5 epochs of
    # SGD(0.05) on the l4 loss. Gradient descent (not gradient flow) drifts by O(lr): measured
    # relative 0.068-0.084 over seeds 0-4, and 0.060 / 0.041 / 0.019 at lr 0.05 / 0.025 / 0.0125
    # (same time lr * steps). A chain drawn without balancing starts near relative 1.
    balance = to.diagnostics.balancedness(layer)
    assert "Balancedness" in printed
    assert balance.relative < 0.15, balance

    # Training did something: the fit beats the zero predictor's l4 loss mean(y^4)/4 by far.
    zero_loss = np.mean(y.astype(np.float64) ** 4) / 4
    assert model.evaluate(x, y, verbose=0) < 0.1 * zero_loss

    # "the same function with plain Dense layers" and "and back again": float32 rounding (1e-5).
    expected = model.predict(x, verbose=0)
    assert [type(lay) for lay in plain.layers] == [keras.layers.Dense]
    np.testing.assert_allclose(plain.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(deep.layers[0], to.OverparamDense) and deep.layers[0].depth == 2
    np.testing.assert_allclose(deep.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)
    assert to.diagnostics.balancedness(deep.layers[0]).relative < 1e-5

    # "the same outputs": the folded convolutions compute the chained ones (float32 rounding).
    convs, folded, images = namespace["convs"], namespace["folded"], namespace["images"]
    assert [type(lay) for lay in folded.layers] == [keras.layers.Conv2D, keras.layers.Conv2D]
    assert [lay.kernel.shape for lay in folded.layers] == [(3, 3, 3, 8), (5, 5, 8, 4)]
    np.testing.assert_allclose(
        folded.predict(images, verbose=0), convs.predict(images, verbose=0), rtol=1e-5, atol=1e-5
    )

    # The EndToEnd-compiled CNN learned the target: far below the loss of predicting zero,
    # mean(target^2) (0.32 here; measured 0.007 after the 20 epochs, from 0.64 before them).
    cnn, targets = namespace["cnn"], namespace["targets"]
    assert isinstance(cnn.optimizer, to.optimizers.EndToEnd) and cnn.optimizer.depth == 2
    assert cnn.evaluate(images, targets, verbose=0) < 0.1 * np.mean(targets.astype(np.float64) ** 2)

    # The end-to-end model trains a plain Dense by eq. 24 at depth 3, and converges as well.
    assert isinstance(shallow, to.EndToEndModel) and shallow.depth == 3
    assert [type(lay) for lay in shallow.layers[1:]] == [keras.layers.Dense]
    assert shallow.evaluate(x, y, verbose=0) < 0.1 * zero_loss


def test_readme_jax_example_prints_what_it_claims(tmp_path, monkeypatch):
    """The JAX example (run without TensorFlow in test_backends.py) prints the loss falling and the
    equal outputs after collapse and reload. Here it runs in-process on the suite's backend: its
    `os.environ` line cannot switch a Keras already imported, and monkeypatch restores it after."""
    blocks = re.findall(r"<!-- jax-example -->\n```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    monkeypatch.chdir(tmp_path)  # it saves overparam.keras
    keras.utils.set_random_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], str(README), "exec"), {})  # noqa: S102 - our own README
    lines = printed.getvalue().splitlines()
    assert len(lines) == 4, lines

    def losses(line):
        first, last = re.search(r"loss (\S+) -> (\S+)$", line).groups()
        return float(first), float(last)

    # Trained: the mean squared error falls by orders of magnitude (a consistent linear target).
    assert lines[0].startswith(f"{keras.backend.backend()}: loss")
    first, last = losses(lines[0])
    assert last < 1e-3 * first, lines[0]
    # Collapsed: one matmul with the product instead of three, equal to float32 rounding of y (~1-10).
    assert float(lines[1].rsplit(":", 1)[1]) <= 1e-4, lines[1]
    assert lines[2] == "reloaded, equal outputs: True"
    first, last = losses(lines[3])
    assert lines[3].startswith("EndToEnd:") and last < 1e-3 * first, lines[3]


def test_readme_is_a_front_door():
    """At most 250 lines; it shows the Ray options, points to the preprocessing study, and every
    link to a file of the repository (docs pages, images) resolves."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "--workers" in text and "--address" in text
    assert "docs/results/gas-sensor.md#preprocessing-study" in text
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert local, "the README links to the docs"
    missing = [target for target in local if not (README.parent / target).exists()]
    assert not missing, missing
