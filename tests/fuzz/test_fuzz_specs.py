"""Fuzzing the spec front end through ``gndgl compile FILE -o OUTDIR`` (hypothesis).

What is generated
-----------------
(``tests/fuzz_strategies.py``, from the values of ``tests/fuzz_values.py``)

* **Mutated shipped specs** (``specs/*.yaml``): 1-4 edits of the parsed document -- drop,
  duplicate (two equal keys in one mapping), rename or add keys; replace a value by a random
  scalar (ints, floats incl. nan/inf/huge/negative, strings, bools, None, binary, dates), a
  random list/dict, another part of the spec, a deep nesting, an anchor/alias "billion laughs"
  bomb or a self-referencing alias; nudge numbers to edge values (0, -1, 2**31, 10**100, ...);
  put Python object tags (``!!python/object/apply:os.system``, ``!!python/name:...``) or custom
  tags on scalars, mappings and sequences; odd names (``../x``, ``a/b``, ``[/]``, surrogates).
  Then, sometimes, byte-level damage of the YAML text: invalid UTF-8, NUL, BOM, tabs, YAML
  tokens (``&a``, ``*a``, ``<<:``, ``!!python/name:``), cut or duplicated lines.
* **Hostile documents**: random YAML values as the whole document, and generated attacks --
  alias bombs, text nesting thousands deep, tagged nodes, oversized files, random bytes, wide
  mappings, and valid but huge networks (thousands of units, wide templates, many groups,
  100k classes) that test the compiler's time and memory budgets.

Each document is compiled with the real CLI entry point, ``gndgl_cli.main.main(["compile",
FILE, "-o", OUT])``, under an odd file / output name now and then. The only outcomes allowed:

* exit 0: the artifact (``manifest.json``) is in OUT and nothing was written anywhere else in
  the example's sandbox (input dir, working dir, ``$TMPDIR``);
* exit 2: stderr starts with ``error:``, nothing was written at all;

never a traceback, another exit code, a signal, a hang or unbounded memory.

How it runs: in a child forked, per example, from a warm worker subprocess, under an address-space
limit and an alarm (``tests/fuzz_runner.py`` explains why and how); the harness itself is checked
by ``test_runner_reports_tracebacks_hangs_and_memory``.

Determinism: ``derandomize=True`` (a fixed seed per test), no example database, a fixed
``max_examples`` (60 mutated specs + 50 hostile documents, ~45 s on 2 cores). For a longer
local hunt, ``GNDGL_FUZZ_EXAMPLES=2000`` sets the number of mutated-spec examples (the hostile
test scales with it) and ``GNDGL_FUZZ_SEED=N`` draws another reproducible sequence. The number
of examples run is printed (``-s``) and recorded as a junit property.

Failures found this way are kept in ``tests/fuzz/fuzz_regressions/`` (one file each, raw bytes;
optional leading ``# expect: FRAGMENT`` / ``# expect-rc: N`` lines) and replayed by
``test_fuzz_regression`` (``tests/fuzz/test_fuzz_regressions.py``) through the same runner. A failing
hypothesis example is saved under pytest's tmp dir (the path is in the assertion message) so it
can be copied there.
"""

from __future__ import annotations

import os
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_runner import Stats, compile_document  # noqa: E402
from fuzz_strategies import OUT_NAMES, SPEC_NAMES, hostile_documents, mutated_specs  # noqa: E402
from paths import SPECS  # noqa: E402

SCALE = float(os.environ.get("GNDGL_FUZZ_EXAMPLES", "0") or 0) / 60 or 1.0
MUTATION_EXAMPLES = max(1, int(60 * SCALE))
HOSTILE_EXAMPLES = max(1, int(50 * SCALE))

SEED = os.environ.get("GNDGL_FUZZ_SEED")  # set: a different, still reproducible, sequence of examples

FUZZ_SETTINGS = dict(
    derandomize=SEED is None,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)



# ----------------------------------------------------------------------------- the tests


def _fuzz(runner, fuzz_root, strategy, max_examples: int, label: str, record_property) -> Stats:
    stats = Stats()
    root = fuzz_root / label
    root.mkdir(exist_ok=True)
    t0 = time.monotonic()

    @settings(max_examples=max_examples, **FUZZ_SETTINGS)
    @given(case=strategy, spec_name=st.sampled_from(SPEC_NAMES), out_name=st.sampled_from(OUT_NAMES))
    @hypothesis.seed(int(SEED or 0))
    def one(case, spec_name, out_name):
        what, doc = case
        hypothesis.note(f"{what} | file {spec_name!r} | -o {out_name!r}")
        res = compile_document(runner, root, doc, spec_name=spec_name, out_name=out_name, stats=stats)
        if res.wall > 2.0:
            stats.slow[-1] += (what,)

    one()
    stats.seconds = time.monotonic() - t0
    leftovers = sorted(p.name for p in root.iterdir())
    assert not leftovers, f"examples left files behind in {root}: {leftovers[:10]}"
    print("\n" + stats.line(label))
    for slow in stats.slow:
        print("  slow:", slow)
    record_property(f"{label}_examples", stats.examples)
    record_property(f"{label}_compiled", stats.ok)
    return stats


def test_fuzz_mutated_shipped_specs(runner, fuzz_root, record_property):
    stats = _fuzz(runner, fuzz_root, mutated_specs(), MUTATION_EXAMPLES, "mutated", record_property)
    assert stats.examples >= MUTATION_EXAMPLES * 0.8
    assert stats.ok > 0 and stats.refused > 0  # the mutations reach both outcomes


def test_fuzz_hostile_documents(runner, fuzz_root, record_property):
    stats = _fuzz(runner, fuzz_root, hostile_documents(), HOSTILE_EXAMPLES, "hostile", record_property)
    assert stats.examples >= HOSTILE_EXAMPLES * 0.8


def test_runner_reports_tracebacks_hangs_and_memory(runner, fuzz_root):
    """The harness itself: a crash, a hang and a memory blow-up are seen as such."""
    box = fuzz_root / "selftest"
    for sub in ("cwd", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    res = runner.run(["compile", str(SPECS / "resnet32_k2g1.yaml"), "-o", str(box / "ok")], box)
    assert res.rc == 0 and res.signal is None and (box / "ok" / "manifest.json").is_file(), res.describe()
    res = runner.run(["compile", str(box / "missing.yaml"), "-o", str(box / "o")], box)
    assert res.rc == 2 and res.stderr.startswith("error:"), res.describe()
    # no address space to spare: the same compile must not look like a success or a clean error
    # (a starved child may also hang in the allocator: a short alarm ends it, and SIGALRM counts as a signal)
    res = runner.run(["compile", str(SPECS / "resnet32_k2g1.yaml"), "-o", str(box / "o2")], box, mem=1 << 20,
                     timeout=5)
    assert res.signal is not None or res.rc not in (0, 2), res.describe()
    res = runner.run(["compile", str(SPECS / "vgg6a_g6_sg_div.yaml"), "-o", str(box / "o3")], box, timeout=1)
    assert res.signal == 14 or res.wall < 1.0, res.describe()
