"""The documents of the spec fuzzer (``tests/fuzz/test_fuzz_specs.py``), as hypothesis strategies.

* ``mutated_specs``: a shipped spec (``specs/*.yaml``) with 1-4 edits of the parsed document --
  drop, duplicate, rename or add keys; replace a value by a random one, another part of the spec,
  a deep nesting, an alias bomb or a self-referencing alias; nudge numbers to edge values; put
  Python object tags or custom tags on nodes -- then, sometimes, byte-level damage (``damaged``);
* ``hostile_documents``: random YAML values as the whole document, and generated attacks (alias
  bombs, text nesting thousands deep, tagged nodes, oversized files, random bytes, wide mappings,
  valid but huge networks);
* ``SPEC_NAMES`` / ``OUT_NAMES``: odd file and output names.

The values they draw from: ``tests/fuzz_values.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import yaml
from hypothesis import strategies as st

from fuzz_values import (BAD_BYTES, EDGE_FLOATS, EDGE_INTS, ODD_STRINGS, TAGS, YAML_TOKENS, Pairs, Tagged, dump,
                         keys, scalars, values)
from paths import SPECS

SPEC_FILES = sorted(SPECS.glob("*.yaml"))


def _slots(node: Any, path: tuple = (), seen: set | None = None) -> list[tuple]:
    """Paths of every value in a dict/list tree (the root is ``()``); shared nodes once."""
    seen = set() if seen is None else seen
    out = [path]
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            return out
        seen.add(id(node))
    if isinstance(node, dict):
        for k, v in node.items():
            out += _slots(v, path + (k,), seen)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _slots(v, path + (i,), seen)
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _bomb(draw) -> Any:
    """Nested lists whose levels all alias the same object: width ** depth leaves."""
    b = draw(st.integers(2, 12))
    levels = draw(st.integers(2, 14))
    node: Any = [draw(st.sampled_from(["lol", 16, {"op": "conv", "out": 16}, None]))] * b
    for _ in range(levels - 1):
        node = [node] * b
    if draw(st.booleans()):
        node = {"k": node, "v": node}
    return node


def _nested(draw) -> Any:
    depth = draw(st.sampled_from([2, 10, 40, 63, 64, 65, 66, 100, 300]))
    leaf = draw(scalars)
    as_map = draw(st.booleans())
    node = leaf
    for _ in range(depth):
        node = {"a": node} if as_map else [node]
    return node


def _self_ref(draw) -> Any:
    if draw(st.booleans()):
        x: list = []
        x.append(x)
        return x
    y: dict = {}
    y["self"] = y
    return y


def _nudge(draw, v: Any) -> Any:
    """A value close to ``v`` in type: edge numbers, odd names, flipped bools, changed lists."""
    if isinstance(v, bool):
        return draw(st.sampled_from([not v, 0, 1, "true", "yes", None]))
    if isinstance(v, int):
        return draw(st.one_of(st.sampled_from(EDGE_INTS), st.sampled_from([v - 1, v + 1, -v, v * 2, v // 2, v * 1000,
                                                                          float(v), v + 0.5, str(v)])))
    if isinstance(v, float):
        near = [-v, v * 2, v / 2, v * 1e6, int(v) if math.isfinite(v) else 0, str(v)]
        return draw(st.one_of(st.sampled_from(EDGE_FLOATS), st.sampled_from(near)))
    if isinstance(v, str):
        return draw(st.one_of(st.sampled_from(ODD_STRINGS), st.sampled_from([v + "x", v[:-1], v.upper(), v + "/..",
                                                                            "../" + v, v + "/" + v, " " + v, v * 2])))
    if isinstance(v, list):
        if v and draw(st.booleans()):
            i = draw(st.integers(0, len(v) - 1))
            return v[:i] + [copy.deepcopy(v[i])] * draw(st.sampled_from([2, 3, 50])) + v[i + 1:]
        return draw(st.sampled_from([[], v[::-1], v + v, v[:1], [v]]))
    if isinstance(v, dict):
        w = dict(v)
        w[draw(keys)] = draw(values)
        return w
    return draw(values)


PLAUSIBLE_INTS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512]
PLAUSIBLE_FLOATS = [0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0, 1.5, 2.0, 3.0, 4.0]
VOCABULARY = [s for s in ODD_STRINGS if s.isascii() and len(s) < 20 and s.replace(".", "").replace("-", "").isalnum()]


def _plausible(draw, v: Any) -> Any:
    """A value of the same type that the spec format may well accept (reaches the later stages)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return draw(st.sampled_from(PLAUSIBLE_INTS))
    if isinstance(v, float):
        return draw(st.sampled_from(PLAUSIBLE_FLOATS))
    if isinstance(v, str):
        return draw(st.sampled_from(VOCABULARY))
    if isinstance(v, list) and v:
        i = draw(st.integers(0, len(v) - 1))
        return v[:i] + v[i + 1:] if draw(st.booleans()) else v[:i + 1] + [copy.deepcopy(v[i])] + v[i + 1:]
    return v


MUTATIONS = ["drop", "duplicate", "rename", "add", "retype", "nudge", "nudge", "tag", "nest", "bomb",
             "self_ref", "swap", "convert"] + ["plausible"] * 6


@st.composite
def mutated_specs(draw) -> tuple[str, bytes]:
    spec_file = draw(st.sampled_from(SPEC_FILES))
    doc: Any = yaml.safe_load(spec_file.read_text())
    done = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        slots = _slots(doc)
        path = draw(st.sampled_from(slots))
        kind = draw(st.sampled_from(MUTATIONS))
        target = _get(doc, path)
        parent = _get(doc, path[:-1]) if path else None
        if kind == "drop" and path:
            del parent[path[-1]]
        elif kind in ("duplicate", "rename", "add") and isinstance(target, dict) and target:
            k = draw(st.sampled_from(list(target)))
            if kind == "duplicate":
                items = list(target.items())
                i = list(target).index(k)
                second = target[k] if draw(st.booleans()) else draw(values)
                items.insert(draw(st.integers(i + 1, len(items))), (k, second))
                doc = _set(doc, path, Pairs(items))  # Pairs is a leaf for later edits
            elif kind == "rename":
                new = draw(keys)
                doc = _set(doc, path, {(new if kk == k else kk): vv for kk, vv in target.items()}
                           if new not in target else target)
            else:
                target[draw(keys)] = draw(values)
        elif kind == "retype":
            doc = _set(doc, path, draw(values))
        elif kind == "nudge":
            doc = _set(doc, path, _nudge(draw, target))
        elif kind == "plausible":
            doc = _set(doc, path, _plausible(draw, target))
        elif kind == "tag":
            doc = _set(doc, path, Tagged(draw(st.sampled_from(TAGS)), target))
        elif kind == "nest":
            doc = _set(doc, path, _nested(draw))
        elif kind == "bomb":
            doc = _set(doc, path, _bomb(draw))
        elif kind == "self_ref":
            doc = _set(doc, path, _self_ref(draw))
        elif kind == "swap":
            other = _get(doc, draw(st.sampled_from(slots)))
            doc = _set(doc, path, other)  # shared object -> written as an anchor + alias
        elif kind == "convert" and isinstance(target, (dict, list)) and path:
            doc = _set(doc, path, list(target.values()) if isinstance(target, dict) else
                       {str(i): v for i, v in enumerate(target)})
        else:
            continue
        done.append(f"{kind}@{'.'.join(map(str, path)) or '<root>'}")
        if not isinstance(doc, (dict, list)):
            break
    data = dump(doc, draw(st.sampled_from([None, False, True])))
    data = draw(damaged(data))
    return f"{spec_file.stem}: {', '.join(done)}", data


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """Sometimes, byte-level damage of YAML text."""
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2]))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["bytes", "token", "cut", "dup_line", "truncate", "random"]))
        if kind == "bytes":
            data = data[:pos] + draw(st.sampled_from(BAD_BYTES)) + data[pos:]
        elif kind == "token":
            data = data[:pos] + draw(st.sampled_from(YAML_TOKENS)).encode() + data[pos:]
        elif kind == "cut":
            data = data[:pos] + data[pos + draw(st.integers(1, 40)):]
        elif kind == "dup_line":
            lines = data.split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            data = b"\n".join(lines)
        elif kind == "truncate":
            data = data[:pos]
        else:
            data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    return data


SPEC_HEAD = b"name: fuzz\nmodel: {template: resnet20}\n"


@st.composite
def hostile_documents(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["value", "value", "alias_bomb", "text_nest", "tagged", "huge", "bytes",
                                 "spec_value", "merge", "many_keys", "long_net", "wide_net", "wide_net"]))
    if kind == "value":  # any YAML value as the whole document
        return kind, dump(draw(values), draw(st.sampled_from([None, True])))
    if kind == "spec_value":  # a valid head, then a random value in one section
        sec = draw(st.sampled_from(["model", "cuts", "local", "placement", "train", "name", "description"]))
        doc = {"name": "fuzz", "model": {"template": "resnet20"}, sec: draw(values)}
        return f"{kind}:{sec}", dump(doc, None)
    if kind == "alias_bomb":
        width, depth = draw(st.integers(2, 30)), draw(st.integers(2, 12))
        lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
        for i in range(1, depth):
            lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
        where = draw(st.sampled_from(["top", "cuts", "layers"]))
        last = f"*l{depth - 1}"
        tail = {"top": "", "cuts": f"cuts: {{depth: {last}}}\n", "layers": f"model: {{layers: {last}}}\n"}[where]
        head = SPEC_HEAD if where != "layers" else b"name: fuzz\n"
        return f"{kind}:{width}^{depth}", head + ("\n".join(lines) + "\n" + tail).encode()
    if kind == "text_nest":
        n = draw(st.sampled_from([63, 64, 65, 200, 1000, 5000, 30000, 200_000]))
        style = draw(st.sampled_from(["[", "{a: ", "- ", "map", "mixed"]))
        if style == "[":
            body = "[" * n + "]" * n
        elif style == "{a: ":
            body = "{a: " * n + "x" + "}" * n
        elif style == "- ":
            body = "- " * min(n, 5000) + "x"
        elif style == "map":
            n = min(n, 900)
            body = "".join("  " * i + "a:\n" for i in range(n)) + "  " * n + "x"
        else:
            body = "[{a: " * (n // 2) + "x" + "}]" * (n // 2)
        return f"{kind}:{style}x{n}", SPEC_HEAD + b"cuts:\n  depth: " + body.encode() + b"\n"
    if kind == "tagged":
        tag = draw(st.sampled_from([t.replace("tag:yaml.org,2002:", "!!") for t in TAGS] + ["!<tag:evil,1:x>"]))
        form = draw(st.sampled_from(["scalar", "map", "seq", "key", "doc"]))
        arg = {"scalar": f"{tag} 'echo pwned > /tmp/gndgl-fuzz-pwned'", "map": f"{tag} {{template: resnet20}}",
               "seq": f"{tag} [echo, pwned]", "key": "x", "doc": ""}[form]
        if form == "doc":
            return f"{kind}:{tag}:{form}", f"--- {tag}\nname: fuzz\nmodel: {{template: resnet20}}\n".encode()
        if form == "key":
            return f"{kind}:{tag}:{form}", f"name: fuzz\nmodel: {{template: resnet20}}\n{tag} k: 1\n".encode()
        sec = draw(st.sampled_from(["model", "name", "cuts: {depth", "train: {optimizer", "local: {head"]))
        if "{" in sec:
            return f"{kind}:{tag}:{form}", f"name: fuzz\nmodel: {{template: resnet20}}\n{sec}: {arg}}}\n".encode()
        if sec == "model":
            return f"{kind}:{tag}:{form}", f"name: fuzz\nmodel: {arg}\n".encode()
        return f"{kind}:{tag}:{form}", f"name: {arg}\nmodel: {{template: resnet20}}\n".encode()
    if kind == "huge":
        size = draw(st.sampled_from([999_000, 1_000_001, 2_000_000]))
        filler = draw(st.sampled_from(["comment", "description"]))
        if filler == "comment":
            return f"{kind}:{filler}:{size}", SPEC_HEAD + b"#" + b"x" * size + b"\n"
        return f"{kind}:{filler}:{size}", SPEC_HEAD + b"description: " + b"x" * size + b"\n"
    if kind == "bytes":
        return kind, draw(st.binary(max_size=200))
    if kind == "long_net":  # many units (up to the 4096 allowed): cut search, partition count, placement
        n = draw(st.sampled_from([2, 40, 600, 1500]))
        c = draw(st.sampled_from([1, 4, 16]))
        k = draw(st.sampled_from([1, 2, 3, n // 2, n, 1024]))
        lines = [f"  - {{op: conv, out: {c}}}"] * n + ["  - {op: flatten}", "  - {op: linear, out: 10}"]
        workers = draw(st.sampled_from(["", "placement: {workers: 4096}\n", "placement: {devices: [cpu, cpu, cpu]}\n"]))
        return f"{kind}:{n}x{c}/K={k}", ("name: long\nmodel:\n  input_shape: [1, 2, 2]\n  layers:\n" + "\n".join(lines)
                                         + f"\ncuts: {{depth: {k}, width: {draw(st.sampled_from([1, 2, c]))}}}\n"
                                         + workers).encode()
    if kind == "wide_net":  # wide templates and many groups: parameter and partition budgets
        template = draw(st.sampled_from(["resnet20", "resnet32", "resnet110", "vgg6a"]))
        width = draw(st.sampled_from([0.01, 1, 2, 4, 8, 16]))
        k = draw(st.sampled_from([1, 2, 4, 16, 54]))
        g = draw(st.sampled_from([1, 2, 16, 64, 256, 1024, 4096]))
        local = draw(st.sampled_from(["{}", "{share_ratio: 1.0, diversity: {weight: 0.5}}",
                                      "{head: {kind: mlp-sr, hidden: 65536}}", "{head: {kind: infopro}}"]))
        classes = draw(st.sampled_from([10, 100_000]))
        return f"{kind}:{template}x{width}/K={k}/G={g}", (
            f"name: wide\nmodel: {{template: {template}, width: {width}, num_classes: {classes}}}\n"
            f"cuts: {{depth: {k}, width: {g}, split: balanced}}\nlocal: {local}\n").encode()
    if kind == "merge":
        return kind, (SPEC_HEAD + b"base: &b {depth: 2, width: 2}\ncuts:\n  <<: *b\n  " +
                      draw(st.sampled_from([b"depth: 4", b"<<: *b", b"x: 1"])) + b"\n")
    n = draw(st.sampled_from([100, 5000, 20_000]))  # many_keys: a wide mapping (60k keys parse for ~4 s)
    return f"{kind}:{n}", SPEC_HEAD + b"train:\n" + b"".join(b"  k%d: 1\n" % i for i in range(n))


SPEC_NAMES = ["spec.yaml", "spec.yml", "spec", "a b.yaml", "ünïcødé.yaml", "..yaml", "x..y.yaml", "-dash.yaml",
              "--help.yaml", "#.yaml", "$(touch pwned).yaml", "name'quote\".yaml"]
OUT_NAMES = ["artifact", "a b", "compiled", "new/nested/dir", "x/../y", "-o", ".hidden", "ünï"]
