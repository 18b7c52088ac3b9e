"""Distributed training over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank owns the partitions placed on it and runs the single-process
:class:`Executor` over them with a :class:`PeerComm` transport:

    rank a                                   rank b
    body(p) ──isend h_p──────────────────▶  recv h_p ─▶ body(q)       (activations)
            ──isend h_p[:, :r·C/G]───────▶  recv     ─▶ aux(q)        (sibling sharing)
    aux(p)  ──isend p̂_p─────────────────▶  recv p̂_p ─▶ loss(q)       (diversity)
    θ_U(q)  ──isend at the step's start──▶  recv after backward(p) ─▶ EMA of p   (MAN's weight edge)

Sends are non-blocking (``isend``), receives are blocking and happen in network
order, so a rank only ever waits for a partition with a lower id than the one
it is computing: no cycle, no deadlock. A rank runs ahead on the next batch while
its consumers are still on the previous one (pipelining); the send handles of at
most ``max_inflight`` steps are kept, which bounds memory. Every rank draws the
same seeded batches, so labels never travel. No gradient crosses a rank.
"""

from __future__ import annotations

import collections
import os
from datetime import timedelta
import torch
import torch.distributed as dist

from ...errors import DistributedError
from ...partition.plan import IMAGE, PartitionPlan

KIND_CODE = {"activation": 0, "share": 1, "diversity": 2, "weight": 3}


def _tag(step: int, src: int, kind: str) -> int:
    """A message tag unique within a window of 4096 steps."""
    return ((step % 4096) * 2048 + src) * 4 + KIND_CODE[kind]


class PeerComm:
    """Point-to-point transport of one rank (a :class:`~gndgl_compiler.runtime.dist.transport.Transport`).

    Args:
        plan: the partition plan (``partition.worker`` = owning rank).
        rank: this rank.
        batch_size: the (constant) training batch size.
        device: this rank's device (receive buffers live there).
        dtype: dtype tensors travel in.
        max_inflight: steps whose sends may still be in flight.
        offset: the global rank of this pipeline's rank 0 (data-parallel replicas, ``runtime/dist/replicas.py``;
            ``rank`` and the plan's workers stay the pipeline's own).
    """

    in_process = False

    def __init__(self, plan: PartitionPlan, rank: int, batch_size: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, max_inflight: int = 2, offset: int = 0):
        self.offset = offset
        self.plan, self.rank, self.bs, self.device, self.dtype = plan, rank, batch_size, device, dtype
        self.owner = {p.id: p.worker for p in plan.partitions}
        self.parts = {p.id: p for p in plan.partitions}
        self.step = 0
        self.pending: collections.deque[list] = collections.deque()
        self.max_inflight = max_inflight
        self.bytes_sent = 0
        # who needs what from each partition: {src: {rank: kind-set}}
        self.act_dst: dict[int, set[int]] = collections.defaultdict(set)
        self.share_dst: dict[int, dict[int, int]] = collections.defaultdict(dict)
        self.div_dst: dict[int, set[int]] = collections.defaultdict(set)
        for p in plan.partitions:
            for i in p.inputs:
                if i.source != IMAGE and self.owner[i.source] != self.owner[p.id]:
                    self.act_dst[i.source].add(self.owner[p.id])
            for s in p.shares:
                if self.owner[s.source] != self.owner[p.id]:
                    cur = self.share_dst[s.source].get(self.owner[p.id], 0)
                    self.share_dst[s.source][self.owner[p.id]] = max(cur, s.channels)
            if p.loss.diversity_weight > 0:
                for sib in p.siblings:
                    if self.owner[sib] != self.owner[p.id]:
                        self.div_dst[sib].add(self.owner[p.id])
        self.weight_dst: dict[int, set[int]] = collections.defaultdict(set)
        """MAN: U's partition → ranks whose MAN partitions follow it (one flat message per step and rank)."""
        for p in plan.partitions:
            if p.man is not None and self.owner[p.man.source] != self.owner[p.id]:
                self.weight_dst[p.man.source].add(self.owner[p.id])
        self._weights: dict[int, torch.Tensor] = {}
        self._work: list = []

    # -- step bookkeeping -------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Start step ``step``; wait for sends older than ``max_inflight`` steps."""
        self.step = step
        self._weights = {}
        self._work = []
        self.pending.append(self._work)
        while len(self.pending) > self.max_inflight:
            self._wait_all(self.pending.popleft())

    def drain(self) -> None:
        """Wait for every outstanding send (end of an epoch / before checkpoints)."""
        while self.pending:
            self._wait_all(self.pending.popleft())

    def _peer(self, rank: int) -> str:
        names = [p.name for p in self.plan.partitions if p.worker == rank]
        return f"rank {rank} (partitions {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"

    def _wait_all(self, works: list) -> None:
        for dst, w in works:
            try:
                w.wait()
            except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses
                raise DistributedError(f"rank {self.rank}: sending to {self._peer(dst)} failed at step {self.step}: "
                                       f"it died or stopped responding ({str(exc).splitlines()[0][-120:]})") from None

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = t.detach().to(self.dtype).contiguous()
        self.bytes_sent += t.numel() * t.element_size()
        self._work.append((dst, dist.isend(t, dst + self.offset, tag=tag)))

    def _recv(self, shape: list[int], src_rank: int, tag: int) -> torch.Tensor:
        buf = torch.empty([self.bs, *shape], dtype=self.dtype, device=self.device)
        try:
            dist.recv(buf, src_rank + self.offset, tag=tag)
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses
            raise DistributedError(f"rank {self.rank}: no data from {self._peer(src_rank)} at step {self.step}: it "
                                   f"died or stopped responding ({str(exc).splitlines()[0][-120:]})") from None
        return buf

    # -- hooks called by the Executor ------------------------------------------------------------
    def recv_inputs(self, pid: int, h: dict[int, torch.Tensor]) -> None:
        """Receive the upstream outputs partition ``pid`` reads from other ranks."""
        for i in self.parts[pid].inputs:
            if i.source != IMAGE and i.source not in h:
                h[i.source] = self._recv(i.shape, self.owner[i.source], _tag(self.step, i.source, "activation"))

    def send_output(self, pid: int, out: torch.Tensor) -> None:
        """Send a body output to the ranks that consume it (full, or the shared slice)."""
        full = self.act_dst.get(pid, set())
        for r in sorted(full):
            self._isend(out, r, _tag(self.step, pid, "activation"))
        for r, ch in sorted(self.share_dst.get(pid, {}).items()):
            if r not in full:
                self._isend(out[:, :ch], r, _tag(self.step, pid, "share"))

    def recv_shares(self, pid: int, h: dict[int, torch.Tensor]) -> None:
        """Receive the sibling outputs the aux head of ``pid`` shares (unless already here)."""
        for s in self.parts[pid].shares:
            if s.source in h:
                continue
            src_rank = self.owner[s.source]
            if self.rank in self.act_dst.get(s.source, set()):  # a later partition here reads all of it
                h[s.source] = self._recv(self.parts[s.source].out_shape, src_rank,
                                         _tag(self.step, s.source, "activation"))
                continue
            ch = self.share_dst[s.source][self.rank]
            shape = [ch, *self.parts[s.source].out_shape[1:]]
            h[s.source] = self._recv(shape, src_rank, _tag(self.step, s.source, "share"))

    def send_weights(self, src: int, flat: torch.Tensor) -> None:
        """MAN: send U's parameters of partition ``src`` (one flat copy, in their own dtype) to the ranks whose
        MAN partitions follow it, before any optimizer step of this step."""
        for r in sorted(self.weight_dst.get(src, set())):
            self.bytes_sent += flat.numel() * flat.element_size()
            self._work.append((r, dist.isend(flat, r + self.offset, tag=_tag(self.step, src, "weight"))))

    def recv_weights(self, src: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """MAN: this step's flat U parameters of partition ``src`` (received once per step, then reused)."""
        if src not in self._weights:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            try:
                dist.recv(buf, self.owner[src] + self.offset, tag=_tag(self.step, src, "weight"))
            except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses
                raise DistributedError(f"rank {self.rank}: no weights from {self._peer(self.owner[src])} at step "
                                       f"{self.step}: it died or stopped responding "
                                       f"({str(exc).splitlines()[0][-120:]})") from None
            self._weights[src] = buf
        return self._weights[src].to(device)

    def exchange_diversity(self, p_hat: dict[int, torch.Tensor]) -> None:
        """Send own diversity vectors to sibling ranks, receive the remote siblings'."""
        own = [pid for pid in p_hat]
        for pid in own:
            for r in sorted(self.div_dst.get(pid, set())):
                self._isend(p_hat[pid], r, _tag(self.step, pid, "diversity"))
        for pid in own:
            for sib in self.parts[pid].siblings:
                if sib not in p_hat and self.owner[sib] != self.rank:
                    p_hat[sib] = self._recv([self.plan.num_classes], self.owner[sib],
                                            _tag(self.step, sib, "diversity")).float()


def init_process_group(timeout_s: float, use_cuda: bool = True) -> tuple[int, int]:
    """Join the process group described by torchrun's environment variables.

    Args:
        timeout_s: seconds a collective or receive may wait for a peer.
        use_cuda: the ranks train on CUDA devices (NCCL); False for CPU plans (gloo).
            ``GNDGL_BACKEND`` overrides the choice.

    Returns:
        ``(rank, world_size)``.

    Raises:
        DistributedError: missing environment or a rendezvous that fails/times out.
    """
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as exc:
        raise DistributedError(f"environment variable {exc} is not set; launch with 'gndgl train --workers N' "
                               "or torchrun") from None
    backend = os.environ.get("GNDGL_BACKEND") or ("nccl" if use_cuda and torch.cuda.is_available() else "gloo")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                store=_restart_store(world, timeout_s))
    except Exception as exc:  # rendezvous errors come in many types
        raise DistributedError(f"rank {rank}: cannot join the process group at "
                               f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({exc})") from None
    return rank, world


def _restart_store(world: int, timeout_s: float) -> dist.Store | None:
    """On a torchrun restart: the agent's store under a prefix of this attempt, else None (``env://``).

    torchrun's agent keeps one store over restarts, so the ranks of a restarted attempt would read the
    addresses the failed attempt's ranks published there (gloo then waits for dead peers until the
    timeout); a prefix per attempt gives each attempt its own keys.
    """
    from .elastic import RESTART_ENV, restart_count

    k = restart_count(os.environ)
    if not k or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"/gndgl/{RESTART_ENV.lower()}_{k}", store)


def barrier() -> None:
    """A barrier that works on gloo and NCCL."""
    dist.barrier()


def all_reduce_flag(value: bool) -> bool:
    """True on every rank if ``value`` is True on any rank (used to stop together)."""
    t = torch.tensor([1.0 if value else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


__all__ = ["PeerComm", "all_reduce_flag", "barrier", "init_process_group"]
