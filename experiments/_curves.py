"""Former name of `experiments.common.curves`, kept for the scripts that still import it."""

import sys

from experiments.common import curves

sys.modules[__name__] = curves
