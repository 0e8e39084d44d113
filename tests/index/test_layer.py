"""The index package is the bottom of the domain: it imports no other convcg module (metrics import
it, never the reverse), so evaluation, serving, batch retrieval and the bench can all use it."""

import ast
from pathlib import Path

import convcg_cli.index

INDEX_DIR = Path(convcg_cli.index.__file__).parent


def test_the_index_package_imports_only_itself_of_convcg():
    outside = []
    for path in sorted(INDEX_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: use absolute imports"
                names = [node.module or ""]
            outside += [
                (path.name, n)
                for n in names
                if n.split(".")[0] == "convcg_cli" and not n.startswith("convcg_cli.index")
            ]
    assert not outside, outside
