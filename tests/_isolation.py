"""Subprocesses with parts of the world taken away: modules that cannot be imported (to show
that a command line never needs them) and no network (every connection and name lookup fails).

`isolated_env(folder, blocked=("tensorflow",), offline=True)` writes a sitecustomize.py into
`folder` and returns an environment whose PYTHONPATH starts there, for `subprocess.run`.
"""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]

_SITECUSTOMIZE = """
import sys

BLOCKED = {blocked!r}


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None


sys.meta_path.insert(0, _Blocker())

if {offline!r}:
    import socket

    def _refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
"""


def isolated_env(folder, blocked=(), offline=False, **extra):
    """An environment for `python -m ...` in which the top-level packages `blocked` raise
    ImportError and, if `offline`, nothing can connect; TF_CPP_MIN_LOG_LEVEL is unset, as a
    user's shell has it. `extra` adds variables."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=tuple(blocked), offline=offline))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env
