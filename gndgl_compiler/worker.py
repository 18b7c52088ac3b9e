"""Distributed worker entry point: ``torchrun --nproc-per-node N -m gndgl_compiler.worker compiled/``.

``gndgl train compiled/ --workers N`` starts N of these itself (same code path).
Each rank builds only the partitions placed on it (placement re-balanced for the
world size without recompiling), trains them, and checkpoints them in step with
the other ranks; rank 0 evaluates and writes the run directory's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .errors import DistributedSetupError, GndglError
from .runtime.options import LaunchOptions, TrainOptions, from_args, worker_parser
from .runtime.report import format_summary


def _parser() -> argparse.ArgumentParser:
    """The worker's flags: the training options of ``gndgl train`` that a rank takes (``runtime/options.py``)."""
    return worker_parser("python -m gndgl_compiler.worker", __doc__.splitlines()[0])


def _encode(text: str, size: int) -> torch.Tensor:
    """``text`` as UTF-8 bytes in a zero-padded uint8 tensor of ``size`` (cut to fit)."""
    buf = torch.zeros(size, dtype=torch.uint8)
    raw = text.encode()[:size]
    buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return buf


def _decode(buf: torch.Tensor) -> str:
    return bytes(buf[buf != 0].tolist()).decode(errors="replace")


def _share_run_dir(rank: int, path: str | None) -> str:
    """Rank 0's run directory name, broadcast to all ranks as bytes (no pickling)."""
    import torch.distributed as dist

    buf = _encode(path or "", 1024) if rank == 0 else torch.zeros(1024, dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return _decode(buf)


def _gather_text(text: str, world: int) -> list[str]:
    """Every rank's ``text``, in rank order, on every rank (as bytes, no pickling)."""
    import torch.distributed as dist

    bufs = [torch.zeros(2048, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(bufs, _encode(text, 2048))
    return [_decode(b) for b in bufs]


def run_worker(args: argparse.Namespace, rank: int, world: int, transport=None) -> dict:
    """Train this rank's partitions; returns rank 0's run summary (others: a short record).
    ``transport``, if given, wraps this rank's PeerComm (``transport(comm) -> Transport``; see :func:`main`)."""
    from .api import load_artifact
    from .runtime.config import new_run_config
    from .runtime.context import DistContext
    from .runtime.distributed import PeerComm, barrier
    from .runtime.run_dir import create_run, read_run_config, record_changes, reopen_run
    from .runtime.train import Trainer

    opts = from_args(TrainOptions, args)
    opts.tensorboard = False
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.resume:
        run_dir = Path(opts.resume)
        _, config, saved, notes = reopen_run(run_dir, opts, world=world, verify=False)
        barrier()  # every rank has read run.json before rank 0 records the changes
        if rank == 0 and notes:
            record_changes(run_dir, saved)
            print("resume: " + "; ".join(notes), flush=True)
    else:
        made = None
        if rank == 0:
            src = load_artifact(args.artifact, verify=True)
            made = create_run(src, new_run_config(src.spec["train"], opts), opts.run_dir, world=world)
        run_dir = Path(_share_run_dir(rank, str(made) if made else None))
        barrier()
        config = read_run_config(run_dir, opts)
    art = load_artifact(run_dir / "artifact", workers=world, rank=rank)
    n_parts = len(art.plan.partitions)
    if world > n_parts:
        raise DistributedSetupError(f"{world} workers for {n_parts} partitions: every worker needs at least one; "
                                    f"use --workers {n_parts} or fewer")
    if art.plan.schedule == "sequential":
        raise DistributedSetupError("the sequential schedule trains one module at a time; run it in one process")
    if opts.device:
        device = opts.device
    elif torch.cuda.is_available() and any(d.startswith("cuda") for d in art.plan.devices):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    else:
        device = "cpu"
    comm = PeerComm(art.plan, rank, config.recipe.batch_size, torch.device(device), dtype=torch.float32)
    comm = transport(comm) if transport is not None else comm
    ctx = DistContext(rank, world, comm, run_dir)
    trainer = Trainer(art, config, run_dir, ctx, device=device, on_log=_print_record if rank == 0 else None)
    setup = _gather_text(ctx.setup_text(trainer.ex), world)  # which modules each rank runs sibling-fused
    if rank == 0:
        print("\n".join(setup), flush=True)
    summary = trainer.fit()
    summary["bytes_sent"] = comm.bytes_sent
    return summary


def _print_record(rec: dict) -> None:
    if rec["kind"] == "note":
        print(rec["text"], flush=True)
    if rec["kind"] == "train" and rec.get("partial"):
        return
    if rec["kind"] == "eval":
        print(f"epoch {rec['epoch'] + 1}: test {100 * rec['test_acc']:.2f}% · ensemble "
              f"{100 * rec['ensemble_acc']:.2f}% · {rec['wall_s']:.0f}s", flush=True)


def _wants_cuda(args: argparse.Namespace) -> bool:
    """Whether the ranks will train on CUDA (NCCL) rather than the CPU (gloo), read from the plan."""
    if args.device:
        return args.device.startswith("cuda")
    from .artifact import read_plan

    art_dir = Path(args.resume) / "artifact" if args.resume else Path(args.artifact)
    try:
        devices = read_plan(art_dir).devices
    except GndglError:
        return False
    return torch.cuda.is_available() and any(str(d).startswith("cuda") for d in devices)


def main(argv: list[str] | None = None, transport=None) -> int:
    """Entry point of one rank; returns the exit code. ``transport`` wraps the rank's PeerComm
    (``transport(comm) -> Transport``): a module that calls ``main(transport=...)`` and is run as
    ``GNDGL_WORKER_MODULE`` (``runtime/launch.py``) injects a transport (tests/fault_worker.py injects faults so)."""
    from .runtime.distributed import init_process_group

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        rank, world = init_process_group(from_args(LaunchOptions, args).timeout, use_cuda=_wants_cuda(args))
        summary = run_worker(args, rank, world, transport)
        if rank == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "history"}) if args.json
                  else format_summary(summary), flush=True)
        code = 0
    except GndglError as err:
        print(f"rank {rank}: {'error: ' if err.is_error else ''}{err}", file=sys.stderr, flush=True)
        code = err.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a peer died or timed out: torch raises RuntimeError / DistBackendError
        print(f"rank {rank}: distributed failure: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        code = 1
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
