"""Sibling fusion: a module's G partitions, on one device, run as one program (DESIGN §2).

The G partitions of a module have the same IR (same node names and kinds; only the channel
slice differs), so each IR node becomes one fused op over all G groups (the layouts and each
op's fused form: ``runtime/fused_ops.py``, token ops ``runtime/fused_tokens.py``); a ``slice``
with start = g·len tiling is the shared tensor itself (identity shortcut of group g); other slices
(unequal lengths and starts) are gathered into one stack (``runtime/fused_padded.py``).
:class:`FusedStage` checks the siblings, compiles their bodies and aux heads into fused steps and
runs them with the batched losses (``runtime/fused_loss.py``: cross-entropy, predsim, InfoPro
softmax, diversity); :class:`SiblingFusedRunner` is its stage runner (``runtime/stage_runner.py``),
which replaces the per-partition runner for that module.

The ``mixed`` aux-head input is exact: conv(cat(own live, siblings' first k channels detached), W_g)
has the value conv(h, W_g') with W_g's columns scattered to the channels of h it reads (any share
ratio), the weight gradient of that conv, and an input gradient that reaches group g's body only
through W_g's own columns (``runtime/shared_conv.py``). Dropout is exact too: each group's mask comes
from its own partition's generator (``runtime/fused_dropout.py``). Unequal group widths (a balanced split)
fuse padded: every group padded to the widest with exact-zero channels that no loss, statistic or
parameter sees (``runtime/fused_padded.py``). What cannot be expressed this way (differing siblings,
a sigmoid or a token op in an unequal split, ...) raises :class:`NotFusable` with the reason, and
the executor runs that module partition by partition.
"""

from __future__ import annotations

import torch

from ..codegen.modules import PartitionModule
from ..partition.plan import IRNode, Partition
from .fuse_storage import FusedTensor, fuse
from .fused_dropout import fused_dropout
from .fused_loss import FusedLoss
from .fused_padded import PaddedChecks, real_channels
from .fused_ops import _ELEMENTWISE, _POOLS, FusedOps, NotFusable, Step, _fn, _same
from .fused_tokens import FusedTokenOps
from .stage_outputs import StageOutputs
from .stage_runner import StepState
from .transport import Transport


class FusedStage(FusedOps, FusedTokenOps, PaddedChecks):
    """One module's G sibling partitions as one program (body, aux heads, local losses).

    Args:
        mods: the G partition modules of the module, in group order, already on their device.

    Raises:
        NotFusable: with the reason, when the siblings cannot be fused exactly.
    """

    def __init__(self, mods: list[PartitionModule]):
        parts = [m.part for m in mods]
        self.G = G = len(parts)
        if G < 2:
            raise NotFusable("a single group (nothing to fuse)")
        if [p.group for p in parts] != list(range(G)) or any(p.groups != G for p in parts):
            raise NotFusable("not all groups of the module are here")
        self.mods, self.parts, self.pids = mods, parts, [p.id for p in parts]
        _same([[i.source for i in p.inputs] for p in parts], "input list")
        self.widths = [p.out_shape[0] for p in parts]
        self.padded = len(set(self.widths)) > 1  # an unequal split: fused padded (runtime/fused_padded.py)
        if any(list(p.out_shape[1:]) != list(parts[0].out_shape[1:]) for p in parts):
            raise NotFusable(f"group output shapes differ beyond the width ({[p.out_shape for p in parts]})")
        outs = parts[0].head_outputs
        _same([p.head_outputs for p in parts], "head outputs")
        if set(outs) - {"sim", "recon"} not in ({"logits"}, {"proj"}) or ("proj" in outs and "recon" not in outs):
            raise NotFusable(f"head outputs {sorted(outs)} (class logits, predsim's sim, InfoPro's recon / proj fuse)")
        self.outputs = dict(outs)
        self.loss = FusedLoss(parts)  # checked before any parameter moves into fused storage
        self.width = max(self.widths)  # the padded group width (every group's, when equal)
        self.tensors: list[FusedTensor] = []
        self._cols: dict = {}
        self._pad: dict[str, list[int]] = {"h": self.widths}  # per-group real widths of stack / gstack values
        self._bn_counters: list[torch.Tensor] = []
        self.body = self._compile([p.body for p in parts], [m.body for m in mods], head=False)
        self.body_out = parts[0].output
        self.head = self._compile([p.head for p in parts], [m.aux for m in mods], head=True)
        self.counters = fuse(self._bn_counters, grad=False) if self._bn_counters else None
        self.cat_input: str | None = self._cat_input(parts[0])
        self.unpad = real_channels(self.widths, self.width, next(mods[0].parameters()).device) if self.padded else None
        self.loss.sim_widths = self._padding(self.outputs["sim"]) if "sim" in self.outputs else None

    # ---------------------------------------------------------------- compilation
    @staticmethod
    def _cat_input(p: Partition) -> str | None:
        """The body's ``cat`` of all its inputs in order, if that is how it starts (fed fused)."""
        ins = [n.name for n in p.body if n.kind == "input"]
        for n in p.body:
            if n.kind == "cat" and n.args == ins and len(ins) > 1:
                return n.name
        return None

    def _compile(self, lists: list[list[IRNode]], gms: list[torch.nn.Module], head: bool) -> list[tuple[str, Step]]:
        """The fused steps of the siblings' bodies (or aux heads), fusing their parameters on the way.

        Args:
            lists: each sibling's IR nodes (body or head), in group order.
            gms: each sibling's GraphModule (its submodules are named after the IR nodes).
            head: compiling the aux heads (inputs ``h`` + sibling shares) rather than the bodies.

        Returns:
            ``[(node name, step)]`` in IR order; each step sets ``env[node name]``.

        Raises:
            NotFusable: an op or pattern without an exact fused form.
        """
        _same([[(n.kind, self._ir_shape(n)) if head and n.kind in ("input", "cat")
                 else (n.name, n.kind, n.args, self._ir_shape(n)) for n in nodes] for nodes in lists], "IR")
        layout: dict[str, str] = {}
        steps: list[tuple[str, Step]] = []
        inputs = [n.name for n in lists[0] if n.kind == "input"]
        for i, n in enumerate(lists[0]):
            ns = [nodes[i] for nodes in lists]
            kind, name, args = n.kind, n.name, n.args
            if kind == "input":
                layout[name] = ("stack" if name == "h" else "share_in") if head else "shared"
                continue
            lays = [layout[a] for a in args]
            if self.padded:
                self._check_padded(ns, lays)
            if kind == "slice":  # each group's channels of the shared input: the stack itself, or gathered
                steps.append((name, self._slice(ns, lays[0], self._shape(lists[0], args[0])[0])))
                layout[name] = "stack"
                self._pad[name] = [m.attrs["length"] for m in ns]
                continue
            if kind == "cat" and head:
                steps.append((name, self._head_cat(ns, lists, inputs)))
                layout[name] = "mixed"
                continue
            if "share_in" in lays:
                raise NotFusable(f"sibling shares read by {kind} (share_ratio < 1 or a custom head)")
            _same([self._ir_attrs(m) for m in ns], f"attributes of {name}")
            if kind == "cat":
                if set(lays) != {"shared"}:
                    raise NotFusable(f"cat {name} of group tensors")
                steps.append((name, _fn(name, torch.cat, args, dim=1, listed=True)))
                layout[name] = "shared"
            elif kind in ("conv", "linear"):
                step, layout[name] = self._conv(name, n, lays[0], [gm.get_submodule(name) for gm in gms])
                steps.append((name, step))
            elif kind == "bn":
                if lays[0] not in ("stack", "gstack"):
                    raise NotFusable(f"batch norm {name} over a {lays[0]} tensor")
                steps.append((name, self._bn(name, args[0], [gm.get_submodule(name) for gm in gms], lays[0])))
                layout[name] = lays[0]
            elif kind in _ELEMENTWISE or kind in _POOLS or kind in ("flatten", "l2norm"):
                if kind in _POOLS and lays[0] == "gstack":
                    raise NotFusable(f"{kind} {name} on flat features")
                steps.append((name, self._channelwise(n, lays[0])))
                layout[name] = "gstack" if kind == "flatten" and lays[0] == "stack" else lays[0]
            elif kind in ("patch_embed", "pos_embed", "layernorm", "attention", "mlp"):
                build = getattr(self, f"_{kind}")
                steps_layout = build(n, lays[0], [gm.get_submodule(name) for gm in gms])
                steps.append((name, steps_layout[0]))
                layout[name] = steps_layout[1]
            elif kind == "token_pool":
                step, layout[name] = self._token_pool(n, lays[0])
                steps.append((name, step))
            elif kind == "add" and "gtok" in lays:
                if set(lays) - {"gtok", "stack"}:
                    raise NotFusable(f"add {name} of {lays[0]} and {lays[1]} tensors")
                steps.append((name, self._token_add(name, args, lays)))
                layout[name] = "gtok"
            elif kind == "dropout":  # each group's mask from its own partition's generator
                steps.append((name, fused_dropout(name, args[0], [gm.get_submodule(name) for gm in gms], lays[0],
                                                   self._padding(args[0]))))
                layout[name] = lays[0]
            elif kind == "add":
                if lays[0] != lays[1] or lays[0] == "mixed":
                    raise NotFusable(f"add {name} of {lays[0]} and {lays[1]} tensors")
                steps.append((name, _fn(name, torch.add, args)))
                layout[name] = lays[0]
            else:
                raise NotFusable(f"op '{kind}' ({name})")
            if layout[name] in ("stack", "gstack"):
                self._pad[name] = [m.shape[0] for m in ns]
        outs = {"out": lists[0][-1].name} if not head else self.outputs
        for key, out in outs.items():
            if layout.get(out) not in {"out": ("stack", "gstack", "gtok"), "logits": ("stack", "gstack"),
                                       "proj": ("gstack",)}.get(key, ("stack",)):
                raise NotFusable(f"{'head' if head else 'body'} output {key} is not per group")
            if head and key not in ("sim", "out") and self._padding(out) is not None:
                raise NotFusable(f"head output {key} has unequal widths per group")
        if not head:
            self.body_gstack = layout[outs["out"]] == "gstack"
            self.body_gtok = layout[outs["out"]] == "gtok"
        return steps

    @staticmethod
    def _shape(nodes: list[IRNode], name: str) -> list[int]:
        """Per-sample shape of IR node ``name``."""
        return next(n.shape for n in nodes if n.name == name)

    # ---------------------------------------------------------------- execution
    def intact(self) -> bool:
        """True while every partition parameter still aliases the fused storage."""
        return all(t.intact() for t in self.tensors) and (self.counters is None or self.counters.intact())

    def attach_grads(self) -> None:
        """Make the partitions' ``.grad`` views of the fused gradients (before a fused backward)."""
        for t in self.tensors:
            t.attach_grads()

    def fused_grads(self) -> list[torch.Tensor]:
        """The fused gradient tensors (zeroed after each optimizer step)."""
        return [t.fused.grad for t in self.tensors if t.grads is not None]

    def forward(self, inputs: list[torch.Tensor], fused_input: torch.Tensor | None, y: torch.Tensor,
                image01: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bodies, aux heads and local losses of all G partitions.

        Args:
            inputs: the body inputs (upstream outputs, not yet detached), in plan order.
            fused_input: the concatenation of ``inputs`` when the upstream module ran fused
                (saves the cat), else None.
            y: labels.
            image01: the de-normalised image (InfoPro's reconstruction target), else None.

        Returns:
            ``(body output (B, G·c, ...), logits (B, G, classes) or None (InfoPro contrast), losses (G,),
            total loss)``.
        """
        env: dict = {}
        skip = None
        if fused_input is not None and self.cat_input is not None:
            env[self.cat_input] = fused_input.detach()
            skip = self.cat_input
        else:
            names = [n.name for n in self.parts[0].body if n.kind == "input"]
            for nm, x in zip(names, inputs):
                env[nm] = x.detach()
        if self.counters is not None and self.mods[0].training:
            self.counters.fused.add_(1)
        for name, step in self.body:
            if name != skip and name not in env:
                step(env)
        out = env[self.body_out]
        if self.body_gstack:  # flat group features (G, B, D) -> (B, G·D)
            out = out.transpose(0, 1).reshape(out.shape[1], -1)
        elif self.body_gtok:  # tokens (G, B, N, c) -> (B, G·c, N)
            out = self.stacked(out)
        henv = {"h": out}  # padded: the heads read the padded layout, the other stages the real channels
        if self.unpad is not None:
            out = out.index_select(1, self.unpad)
        for name, step in self.head:
            step(henv)
        B = out.shape[0]
        logits = None
        if "logits" in self.outputs:
            z = henv[self.outputs["logits"]]
            logits = z.transpose(0, 1) if z.dim() == 3 else z.view(B, self.G, -1)
        sim, recon, proj = (henv[self.outputs[k]] if k in self.outputs else None for k in ("sim", "recon", "proj"))
        losses = self.loss(logits, y, sim=sim, recon=recon, image01=image01, proj=proj)
        return out, logits, losses, losses.sum()


class SiblingFusedRunner:
    """The stage runner of a sibling-fused module: forward and one backward of :class:`FusedStage`.

    Its output goes into the step's :class:`StageOutputs` whole (the next fused module reads it
    without a cat); its stats are reported directly. It trains the stage only when every sibling
    trains (sequential schedules fall back to the per-partition runner).

    Args:
        fs: the fused program.
        stage: the module's partition ids, in group order.
        module: the module's number (for error messages).
        device: the siblings' device.
        autocast: ``device -> context manager`` (the executor's bf16 autocast).
        transport: the executor's transport; unless it is ``in_process``, its hooks bring the
            module's inputs from other ranks and send each partition's output to its readers there.
        image01: ``x -> image in [0, 1]`` (``StageEnv.image01``), for InfoPro's reconstruction loss.
    """

    def __init__(self, fs: FusedStage, stage: list[int], module: int, device: torch.device, autocast,
                 transport: Transport, image01=None):
        self.fs, self.stage, self.module, self.device, self.autocast = fs, stage, module, device, autocast
        self.image01 = image01 if fs.loss.kind == "infopro" else None
        self.srcs = [i.source for i in fs.parts[0].inputs]
        self.transport = transport
        self.remote = not transport.in_process
        """Whether tensors leave the process (else the hooks are skipped: they would do nothing)."""

    def takes(self, active: set[int] | None) -> bool:
        return active is None or all(p in active for p in self.stage)

    def train(self, st: StepState, updater: object) -> None:
        fs, dev, h = self.fs, self.device, st.h
        assert isinstance(h, StageOutputs)
        if not fs.intact():
            raise RuntimeError(f"module {self.module}: a partition's parameters were moved or "
                               "replaced after the Executor fused them; build the Executor after moving modules")
        fs.attach_grads()
        self._recv_inputs(h)
        fused_in = h.get_fused(self.srcs) if fs.cat_input is not None else None
        inputs = [] if fused_in is not None else [h[s].to(dev, non_blocking=True) for s in self.srcs]
        yd = st.y.to(dev, non_blocking=True)
        with self.autocast(dev):
            out, logits, losses, total = fs.forward(inputs, fused_in, yd,
                                                    None if self.image01 is None else self.image01(st.x).to(dev))
        h.put_fused(self.stage, out, fs.widths)
        self._send_outputs(out)
        total.backward()
        correct = [None] * fs.G if logits is None else (logits.detach().argmax(2) == yd.unsqueeze(1)).sum(0).unbind(0)
        st.stats.update(zip(self.stage, zip(losses.detach().unbind(0), correct)))

    # ---------------------------------------------------------------- transport hooks (distributed ranks)
    # Every sibling is on this rank (step_plan.py), so shares and diversity vectors stay here: only
    # the module's inputs arrive and its partitions' outputs leave, as on the per-partition path.
    def _recv_inputs(self, h: StageOutputs) -> None:
        """Receive into ``h`` the module's inputs that live on other ranks."""
        if self.remote:
            for pid in self.stage:
                self.transport.recv_inputs(pid, h)

    def _send_outputs(self, out: torch.Tensor) -> None:
        """Send each partition's output (its channel slice of ``out``, detached; the transport makes
        it contiguous) to its readers on other ranks."""
        if self.remote:
            start = 0
            for width, pid in zip(self.fs.widths, self.stage):
                self.transport.send_output(pid, out.detach().narrow(1, start, width))
                start += width
