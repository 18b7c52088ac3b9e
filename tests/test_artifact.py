"""The compiled artifact (DESIGN §5): written atomically, verified on load, never executed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gndgl_compiler import compile_spec, load_artifact
from gndgl_compiler.artifact import FORMAT_VERSION, MANIFEST, read_manifest
from gndgl_compiler.fsio import sha256_file
from gndgl_compiler.errors import ArtifactError, GndglError
from paths import SPECS


SPEC = ("name: art_k2g2\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 2}\n"
        "local: {share_ratio: 1.0, diversity: {weight: 0.5}}\n")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "compiled"
    art = compile_spec(SPEC, out)
    return art, out


def fresh_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_artifact_layout_and_manifest(compiled):
    art, out = compiled
    assert art.path == out
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    expected_code = {f"code/{p.name}.py" for p in art.plan.partitions} | {"code/inference.py"}
    assert expected_code <= set(files)
    for name in ("manifest.json", "spec.json", "graph.json", "plan.json", "costs.json", "weights.safetensors"):
        assert name in files
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == FORMAT_VERSION
    assert manifest["name"] == "art_k2g2"
    assert {"gndgl", "torch", "python"} <= set(manifest)
    assert set(manifest["files"]) == set(files) - {MANIFEST}
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    # no temporary siblings are left behind
    assert [p.name for p in out.parent.iterdir()] == ["compiled"]
    # the code is for reading: every partition file shows its detached inputs
    code = (out / "code" / "m2.g0.py").read_text()
    assert "detach()" in code and "# ---- body" in code and "# ---- local loss" in code


def test_round_trip_outputs_and_state_dicts(compiled):
    art, out = compiled
    loaded = load_artifact(out)
    assert loaded.plan.to_dict() == art.plan.to_dict()
    assert loaded.summary == art.summary
    assert loaded.spec == art.spec
    assert loaded.manifest["files"] == art.manifest["files"]
    for pid, m in art.modules.items():
        a, b = m.state_dict(), loaded.modules[pid].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (pid, k)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    n1, n2 = art.assembled().eval(), loaded.assembled().eval()
    with torch.no_grad():
        assert torch.equal(n1(x), n2(x))
    # and so do the aux heads and local losses of a partition
    part = art.plan.partitions[0]
    y = torch.tensor([1, 2])
    with torch.no_grad():
        outs = []
        for m in (art.modules[0].eval(), loaded.modules[0].eval()):
            h = m.body(x)
            sib = h[:, :part.shares[0].channels]  # stands in for the sibling's share
            logits = m.aux(h, sib)["logits"]
            sib_p = torch.softmax(logits, 1)
            outs.append((h, logits, m.loss(logits, y, sib_p)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_weights_file_holds_named_tensors_only(compiled):
    """weights.safetensors holds '<partition>.<param>' tensors and nothing else."""
    from safetensors import safe_open

    art, out = compiled
    with safe_open(str(out / "weights.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    expected = {f"{p.name}.{k}" for p in art.plan.partitions for k in art.modules[p.id].state_dict()}
    assert keys == expected
    assert meta.get("format") == "gndgl-weights"


@pytest.mark.parametrize("target", ["plan.json", "weights.safetensors", "code/m1.g0.py", "code/inference.py",
                                    "spec.json", "graph.json"])
def test_tampered_file_is_refused_naming_it(compiled, tmp_path, target):
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    _flip_byte(d / target)
    with pytest.raises(ArtifactError) as info:
        load_artifact(d)
    assert target in str(info.value) and "sha256" in str(info.value)
    assert isinstance(info.value, GndglError) and info.value.exit_code == 2


def test_tampered_plan_with_matching_hash_is_still_safe(compiled, tmp_path):
    """Even a consistent edit (hash updated) cannot smuggle in code: modules are rebuilt from
    plain data and the weights must fit the rebuilt modules."""
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    plan = json.loads((d / "plan.json").read_text())
    conv = next(n for n in plan["partitions"][0]["body"] if n["kind"] == "conv")
    conv["attrs"]["out"] += 1
    (d / "plan.json").write_text(json.dumps(plan))
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["files"]["plan.json"] = sha256_file(d / "plan.json")
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="weights of partition m1.g0 do not match"):
        load_artifact(d)


@pytest.mark.parametrize("target", ["plan.json", "weights.safetensors", "code/m2.g1.py"])
def test_missing_file_is_refused(compiled, tmp_path, target):
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    (d / target).unlink()
    with pytest.raises(ArtifactError) as info:
        load_artifact(d)
    assert target in str(info.value) and "missing" in str(info.value)


def test_missing_manifest_or_directory(compiled, tmp_path):
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    (d / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        load_artifact(d)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        load_artifact(tmp_path / "a_file")


@pytest.mark.parametrize("fmt", [FORMAT_VERSION + 1, 0, "1"])
def test_manifest_with_another_format_is_refused(compiled, tmp_path, fmt):
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["format"] = fmt
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as info:
        load_artifact(d)
    assert "format" in str(info.value) and str(FORMAT_VERSION) in str(info.value)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 1}', ""])
def test_corrupt_manifest_is_refused(compiled, tmp_path, content):
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    (d / MANIFEST).write_text(content)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(d)


def test_unlisted_extra_file_does_not_break_loading(compiled, tmp_path):
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    (d / "NOTES.txt").write_text("my notes\n")
    assert load_artifact(d).summary["partitions"] == 5


def test_verify_false_skips_hashes(compiled, tmp_path):
    _, out = compiled
    d = fresh_copy(out, tmp_path)
    _flip_byte(d / "code" / "m1.g0.py")  # code is never executed, only read
    art = load_artifact(d, verify=False)
    assert art.summary["partitions"] == 5
    assert read_manifest(d, verify=False)["format"] == FORMAT_VERSION


def test_recompile_over_existing_artifact(tmp_path):
    out = tmp_path / "art"
    a = compile_spec(SPECS / "quickstart_fmnist.yaml", out)
    b = compile_spec(SPEC, out)  # another spec into the same directory
    assert b.path == out
    loaded = load_artifact(out)
    assert loaded.plan.name == "art_k2g2" and loaded.summary == b.summary
    assert not (out / "code" / "m1.g0.py").read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # old copy removed, no temp dirs
    assert a.plan.name == "quickstart_fmnist"


def test_non_empty_non_artifact_directory_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious\n")
    with pytest.raises(ArtifactError, match="exists and is not a gndgl artifact"):
        compile_spec(SPEC, out)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_existing_file_and_empty_directory_as_output(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError):
        compile_spec(SPEC, f)
    assert f.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    art = compile_spec(SPEC, empty)
    assert (empty / MANIFEST).is_file() and art.path == empty


def test_unwritable_output_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="cannot write the artifact"):
        compile_spec(SPEC, "/proc/gndgl_test/out")


def test_every_partition_can_be_loaded_alone(compiled):
    """rank=N builds only the partitions placed on worker N (distributed runs)."""
    _, out = compiled
    art = load_artifact(out, workers=2, rank=1)
    ids = [p.id for p in art.plan.partitions if p.worker == 1]
    assert sorted(art.modules) == ids and 0 < len(ids) < 5
