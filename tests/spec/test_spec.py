"""Spec front end (DESIGN §5 ``spec/``): templates, JSON Schema, safe YAML with lines."""

from __future__ import annotations

import time

import pytest
import yaml

from gndgl_compiler import compile_spec, load_spec
from gndgl_compiler.errors import GndglError, SpecError
from gndgl_compiler.graph.build import build_graph
from gndgl_compiler.spec import expand_model, parse_spec
from gndgl_compiler.spec.models import Spec
from gndgl_compiler.spec.templates import resnet_layers, vgg6a_layers
from gndgl_compiler.spec.yaml_loader import MAX_NODES, load_yaml
from paths import SPECS



# ----------------------------------------------------------------------------- templates


def _resnet32_by_hand() -> str:
    lines = ["    - {op: conv, name: stem, out: 16, kernel: 3}",
             "    - {op: bn, name: stem_bn}",
             "    - {op: relu, name: stem_relu}"]
    for s, (c, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        for j in range(5):
            lines.append(f"    - {{op: block, name: s{s}.b{j}, out: {c}, stride: {stride if j == 0 else 1}}}")
    lines += ["    - {op: adaptive_avgpool, name: pool, size: 1}",
              "    - {op: flatten, name: flatten}",
              "    - {op: linear, name: fc, out: 10}"]
    return "\n".join(lines)


def _spec(model: str, cuts: str, local: str = "{share_ratio: 1.0, diversity: {weight: 0.5}}") -> str:
    return f"name: same\nmodel:\n{model}\ncuts: {cuts}\nlocal: {local}\n"


TEMPLATE = "  template: resnet32"
BY_HAND = "  layers:\n" + _resnet32_by_hand()


@pytest.mark.parametrize("cuts", [
    "{depth: [s1.b2, s2.b1, s3.b0], width: 2}",
    "{depth: [stem, s1.b4, s3.b4], width: [1, 2, 4]}",
    "{depth: [s2.b1, s3.b4], width: 4}",
])
def test_resnet32_template_equals_explicit_layers(cuts):
    a = compile_spec(_spec(TEMPLATE, cuts))
    b = compile_spec(_spec(BY_HAND, cuts))
    assert a.summary == b.summary
    assert a.plan.to_dict() == b.plan.to_dict()
    sa = {pid: m.state_dict() for pid, m in a.modules.items()}
    sb = {pid: m.state_dict() for pid, m in b.modules.items()}
    assert sa.keys() == sb.keys()
    for pid in sa:  # same plan, same seed: identical initial weights
        assert sa[pid].keys() == sb[pid].keys()
        assert all(sa[pid][k].equal(sb[pid][k]) for k in sa[pid])


def test_resnet32_template_graph_equals_explicit_layers():
    ta, tb = load_spec(_spec(TEMPLATE, "{depth: 1}")), load_spec(_spec(BY_HAND, "{depth: 1}"))
    ga, gb = build_graph(ta), build_graph(tb)
    assert ga.total_macs() == gb.total_macs() == 69_124_736
    params = lambda g: sum(d["params"] for _, d in g.graph.nodes(data=True))  # noqa: E731
    assert params(ga) == params(gb) == 466_906
    assert list(ga.graph.nodes) == list(gb.graph.nodes)
    for n in ga.graph.nodes:
        da, db = ga.node(n), gb.node(n)
        assert (da["kind"], da["attrs"], da["shape"], da["macs"], da["params"]) == \
               (db["kind"], db["attrs"], db["shape"], db["macs"], db["params"])
    assert [s.units for s in ga.segments] == [s.units for s in gb.segments]
    assert [u.model_dump() for u in expand_model(ta.model)] == [u.model_dump() for u in expand_model(tb.model)]


def test_resnet32_template_k_table_equals_explicit_cut_names():
    """Integer K on the resnet32 template uses the paper's cut table (DESIGN §3)."""
    table = {2: "[s2.b1, s3.b4]", 4: "[s1.b2, s2.b1, s3.b0, s3.b4]",
             8: "[s1.b0, s1.b2, s1.b4, s2.b1, s2.b3, s3.b0, s3.b2, s3.b4]"}
    for k, names in table.items():
        a = compile_spec(_spec(TEMPLATE, f"{{depth: {k}, width: 2}}"))
        b = compile_spec(_spec(TEMPLATE, f"{{depth: {names}, width: 2}}"))
        assert a.plan.to_dict() == b.plan.to_dict(), k


def test_template_expansions():
    r = resnet_layers(5, 1.0, 10)
    assert len(r) == 3 + 15 + 3
    assert [u["stride"] for u in r if u["op"] == "block"] == [1] * 5 + [2, 1, 1, 1, 1] + [2, 1, 1, 1, 1]
    assert [u["out"] for u in r if u["op"] == "block"] == [16] * 5 + [32] * 5 + [64] * 5
    r2 = resnet_layers(5, 2.0, 100)
    assert r2[0]["out"] == 32 and r2[-1]["out"] == 100
    v = vgg6a_layers(1.0, 0.0, 10)
    assert [u["out"] for u in v if u["op"] in ("conv", "linear")] == [128, 256, 512, 512, 1024, 10]
    assert not any(u["op"] == "dropout" for u in v)
    assert sum(u["op"] == "dropout" for u in vgg6a_layers(1.0, 0.1, 10)) == 5
    vspec = load_spec("name: v\nmodel: {template: vgg6a}\n")
    g = build_graph(vspec)
    assert g.node("flatten")["shape"] == (8192,)  # DESIGN §3: flatten is 8192 for 32x32
    assert [s.name for s in g.segments] == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]


def test_unnamed_units_get_op_index_names():
    spec = load_spec("name: t\nmodel:\n  layers:\n    - {op: conv, out: 8}\n    - {op: relu}\n"
                     "    - {op: flatten}\n    - {op: linear, out: 10}\n")
    assert [u.name for u in expand_model(spec.model)] == ["conv0", "relu1", "flatten2", "linear3"]


def test_load_spec_accepts_path_text_dict_and_spec():
    path = SPECS / "resnet32_k2g2.yaml"
    text = path.read_text()
    data = yaml.safe_load(text)
    a = compile_spec(path)
    b = compile_spec(str(path))
    c = compile_spec(text)
    d = compile_spec(data)
    e = compile_spec(load_spec(path))
    ref = a.plan.to_dict()
    for other in (b, c, d, e):
        assert other.plan.to_dict() == ref
    assert a.spec == c.spec  # normalised spec, defaults filled in
    assert a.spec["train"]["optimizer"]["lr"] == 0.8 and a.spec["placement"]["devices"] == "cpu"


# ----------------------------------------------------------------------------- JSON schema


def test_json_schema_describes_every_property():
    schema = Spec.model_json_schema()
    missing, seen = [], 0

    def walk(node, where):
        nonlocal seen
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                for name, prop in props.items():
                    seen += 1
                    desc = prop.get("description") if isinstance(prop, dict) else None
                    if not (isinstance(desc, str) and desc.strip()):
                        missing.append(f"{where}.{name}")
            for key, val in node.items():
                walk(val, f"{where}.{key}")
        elif isinstance(node, list):
            for i, val in enumerate(node):
                walk(val, f"{where}[{i}]")

    walk(schema, "$")
    assert seen > 60
    assert not missing, f"properties without a description: {missing}"
    assert {"Cuts", "Local", "Train", "Conv", "Block"} <= set(schema["$defs"])


# ----------------------------------------------------------------------------- YAML loading


def test_yaml_line_numbers():
    text = ("# a comment\n"
            "name: t\n"
            "model:\n"
            "  template: resnet32\n"
            "cuts:\n"
            "  depth: 2\n"
            "  width: 4\n"
            "train:\n"
            "  optimizer: {kind: sgd, lr: 0.1}\n"
            "  schedule:\n"
            "    kind: multistep\n"
            "    milestones:\n"
            "      - 10\n"
            "      - 20\n")
    data, lines = load_yaml(text)
    assert data["cuts"] == {"depth": 2, "width": 4}
    assert lines[("name",)] == 2
    assert lines[("model", "template")] == 4
    assert lines[("cuts",)] == 5
    assert lines[("cuts", "width")] == 7
    assert lines[("train", "optimizer", "lr")] == 9
    assert lines[("train", "schedule", "milestones", 1)] == 14
    assert lines.line_of(("cuts", "width", "nonexistent")) == 7  # closest recorded ancestor


def test_spec_error_names_file_line_and_field(tmp_path):
    f = tmp_path / "my_spec.yaml"
    f.write_text("name: t\nmodel: {template: resnet32}\ncuts:\n  depth: 2\n  width: 5\n")
    with pytest.raises(SpecError) as info:
        compile_spec(f)
    err = info.value
    assert err.line == 5 and err.path == "cuts.width" and err.file == str(f)
    assert str(err).startswith(f"{f}:5, field 'cuts.width': ")


def test_several_errors_are_reported_together():
    with pytest.raises(SpecError) as info:
        load_spec("name: t\nmodel: {template: resnet32}\ncuts: {depth: 0}\ntrain: {epochs: 0, batch_size: -1}\n")
    msg = str(info.value)
    assert "problem(s) in the spec" in msg
    for frag in ("'cuts.depth'", "'train.epochs'", "'train.batch_size'", "line 3", "line 4"):
        assert frag in msg


def test_duplicate_keys_are_refused_with_their_line():
    with pytest.raises(SpecError) as info:
        load_yaml("name: t\nmodel:\n  template: resnet32\n  width: 1\n  width: 2\n")
    assert "duplicate key 'width'" in str(info.value)
    assert info.value.line == 5
    assert info.value.path == "model.width"




@pytest.mark.parametrize("text", [
    "name: !!python/name:os.system\n",
    "name: !!python/object/new:str x\n",
    "x: !custom 3\n",
    "name: !!python/object/apply:os.system ['echo pwned']\n",
    "x: !!python/tuple [1, 2]\n",
    "model: !!python/object/new:dict {template: resnet32}\n",
    "a: !foo {b: 1}\n",
])
def test_python_and_custom_tags_are_refused(text):
    with pytest.raises(SpecError) as info:
        load_yaml(text)
    assert "is not allowed in a spec" in str(info.value)
    assert info.value.line == 1


def test_python_tags_never_execute(tmp_path, capfd):
    marker = tmp_path / "marker"
    for text in (f"name: !!python/object/apply:os.system ['touch {marker}']\nmodel: {{template: resnet32}}\n",
                 f"name: !!python/object/apply:os.system\n  args: ['touch {marker}']\nmodel: {{template: resnet32}}\n"):
        with pytest.raises(GndglError):
            compile_spec(text)
    assert not marker.exists()


def test_anchor_bomb_is_refused_quickly():
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    names = "abcdefghij"
    for prev, cur in zip(names, names[1:]):
        levels.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]")
    bomb = "\n".join(levels) + "\n"  # 10^10 leaves if expanded
    t = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(bomb)
    assert time.perf_counter() - t < 10
    assert f"more than {MAX_NODES} nodes" in str(info.value)


def test_small_aliases_are_fine():
    data, _ = load_yaml("w: &w 2\ncuts: {depth: 2, width: *w}\n")
    assert data["cuts"]["width"] == 2


def test_merge_keys_and_deep_nesting_are_refused():
    with pytest.raises(SpecError, match="merge keys"):
        load_yaml("a: &a {x: 1}\nb:\n  <<: *a\n")
    with pytest.raises(SpecError, match="nested deeper"):
        load_yaml("a: " + "[" * 500 + "]" * 500 + "\n")


def test_yaml_syntax_error_has_line():
    with pytest.raises(SpecError) as info:
        load_yaml("name: t\nmodel: {template: resnet32\ncuts: 3\n")
    assert info.value.line == 3
    assert "YAML syntax error" in str(info.value)


def test_non_mapping_and_empty_documents():
    with pytest.raises(SpecError, match="found list"):
        load_spec("- 1\n- 2\n")
    with pytest.raises(SpecError, match="is empty"):
        load_spec("# only a comment\n")
    with pytest.raises(SpecError, match="found int"):
        parse_spec(3)


def test_oversized_and_binary_specs_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"name: t\n" + b"# pad\n" * 200_000)
    with pytest.raises(SpecError, match="larger than"):
        load_spec(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: t\n\x00\xff\xfe\x81")
    with pytest.raises(SpecError, match="UTF-8"):
        load_spec(binary)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(SpecError) as info:
        load_spec("name: t\nmodel: {template: resnet32}\nlocal:\n  diversity: {weigth: 0.5}\n")
    msg = str(info.value)
    assert "field 'local.diversity.weigth'" in msg and "line 4" in msg
    assert "allowed keys here: temperature, weight" in msg


def test_spec_name_is_a_safe_file_name():
    for bad in ("../x", "a/b", "", ".hidden", "a b", "x" * 65):
        with pytest.raises(SpecError):
            load_spec({"name": bad, "model": {"template": "resnet32"}})
    for good in ("a", "resnet32_k8g4", "v1.2-final", "x" * 64):
        assert load_spec({"name": good, "model": {"template": "resnet32"}}).name == good
