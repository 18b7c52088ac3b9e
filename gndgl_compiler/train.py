"""Distributed worker entry point: ``torchrun --nproc-per-node N -m gndgl_compiler.train compiled/``.

``gndgl train compiled/ --workers N`` starts N of these itself (same code path).
Each rank builds only the partitions placed on it (placement re-balanced for the
world size without recompiling), trains them, and checkpoints them in step with
the other ranks; rank 0 evaluates and writes the run directory's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from . import fsio
from .errors import DistributedSetupError, GndglError, RunError
from .runtime.report import format_summary
from .runtime.resume import resume_config
from .runtime.run_dir import write_run_record
from .runtime.train import DistContext, TrainOptions, _merge, _new_run_dir, _run, check_resume_world


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gndgl_compiler.train", description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", default="compiled", help="compiled artifact directory")
    for name, typ in (("--run-dir", str), ("--resume", str), ("--epochs", int), ("--dataset", str),
                      ("--data-root", str), ("--batch-size", int), ("--lr", float), ("--seed", int),
                      ("--limit-train", int), ("--limit-test", int), ("--max-steps", int),
                      ("--checkpoint-every", int), ("--log-every", int), ("--device", str), ("--threads", int)):
        p.add_argument(name, type=typ, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a rank waits for a peer before failing")
    p.add_argument("--no-fused", action="store_true")
    p.add_argument("--json", action="store_true", help="end with the run summary as one JSON line")
    return p


def _share_run_dir(rank: int, path: str | None) -> str:
    """Rank 0's run directory name, broadcast to all ranks as bytes (no pickling)."""
    import torch.distributed as dist

    buf = torch.zeros(1024, dtype=torch.uint8)
    if rank == 0:
        raw = (path or "").encode()[:1024]
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return bytes(buf[buf != 0].tolist()).decode()


def run_worker(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Train this rank's partitions; returns rank 0's run summary (others: a short record)."""
    from .api import load_artifact
    from .runtime.distributed import PeerComm, barrier

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = TrainOptions(epochs=args.epochs, dataset=args.dataset, data_root=args.data_root,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, limit_train=args.limit_train,
                        limit_test=args.limit_test, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                        log_every=args.log_every, fused=False if args.no_fused else None, tensorboard=False)
    if args.resume:
        run_dir = Path(args.resume)
        saved = check_resume_world(run_dir, world)
        art0 = load_artifact(run_dir / "artifact", verify=False)
        opts.device = args.device
        cfg, notes = resume_config(run_dir, saved, opts, sequential=art0.plan.schedule == "sequential")
        barrier()  # every rank has read run.json before rank 0 records the changes
        if rank == 0 and notes:
            write_run_record(run_dir, saved)
            print("resume: " + "; ".join(notes), flush=True)
    else:
        made = None
        if rank == 0:
            src = load_artifact(args.artifact, verify=True)
            made = _new_run_dir(src.plan.name, args.run_dir)
            shutil.copytree(src.path, made / "artifact", dirs_exist_ok=True)
            cfg = _merge(src.spec["train"], opts)
            cfg["limit_train"], cfg["limit_test"] = args.limit_train, args.limit_test
            write_run_record(made, {"config": cfg, "device": args.device, "world": world, "source": str(src.path)})
        run_dir = Path(_share_run_dir(rank, str(made) if made else None))
        barrier()
        cfg = fsio.read_json(run_dir / "run.json", error=RunError)["config"]
    art = load_artifact(run_dir / "artifact", workers=world, rank=rank)
    n_parts = len(art.plan.partitions)
    if world > n_parts:
        raise DistributedSetupError(f"{world} workers for {n_parts} partitions: every worker needs at least one; "
                               f"use --workers {n_parts} or fewer")
    if art.plan.schedule == "sequential":
        raise DistributedSetupError("the sequential schedule trains one module at a time; run it in one process")
    if args.device:
        device = args.device
    elif torch.cuda.is_available() and any(d.startswith("cuda") for d in art.plan.devices):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    else:
        device = "cpu"
    dtype = torch.float32
    comm = PeerComm(art.plan, rank, cfg["batch_size"], torch.device(device), dtype=dtype)
    if rank == 0:
        opts.on_log = _print_record
    summary = _run(art, cfg, run_dir, device, opts, DistContext(rank, world, comm))
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank; returns the exit code."""
    from .runtime.distributed import init_process_group

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        rank, world = init_process_group(args.timeout, use_cuda=_wants_cuda(args))
        summary = run_worker(args, rank, world)
        if rank == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "history"}) if args.json
                  else format_summary(summary), flush=True)
        code = 0
    except GndglError as err:
        print(f"rank {rank}: error: {err}", file=sys.stderr, flush=True)
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
