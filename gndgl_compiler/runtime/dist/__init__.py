"""Distributed runs: what differs between one process and a rank (context), the transport protocol, peer communication
over torch.distributed, the local launcher and elastic restarts."""
