"""Pictures: partition graphs (DOT/SVG), sweep tables vs the paper, training curves, CLI."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gndgl_compiler import compile_spec
from gndgl_compiler.viz import plan_to_dot, render_dot
from gndgl_compiler.viz.style import EDGE_STYLES
from gndgl_compiler.sweep import run_sweep
from gndgl_compiler.viz.tables import PAPER_INFERENCE_SPEEDUP, PAPER_TRAIN_SPEEDUP, write_tables
from paths import SPECS

HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz `dot` is not installed (apt-get install graphviz)")

T4 = {(2, 1): 1.894, (4, 1): 3.622, (8, 1): 6.456, (16, 1): 11.609, (1, 2): 3.674, (2, 2): 6.304, (4, 2): 10.667,
      (8, 2): 16.426, (16, 2): 23.072, (1, 4): 11.982, (2, 4): 17.445, (4, 4): 24.522, (8, 4): 30.47,
      (1, 8): 28.531, (2, 8): 33.736, (4, 8): 39.333}
T5 = {(2, 1): 1, (4, 1): 1, (8, 1): 1, (16, 1): 1, (1, 2): 1.961, (2, 2): 1.899, (4, 2): 1.785, (8, 2): 1.612,
      (16, 2): 1.338, (1, 4): 3.777, (2, 4): 3.448, (4, 4): 2.936, (8, 4): 2.324, (1, 8): 7.03, (2, 8): 5.824,
      (4, 8): 4.336}

EDGE_RE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)"(?: \[(.*)\])?;$')
ATTR_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|<.*?>)')


def edges_of(dot: str) -> list[dict[str, str]]:
    """Attributes of every edge statement of DOT text written by gndgl."""
    out = []
    for line in dot.splitlines():
        m = EDGE_RE.match(line)
        if m:
            attrs = {k: v.strip('"') for k, v in ATTR_RE.findall(m.group(3) or "")}
            out.append({"src": m.group(1), "dst": m.group(2), **attrs})
    return out


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gndgl_cli.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def run_main(*args: str, capsys) -> tuple[int, str, str]:
    """Run the CLI in this process (cheaper than a subprocess); returns (exit code, stdout, stderr)."""
    from gndgl_cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def k8g4():
    return compile_spec(SPECS / "resnet32_k8g4.yaml").plan


@pytest.fixture(scope="module")
def k8g4_w4():
    return compile_spec(SPECS / "resnet32_k8g4.yaml", workers=4).plan


@needs_dot
def test_svg_has_one_cluster_per_partition_and_a_legend(k8g4, tmp_path):
    out = render_dot(plan_to_dot(k8g4, level="ops"), tmp_path / "partitions.svg")
    root = ET.parse(out).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    titles = [g.find(f"{ns}title").text for g in root.iter(f"{ns}g") if g.get("class") == "cluster"]
    names = {f"cluster_{p.name}" for p in k8g4.partitions}
    assert len(names) == 33
    assert sorted(t for t in titles if t in names) == sorted(names)
    assert "cluster_legend" in titles
    text = out.read_text()
    assert "IMAGE" in text and "PREDICTION" in text and "FINAL HEAD" in text


def test_every_edge_kind_has_its_own_style(k8g4_w4):
    signature = {k: (v.get("color"), v.get("style"), v.get("dir"), v.get("arrowhead")) for k, v in EDGE_STYLES.items()
                 if k != "image"}  # the image input is drawn like forward data (bolder)
    assert len(set(signature.values())) == len(signature)
    for level in ("ops", "partitions"):
        edges = edges_of(plan_to_dot(k8g4_w4, level=level, bundle=False))
        def has(edges=edges, **want):
            return any(all(e.get(k) == v for k, v in want.items()) for e in edges)
        if level == "ops":
            assert has(color="black", style="solid")                               # inside a partition
        assert has(color=EDGE_STYLES["sg"]["color"], style="dashed", arrowhead="teenormal")   # stop-gradient
        assert has(style="dotted", arrowhead="empty")                               # to the aux head
        assert has(color="#1f5fbf", style="dashed")                                 # sibling sharing
        assert has(color="#d62728", penwidth="2.6")                                 # cross-worker transfer
        assert any("bold" in e.get("style", "") and e.get("color") == "#d62728" for e in edges)
        div = [e for e in edges if e.get("dir") == "both" and e.get("style", "").startswith("dotted")
               and not e["src"].startswith("legend")]
        assert len(div) == 8 * 6                                                    # one edge per sibling pair
        pairs = {frozenset((e["src"], e["dst"])) for e in div}
        assert len(pairs) == len(div)


def test_partitions_level_labels_and_bundled_hubs(k8g4):
    dot = plan_to_dot(k8g4, level="partitions")
    assert "1.6M MACs · 10.6k params" in dot and "rankdir=\"LR\"" in dot
    assert dot.count('"share_hub_') >= 8 and dot.count('"diversity_hub_') >= 8
    assert 'rank="same"' in dot
    labels = [e.get("label", "") for e in edges_of(dot)]
    assert "12.0 KiB" in labels                                                      # bytes / sample


def test_dot_output_parses_with_pydot(tmp_path, monkeypatch, capsys):
    pydot = pytest.importorskip("pydot", reason="pip install pydot")
    compile_spec(SPECS / "quickstart_fmnist.yaml", tmp_path / "compiled")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("viz", "--format", "dot", capsys=capsys)             # DOT on stdout
    assert code == 0, err
    graphs = pydot.graph_from_dot_data(out)
    assert graphs and graphs[0].get_name().strip('"') == "quickstart_fmnist"
    assert not list(tmp_path.glob("compiled/partitions.*"))


def test_sweep_reproduces_tables_4_and_5(tmp_path):
    rows = run_sweep(SPECS / "resnet32_k8g4.yaml", [1, 2, 4, 8, 16], [1, 2, 4, 8])
    cells = {(r.K, r.G): r for r in rows}
    assert set(T4) <= set(cells) and PAPER_TRAIN_SPEEDUP.items() >= T4.items()
    assert PAPER_INFERENCE_SPEEDUP.items() >= T5.items()
    for key, paper in T4.items():
        assert cells[key].training_speedup == pytest.approx(paper, rel=0.05), key
    for key, paper in T5.items():
        assert cells[key].inference_speedup == pytest.approx(paper, rel=0.05), key
    assert cells[(8, 4)].partitions == 33 and cells[(16, 8)].partitions == 129
    md, csv_path = write_tables(rows, tmp_path, title="ResNet-32", paper=True)
    table = md.read_text()
    assert "| K·G | G=1 (DGL) | G=2 | G=4 | G=8 |" in table and "(30.47)" in table
    read = list(csv.DictReader(csv_path.open()))
    assert len(read) == 20
    r = next(x for x in read if x["K"] == "8" and x["G"] == "4")
    assert float(r["training_speedup"]) == pytest.approx(30.47, rel=0.05) and r["KxG"] == "32"


def _synthetic_metrics(run: Path) -> None:
    run.mkdir(parents=True)
    parts = ["m1.g0", "m1.g1", "m2.g0", "m2.g1", "head"]
    lines = []
    for step in range(1, 21):
        for i, p in enumerate(parts):
            rec = {"kind": "train", "epoch": (step - 1) // 10, "step": step, "partition": p,
                   "loss": 2.3 * math.exp(-step / (10 + i))}
            if p != "head":
                rec["acc"] = 1 - math.exp(-step / (8 + i))
            lines.append(json.dumps(rec))
        if step % 10 == 0:
            lines.append(json.dumps({"kind": "eval", "epoch": step // 10 - 1, "step": step,
                                     "test_acc": 0.3 + step / 100, "ensemble_acc": 0.32 + step / 100,
                                     "partition_acc": {p: 0.2 for p in parts}}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"kind": "tra')  # truncated last line


def test_plot_curves_from_synthetic_metrics(tmp_path):
    from gndgl_compiler.viz.plots import plot_run, read_curves

    run = tmp_path / "runs" / "r1"
    _synthetic_metrics(run)
    data = read_curves(run)
    assert len(data["train"]) == 5 and data["eval"]["epoch"] == [1, 2]
    for name in ("curves.png", "curves.svg"):
        out = plot_run(run, tmp_path / name)
        assert out.exists() and out.stat().st_size > 5000
    assert plot_run(run) == run / "curves.png"


@needs_dot
def test_cli_commands_in_subprocesses(tmp_path):
    compile_spec(SPECS / "resnet32_k2g2.yaml", tmp_path / "compiled")
    r = cli("viz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "compiled/partitions.svg" in r.stdout and (tmp_path / "compiled" / "partitions.svg").stat().st_size > 0

    r = cli("sweep", str(SPECS / "resnet32_k8g4.yaml"), "--depth", "1,2", "--width", "1,2,3", "-o", "sweep/",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sweep/table.md" in r.stdout and "sweep/bubble.png" in r.stdout
    for name in ("table.md", "table.csv", "bubble.png", "bubble.svg"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    assert "skipped" in (tmp_path / "sweep" / "table.md").read_text()              # G=3 does not divide 16

    _synthetic_metrics(tmp_path / "runs" / "r1")
    r = cli("plot", "runs/r1", "-o", "curves.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "curves.png" in r.stdout and (tmp_path / "curves.png").stat().st_size > 5000

    (tmp_path / "runs" / "empty").mkdir(parents=True)
    r = cli("plot", "runs/empty", cwd=tmp_path)
    assert r.returncode == 2 and "no metrics file" in r.stderr and "Traceback" not in r.stderr


@needs_dot
def test_cli_variants(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("viz", capsys=capsys)                                # no ./compiled yet
    assert code == 2 and "gndgl compile" in err
    compile_spec(SPECS / "resnet32_k2g2.yaml", tmp_path / "compiled")

    code, out, err = run_main("viz", "compiled/", "-o", "graph.png", "--level", "ops", capsys=capsys)
    assert code == 0, err
    assert "graph.png" in out and (tmp_path / "graph.png").read_bytes()[:4] == b"\x89PNG"

    code, out, err = run_main("viz", str(SPECS / "vgg6a_g6.yaml"), "--level", "partitions", capsys=capsys)
    assert code == 0, err
    assert "vgg6a_g6_partitions.svg" in out and "27 partitions" in out

    code, out, err = run_main("viz", "compiled/", "--format", "dot", "-o", "g.dot", capsys=capsys)
    assert code == 0 and "g.dot" in out and (tmp_path / "g.dot").read_text().startswith("digraph")

    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run_main("viz", "compiled/", "--terminal", capsys=capsys)
    assert code == 0, err
    assert "module 1" in out and "m2.g1" in out and "training speed-up" in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before                    # no files written

    code, out, err = run_main("viz", "compiled", "-o", "x.bmp", capsys=capsys)
    assert code == 2 and ".svg" in err
    code, out, err = run_main("viz", "compiled", "--level", "layers", capsys=capsys)
    assert code == 2 and "partitions" in err
    code, out, err = run_main("sweep", str(SPECS / "resnet32_k8g4.yaml"), "--depth", "1,x", capsys=capsys)
    assert code == 2 and "--depth" in err


def test_missing_graphviz_still_writes_dot(k8g4, tmp_path, monkeypatch):
    from gndgl_compiler.viz.render import RenderError

    (tmp_path / "no-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no `dot` executable to find
    with pytest.raises(RenderError, match="apt-get install graphviz"):
        render_dot(plan_to_dot(k8g4, level="partitions"), tmp_path / "p.svg")
    assert (tmp_path / "p.dot").read_text().startswith("digraph")


def test_viz_imports_are_lazy():
    code = ("import sys, gndgl_compiler, gndgl_compiler.viz, gndgl_compiler.sweep, gndgl_compiler.viz.tables,"
            " gndgl_compiler.viz.plots, gndgl_compiler.viz.bubble; print('matplotlib' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
