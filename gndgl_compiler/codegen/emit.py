"""IR → ``torch.fx.GraphModule``: one pass over a node list, one fx node per IR node.

Inputs of a partition are detached first thing in its generated code, so the
stop-gradient boundary is visible in ``print(gm.code)`` and holds by construction.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from .. import losses as L
from ..graph.ops import get_op
from ..partition.plan import IRNode, Loss


def emit_ir(nodes: list[IRNode], outputs: str | dict[str, str], class_name: str,
            live_inputs: tuple[str, ...] = ()) -> fx.GraphModule:
    """Emit a GraphModule computing ``outputs`` from the input nodes of ``nodes``.

    Args:
        nodes: IR nodes in topological order; ``kind == 'input'`` become placeholders.
        outputs: one IR name, or a dict of named outputs.
        class_name: name of the generated class (shows in ``print(gm)``).
        live_inputs: inputs that stay attached (the aux head's own ``h``); every other
            input crosses a partition boundary and is detached.

    Returns:
        The GraphModule; its submodules are named after the IR nodes.
    """
    root = nn.Module()
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    shapes = {n.name: tuple(n.shape) for n in nodes}
    for n in nodes:
        if n.kind == "input":
            ph = graph.placeholder(n.name)
            env[n.name] = ph
            if n.name not in live_inputs:
                env[n.name] = graph.create_node("call_method", "detach", (ph,), {}, name=f"{n.name}_sg")
            continue
        op = get_op(n.kind)
        args = [env[a] for a in n.args]
        ins = [shapes[a] for a in n.args]
        if op.module is not None:
            root.add_module(n.name, op.module(n.attrs, ins, tuple(n.shape)))
            node = graph.create_node("call_module", n.name, tuple(args), {}, name=n.name)
        else:
            node = graph.create_node("call_function", op.target(), (args,) if op.variadic else tuple(args),
                                     op.kwargs(n.attrs, ins), name=n.name)
        env[n.name] = node
    graph.output(env[outputs] if isinstance(outputs, str) else {k: env[v] for k, v in outputs.items()})
    graph.lint()
    return fx.GraphModule(root, graph, class_name)


def emit_loss(loss: Loss, head_outputs: dict[str, str], num_classes: int, n_siblings: int,
              class_name: str) -> fx.GraphModule:
    """Emit the local loss of a partition as a GraphModule.

    Placeholders, in order: the head outputs it uses (``logits``, ``sim``, ``recon``,
    ``proj``), ``y``, ``image01`` (InfoPro), then ``sib_p0..`` (detached sibling
    diversity vectors when the penalty is on).

    Returns:
        A GraphModule returning the scalar loss.
    """
    graph = fx.Graph()
    ph = {k: graph.placeholder(k) for k in ("logits", "sim", "recon", "proj") if k in head_outputs}
    y = graph.placeholder("y")
    f = graph.call_function
    if loss.kind == "predsim":
        out = f(L.predsim_loss, (ph["sim"], ph["logits"], y, num_classes, loss.beta))
    elif loss.kind == "infopro":
        image = graph.placeholder("image01")
        recon = f(L.recon_bce, (ph["recon"], image))
        task = (f(L.supcon_loss, (ph["proj"], y, loss.temperature)) if loss.variant == "contrast"
                else f(L.cross_entropy, (ph["logits"], y)))
        out = f(operator.add, (f(operator.mul, (loss.recon_weight, recon)), f(operator.mul, (loss.task_weight, task))))
    else:
        out = f(L.cross_entropy, (ph["logits"], y))
    if loss.diversity_weight > 0 and n_siblings > 0:
        sibs = [graph.call_method("detach", (graph.placeholder(f"sib_p{i}"),)) for i in range(n_siblings)]
        p_hat = f(L.diversity_probs, (ph["logits"], y, loss.diversity_temperature))
        penalty = f(L.diversity_penalty, (p_hat, sibs))
        out = f(operator.add, (out, f(operator.mul, (loss.diversity_weight, penalty))))
    graph.output(out)
    graph.lint()
    return fx.GraphModule(nn.Module(), graph, class_name)
