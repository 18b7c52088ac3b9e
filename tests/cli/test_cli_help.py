"""``gndgl --help`` at 80 columns, and the commands that answer without importing torch.

Help: every option name of every command appears whole at ``COLUMNS=80`` (rich's help table
cut them to ``--checkpoint-eve…``). Lazy torch: ``--help``, ``--version``, ``schema``,
``units`` and a spec's error messages run without ``torch`` in ``sys.modules`` (checked in
a fresh process, not timed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from gndgl_cli.main import app
from paths import REPO, SPECS


# runs the CLI in-process, then says whether torch was imported (the CLI's own exit code is kept aside)
PROBE = """
import sys
from gndgl_cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr)
"""


def _env(columns: int) -> dict[str, str]:
    return dict(os.environ, COLUMNS=str(columns), NO_COLOR="1", TERM="dumb")


def _commands() -> dict[str, list[str]]:
    """Every command path ('' for the root) → its option names (both sides of --x/--no-x flags)."""
    root = typer.main.get_command(app)
    out = {"": [o for p in root.params for o in [*p.opts, *p.secondary_opts] if o.startswith("-")]}
    for name, cmd in root.commands.items():
        out[name] = [o for p in cmd.params if p.param_type_name == "option" for o in [*p.opts, *p.secondary_opts]]
    return out


COMMANDS = _commands()


def test_every_command_is_listed():
    assert {"compile", "inspect", "units", "schema", "train", "eval", "viz", "sweep", "plot", "export"} <= set(COMMANDS)
    assert "--checkpoint-every" in COMMANDS["train"] and "--no-fuse-siblings" in COMMANDS["train"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_at_80_columns_shows_every_option_name_whole(command):
    argv = [command, "--help"] if command else ["--help"]
    r = subprocess.run([sys.executable, "-m", "gndgl_cli.main", *argv], cwd=REPO, env=_env(80),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    words = r.stdout.replace(",", " ").split()
    for opt in COMMANDS[command]:
        assert opt in words, f"{opt} is not shown whole in 'gndgl {' '.join(argv)}' at 80 columns:\n{r.stdout}"
    assert "…" not in r.stdout, r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80, r.stdout


def _probe(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=tmp_path, env=_env(100), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["schema"], ["train", "--help"], ["compile", "--help"],
                                  ["units", "resnet20"]])
def test_commands_that_answer_without_torch(tmp_path, argv):
    r = _probe(tmp_path, *argv)
    assert "NO-TORCH 0" in r.stderr, (argv, r.stderr)
    assert r.stdout.strip()


def test_spec_errors_answer_without_torch(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\nmodel:\n  template: resnet20\n  input_shape: [28, 28]\n")
    for argv in (["compile", "bad.yaml"], ["train", "bad.yaml"], ["units", "bad.yaml"]):
        r = _probe(tmp_path, *argv)
        assert "NO-TORCH 2" in r.stderr, (argv, r.stderr)
        assert r.stderr.startswith("error:") and "needs 3 values C, H, W; got 2" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_compile_still_imports_torch_when_it_builds_modules(tmp_path):
    """The probe can see torch: a real compile imports it (keeps the tests above honest)."""
    r = _probe(tmp_path, "compile", str(SPECS / "quickstart_fmnist.yaml"), "-o", str(tmp_path / "out"))
    assert "TORCH-IMPORTED 0" in r.stderr, r.stderr
