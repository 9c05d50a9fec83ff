"""The gas sensor preprocessings (issue 12 item 3), checked against NumPy on the real data."""

import numpy as np
import pytest

from experiments.data import gas_sensor


@pytest.fixture
def raw(gas_sensor_dir):
    return gas_sensor.load_ethanol(gas_sensor_dir, normalize=False)


def test_zscore_matches_the_loader_default(raw, gas_sensor_dir):
    default = gas_sensor.load_ethanol(gas_sensor_dir)
    scaled = gas_sensor.preprocess(raw, "zscore")
    np.testing.assert_allclose(scaled.x, default.x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scaled.y, default.y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", sorted(gas_sensor.PREPROCESSINGS))
@pytest.mark.parametrize("bias", [False, True])
def test_each_scaling_is_the_stated_affine_map(raw, scheme, bias):
    data = gas_sensor.preprocess(raw, scheme, bias=bias)
    x, y = raw.x.astype(np.float64), raw.y.astype(np.float64)
    features = data.x[:, :128].astype(np.float64)
    if scheme == "minmax":
        varying = x.max(axis=0) > x.min(axis=0)
        assert features[:, varying].min(axis=0) == pytest.approx(0.0, abs=1e-6)
        assert features[:, varying].max(axis=0) == pytest.approx(1.0, abs=1e-6)
        assert (data.y.min(), data.y.max()) == pytest.approx((0.0, 1.0), abs=1e-6)
    else:
        varying = x.std(axis=0) > 0
        np.testing.assert_allclose(features[:, varying].mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(features[:, varying].std(axis=0), 1.0, atol=1e-4)
        expected_y = {"zscore": (y - y.mean()) / y.std(), "zscore-target-max": y / y.max(), "zscore-raw-target": y}
        np.testing.assert_allclose(data.y, expected_y[scheme], rtol=1e-5, atol=1e-5)
    # The recorded offsets and scales are the map (compared in scaled units: float32 data).
    raw_x = np.c_[x, np.ones(len(x))] if bias else x
    np.testing.assert_allclose(data.x, (raw_x - data.feature_mean) / data.feature_std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.y, (y - data.target_mean) / data.target_std, rtol=1e-5, atol=1e-5)
    assert data.x.shape[1] == 128 + bias and (not bias or np.all(data.x[:, -1] == 1.0))
    assert gas_sensor.PREPROCESSINGS[scheme] in data.description


def test_bad_scheme_and_normalised_input(raw, gas_sensor_dir):
    with pytest.raises(ValueError, match="`scheme`"):
        gas_sensor.preprocess(raw, "log")
    with pytest.raises(ValueError, match="`data`"):
        gas_sensor.preprocess(gas_sensor.load_ethanol(gas_sensor_dir), "zscore")
