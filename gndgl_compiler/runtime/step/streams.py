"""Per-partition random streams: the generators dropout draws from, seeded as a pure function of
(seed, step, partition), with no global RNG state touched.

Every partition with random ops (``StepPlan.random``) gets two ``torch.Generator``s on its own
device, one for its body program and one for its aux head (the head's seed is offset by 2^40
steps, so the two never share a stream). :meth:`Streams.seed` re-seeds them at the start of each
training step with ``partition_seed(seed, step, pid)``: the dropout masks do not depend on
placement, on which partitions share a process, on the order they run, on sibling fusion or on
how many steps ran before (kill/resume replays the same masks).

CUDA graphs. ``Generator.manual_seed`` is a host operation (it sets the seed and zeroes the
philox offset; nothing is read from the device), so it is done *before* the captured region. A
captured step registers each generator with ``CUDAGraph.register_generator_state``; at every
replay the graph reads the generator's current (seed, offset) into its device-side philox state
and advances the offset by the captured amount (torch's ``CUDAGeneratorState::replay_prologue``),
so re-seeding before each replay gives the same mask as an uncaptured step (``runtime/step/cuda_graphs.py``;
untested until a session with a GPU runs
``benchmarks/gpu_check_correctness.py``).

A registry random op whose module has no ``generator`` attribute (or that is a plain function)
falls back to the old way: its partition runs under a forked global RNG re-seeded per step
(:meth:`Streams.legacy_rng`); such a partition is neither sibling-fused nor CUDA-graph capturable.
"""

from __future__ import annotations

import contextlib

import torch

from ...graph.ops import RANDOM_KINDS

HEAD_OFFSET = 1 << 40
"""Step offset of an aux head's stream (body: ``step``, head: ``step + HEAD_OFFSET``)."""


def partition_seed(seed: int, step: int, pid: int) -> int:
    """Seed of partition ``pid``'s random ops at global step ``step`` (independent of placement)."""
    return ((seed * 1_000_003 + step) * 65_537 + pid) % (2 ** 63)


@contextlib.contextmanager
def _forked(device: torch.device, seed: int):
    """Run the block with the global RNG (CPU, and ``device`` if CUDA) seeded to ``seed``; restore it after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def random_modules(parts: dict, modules: dict, random: set[int]):
    """``(pid, stream offset, random submodule or None)`` of every random IR node of the owned partitions."""
    for pid in sorted(random):
        if pid not in modules:
            continue
        for offset, nodes, gm in ((0, parts[pid].body, modules[pid].body),
                                  (HEAD_OFFSET, parts[pid].head, modules[pid].aux)):
            subs = dict(gm.named_modules())
            for n in nodes:
                if n.kind in RANDOM_KINDS:
                    yield pid, offset, subs.get(n.name)


def untaken(parts: dict, modules: dict, random: set[int]) -> set[int]:
    """Partitions with a random op that takes no generator (they need the forked global RNG)."""
    return {pid for pid, _, sub in random_modules(parts, modules, random) if not hasattr(sub, "generator")}


class Streams:
    """The generators of the random partitions of one Executor, set on their random modules.

    Args:
        parts: ``{pid: Partition}`` (its IR says which nodes are random).
        modules: ``{pid: PartitionModule}``.
        devices: ``{pid: device}``.
        random: ids of the partitions with random ops.
    """

    def __init__(self, parts: dict, modules: dict, devices: dict[int, torch.device], random: set[int]):
        self.devices = devices
        self.generators: dict[tuple[int, int], torch.Generator] = {}
        """``(pid, 0 | HEAD_OFFSET) -> generator`` (body or aux-head stream)."""
        self.legacy: set[int] = set()
        """Partitions with a random op that takes no generator (forked global RNG per step)."""
        for pid, offset, sub in random_modules(parts, modules, random):
            if not hasattr(sub, "generator"):
                self.legacy.add(pid)
                continue
            key = (pid, offset)
            if key not in self.generators:
                gen = torch.Generator(device=devices[pid])
                gen.manual_seed(partition_seed(0, offset, pid))
                self.generators[key] = gen
            sub.generator = self.generators[key]

    def seed(self, seed: tuple[int, int] | None) -> None:
        """Seed every stream for ``(run seed, global step)`` (host only; None: keep drawing on)."""
        if seed is None:
            return
        for (pid, offset), gen in self.generators.items():
            gen.manual_seed(partition_seed(seed[0], seed[1] + offset, pid))

    def legacy_rng(self, pid: int, seed: tuple[int, int] | None, head: bool = False):
        """The forked, re-seeded global RNG of a partition whose random op takes no generator; else nothing."""
        if seed is None or pid not in self.legacy:
            return contextlib.nullcontext()
        return _forked(self.devices[pid], partition_seed(seed[0], seed[1] + (HEAD_OFFSET if head else 0), pid))
