"""Plan → modules: one :class:`PartitionModule` per partition and the assembled
inference network, all rebuilt from plain plan data."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..graph.man_modules import LearnedMix
from ..graph.transformer_modules import PosEmbed
from ..partition.plan import IMAGE, Partition, PartitionPlan
from .emit import emit_ir, emit_loss


def _cls(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.title())


class PartitionModule(nn.Module):
    """A partition: ``body`` (detached inputs → output slice), ``aux`` (output +
    detached sibling shares → head outputs) and ``loss`` (head outputs, labels →
    scalar), each a readable ``torch.fx.GraphModule``.

    Args:
        part: the partition's plan entry.
        num_classes: classes of the task.
    """

    def __init__(self, part: Partition, num_classes: int, loss: fx.GraphModule | None = None):
        super().__init__()
        self.part = part
        base = _cls(part.name)
        self.body = emit_ir(part.body, part.output, f"{base}Body")
        self.aux = emit_ir(part.head, part.head_outputs, f"{base}Head", live_inputs=("h",))
        for name in part.man.ema if part.man is not None else ():
            self.aux.get_submodule(name).requires_grad_(False)  # MAN's EMA unit: moved by the EMA, not by SGD
        self.loss = loss if loss is not None else emit_loss(
            part.loss, part.head_outputs, num_classes, self.n_diversity_inputs(part), f"{base}Loss")

    @staticmethod
    def n_diversity_inputs(part: Partition) -> int:
        """How many sibling diversity vectors the loss reads."""
        return len(part.siblings) if part.loss.diversity_weight > 0 else 0

    @property
    def share_sources(self) -> list[int]:
        """Sibling ids whose detached outputs the aux head reads, in placeholder order."""
        return [s.source for s in self.part.shares]

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Body then head, for a partition without sibling shares."""
        return self.aux(self.body(*inputs))

    def code(self) -> str:
        """The generated Python of body, head and loss, for reading and diffing."""
        return "\n".join([
            f"# partition {self.part.name} (module {self.part.module}, group {self.part.group}/{self.part.groups})",
            f"# units: {', '.join(self.part.units) or '-'}",
            "# ---- body", self.body.code.strip(), "", "# ---- aux head", self.aux.code.strip(), "",
            "# ---- local loss", self.loss.code.strip(), ""])


def init_weights(module: nn.Module, seed: int) -> None:
    """Deterministic init of one partition: Kaiming-normal convs, unit BN and LayerNorm, default linears,
    N(0, 0.02) positional embeddings and CLS tokens.

    The RNG is seeded per partition, so a partition's initial weights do not depend on
    which other partitions are built in the same process.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            m.reset_parameters()  # weight 1, bias 0 (BN: running stats reset)
        elif isinstance(m, PosEmbed):
            m.reset_parameters(gen)
        elif isinstance(m, LearnedMix):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            bound = 1.0 / m.in_features ** 0.5
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=gen)


def _materialize(module: nn.Module) -> None:
    """``module.to_empty(device="cpu")``, without its per-tensor dispatch through the meta decompositions
    (~0.4 ms a tensor: 1.6 s of a 205-partition ResNet-152 compile). Storage is uninitialised, as there."""
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = torch.empty(b.shape, dtype=b.dtype)


def build_partitions(plan: PartitionPlan, seed: int = 0, ids: list[int] | None = None, *,
                     copy_ema: bool = True) -> dict[int, PartitionModule]:
    """Build (a subset of) the partition modules of a plan, freshly initialised.

    Args:
        plan: the partition plan.
        seed: weight-init seed; partition ``p`` uses ``seed * 1_000_003 + p``.
        ids: partitions to build (default: all).
        copy_ema: start each MAN partition's EMA unit as a copy of U's initial parameters (building U's
            partition on the side when it is not among ``ids``).

    Returns:
        ``{partition id: PartitionModule}``.
    """
    out = {}
    losses: dict[str, fx.GraphModule] = {}  # parameter-free loss graphs, shared between equal partitions
    for p in plan.partitions:
        if ids is None or p.id in ids:
            key = repr((p.loss, sorted(p.head_outputs), PartitionModule.n_diversity_inputs(p)))
            with torch.device("meta"):  # allocate once, below, instead of default-initialising
                pm = PartitionModule(p, plan.num_classes, losses.get(key))
            _materialize(pm)
            losses.setdefault(key, pm.loss)
            init_weights(pm, seed * 1_000_003 + p.id)
            out[p.id] = pm
    for p in plan.partitions if copy_ema else ():
        if p.man is not None and p.id in out:
            src = out.get(p.man.source) or build_partitions(plan, seed, [p.man.source], copy_ema=False)[p.man.source]
            copy_ema_from_u(out[p.id], src)
    return out


@torch.no_grad()
def copy_ema_from_u(pm: PartitionModule, src: PartitionModule) -> None:
    """MAN: θ_EMA ← θ_U (parameters only; DESIGN §2.3: the EMA starts as a copy of U's initial weights)."""
    for ema, u in ema_pairs(pm, src):
        ema.copy_(u)


def ema_pairs(pm: PartitionModule, src: PartitionModule) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(EMA parameter of pm's aux net, the U parameter of src's body it follows)``, in a fixed order."""
    assert pm.part.man is not None
    out = []
    for ema_name, u_name in pm.part.man.ema.items():
        u_mod = src.body.get_submodule(u_name)
        for key, p in pm.aux.get_submodule(ema_name).named_parameters():
            out.append((p, u_mod.get_parameter(key)))
    return out


def build_assembled(plan: PartitionPlan, parts: dict[int, PartitionModule]) -> fx.GraphModule:
    """The inference network: all bodies in order, then the final head (no aux heads).

    Its submodules are the partitions' own ``body`` / ``aux`` modules (shared weights).

    Returns:
        A GraphModule ``image -> logits``.
    """
    root = nn.Module()
    graph = fx.Graph()
    env = {IMAGE: graph.placeholder("image")}
    for p in plan.partitions:
        key = p.name.replace(".", "_")
        root.add_module(key, parts[p.id].body)
        args = tuple(env[i.source] for i in p.inputs)
        env[p.id] = graph.create_node("call_module", key, args, {}, name=key)
    final = plan.final
    root.add_module("classifier", parts[final.id].aux)
    head = graph.create_node("call_module", "classifier", (env[final.id],), {}, name="classifier")
    logits = graph.call_function(operator.getitem, (head, "logits"))
    graph.output(logits)
    graph.lint()
    return fx.GraphModule(root, graph, f"{_cls(plan.name)}Inference")
