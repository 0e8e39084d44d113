"""Paths in a committed report, written so that the report reads, and its reproduce line runs, on
another machine than the one that made it.

A path inside the checkout (the working directory) becomes relative to it (``data/kuairand``), or
``$PWD/data/kuairand`` in a command (convcg keeps paths absolute in a run's saved config, so a
command spells them out); a path under ``$CONVCG_HOME``, the temp directory or another directory the
caller names becomes that variable (``$CONVCG_HOME/mlflow.db``); any other absolute path becomes a
variable named after its parent directory (``/srv/runs/synthetic-small`` -> ``$RUNS/synthetic-small``).
Pure string functions of the path and a :class:`Places`; :meth:`Places.here` reads the process's.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

CHECKOUT_VARIABLE = "PWD"
HOME_VARIABLE = "CONVCG_HOME"
TEMP_VARIABLE = "TMPDIR"
# URI schemes whose rest is a local path (``sqlite:////abs/mlflow.db``, ``file:///abs/mlartifacts``).
_PATH_SCHEMES = ("sqlite:///", "file://")
# An absolute path inside free text: a '/' that does not continue a word, a number or a URI.
_PATH_IN_TEXT = re.compile(r"(?<![\w/.:$~-])/[\w.@%+~-]+(?:/[\w.@%+~-]+)*/?")
_SAFE_WORD = re.compile(r"[\w@%+=:,./-]*")


@dataclass(frozen=True)
class Places:
    """Where the machine that renders a report keeps things, each with the variable it is written as.

    Args:
        checkout: the working directory (the checkout): paths inside it become relative.
        named: ``{variable: directory}``, e.g. ``{"CONVCG_HOME": PurePosixPath("/srv/home")}``; a path
            takes the variable of the deepest directory holding it (the checkout included).
    """

    checkout: PurePosixPath
    named: Mapping[str, PurePosixPath]

    @classmethod
    def here(cls, **named: str | os.PathLike[str]) -> Places:
        """This process's places: the working directory, ``$CONVCG_HOME`` when set, the temp
        directory, and any ``named`` directories (e.g. ``WORKDIR=...``)."""
        places = {TEMP_VARIABLE: tempfile.gettempdir()}
        if os.environ.get(HOME_VARIABLE):
            places[HOME_VARIABLE] = os.path.expanduser(os.environ[HOME_VARIABLE])
        places.update({name: os.fspath(path) for name, path in named.items()})
        # Real paths: convcg resolves the paths of a config (symlinks included) before they are used.
        return cls(_real(os.getcwd()), {name: _real(path) for name, path in places.items()})


def _real(path: str) -> PurePosixPath:
    return PurePosixPath(os.path.realpath(path))


def _split(path: str, places: Places) -> tuple[str | None, str]:
    """``(variable, rest)`` of an absolute ``path``: variable None means inside the checkout."""
    pure = PurePosixPath(os.path.normpath(path))
    candidates = [(None, places.checkout), *places.named.items()]
    holding = [(name, root) for name, root in candidates if pure == root or root in pure.parents]
    if holding:
        name, root = max(holding, key=lambda c: len(c[1].parts))  # the deepest directory wins
        return name, pure.relative_to(root).as_posix()
    parent = re.sub(r"\W+", "_", pure.parent.name).strip("_").upper() or "ROOT"
    return parent, pure.name


def portable_path(path: str, places: Places) -> str:
    """``path`` as a report shows it: relative inside the checkout, else ``$VARIABLE/rest``; a
    relative path is returned unchanged.

    Example:
        >>> places = Places(PurePosixPath("/w/main"), {"CONVCG_HOME": PurePosixPath("/w/home")})
        >>> [portable_path(p, places) for p in ("/w/main/data/k", "/w/home/mlflow.db", "/srv/x/y", "d")]
        ['data/k', '$CONVCG_HOME/mlflow.db', '$X/y', 'd']
    """
    if not path.startswith("/"):
        return path
    variable, rest = _split(path, places)
    if variable is None:
        return rest
    return f"${variable}" + ("" if rest == "." else f"/{rest}")


def portable_uri(uri: str, places: Places) -> str:
    """A tracking URI or path as a report shows it: the local path of a ``sqlite:///`` or ``file://``
    URI (or a bare path) as in a command; a server URI unchanged.

    Example:
        >>> places = Places(PurePosixPath("/w/main"), {"CONVCG_HOME": PurePosixPath("/w/home")})
        >>> portable_uri("sqlite:////w/home/mlflow.db", places), portable_uri("http://h:5000", places)
        ('sqlite:///$CONVCG_HOME/mlflow.db', 'http://h:5000')
    """
    for scheme in _PATH_SCHEMES:
        if uri.startswith(scheme) and uri[len(scheme) :].startswith("/"):
            return scheme + _command_path(uri[len(scheme) :], places)
    return _command_path(uri, places) if uri.startswith("/") else uri


def _command_path(path: str, places: Places) -> str:
    """``path`` as a command spells it: always absolute once the shell expands the variable."""
    variable, rest = _split(path, places)
    return f"${variable or CHECKOUT_VARIABLE}" + ("" if rest == "." else f"/{rest}")


def portable_command(command: str, places: Places) -> str:
    """A shell command with every absolute path argument (``key=/abs/path``, a bare ``/abs/path``, a
    ``sqlite:///`` URI) portable: ``$PWD/...`` inside the checkout, else a variable; the shell expands
    the variables, so the command still runs. A command that does not parse (cut short) has the paths
    in its text replaced as a command spells them.

    Example:
        >>> places = Places(PurePosixPath("/w/main"), {})
        >>> portable_command("convcg ablate g data.dir=/w/main/data/k --seeds 0,1", places)
        'convcg ablate g data.dir=$PWD/data/k --seeds 0,1'
    """
    try:
        words = shlex.split(command)
    except ValueError:
        return _PATH_IN_TEXT.sub(lambda m: _command_path(m.group(0), places), command)
    return " ".join(_portable_word(word, places) for word in words)


def _portable_word(word: str, places: Places) -> str:
    key, sep, value = word.partition("=")
    if not sep or word.startswith("-"):
        key, sep, value = "", "", word
    new = portable_uri(value, places)
    if new == value:
        return shlex.quote(word)
    variable, _, rest = new.partition("$")
    name, slash, tail = rest.partition("/")
    # Quote around the variable, never over it, so the shell still expands it.
    return _quote(key + sep + variable) + f"${name}" + slash + _quote(tail)


def _quote(text: str) -> str:
    return text if _SAFE_WORD.fullmatch(text) else shlex.quote(text)


def portable_text(text: str, places: Places) -> str:
    """Free text (e.g. a step's description) with every absolute path in it made portable.

    Example:
        >>> places = Places(PurePosixPath("/w/main"), {"TMPDIR": PurePosixPath("/tmp")})
        >>> portable_text("Loading and checking /tmp/b-1/eval-small (10 GFLOP/s)", places)
        'Loading and checking $TMPDIR/b-1/eval-small (10 GFLOP/s)'
    """
    return _PATH_IN_TEXT.sub(lambda m: portable_path(m.group(0), places), text)
