"""The install works with only what ``pyproject.toml`` declares.

Reads every import statement of ``gndgl_compiler`` and ``gndgl_cli`` (their AST) and
checks that each third-party module belongs to a declared distribution: a base dependency
(or one of its own requirements) anywhere, an optional extra only inside a function (a lazy
import, so the bare install starts). An undeclared import such as ``click``, which newer
typer no longer pulls in, fails here on any machine, not only on a fresh one.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from paths import REPO

OWN = {"gndgl_compiler", "gndgl_cli"}
# import name -> distribution where they differ and the package may not be installed here
KNOWN = {"yaml": "pyyaml", "PIL": "pillow", "tensorboard": "tensorboard", "onnx": "onnx", "onnxscript": "onnxscript",
         "onnxruntime": "onnxruntime", "pydot": "pydot", "matplotlib": "matplotlib"}


def _dist_name(req: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    """The declared distributions and everything they require (installed ones only)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_dist_name(r) for r in reqs if "extra ==" not in r]
    return seen


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module, imported at module level, line) of every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name.split(".")[0], top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module.split(".")[0], top, child.lineno))
            visit(child, inner)

    visit(tree, True)
    return out


def _dists_of(module: str, owners: dict) -> set[str]:
    found = {d.lower().replace("_", "-") for d in owners.get(module, [])}
    return found or ({KNOWN[module]} if module in KNOWN else set())


def test_every_import_is_declared_and_extras_are_lazy():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = _closure([_dist_name(d) for d in project["dependencies"]])
    extras = {_dist_name(d) for reqs in project["optional-dependencies"].values() for d in reqs}
    owners = metadata.packages_distributions()
    problems = []
    for path in sorted([*(REPO / "gndgl_compiler").rglob("*.py"), *(REPO / "cli").rglob("*.py")]):
        for mod, top, line in _imports(path):
            if mod in sys.stdlib_module_names or mod in OWN or mod == "__future__":
                continue
            dists = _dists_of(mod, owners)
            where = f"{path.relative_to(REPO)}:{line} imports {mod}"
            if not dists:
                problems.append(f"{where}: not installed and not a known distribution")
            elif dists & base:
                continue
            elif not dists & extras:
                problems.append(f"{where}: {sorted(dists)} is not declared in pyproject.toml")
            elif top:
                problems.append(f"{where}: {sorted(dists)} is an optional extra; import it inside the function")
    assert not problems, "\n".join(problems)


def test_cli_starts_and_reports_its_version():
    from gndgl_compiler import __version__

    out = subprocess.run([sys.executable, "-m", "gndgl_cli.main", "--version"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"gndgl {__version__}"
