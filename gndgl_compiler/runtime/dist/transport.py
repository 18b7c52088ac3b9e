"""The Transport protocol: how body outputs, shared slices and diversity vectors reach other processes.

The executor calls these hooks at fixed points of every stage (network order), whatever the
transport; a single-process run gets :class:`LocalTransport`, whose hooks do nothing:

    begin_step(step)          before the step's first stage (the training loop calls it)
    recv_inputs(pid, h)       before body(pid): put the upstream outputs it reads that live elsewhere into h
    send_output(pid, out)     after body(pid): hand its output to whoever consumes it elsewhere
    recv_shares(pid, h)       before aux(pid): the sibling outputs its head shares that live elsewhere
    exchange_diversity(p̂)    before the losses: send own diversity vectors, add the remote siblings' to p̂
    drain()                   wait for everything in flight (before checkpoints, at the end)

Everything sent is detached (no gradient crosses a partition). ``PeerComm``
(``runtime/dist/peer.py``) is the point-to-point implementation. A module whose G siblings
are all in this process may run sibling-fused whatever the transport: its runner calls
``recv_inputs`` per partition before the fused bodies and ``send_output`` per partition after
(each partition's channel slice of the fused output, a detached view: the transport makes its
own contiguous copy if it sends it); its siblings' shares and diversity vectors never leave the
process, so it calls neither ``recv_shares`` nor ``exchange_diversity``. With ``in_process``
True the fused runner skips the hooks. How to add one: docs/architecture.md.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Transport(Protocol):
    """What the executor and the training loop need from a transport."""

    in_process: bool
    """True when no tensor leaves this process (the sibling-fused runner then skips the hooks)."""
    bytes_sent: int
    """Bytes sent so far (reported in a distributed run's summary)."""

    def begin_step(self, step: int) -> None:
        """Start global step ``step``."""

    def drain(self) -> None:
        """Wait until every send is done."""

    def recv_inputs(self, pid: int, h: dict[int, torch.Tensor]) -> None:
        """Receive into ``h`` the upstream outputs partition ``pid`` reads that are not in ``h``."""

    def send_output(self, pid: int, out: torch.Tensor) -> None:
        """Send partition ``pid``'s body output to its consumers elsewhere."""

    def recv_shares(self, pid: int, h: dict[int, torch.Tensor]) -> None:
        """Receive into ``h`` the sibling outputs partition ``pid``'s aux head shares that are not in ``h``."""

    def exchange_diversity(self, p_hat: dict[int, torch.Tensor]) -> None:
        """Send the diversity vectors in ``p_hat``; add the remote siblings' vectors to it."""


class LocalTransport:
    """The single-process transport: every partition is here, nothing travels."""

    in_process = True
    bytes_sent = 0

    def begin_step(self, step: int) -> None:
        pass

    def drain(self) -> None:
        pass

    def recv_inputs(self, pid: int, h: dict[int, torch.Tensor]) -> None:
        pass

    def send_output(self, pid: int, out: torch.Tensor) -> None:
        pass

    def recv_shares(self, pid: int, h: dict[int, torch.Tensor]) -> None:
        pass

    def exchange_diversity(self, p_hat: dict[int, torch.Tensor]) -> None:
        pass


__all__ = ["LocalTransport", "Transport"]
