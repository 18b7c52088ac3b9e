"""Phase 2 of ``benchmarks/gpu_check.py``, speed and memory: ``benchmarks/gpu_throughput.py``'s
``bench`` (hand-written loops vs gndgl fused, images/s, peak MiB) per config and batch size.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from gpu_check_common import free, phase_status

if TYPE_CHECKING:
    from gpu_check import Recorder


def cuda_graphs_note() -> str:
    """What the run says about CUDA graphs: measured by phase 1's ``cuda_graphs_on_vs_off`` checks, not here."""
    from gndgl_compiler.spec.models import Train

    if "cuda_graphs" in Train.model_fields:
        return ("n/a here: train.cuda_graphs (default off) is measured on vs off in phase 1 "
                "(cuda_graphs_on_vs_off: losses and img/s); this table runs without it")
    return "n/a (no cuda_graphs option yet)"


def phase_speed(rec: Recorder, args, device: torch.device) -> dict:
    """Phase 2: ``gpu_throughput.bench`` for each config and batch size (hand-written vs gndgl fused)."""
    import gpu_throughput as gt
    from gndgl_compiler.runtime.data.sources import load_dataset

    note = cuda_graphs_note()
    phase = {"status": "running", "checks": [], "rows": [], "cuda_graphs": note}
    rec.results["phases"]["speed"] = phase
    t0 = time.perf_counter()
    amp = cl = device.type == "cuda"
    configs = [c for c in gt.CONFIGS if c[0] in args.speed_specs]
    for bs in args.batches:
        images = max(args.images, bs * (args.warmup + args.bench_steps))
        data = load_dataset("synthetic", synthetic={"n_train": images, "n_test": 16}).to(device)
        for spec, label, make_hand in configs:
            name = f"throughput batch {bs}"
            if time.perf_counter() - t0 > args.phase2_s:
                phase["checks"].append({"name": name, "spec": spec, "status": "skipped", "seconds": 0.0,
                                        "message": f"skipped (phase 2 past its {args.phase2_s:.0f} s budget)"})
                continue
            bargs = SimpleNamespace(batch=bs, steps=args.bench_steps, warmup=args.warmup, channels_last=cl)

            def one(spec=spec, label=label, make_hand=make_hand, bs=bs, bargs=bargs, data=data):
                r = gt.bench(spec, make_hand, data, bargs, device, amp)
                row = {"config": label, "spec": spec, "batch": bs, "hand_img_s": r["hand"][0],
                       "gndgl_img_s": r["gndgl"][0], "ratio": r["gndgl"][0] / r["hand"][0],
                       "noaug_img_s": r["noaug"][0], "hand_peak_mib": r["hand"][1], "gndgl_peak_mib": r["gndgl"][1],
                       "noaug_peak_mib": r["noaug"][1], "cuda_graphs": note}
                phase["rows"].append(row)
                return {"status": "pass", "message": f"hand {row['hand_img_s']:.0f} img/s, "
                                                     f"gndgl {row['gndgl_img_s']:.0f} "
                                                     f"img/s ({row['ratio']:.2f}x), "
                                                     f"peak {row['gndgl_peak_mib']:.0f} MiB"}

            rec.check(phase, name, spec, one, device)
        del data
        free(device)
    phase["settings"] = {"steps": args.bench_steps, "warmup": args.warmup, "amp": "bf16" if amp else "float32",
                         "channels_last": cl}
    phase["status"] = phase_status(phase["checks"])
    phase["seconds"] = round(time.perf_counter() - t0, 1)
    return phase
