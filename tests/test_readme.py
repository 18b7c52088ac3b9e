"""Every Python snippet of the README runs as written (in order, in one namespace, in a fresh
working directory that holds the repository's ``specs/``), and every ``gndgl`` subcommand the
README shows exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from paths import REPO, SPECS

README = (REPO / "README.md").read_text()


def test_python_snippets_run_as_written(tmp_path, one_thread):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no Python snippet"
    (tmp_path / "specs").symlink_to(SPECS)
    code = "\n".join(blocks)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_every_shown_subcommand_exists():
    from gndgl_cli.main import app
    import typer

    names = set(typer.main.get_command(app).commands)
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
    shown = set(re.findall(r"^gndgl ([a-z]+)", bash, flags=re.M))
    assert shown and shown <= names, shown - names
