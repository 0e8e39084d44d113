"""Where the Hydra configs (``conf/``) and the data contract (``data_schemas/``) are read from, and
which ``mlflow`` command the hints name.

An installed wheel carries them inside the package (``convcg_cli/_bundled/``, copied by ``setup.py``);
a source checkout (editable install, tests) reads them from the repository root, so edits there take
effect at once. A leaf module: it imports nothing of convcg.
"""

import os
import shlex
import shutil
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The ``conf`` or ``data_schemas`` directory: the packaged copy if there is one, else the checkout's."""
    bundled = _PACKAGE / "_bundled" / name
    return bundled if bundled.is_dir() else _PACKAGE.parent / name


def mlflow_command(python: str | None = None, path: str | None = None) -> str:
    """The ``mlflow`` executable of this installation, as a hint should spell it: plain ``mlflow``
    when that is what ``PATH`` finds, else the executable beside the running Python (a venv's or an
    installed wheel's scripts directory) by its absolute path, so the hint works from any folder.

    Args:
        python: the running interpreter (default ``sys.executable``; not resolved, as a venv's python
            is a link to the base one).
        path: the search path (default ``$PATH``).
    """
    scripts = Path(python or sys.executable).parent
    beside = next((p for p in (scripts / "mlflow", scripts / "mlflow.exe") if p.is_file()), None)
    found = shutil.which("mlflow", path=path if path is not None else os.environ.get("PATH"))
    if found is not None and (beside is None or os.path.samefile(found, beside)):
        return "mlflow"
    if beside is not None:
        return shlex.quote(str(beside.absolute()))
    return f"{shlex.quote(str(Path(python or sys.executable).absolute()))} -m mlflow"
