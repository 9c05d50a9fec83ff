"""Data sets used by the experiments."""

from tf_overparam.datasets.gas_sensor import UCI_URL, GasSensorData, load_ethanol, parse_batch_file
from tf_overparam.datasets.mnist import load_mnist

__all__ = ["UCI_URL", "GasSensorData", "load_ethanol", "parse_batch_file"]
__all__ += ["load_mnist"]
