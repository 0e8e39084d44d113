"""Where the Hydra configs (``conf/``) and the data contract (``data_schemas/``) are read from.

An installed wheel carries them inside the package (``convcg_cli/_bundled/``, copied by ``setup.py``);
a source checkout (editable install, tests) reads them from the repository root, so edits there take
effect at once. A leaf module: it imports nothing of convcg.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The ``conf`` or ``data_schemas`` directory: the packaged copy if there is one, else the checkout's."""
    bundled = _PACKAGE / "_bundled" / name
    return bundled if bundled.is_dir() else _PACKAGE.parent / name
