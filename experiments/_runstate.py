"""Former name of `experiments.common.runstate`, kept for the scripts that still import it."""

import sys

from experiments.common import runstate

sys.modules[__name__] = runstate
