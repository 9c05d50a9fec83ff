"""Keras' own layer test harness for the library's layers (shared by the layer test files).

`run_keras_layer_test(layer_cls, init_kwargs, input_shape, ...)` runs
`keras.src.testing.TestCase.run_layer_test`: config serialization round trip, build, symbolic
and eager calls, the expected output shape and weight counts, a one-step `fit`, and the same
under a `mixed_float16` policy. Keras exposes this harness only under `keras.src`; it is used
by the tests alone, never by the library.
"""

from keras.src.testing import TestCase


class _Harness(TestCase):
    def runTest(self):  # unittest needs a test method to instantiate the case
        pass


def run_keras_layer_test(layer_cls, init_kwargs, input_shape, expected_output_shape, **kwargs):
    """Runs Keras' `run_layer_test` on `layer_cls(**init_kwargs)`; fails the calling test on
    any failed check. Extra keyword arguments go to `run_layer_test` (e.g.
    `expected_num_trainable_weights`, `expected_num_losses`, `supports_masking`)."""
    harness = _Harness()
    harness.setUp()
    try:
        harness.run_layer_test(
            layer_cls,
            init_kwargs=init_kwargs,
            input_shape=input_shape,
            expected_output_shape=expected_output_shape,
            **kwargs,
        )
    finally:
        harness.tearDown()
