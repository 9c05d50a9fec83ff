"""Initializers for factor chains: near-zero, identity (linear residual) and balanced.

A plain Keras initializer given to `OverparamDense` draws each factor independently. The
subclasses of `ChainInitializer` see the whole chain at once (`chain(shapes)`), which the
identity and balanced initialisations need.
"""

import keras
import numpy as np

from tf_overparam import backend
from tf_overparam.chain import balanced_factors
from tf_overparam.validation import PACKAGE, check_positive_float


@keras.saving.register_keras_serializable(package=PACKAGE)
class NearZero(keras.initializers.RandomNormal):
    """The paper's near-zero initialisation: i.i.d. N(0, stddev^2) entries.

    Args:
        stddev: positive float, the standard deviation of every entry.
        seed: int or None. An int makes the draw reproducible.

    Example:

    >>> init = NearZero(stddev=1e-3, seed=0)
    >>> init((4, 2)).shape
    TensorShape([4, 2])
    """

    def __init__(self, stddev=0.01, seed=None):
        super().__init__(mean=0.0, stddev=check_positive_float(stddev, "stddev"), seed=seed)

    def get_config(self):
        config = super().get_config()
        config.pop("mean")
        return config


class ChainInitializer(keras.initializers.Initializer):
    """An initializer that draws all factors of a chain together.

    Subclasses implement `chain(shapes, dtype)`. Called on one shape, it initialises a chain
    of depth 1, so a chain initializer also serves a plain `Dense` kernel.
    """

    def chain(self, shapes, dtype=None):
        """Returns one tensor per shape, input side first; shapes are (n_{j-1}, n_j)."""
        raise NotImplementedError

    def __call__(self, shape, dtype=None):
        return self.chain([tuple(shape)], dtype=dtype)[0]


def _check_chain_shapes(shapes):
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    for shape in shapes:
        if len(shape) != 2:
            raise ValueError(f"Chain initializers serve 2-D factors only, got shape {shape}.")
    for (_, out_width), (in_width, _) in zip(shapes, shapes[1:]):
        if out_width != in_width:
            raise ValueError(f"Factor shapes {shapes} do not form a chain.")
    return shapes


@keras.saving.register_keras_serializable(package=PACKAGE)
class Identity(ChainInitializer):
    """Every factor is `gain` times the (rectangular) identity: a linear residual network.

    Unlike `keras.initializers.Identity`, `gain` survives `get_config`. With hidden widths at
    least min(inputs, units) the end-to-end kernel is gain^depth times the identity.

    Args:
        gain: float, the multiplier of each factor.

    Example:

    >>> Identity(gain=2.0)((2, 3)).numpy()
    array([[2., 0., 0.],
           [0., 2., 0.]], dtype=float32)
    """

    def __init__(self, gain=1.0):
        self.gain = float(gain)

    def chain(self, shapes, dtype=None):
        dtype = dtype or keras.backend.floatx()
        return [
            keras.ops.multiply(self.gain, keras.ops.eye(rows, cols, dtype=dtype))
            for rows, cols in _check_chain_shapes(shapes)
        ]

    def get_config(self):
        return {"gain": self.gain}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Balanced(ChainInitializer):
    """Draws an end-to-end kernel and factors it into an exactly balanced chain.

    The chain satisfies W_{j+1}^T W_{j+1} = W_j W_j^T (docs/equations.md), the condition under which
    gradient descent on the chain follows the end-to-end update rule (eq. 24). Hidden spaces
    are turned by seeded random rotations (see `chain.balanced_factors`); a hidden
    width below the rank of the draw keeps its best rank-h approximation.

    Args:
        end_to_end_initializer: initializer (or its name or config) of the end-to-end kernel;
            default `NearZero(seed=seed)`.
        seed: int or None, seeds the rotations (and the default end-to-end draw).

    Example:

    >>> factors = Balanced(NearZero(1e-2, seed=0), seed=0).chain([(4, 3), (3, 1)])
    >>> [tuple(f.shape) for f in factors]
    [(4, 3), (3, 1)]
    """

    def __init__(self, end_to_end_initializer=None, seed=None):
        if end_to_end_initializer is None:
            end_to_end_initializer = NearZero(seed=seed)
        self.end_to_end_initializer = get(end_to_end_initializer)
        self.seed = seed

    def chain(self, shapes, dtype=None):
        dtype = dtype or keras.backend.floatx()
        shapes = _check_chain_shapes(shapes)
        end_to_end_shape = (shapes[0][0], shapes[-1][1])
        kernel = keras.ops.convert_to_numpy(self.end_to_end_initializer(end_to_end_shape, dtype=backend.widest_float()))
        hidden = [shape[1] for shape in shapes[:-1]]
        factors = balanced_factors(kernel, hidden, rotation_seed=self.seed)
        return [keras.ops.convert_to_tensor(f.astype(np.dtype(dtype))) for f in factors]

    def get_config(self):
        return {
            "end_to_end_initializer": keras.initializers.serialize(self.end_to_end_initializer),
            "seed": self.seed,
        }


_ALIASES = {"near_zero": NearZero, "identity": Identity, "balanced": Balanced}


def get(identifier):
    """Resolves an initializer from an instance, a name (also "near_zero", "balanced") or a config."""
    if isinstance(identifier, str) and identifier in _ALIASES:
        return _ALIASES[identifier]()
    initializer = keras.initializers.get(identifier)
    if initializer is None:
        raise ValueError(f"Could not interpret initializer {identifier!r}.")
    return initializer


def seeded(initializer, seed):
    """A fresh copy of an initializer (instance, name or config) with `seed`, if it takes one.

    The one seeding rule of the library: `seed=None` gives a fresh unseeded copy (Keras fixes
    an unseeded initializer's random seed when it is made, so a copy draws new values);
    an initializer without a `seed` argument is returned unchanged.
    """
    initializer = get(initializer)
    config = initializer.get_config()
    if "seed" in config:
        return initializer.__class__.from_config({**config, "seed": seed})
    return initializer


def initialize_chain(initializer, shapes, dtype=None):
    """Initial values for a chain of factor shapes, input side first.

    A `ChainInitializer` draws the whole chain. A plain Keras initializer draws each factor
    on its own; a seeded one gets seed + j for factor j, so equal shapes get different values.
    An unseeded Keras initializer fixes a random seed when it is made (every call gives the same
    values), so each factor gets a fresh instance.
    """
    initializer = get(initializer)
    if isinstance(initializer, ChainInitializer):
        return initializer.chain(shapes, dtype=dtype)
    seed = initializer.get_config().get("seed", "absent")
    values = []
    for j, shape in enumerate(shapes):
        if isinstance(seed, int):
            initializer = seeded(initializer, seed + j)
        elif j > 0 and seed is None:
            initializer = seeded(initializer, None)
        values.append(initializer(shape, dtype=dtype))
    return values
