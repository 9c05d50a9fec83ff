"""Former name of `experiments.common.sweep`, kept for the scripts that still import it."""

import sys

from experiments.common import sweep

sys.modules[__name__] = sweep
