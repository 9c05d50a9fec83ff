"""Former name of `experiments.common.rates`, kept for the scripts that still import it."""

import sys

from experiments.common import rates

sys.modules[__name__] = rates
