"""The partition plan: what every partition computes, where it runs, what it sends.

A plan is plain data (dataclasses of ints, strings and lists) so it serialises to
JSON and back losslessly; codegen rebuilds modules from it without any stored code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

IMAGE = -1
"""Source id of the input image (not a partition)."""


@dataclass
class IRNode:
    """One op of a partition's body or head, with group-specific attributes."""

    name: str
    """Python identifier; also the name of its submodule when it has one."""
    kind: str
    """Op kind from the registry, or 'input'."""
    attrs: dict[str, Any]
    args: list[str]
    """Names of the IR nodes it reads, in order."""
    shape: list[int]
    """Per-sample output shape."""
    macs: int = 0
    params: int = 0
    source: str = ""
    """Op-graph node it comes from ('' for inserted ops)."""
    dense_in: bool = False
    """True when it reads the partition's detached input (no input gradient needed)."""


@dataclass
class Input:
    """One input tensor of a partition."""

    source: int
    """Partition id it comes from, or IMAGE."""
    shape: list[int]
    kind: str = "activation"
    """'activation' (upstream body output) or 'image' (InfoPro's reconstruction target)."""


@dataclass
class Share:
    """A sibling's detached tensor fed to this partition's aux head."""

    source: int
    channels: int
    """Leading channels of the sibling's output that are sent."""


@dataclass
class Loss:
    """The local loss of a partition."""

    kind: str
    """'ce', 'predsim', 'infopro' (with variant) ."""
    beta: float = 0.99
    variant: str = ""
    recon_weight: float = 0.0
    task_weight: float = 1.0
    temperature: float = 0.07
    diversity_weight: float = 0.0
    diversity_temperature: float = 3.0


OMIT_UNSET = {"omit_unset": True}
"""Field metadata: the field stays out of ``plan.json`` while it holds its default (plans without it are unchanged)."""


@dataclass
class ManLink:
    """MAN / MAN++ (DESIGN §2.3): the aux net's EMA unit follows U, the first unit of the next module."""

    source: int
    """Partition whose body holds U (module k+1, group ⌊g·G_{k+1}/G_k⌋): the weight edge's source."""
    momentum: float
    """EMA momentum m: θ_EMA ← m·θ_EMA + (1−m)·θ_U after this partition's backward."""
    mix: str
    """'sum' (MAN) or 'learned' (MAN++)."""
    ema: dict[str, str]
    """Head node of the EMA unit → body node of U in ``source`` (same op, same parameter names)."""
    lb: list[str]
    """Head nodes of the trainable copy LB."""
    mix_node: str
    """Head node that mixes LB(h) and EMA(h) (the head proper reads it)."""


@dataclass
class Partition:
    """One independently trained piece of the network."""

    id: int
    name: str
    kind: str
    """'local' (module k, group g), 'final' (final head) or 'e2e' (K = G = 1)."""
    module: int
    group: int
    groups: int
    units: list[str]
    inputs: list[Input]
    body: list[IRNode]
    channels: list[int]
    """[start, end) of this partition's slice of its module's output channels."""
    head_kind: str
    head: list[IRNode]
    head_outputs: dict[str, str]
    """Named head outputs ('logits', 'sim', 'recon', 'proj') → IR node names."""
    loss: Loss
    shares: list[Share] = field(default_factory=list)
    siblings: list[int] = field(default_factory=list)
    """Partitions of the same module (diversity exchange)."""
    device: str = "cpu"
    worker: int = 0
    costs: dict[str, int] = field(default_factory=dict)
    aux_units: list[str] = field(default_factory=list, metadata=OMIT_UNSET)
    """auglocal: the later units of the net its aux net was built from (fresh copies)."""
    man: ManLink | None = field(default=None, metadata=OMIT_UNSET)
    """MAN / MAN++: the EMA link of this partition's aux net (None: no MAN)."""

    @property
    def output(self) -> str:
        """Name of the body's output node."""
        return self.body[-1].name

    @property
    def out_shape(self) -> list[int]:
        """Per-sample shape of the body output."""
        return self.body[-1].shape


@dataclass
class Edge:
    """Forward communication between partitions (always detached)."""

    src: int
    dst: int
    kind: str
    """'activation', 'image', 'share', 'diversity' or 'weight' (MAN: U's parameters, forward only, no gradient)."""
    bytes_per_sample: int
    bytes_per_step: int = field(default=0, metadata=OMIT_UNSET)
    """Bytes sent once per step whatever the batch (a weight edge's parameters)."""


@dataclass
class PartitionPlan:
    """All partitions of a compiled spec plus summary costs."""

    name: str
    partitions: list[Partition]
    edges: list[Edge]
    num_modules: int
    groups: list[int]
    num_classes: int
    input_shape: list[int]
    final_mode: str
    schedule: str
    devices: list[str]
    workers: int
    summary: dict[str, Any] = field(default_factory=dict)

    def by_module(self) -> dict[int, list[Partition]]:
        """Partitions grouped by module number (the final head is module K+1)."""
        out: dict[int, list[Partition]] = {}
        for p in self.partitions:
            out.setdefault(p.module, []).append(p)
        return out

    @property
    def final(self) -> Partition:
        """The partition whose head is the network's classifier."""
        return self.partitions[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (like ``dataclasses.asdict`` without its deep copies of every leaf); fields marked
        :data:`OMIT_UNSET` are left out while they hold their default (a plan without them serialises as before)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartitionPlan":
        """Inverse of :meth:`to_dict`."""
        parts = []
        for p in d["partitions"]:
            p = dict(p)
            p["inputs"] = [Input(**i) for i in p["inputs"]]
            p["body"] = [IRNode(**n) for n in p["body"]]
            p["head"] = [IRNode(**n) for n in p["head"]]
            p["loss"] = Loss(**p["loss"])
            p["shares"] = [Share(**s) for s in p["shares"]]
            if p.get("man") is not None:
                p["man"] = ManLink(**p["man"])
            parts.append(Partition(**p))
        rest = {k: v for k, v in d.items() if k not in ("partitions", "edges")}
        return cls(partitions=parts, edges=[Edge(**e) for e in d["edges"]], **rest)


def _default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (made by its factory where it has one)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _plain(obj: Any) -> Any:
    """Dataclasses, lists, tuples and dicts turned into plain dicts and lists; leaves are shared."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_unset") and getattr(obj, f.name) == _default(f))}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
