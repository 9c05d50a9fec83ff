"""Packaging: the distribution installs only the `tf_overparam` package (issue 11 item 5)."""

import configparser
import pathlib

import setuptools

import tf_overparam

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_only_tf_overparam_packages_are_found_for_the_wheel():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    packages = setuptools.find_packages(where=str(REPO_ROOT), include=include)
    assert "tf_overparam" in packages and "tf_overparam.layers" in packages
    assert all(p == "tf_overparam" or p.startswith("tf_overparam.") for p in packages), packages
    # The checkout does hold other top-level packages, which must stay out.
    assert {"experiments", "benchmarks"} <= set(setuptools.find_packages(where=str(REPO_ROOT)))


def test_version_matches_setup_cfg():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    assert config["metadata"]["version"] == tf_overparam.__version__ == "0.2.0"
