"""Former home of `experiments.common.cli` and `experiments.common.run_folder`; re-exports them
for the scripts that still import this name."""

from experiments.common.cli import (  # noqa: F401
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    RunInterrupted,
    UserError,
    cli,
    format_seconds,
    lazy_import,
    lazy_keras_tensorflow_pyplot,
    lazy_pyplot,
    one_line,
    quiet_tensorflow,
    resume_command,
    user_errors,
)
from experiments.common.run_folder import (  # noqa: F401
    RUN_FILES,
    file_mode,
    holds_run,
    make_run_dir,
    provenance,
    record_run,
    replace_atomic,
    write_json_atomic,
)
