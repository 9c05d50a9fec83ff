"""Tests for experiments.data.gas_sensor (UCI 270 loader)."""

import functools
import zipfile

import numpy as np
import pytest

from experiments.data import gas_sensor
from experiments.data.gas_sensor import load_ethanol, parse_batch_file

ENV_VAR = "TF_OVERPARAM_GAS_SENSOR_DIR"

# Independent expectations, from /work/shared/data/gas_sensor/SOURCE.md.
ETHANOL_ROWS_PER_BATCH = {
    "batch1": 90,
    "batch2": 164,
    "batch3": 365,
    "batch4": 64,
    "batch5": 28,
    "batch6": 514,
    "batch8": 30,
    "batch9": 61,
}
ETHANOL_CONCENTRATIONS = {
    10,
    20,
    25,
    30,
    40,
    50,
    75,
    100,
    125,
    150,
    175,
    200,
    225,
    250,
    275,
    500,
    600,
}


@functools.cache
def _load_real(path, normalize):
    return load_ethanol(path, normalize=normalize)


def _line(gas, conc, values, indices=None, sep=":"):
    indices = range(1, len(values) + 1) if indices is None else indices
    feats = " ".join(f"{i}{sep}{v}" for i, v in zip(indices, values))
    return f"{gas};{conc} {feats} \n"


def _good_line(gas=1, conc="10.000000"):
    return _line(gas, conc, [f"{0.25 * i:.6f}" for i in range(1, 129)])


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# ---------------------------------------------------------------- real data


def test_real_data_counts(gas_sensor_dir):
    data = _load_real(str(gas_sensor_dir), True)
    assert data.x.shape == (1316, 128) and data.x.dtype == np.float32
    assert data.y.shape == (1316, 1) and data.y.dtype == np.float32
    assert data.batches == tuple(ETHANOL_ROWS_PER_BATCH)
    assert data.missing_batches == ("batch7", "batch10")
    assert data.rows_per_batch == ETHANOL_ROWS_PER_BATCH
    assert sum(data.rows_per_batch.values()) == 1316
    assert data.source == str(gas_sensor_dir)
    assert data.description == (
        "UCI 270 Ethanol: 1316 rows from 8 of 10 batches (batch1..6, batch8, "
        "batch9; missing batch7, batch10), features and target z-scored"
    )


def test_real_data_raw_concentrations(gas_sensor_dir):
    raw = _load_real(str(gas_sensor_dir), False)
    assert not raw.normalized
    assert set(np.unique(raw.y).tolist()) == ETHANOL_CONCENTRATIONS
    np.testing.assert_array_equal(raw.feature_mean, 0.0)
    np.testing.assert_array_equal(raw.feature_std, 1.0)
    assert (raw.target_mean, raw.target_std) == (0.0, 1.0)
    assert "not normalised" in raw.description


def test_real_data_normalisation_and_undo(gas_sensor_dir):
    data = _load_real(str(gas_sensor_dir), True)
    raw = _load_real(str(gas_sensor_dir), False)
    x = data.x.astype(np.float64)
    raw_x = raw.x.astype(np.float64)
    non_constant = raw_x.max(axis=0) > raw_x.min(axis=0)
    assert non_constant.any()
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0)[non_constant], 1.0, atol=1e-5)
    np.testing.assert_allclose(x[:, ~non_constant], 0.0)
    y = data.y.astype(np.float64)
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1.0) < 1e-5

    # The stored statistics are those of the raw rows ...
    np.testing.assert_allclose(data.feature_mean, raw_x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        data.feature_std[non_constant],
        raw_x.std(axis=0)[non_constant],
        rtol=1e-5,
    )
    assert data.target_mean == pytest.approx(raw.y.mean(), rel=1e-6)
    assert data.target_std == pytest.approx(raw.y.std(), rel=1e-5)
    # ... and undo the scaling.
    undone = x * data.feature_std + data.feature_mean
    err = np.abs(undone - raw_x) / data.feature_std
    assert err.max() < 1e-5
    undone_y = y * data.target_std + data.target_mean
    np.testing.assert_allclose(undone_y, raw.y, rtol=1e-5)
    assert set(np.round(undone_y).ravel().tolist()) == ETHANOL_CONCENTRATIONS


def test_env_var_route(gas_sensor_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(gas_sensor_dir))
    data = load_ethanol(normalize=False)
    assert data.source == str(gas_sensor_dir)
    assert data.x.shape == (1316, 128)


def test_data_dir_wins_over_env_var(gas_sensor_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(gas_sensor_dir))
    (tmp_path / "batch3.dat").write_text(_good_line() + _good_line(conc="20"))
    data = load_ethanol(tmp_path, normalize=False)
    assert data.source == str(tmp_path)
    assert data.batches == ("batch3",)


# ------------------------------------------------------------ hand-written


def test_parse_two_line_file(tmp_path):
    path = tmp_path / "batch1.dat"
    line1 = _line(1, "10.000000", [f"{0.25 * i:.6f}" for i in range(1, 129)])
    line2 = _line(3, "250.5", [f"-{i}e3" for i in range(1, 129)])
    path.write_bytes((line1 + line2.replace("\n", "\r\n") + "\n").encode())
    classes, conc, feats = parse_batch_file(path)
    np.testing.assert_array_equal(classes, [1, 3])
    assert classes.dtype == np.int64
    np.testing.assert_array_equal(conc, [10.0, 250.5])
    assert feats.shape == (2, 128) and feats.dtype == np.float64
    np.testing.assert_array_equal(feats[0], 0.25 * np.arange(1, 129))
    np.testing.assert_array_equal(feats[1], -1000.0 * np.arange(1, 129))


def test_parse_empty_file(tmp_path):
    path = tmp_path / "batch1.dat"
    path.write_text("")
    classes, conc, feats = parse_batch_file(path)
    assert classes.shape == (0,) and conc.shape == (0,)
    assert feats.shape == (0, 128)


def test_load_hand_written_normalisation(tmp_path, no_env):
    # Two Ethanol rows: feature i is i and 3i, except feature 7 (constant 5);
    # a class-2 row that must be dropped. Files batch10 and batch2 check the
    # numeric order.
    a = [float(i) for i in range(1, 129)]
    b = [3.0 * i for i in range(1, 129)]
    a[6] = b[6] = 5.0
    (tmp_path / "batch10.dat").write_text(_line(1, "30", b))
    (tmp_path / "batch2.dat").write_text(_line(1, "10", a) + _good_line(gas=2))
    data = load_ethanol(tmp_path)
    assert data.batches == ("batch2", "batch10")
    assert data.rows_per_batch == {"batch2": 1, "batch10": 1}
    assert data.missing_batches == (
        "batch1",
        "batch3",
        "batch4",
        "batch5",
        "batch6",
        "batch7",
        "batch8",
        "batch9",
    )
    expected = np.array([[-1.0] * 128, [1.0] * 128])
    expected[:, 6] = 0.0
    np.testing.assert_allclose(data.x, expected, atol=1e-6)
    np.testing.assert_allclose(data.y, [[-1.0], [1.0]], atol=1e-6)
    mean = 2.0 * np.arange(1, 129)
    std = np.arange(1, 129, dtype=np.float64)
    mean[6], std[6] = 5.0, 1.0
    np.testing.assert_allclose(data.feature_mean, mean)
    np.testing.assert_allclose(data.feature_std, std)
    assert (data.target_mean, data.target_std) == (20.0, 10.0)
    assert data.description == (
        "UCI 270 Ethanol: 2 rows from 2 of 10 batches (batch2, batch10; "
        "missing batch1, batch3, batch4, batch5, batch6, batch7, batch8, "
        "batch9), features and target z-scored"
    )

    other = load_ethanol(tmp_path, gas_class=2, normalize=False)
    assert other.rows_per_batch == {"batch2": 1, "batch10": 0}
    assert "Ethylene" in other.description


def test_batch_files_found_in_subdirectory(tmp_path, no_env):
    sub = tmp_path / "unpacked" / "Dataset"
    sub.mkdir(parents=True)
    (sub / "batch5.dat").write_text(_good_line())
    (tmp_path / "notes.dat").write_text("not a batch file")
    data = load_ethanol(tmp_path, normalize=False)
    assert data.source == str(sub) and data.batches == ("batch5",)


def _bad_lines():
    values = [f"{0.5 * i}" for i in range(1, 129)]
    idx = list(range(1, 129))
    swapped = idx[:2] + [4, 3] + idx[4:]
    return {
        "no separator": ("1,10 " + _good_line().split(" ", 1)[1], "gas class"),
        "class not int": (_good_line(gas="x"), "not an integer"),
        "class out of range": (_good_line(gas=7), "gas class 7"),
        "bad concentration": (_good_line(conc="abc"), "concentration"),
        "missing index": (
            _line(1, 10, values[:4] + values[5:], idx[:4] + idx[5:]),
            "feature index 5 missing",
        ),
        "duplicated index": (
            _line(1, 10, values, idx[:5] + [5] + idx[6:]),
            "feature index 5 duplicated",
        ),
        "index out of range": (
            _line(1, 10, values + ["1.0"], idx + [129]),
            "129 is out of range",
        ),
        "index zero": (_line(1, 10, ["1.0"] + values, [0] + idx), "0 is out of range"),
        "out of order": (_line(1, 10, values, swapped), "out of order"),
        "non-float value": (
            _line(1, 10, values[:9] + ["abc"] + values[10:]),
            "'abc' of feature 10 is not a finite float",
        ),
        "nan value": (_line(1, 10, ["nan"] + values[1:]), "finite float"),
        "no colon": (_line(1, 10, values, sep="="), "<index>:<value>"),
        "head only": ("1;10\n", "feature index 1, 2, 3"),
    }


def test_malformed_lines_raise(tmp_path):
    # One test over all cases: the autouse Keras fixture in conftest costs
    # about 0.2 s per test.
    path = tmp_path / "batch4.dat"
    for kind, (line, fragment) in _bad_lines().items():
        path.write_text(_good_line() + "\n" + line + _good_line())
        try:
            parse_batch_file(path)
        except ValueError as e:
            message = str(e)
        else:
            pytest.fail(f"{kind}: no ValueError")
        assert "batch4.dat" in message, (kind, message)
        assert "line 3" in message, (kind, message)
        assert fragment in message, (kind, message)


def test_malformed_line_raises_through_load(tmp_path, no_env):
    (tmp_path / "batch1.dat").write_text(_good_line(gas="9"))
    with pytest.raises(ValueError, match=r"batch1\.dat, line 1"):
        load_ethanol(tmp_path)


def test_gas_class_validation(tmp_path):
    (tmp_path / "batch1.dat").write_text(_good_line())
    for bad in [0, 7, "1", 1.0, True, None]:
        with pytest.raises(ValueError, match=r"gas_class.*1\.\.6"):
            load_ethanol(tmp_path, gas_class=bad)
    assert load_ethanol(tmp_path, gas_class=np.int64(1)).x.shape == (1, 128)


def test_no_rows_of_class(tmp_path, no_env):
    (tmp_path / "batch1.dat").write_text(_good_line(gas=2))
    with pytest.raises(ValueError, match="no rows of gas class 1"):
        load_ethanol(tmp_path)


# ------------------------------------------------------------- not found


def test_missing_data_message(tmp_path, no_env):
    with pytest.raises(FileNotFoundError) as info:
        load_ethanol()
    message = str(info.value)
    assert gas_sensor.UCI_URL in message
    assert "https://archive.ics.uci.edu/dataset/270" in message
    assert ENV_VAR in message
    assert "--data-dir" in message and "download=True" in message


def test_explicit_data_dir_is_never_replaced(tmp_path, monkeypatch):
    # Valid data under the environment variable must not stand in for a wrong data_dir.
    good = tmp_path / "good"
    good.mkdir()
    (good / "batch1.dat").write_text(_good_line())
    monkeypatch.setenv(ENV_VAR, str(good))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no batch<N>.dat files") as info:
        load_ethanol(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ethanol(tmp_path / "typo")


def test_row_less_batch_file_is_an_error_naming_it(tmp_path, no_env):
    (tmp_path / "batch2.dat").write_text(_good_line())
    for content in ("", "\n  \n"):
        (tmp_path / "batch1.dat").write_text(content)
        with pytest.raises(ValueError, match=r"batch1\.dat holds no rows"):
            load_ethanol(tmp_path)


def test_files_read_are_recorded_with_sha256_and_rows(tmp_path, no_env):
    import hashlib

    (tmp_path / "batch1.dat").write_text(_good_line() + _good_line(gas=2) + _good_line(conc="20"))
    (tmp_path / "batch3.dat").write_text(_good_line(gas=3))
    (tmp_path / "batch4.dat").write_text(_good_line(conc="30"))
    data = load_ethanol(tmp_path, normalize=False)
    assert set(data.files) == {"batch1", "batch3", "batch4"}
    for name, rows, used in (("batch1", 3, 2), ("batch3", 1, 0), ("batch4", 1, 1)):
        path = tmp_path / f"{name}.dat"
        assert data.files[name] == {
            "path": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "rows": rows,
            "rows_used": used,
        }


def test_non_finite_values_are_rejected_naming_file_and_line(tmp_path, no_env):
    (tmp_path / "batch1.dat").write_text(_good_line() + _line(1, "10", ["0.5"] * 64 + ["-inf"] + ["0.5"] * 63))
    with pytest.raises(ValueError, match=r"batch1\.dat, line 2: value '-inf' of feature 65 is not a finite"):
        load_ethanol(tmp_path)
    (tmp_path / "batch1.dat").write_text(_good_line(conc="NaN"))
    with pytest.raises(ValueError, match=r"batch1\.dat, line 1: concentration 'NaN' is not a finite"):
        load_ethanol(tmp_path)


def test_download_from_an_unreachable_url_is_a_connection_error(tmp_path, no_env):
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused at once.
    with pytest.raises(ConnectionError, match=r"could not download http://127\.0\.0\.1:9/uci\.zip") as info:
        load_ethanol(download=True, origin="http://127.0.0.1:9/uci.zip", cache_dir=tmp_path / "cache")
    assert "check the network" in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "cache").rglob("*.zip"))


def test_missing_data_env_var_named(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=ENV_VAR) as info:
        load_ethanol()
    assert str(tmp_path / "nowhere") in str(info.value)


# ---------------------------------------------------------------- download


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, source in members.items():
            if isinstance(source, bytes):
                zf.writestr(name, source)
            else:
                zf.write(source, name)
    return path


def test_download_extracts_nested_folder(gas_sensor_dir, tmp_path, no_env):
    archive = _zip(
        tmp_path / "uci270.zip",
        {
            "Dataset/batch1.dat": gas_sensor_dir / "batch1.dat",
            "Dataset/batch4.dat": gas_sensor_dir / "batch4.dat",
            "readme.txt": b"hello",
        },
    )
    cache = tmp_path / "cache"
    data = load_ethanol(
        origin="file://" + str(archive),
        download=True,
        cache_dir=cache,
        normalize=False,
    )
    assert data.batches == ("batch1", "batch4")
    assert data.rows_per_batch == {"batch1": 90, "batch4": 64}
    assert data.x.shape == (154, 128)
    assert data.source.startswith(str(cache))
    assert data.source.endswith("Dataset")
    everything = _load_real(str(gas_sensor_dir), False)
    batch4_start = sum(ETHANOL_ROWS_PER_BATCH[f"batch{i}"] for i in (1, 2, 3))
    expected = np.concatenate([everything.x[:90], everything.x[batch4_start : batch4_start + 64]])
    np.testing.assert_array_equal(data.x, expected)

    # Second call: served from the cache, the origin is not read again.
    archive.unlink()
    again = load_ethanol(origin="file://" + str(archive), download=True, cache_dir=cache)
    assert again.source == data.source and again.x.shape == (154, 128)


def test_download_nested_zip(gas_sensor_dir, tmp_path, no_env):
    inner = _zip(
        tmp_path / "Dataset.zip",
        {"Dataset/batch8.dat": gas_sensor_dir / "batch8.dat"},
    )
    outer = _zip(tmp_path / "outer.zip", {"Dataset.zip": inner})
    data = load_ethanol(
        origin="file://" + str(outer),
        download=True,
        cache_dir=tmp_path / "cache",
        normalize=False,
    )
    assert data.rows_per_batch == {"batch8": 30}


def test_download_archive_without_batch_files(tmp_path, no_env):
    archive = _zip(tmp_path / "empty.zip", {"readme.txt": b"nothing"})
    with pytest.raises(FileNotFoundError, match="archive downloaded from"):
        load_ethanol(
            origin="file://" + str(archive),
            download=True,
            cache_dir=tmp_path / "cache",
        )


def test_download_refuses_unsafe_member(tmp_path, no_env):
    archive = _zip(tmp_path / "evil.zip", {"../batch1.dat": _good_line().encode()})
    with pytest.raises(ValueError, match="unsafe member"):
        load_ethanol(
            origin="file://" + str(archive),
            download=True,
            cache_dir=tmp_path / "cache",
        )
    assert not (tmp_path / "cache" / "batch1.dat").exists()


def test_download_not_a_zip(tmp_path, no_env):
    bogus = tmp_path / "bogus.zip"
    bogus.write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="not a valid zip"):
        load_ethanol(
            origin="file://" + str(bogus),
            download=True,
            cache_dir=tmp_path / "cache",
        )


def test_no_download_without_flag(tmp_path, no_env):
    archive = _zip(tmp_path / "uci270.zip", {"batch1.dat": _good_line().encode()})
    with pytest.raises(FileNotFoundError):
        load_ethanol(origin="file://" + str(archive), cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
