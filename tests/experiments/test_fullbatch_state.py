"""FullBatchTrainer.get_state / set_state: a run checkpointed, restored into a new trainer and
continued gives the numbers of the uninterrupted run (the gas sensor --resume relies on it)."""

import numpy as np
import pytest
from _synthetic_data import regression

from experiments.engine.fullbatch import ChainSpec, FullBatchTrainer
from tf_overparam import initializers

RATES = [1e-3, 3e-2, 30.0]  # the last one diverges


@pytest.mark.parametrize("optimizer", ["gd", "adagrad", "adadelta", "adam"])
@pytest.mark.parametrize("update", ["chain", "end_to_end"])
def test_restored_trainer_continues_exactly(optimizer, update):
    x, y = regression(rows=48, inputs=6, seed=3)
    spec = ChainSpec(
        depth=3, hidden_units=2, update=update, optimizer=optimizer, p=4, initializer=initializers.NearZero(0.3)
    )

    def trainer():
        return FullBatchTrainer(x, y, spec, RATES, seeds=(0, 1), blowup=50.0)

    schedule = [0, 7, 20, 41, 60]
    uninterrupted = trainer().run(60, schedule=schedule)
    first = trainer()
    first.run(20, schedule=schedule[:3])
    state = first.get_state()
    second = trainer()  # a fresh one: its own initial chains, overwritten by the state
    second.set_state(state)
    assert second.iteration == 20
    continued = second.run(60, schedule=schedule[3:])
    np.testing.assert_array_equal(continued.losses, uninterrupted.losses[3:])
    np.testing.assert_array_equal(continued.diverged_at, uninterrupted.diverged_at)
    np.testing.assert_array_equal(continued.kernels, uninterrupted.kernels)
    if optimizer == "gd":  # the adaptive rules take small steps and do not blow up here
        assert (uninterrupted.diverged_at >= 0).any()  # the marks were part of what was restored


def test_state_holds_every_part_and_the_bound():
    x, y = regression(rows=16, inputs=3, seed=1)
    trainer = FullBatchTrainer(x, y, ChainSpec(depth=2, optimizer="adam"), [0.1], blowup=7.0)
    state = trainer.get_state()
    assert sorted(state) == sorted(
        [
            "factor_0",
            "factor_1",
            "slot_0_0",
            "slot_0_1",
            "slot_1_0",
            "slot_1_1",
            "step",
            "diverged_at",
            "divergence_bound",
        ]
    )
    # The bound is blowup x the initial loss, computed here by NumPy.
    kernel = state["factor_0"][0] @ state["factor_1"][0]
    initial = np.mean((x.astype("float32") @ kernel - y.astype("float32")) ** 2) / 2
    np.testing.assert_allclose(state["divergence_bound"], 7.0 * initial, rtol=1e-5)


def test_state_of_another_trainer_is_refused():
    x, y = regression(rows=16, inputs=3, seed=1)
    deep = FullBatchTrainer(x, y, ChainSpec(depth=3), [0.1]).get_state()
    with pytest.raises(ValueError, match="`state` does not fit this trainer: 'factor_0'"):
        FullBatchTrainer(x, y, ChainSpec(depth=3), [0.1, 0.2]).set_state(deep)
    with pytest.raises(ValueError, match="'factor_2' should have shape"):
        FullBatchTrainer(x, y, ChainSpec(depth=3), [0.1]).set_state({k: v for k, v in deep.items() if k != "factor_2"})
