"""YAML building blocks and random values of the spec fuzzer (``tests/fuzz/test_fuzz_specs.py``).

``Pairs`` (a mapping with repeated keys) and ``Tagged`` (a node with an explicit tag) are written
by ``dump``; the vocabularies (edge numbers, odd strings, the spec format's keys, Python/custom
tags, bad bytes, YAML tokens) feed the hypothesis strategies ``scalars``, ``keys`` and ``values``.
The documents built from them: ``tests/fuzz_strategies.py``.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import yaml
from hypothesis import strategies as st


# ----------------------------------------------------------------------------- YAML building blocks


class Pairs:
    """A mapping written with possibly repeated keys (for duplicate-key documents)."""

    def __init__(self, items: list[tuple[Any, Any]]):
        self.items = items


class Tagged:
    """A value written with an explicit YAML tag (on a scalar, mapping or sequence node)."""

    def __init__(self, tag: str, value: Any):
        self.tag, self.value = tag, value


class _Dumper(yaml.SafeDumper):
    pass


def _repr_pairs(d: yaml.SafeDumper, v: Pairs) -> yaml.Node:
    return d.represent_mapping("tag:yaml.org,2002:map", v.items)


def _repr_tagged(d: yaml.SafeDumper, v: Tagged) -> yaml.Node:
    val = v.value
    if isinstance(val, dict):
        return d.represent_mapping(v.tag, val)
    if isinstance(val, Pairs):
        return d.represent_mapping(v.tag, val.items)
    if isinstance(val, (list, tuple)):
        return d.represent_sequence(v.tag, list(val))
    return d.represent_scalar(v.tag, "" if val is None else str(val))


_Dumper.add_representer(Pairs, _repr_pairs)
_Dumper.add_representer(Tagged, _repr_tagged)


def dump(doc: Any, flow: bool | None) -> bytes:
    """YAML text of ``doc`` (anchors/aliases for shared containers, as PyYAML does)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # the emitter recurses a few frames per nesting level
    try:
        text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=flow,
                         width=120)
    finally:
        sys.setrecursionlimit(limit)
    return text.encode("utf-8", errors="surrogatepass")  # a lone surrogate stays invalid UTF-8


# ----------------------------------------------------------------------------- strategies

NAN, INF = float("nan"), float("inf")
EDGE_INTS = [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 255, 256,
             1000, 1023, 1024, 1025, 4095, 4096, 4097, 65535, 65536, 65537, 100_000, 1_000_000, 1_000_001,
             2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**31, -2**63, 10**100, -10**100]
EDGE_FLOATS = [NAN, INF, -INF, 0.0, -0.0, 1e-300, 5e-324, 1e308, -1e308, 0.5, 0.999999, 1.0, 1.0000001, 1.5, 2.0,
               3.7, 15.999, 16.0, 16.0001, 100.0, 1e6, -0.5, -1.0, 1e-3, 0.07]
ODD_STRINGS = [
    "", " ", ".", "..", "../", "../x", "../../etc/passwd", "/", "/tmp/gndgl-fuzz", "a/b", "a\\b", "..\\..\\x",
    "~", "~/x", "$HOME", "${HOME}", "%s%s%n", "{0}", "{}", "[bold]x[/]", "[/]", "[link=x]y", "\x00", "a\x00b",
    "\x1b[31mred", "\u202eevil", "\ufeff", "ü", "名前", "🦀", "\ud800", "\udcff", "x" * 65, "y" * 5000,
    "null", "~", "true", "yes", "no", "on", "off", "1e3", "0x10", "0o17", "1_000", ".inf", ".nan", "-.inf",
    "2001-12-14", "12:30:00", "<<", "&a", "*a", "!!python/name:os.system", "- x", "a: b", "# c", "'", '"',
    "cpu", "cuda", "cuda:0", "cuda:999", "cuda:-1", "mps", "tpu", "resnet32", "resnet110", "vgg6a", "1c2f",
    "infopro", "predsim", "model", "joint", "separate", "balanced", "equal", "sgd", "adamw", "multistep",
    "conv", "block", "linear", "flatten", "bn", "relu", "dropout", "stem", "s1.b0", "s3.b4", "fc", "fc2",
    "conv1", "block1", "synthetic", "fashion-mnist", "/nonexistent/data.tar.gz", "m1.g0", "head", "e2e",
    "con", "nul", "aux", "inference", "manifest", "code", "weights",
]
# keys that exist somewhere in the spec format (renames / additions pick from these too)
SPEC_KEYS = [
    "name", "description", "model", "template", "width", "dropout", "layers", "input_shape", "num_classes",
    "op", "out", "kernel", "stride", "padding", "bias", "size", "p", "cuts", "depth", "split", "local", "head",
    "kind", "hidden", "beta", "variant", "recon_weight", "task_weight", "temperature", "projection",
    "share_ratio", "diversity", "weight", "final_head", "mode", "schedule", "placement", "devices", "workers",
    "train", "dataset", "data_root", "batch_size", "epochs", "optimizer", "lr", "momentum", "nesterov",
    "weight_decay", "betas", "warmup_epochs", "warmup_start_lr", "min_lr", "milestones", "gamma", "values",
    "augment", "crop_pad", "flip", "seed", "checkpoint_every", "log_every", "amp", "channels_last", "fused",
]
TAGS = [
    "tag:yaml.org,2002:python/object/apply:os.system",
    "tag:yaml.org,2002:python/object/apply:subprocess.check_output",
    "tag:yaml.org,2002:python/object/new:dict",
    "tag:yaml.org,2002:python/object:builtins.object",
    "tag:yaml.org,2002:python/name:os.system",
    "tag:yaml.org,2002:python/module:os",
    "tag:yaml.org,2002:python/tuple",
    "tag:yaml.org,2002:python/bytes",
    "tag:yaml.org,2002:python/complex",
    "tag:yaml.org,2002:python/none",
    "tag:yaml.org,2002:set",
    "tag:yaml.org,2002:omap",
    "tag:yaml.org,2002:pairs",
    "tag:yaml.org,2002:binary",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:merge",
    "tag:yaml.org,2002:value",
    "tag:yaml.org,2002:yaml",
    "!custom",
    "!gndgl/spec",
    "!",
    "tag:example.com,2000:app/foo",
]
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00",
             b"\x1b", b"\t", b"\r", b"\r\n", b"\x85", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"\x80\x80\x80"]
YAML_TOKENS = ["&a ", "*a", "*undefined ", "!!python/name:os.system ", "!!python/object/apply:os.system [ls] ",
               "!foo ", "!!binary ", "!!set ", "<<: ", "<<: *a\n", "? ", "- ", ": ", "{", "}", "[", "]", "'", '"',
               "%YAML 1.1\n", "%TAG ! tag:evil.com,2000:\n", "---\n", "...\n", "|\n", ">-\n", "#", ",", "\\",
               "&a [*a]", "\n  ", "\n- ", "{a: *a}", "&x x", "!!int ", "!!float ", "!!str ", "!!timestamp "]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(-70, 70),
    st.integers(),
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=12),
    st.binary(max_size=6),
    st.dates(min_value=dt.date(1, 1, 1)),
    st.datetimes(),
)
keys = st.one_of(st.sampled_from(SPEC_KEYS), st.sampled_from(ODD_STRINGS), scalars)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=10,
)
