"""Section 6: the single-output end-to-end field is not a gradient (non-zero circulation)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _figures import check_figure, check_png
from _isolation import isolated_env

from experiments import not_a_regularizer as nar

REPO = pathlib.Path(__file__).resolve().parents[2]

HESSIAN, MINIMIZER = (1.0, 4.0), (1.0, 1.0)
OFF, AROUND = nar.DEFAULT_CIRCLES


def closed_form_field(w, depth, hessian, minimizer):
    """Eq. 27 written out in NumPy: ||w||^{2-2/N} (phi + (N-1) <phi, w>/||w||^2 w)."""
    w = np.atleast_2d(w)
    phi = np.asarray(hessian) * (w - np.asarray(minimizer))
    norm2 = np.sum(w * w, axis=1, keepdims=True)
    inner = np.sum(phi * w, axis=1, keepdims=True)
    return norm2 ** (1 - 1 / depth) * (phi + (depth - 1) * inner / norm2 * w)


def gauss_legendre_circulation(circle, depth, hessian, minimizer, nodes=400):
    """The line integral by Gauss-Legendre in the angle: another rule, another field code."""
    x, weights = np.polynomial.legendre.leggauss(nodes)
    t = np.pi * (x + 1)
    points = np.asarray(circle.center) + circle.radius * np.stack([np.cos(t), np.sin(t)], axis=1)
    tangent = circle.radius * np.stack([-np.sin(t), np.cos(t)], axis=1)
    values = closed_form_field(points, depth, hessian, minimizer)
    return float(np.pi * np.sum(weights * np.sum(values * tangent, axis=1)))


def closed_form_curl_depth2(w, hessian):
    """curl F for N = 2 (derived symbolically): (a1 - a2) w1 w2 / ||w||."""
    return (hessian[0] - hessian[1]) * w[:, 0] * w[:, 1] / np.linalg.norm(w, axis=1)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_library_field_matches_eq_27(depth):
    points = np.random.default_rng(depth).normal(size=(50, 2))
    np.testing.assert_allclose(
        nar.field(points, depth, HESSIAN, MINIMIZER).numpy(),
        closed_form_field(points, depth, HESSIAN, MINIMIZER),
        rtol=1e-12,
        atol=1e-12,
    )


def test_autodiff_curl_matches_closed_form():
    points = np.random.default_rng(0).normal(size=(50, 2))
    np.testing.assert_allclose(
        nar.curl(points, 2, HESSIAN, MINIMIZER), closed_form_curl_depth2(points, HESSIAN), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("circle", [OFF, AROUND], ids=lambda c: c.name)
def test_circulation_converges_geometrically_to_a_nonzero_limit(depth, circle):
    ks = [8, 16, 32, 64, 128, 256]
    values = np.array([nar.circulation(circle, k, depth, HESSIAN, MINIMIZER) for k in ks])
    differences = np.abs(np.diff(values))
    for previous, current in zip(differences, differences[1:]):
        assert current < max(previous / 10, 1e-12)  # geometric until round-off
    assert differences[-1] < 1e-12
    limit = gauss_legendre_circulation(circle, depth, HESSIAN, MINIMIZER)
    assert values[-1] == pytest.approx(limit, abs=1e-10)
    assert abs(limit) > 0.5  # far from round-off: F is not a gradient


@pytest.mark.parametrize("circle", [OFF, AROUND], ids=lambda c: c.name)
def test_depth_1_field_is_a_gradient_with_zero_circulation(circle):
    for k in (16, 32, 64, 128, 256):
        assert abs(nar.circulation(circle, k, 1, HESSIAN, MINIMIZER)) < 1e-13


def test_greens_theorem_with_the_closed_form_curl():
    x, weights = np.polynomial.legendre.leggauss(60)
    rho, rho_w = OFF.radius * (x + 1) / 2, OFF.radius * weights / 2
    t, t_w = np.pi * (x + 1), np.pi * weights
    r, a = np.meshgrid(rho, t, indexing="ij")
    points = np.asarray(OFF.center) + np.stack([r * np.cos(a), r * np.sin(a)], axis=-1).reshape(-1, 2)
    curl = closed_form_curl_depth2(points, HESSIAN).reshape(r.shape)
    area_integral = float(np.einsum("i,j,ij->", rho_w * rho, t_w, curl))
    assert nar.circulation(OFF, 256, 2, HESSIAN, MINIMIZER) == pytest.approx(area_integral, abs=1e-10)
    assert nar.stokes(OFF, 2, HESSIAN, MINIMIZER, (64, 256)) == pytest.approx(area_integral, abs=1e-10)


def test_isotropic_loss_makes_depth_2_a_gradient_but_not_depth_3():
    isotropic = (2.0, 2.0)
    for k in (128, 256):
        assert abs(nar.circulation(OFF, k, 2, isotropic, MINIMIZER)) < 1e-12
    assert abs(nar.circulation(OFF, 64, 3, isotropic, MINIMIZER)) > 0.1


def test_cli_quick_writes_consistent_results_quietly(tmp_path):
    """A user's run: a subprocess without TF_CPP_MIN_LOG_LEVEL, whose standard error stays empty."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.not_a_regularizer", "--quick", "--out", str(out)]
    completed = subprocess.run(
        command, cwd=REPO, env=isolated_env(tmp_path / "site"), capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr[-3000:]
    check_png(out / "not_a_regularizer.png")
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((out / "results.json").read_text())
    assert saved["ks"] == config["ks"] == [16, 32, 64, 128]
    for values in saved["depth_1"].values():
        assert np.abs(values).max() < 1e-13
    for depth, per_circle in saved["depths"].items():
        for circle in nar.DEFAULT_CIRCLES:
            entry = per_circle[circle.name]
            assert entry["limit"] == entry["circulation"][-1]
            np.testing.assert_allclose(entry["differences"], np.abs(np.diff(entry["circulation"])))
            assert entry["differences"][-1] < 1e-12
            assert abs(entry["limit"]) > 0.5
            # The curl is not smooth at w = 0, so the disk quadrature is coarser around the origin.
            assert entry["stokes"] == pytest.approx(entry["limit"], rel=1e-3 if circle.encloses_origin else 1e-9)
            expected = gauss_legendre_circulation(circle, int(depth), config["hessian"], config["minimizer"])
            assert entry["limit"] == pytest.approx(expected, abs=1e-10)
    check_saved_figure(saved)


def check_saved_figure(saved):
    """The figure: the middle panel is the convergence |I_K - I_K/2| (not "circulation"), the
    right one shows every limit as a bar with its value written on it."""
    config = nar.Config(ks=tuple(saved["ks"]), stokes_nodes=(8, 8))
    _, middle, right = check_figure(nar.figure_of(saved, config, quick=True), title_contains=("quick run",))
    assert middle.get_ylabel() == r"$|I_K - I_{K/2}|$" and "convergence" in middle.get_title()
    written = {text.get_text() for text in right.texts}
    for per_circle in saved["depths"].values():
        for entry in per_circle.values():
            assert f"{entry['limit']:.4g}" in written
    heights = sorted(abs(bar.get_height()) for bar in right.patches)
    limits = [abs(entry["limit"]) for per_circle in saved["depths"].values() for entry in per_circle.values()]
    depth_1 = [abs(values[-1]) for values in saved["depth_1"].values()]
    np.testing.assert_allclose(heights, sorted([*limits, *depth_1]))


def test_help_answers_without_tensorflow_keras_or_matplotlib(tmp_path):
    env = isolated_env(tmp_path, blocked=("tensorflow", "keras", "matplotlib"))
    command = [sys.executable, "-m", "experiments.not_a_regularizer", "--help"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr
    assert "--debug" in completed.stdout and "--quick" in completed.stdout


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"depths": (1,)}, "depths"),
        ({"depths": ()}, "depths"),
        ({"hessian": (0.0, 1.0)}, "hessian"),
        ({"hessian": (1.0,)}, "hessian"),
        ({"ks": (16, 8)}, "ks"),
        ({"ks": (16,)}, "ks"),
        ({"circles": (nar.Circle("through_origin", (1.0, 0.0), 1.0),)}, "circles"),
    ],
)
def test_bad_config_raises_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        nar.Config(**kwargs)


@pytest.mark.parametrize(
    "argv, name", [(["--depths", "1"], "depths"), (["--hessian", "-1", "1"], "hessian"), (["--ks", "64", "32"], "ks")]
)
def test_bad_cli_arguments_exit_through_the_parser(argv, name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        nar.main([*argv, "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    assert f"`{name}`" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
