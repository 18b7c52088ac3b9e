"""Distributed training benchmark: N local workers (gloo, CPU) against one, next to the cost model.

For each config it trains with 1 worker and with N workers (``--threads 1`` each, side by
side in one run, interleaved over ``--repeat`` rounds) and prints:

- throughput (images/s) of 1 and N workers over ``--steps`` timed steps. Every rank
  stamps the end of each of its training steps; the timed window runs from the end of
  step ``--warmup`` to the end of step ``warmup + steps`` on the slowest rank, so
  start-up, the pipeline filling, the final checkpoint and the weights gather are all
  outside it. (Rank 0's ``images_per_s`` summary, which includes them, is printed too.)
- the measured speed-up next to the cost model's prediction for the same placement,
  ``sum(train_macs) / max over workers of sum(train_macs of its partitions)``, with
  ``placement.place(plan, plan.devices, N)``;
- a control ("ceiling"): N independent 1-worker runs at the same time, their summed
  throughput over one run alone: what N processes can get on this machine right now
  (memory bandwidth, other load). A speed-up far below the prediction but near the
  ceiling is the machine, not the pipeline;
- where each rank's time went over the window: compute (``Executor.train_step`` minus
  blocking receives), blocked in receives (``PeerComm._recv``: waiting for an upstream
  rank), blocked in send waits (``PeerComm._wait_all``: the ``max_inflight`` window);
  and the process CPU seconds in ``train_step`` (not inflated by other jobs on the machine:
  1 worker's over the busiest rank's is the speed-up an idle machine would allow);
- with ``--fusion-ab``, the same for ``--no-fuse-siblings`` runs in the same rounds: what sibling
  fusion on the ranks changes (modules whose siblings sit whole on a rank run fused);
- with ``--replicas R``, R data-parallel replicas × 1 stage (R processes, ``--replicas R``) in the same
  rounds: images/s next to 1 worker and to 1 replica × N stages, the time steps wait for the gradient all-reduce
  (what the next stage's backward did not hide) and the
  all-reduce bytes per step (measured in ``GradAverager``, and the cost model's: every parameter's gradient);
- the bytes that crossed a process boundary per sample (``bytes_sent`` of every rank over
  the window / (steps x batch)) next to the plan's prediction (``cross_worker_bytes``: each
  ``plan.edges`` tensor once per destination worker, as the runtime sends it).

The workers get the environment ``launch_local`` gives them (torchrun variables,
``--threads 1``), but run a small entry point in this file that wraps a few methods
with timers and prints every rank's summary (``python -m gndgl_compiler.worker``
prints rank 0's only, and ranks >= 1 can send too).

    python benchmarks/distributed_speedup.py [--steps 12] [--batch 32] [--warmup 3] [--workers 2]
                                             [--repeat 3] [--no-control] [--fusion-ab] [--replicas 2]
                                             [--configs resnet32_k2g1,...]

The data set is ``synthetic`` (512 training images), so ``(warmup + steps) x batch``
must stay below 512: no end-of-epoch evaluation or checkpoint lands in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_TRAIN = 512
MARK = "GNDGL_BENCH_SUMMARY "


def _configs() -> dict[str, object]:
    import yaml

    vgg = yaml.safe_load((ROOT / "specs" / "vgg6a_dgl.yaml").read_text())
    vgg["name"] = "vgg6a_dgl_w05"
    vgg["model"]["width"] = 0.5  # VGG6a at width 1 is ~0.86 GMAC/sample to train: too slow on 2 cores
    return {"resnet32_k2g1": ROOT / "specs" / "resnet32_k2g1.yaml",
            "resnet32_k2g2": ROOT / "specs" / "resnet32_k2g2.yaml",
            "resnet32_k8g4": ROOT / "specs" / "resnet32_k8g4.yaml",  # 2 ranks: 7 of 8 modules whole, fused
            "vgg6a_dgl_w05": vgg}


# --------------------------------------------------------------------------------------- worker side
def _worker(argv: list[str]) -> int:
    """One rank: what ``python -m gndgl_compiler.worker`` does, plus per-step stamps in its printed summary.

    ``trace[i]`` = (time, seconds in train_step, in receives, in send waits, bytes sent), all
    cumulative, taken when this rank's step ``i + 1`` returns.
    """
    import torch.distributed as dist

    from gndgl_compiler import worker as T
    from gndgl_compiler.runtime.dist import peer as D
    from gndgl_compiler.runtime.dist import replicas as R
    from gndgl_compiler.runtime.step import executor as E

    acc = {"step": 0.0, "recv": 0.0, "send_wait": 0.0, "cpu": 0.0, "allreduce": 0.0, "allreduce_bytes": 0}
    trace: list[tuple] = []
    comms: list = []

    def timed(cls: type, name: str, key: str) -> None:
        fn = getattr(cls, name)

        def wrapper(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
                if key == "step":
                    acc["cpu"] += time.process_time() - c
                if key == "step":
                    sent = comms[0].bytes_sent if comms else 0
                    trace.append((time.perf_counter(), acc["step"], acc["recv"], acc["send_wait"], sent, acc["cpu"]))

        setattr(cls, name, wrapper)

    timed(E.Executor, "train_step", "step")
    timed(D.PeerComm, "_recv", "recv")
    timed(D.PeerComm, "_wait_all", "send_wait")
    start, wait = R.GradAverager.start, R.PendingMean.wait

    def started(self, params):  # bytes: every bucket launched
        before = self.bytes_reduced
        try:
            return start(self, params)
        finally:
            acc["allreduce_bytes"] += self.bytes_reduced - before

    def waited(self):  # time: what the step waits for the all-reduce (not hidden behind the next backward)
        t = time.perf_counter()
        wait(self)
        acc["allreduce"] += time.perf_counter() - t

    R.GradAverager.start, R.PendingMean.wait = started, waited
    init = D.PeerComm.__init__

    def remember(self, *a, **k):
        init(self, *a, **k)
        comms.append(self)

    D.PeerComm.__init__ = remember
    args = T._parser().parse_args(argv)
    rank, world = D.init_process_group(args.timeout)
    try:
        summary = T.run_worker(args, rank, world)
        summary["rank"], summary["trace"] = rank, trace
        summary["allreduce_s"], summary["allreduce_bytes"] = acc["allreduce"], acc["allreduce_bytes"]
        print(MARK + json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------- driver side
def _start(art: Path, workers: int, max_steps: int, batch: int, run_dir: Path,
           extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Start the ``workers`` ranks (``--threads 1`` each) of one run."""
    from gndgl_compiler.runtime.dist.launch import free_port

    args = [str(art), "--run-dir", str(run_dir), "--dataset", "synthetic", "--limit-train", str(SYNTHETIC_TRAIN),
            "--limit-test", "64", "--batch-size", str(batch), "--epochs", "1", "--max-steps", str(max_steps),
            "--threads", "1", "--timeout", "120", *extra]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(workers),
                OMP_NUM_THREADS="1", GNDGL_BACKEND="gloo")
    return [subprocess.Popen([sys.executable, __file__, "--_worker", *args],
                             env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(workers)]


def _collect(procs: list[subprocess.Popen], timeout_s: float) -> list[dict]:
    """Every rank's summary, by rank."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise RuntimeError(f"worker failed ({p.returncode}):\n{err[-3000:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    summaries = [json.loads(line[len(MARK):]) for out in outs for line in out.splitlines() if line.startswith(MARK)]
    return sorted(summaries, key=lambda s: s["rank"])


def _window(ranks: list[dict], warmup: int, steps: int) -> dict:
    """The timed window of one run: seconds (slowest rank), and each rank's compute / recv / send-wait / bytes."""
    per_rank = []
    for s in ranks:
        tr = s["trace"]
        assert len(tr) == warmup + steps, (len(tr), s["rank"])
        a, b = tr[warmup - 1], tr[-1]
        dt, step, recv, send_wait, sent, cpu = (y - x for x, y in zip(a, b))
        per_rank.append({"rank": s["rank"], "wall": dt, "compute": step - recv, "recv": recv,
                         "send_wait": send_wait, "bytes": sent, "cpu": cpu})
    return {"wall": max(r["wall"] for r in per_rank), "ranks": per_rank,
            "summary_ips": ranks[0]["images_per_s"]}


def _prediction(art_dir: Path, workers: int) -> tuple[float, float, list[list[str]]]:
    """(predicted speed-up, predicted cross-worker bytes per sample, partition names per worker)."""
    from gndgl_compiler import load_artifact
    from gndgl_compiler.partition.placement import cross_worker_bytes, place

    plan = load_artifact(art_dir, verify=False).plan
    place(plan, plan.devices, workers)
    total = sum(p.costs["train_macs"] for p in plan.partitions)
    per_worker: dict[int, int] = {}
    names: dict[int, list[str]] = {}
    for p in plan.partitions:
        per_worker[p.worker] = per_worker.get(p.worker, 0) + p.costs["train_macs"]
        names.setdefault(p.worker, []).append(p.name)
    cross = cross_worker_bytes(plan)
    return total / max(per_worker.values()), float(cross), [names[w] for w in sorted(names)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        sys.exit(_worker(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after the warm-up steps)")
    ap.add_argument("--batch", type=int, default=32, help="batch size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones (>= 1)")
    ap.add_argument("--workers", type=int, default=2, help="N, compared with 1 worker")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each setting keeps its fastest run")
    ap.add_argument("--no-control", action="store_true", help="skip the N concurrent 1-worker runs (ceiling)")
    ap.add_argument("--fusion-ab", action="store_true",
                    help="also run 1 and N workers with --no-fuse-siblings in the same rounds "
                         "(every module per partition)")
    ap.add_argument("--replicas", type=int, default=0,
                    help="also run R data-parallel replicas x 1 stage (R processes) in the same rounds (0: off)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(_configs()))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    if (args.warmup + args.steps) * args.batch >= SYNTHETIC_TRAIN:
        ap.error(f"(warmup + steps) x batch must stay below the {SYNTHETIC_TRAIN} synthetic training images "
                 "so that no end-of-epoch evaluation is in the run; lower --steps or --batch")

    from gndgl_compiler import compile_spec

    configs = _configs()
    if args.configs:
        configs = {k: v for k, v in configs.items() if k in args.configs.split(",")}
    n, total_steps = args.workers, args.warmup + args.steps
    images = args.steps * args.batch
    rows = []
    with tempfile.TemporaryDirectory(prefix="gndgl-bench-") as tmp:
        tmp = Path(tmp)
        for name, spec in configs.items():
            art_dir = compile_spec(spec, tmp / "art" / name).path
            speed, cross_pred, placement = _prediction(art_dir, n)
            best: dict[str, dict] = {}
            control: list[float] = []
            k = 0
            for _ in range(args.repeat):  # interleaved, so that background load hits every setting alike
                for setting in ("1w", "Nw") + (("1w-pp", "Nw-pp") if args.fusion_ab else ()) + \
                        (("Rr",) if args.replicas else ()):
                    k += 1
                    extra = ("--no-fuse-siblings",) if setting.endswith("-pp") else ()
                    procs = {"1": 1, "N": n, "R": args.replicas}[setting[0]]
                    if setting == "Rr":
                        extra = ("--replicas", str(args.replicas))
                    run = _collect(_start(art_dir, procs, total_steps, args.batch,
                                          tmp / "runs" / f"{name}-{k}", extra), args.timeout)
                    if setting == "Rr":
                        win_ar = {"s": max(x["allreduce_s"] for x in run),
                                  "bytes": run[0]["allreduce_bytes"] / total_steps}
                    win = _window(run, args.warmup, args.steps)
                    if setting not in best or win["wall"] < best[setting]["wall"]:
                        best[setting] = win
                        if setting == "Rr":
                            best["Rr"]["allreduce"] = win_ar
                if not args.no_control:
                    groups = []
                    for _c in range(n):
                        k += 1
                        groups.append(_start(art_dir, 1, total_steps, args.batch, tmp / "runs" / f"{name}-{k}"))
                    wins = [_window(_collect(g, args.timeout), args.warmup, args.steps) for g in groups]
                    control.append(sum(images / w["wall"] for w in wins))
            one, many = images / best["1w"]["wall"], images / best["Nw"]["wall"]
            rows.append({"name": name, "placement": " | ".join("+".join(p) for p in placement), "one": one,
                         "many": many, "pred": speed, "ceiling": max(control) / one if control else None,
                         "bytes": sum(r["bytes"] for r in best["Nw"]["ranks"]) / images, "pred_bytes": cross_pred,
                         "ranks": best["Nw"]["ranks"], "one_compute": best["1w"]["ranks"][0]["compute"],
                         "one_cpu": best["1w"]["ranks"][0]["cpu"],
                         "summary": (best["1w"]["summary_ips"], best["Nw"]["summary_ips"]),
                         "ab": {st: (images / best[st]["wall"], max(x["cpu"] for x in best[st]["ranks"]),
                                     sum(x["bytes"] for x in best[st]["ranks"]) / images)
                                for st in best},
                         "rep": _replica_row(best.get("Rr"), images, art_dir)})
            print(f"  done {name}", file=sys.stderr, flush=True)

    print(f"gloo on CPU, {os.cpu_count()} cores, --threads 1 per worker; batch {args.batch}; {args.steps} timed steps "
          f"after {args.warmup} warm-up steps; fastest of {args.repeat} runs per setting")
    head = (f"{'config':<15} {'placement (N=' + str(n) + ')':<36} {'1w img/s':>9} {str(n) + 'w img/s':>9} "
            f"{'speed-up':>8} {'predicted':>9} {'ceiling':>8} {'B/sample':>9} {'predicted':>9} "
            f"{'summary img/s 1w, ' + str(n) + 'w':>22}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ceiling = "-" if r["ceiling"] is None else f"{r['ceiling']:.2f}x"
        print(f"{r['name']:<15} {r['placement']:<36} {r['one']:>9.1f} {r['many']:>9.1f} {r['many'] / r['one']:>7.2f}x "
              f"{r['pred']:>8.2f}x {ceiling:>8} {r['bytes']:>9.0f} {r['pred_bytes']:>9.0f} "
              f"{r['summary'][0]:>11.1f}, {r['summary'][1]:<9.1f}")
    print(f"speed-up = {n}w / 1w images/s; predicted = total train MACs / busiest worker's; ceiling = {n} concurrent "
          f"1-worker runs / one alone; B/sample = bytes sent by all ranks per timed sample, "
          f"predicted = cross_worker_bytes(plan) "
          f"(each tensor once per destination worker); summary img/s = rank 0's images_per_s "
          f"(start-up excluded, final checkpoint included)")
    print("\nper rank over the timed window (s): compute = train_step minus blocking receives")
    for r in rows:
        ranks = " · ".join(f"rank {x['rank']}: compute {x['compute']:.2f} recv-wait {x['recv']:.2f} "
                           f"send-wait {x['send_wait']:.2f}" for x in r["ranks"])
        print(f"  {r['name']:<15} 1w compute {r['one_compute']:.2f} · {ranks}")
    print("\nprocess CPU seconds in train_step over the timed window (what the load of other jobs does not inflate);"
          " CPU speed-up = 1 worker's / the busiest rank's")
    for r in rows:
        cpus = [x["cpu"] for x in r["ranks"]]
        per_rank = " · ".join(f"rank {i}: {c:.2f}" for i, c in enumerate(cpus))
        print(f"  {r['name']:<15} 1w {r['one_cpu']:.2f} · {per_rank} · CPU speed-up {r['one_cpu'] / max(cpus):.2f}x")
    if args.fusion_ab:
        print("\nsibling fusion on the ranks vs --no-fuse-siblings (every module per partition), same rounds: "
              "img/s · busiest rank's CPU s · B/sample")
        for r in rows:
            ab = r["ab"]
            print(f"  {r['name']:<15} " + " | ".join(f"{st}: {ab[st][0]:.1f} img/s, {ab[st][1]:.2f} CPU s, "
                                                    f"{ab[st][2]:.0f} B" for st in ("1w", "1w-pp", "Nw", "Nw-pp")))
    if args.replicas:
        _print_replicas(rows, args.replicas, n)
    if n == 2:
        for r in rows:
            sp = r["many"] / r["one"]
            print(f"target 2 workers >= 1.6x one worker: {r['name']} {'ok' if sp >= 1.6 else 'MISS'} ({sp:.2f}x)")


def _replica_row(win: dict | None, images: int, art_dir: Path) -> dict | None:
    """The replicas setting's images/s, all-reduce seconds (busiest rank, whole run) and bytes per step (measured,
    and the cost model's: every partition's float32 gradients, ``partition/costs.py``)."""
    if win is None:
        return None
    from gndgl_compiler import load_artifact

    plan = load_artifact(art_dir, verify=False).plan
    return {"ips": images / win["wall"], "ar_s": win["allreduce"]["s"], "ar_bytes": win["allreduce"]["bytes"],
            "pred_bytes": 4 * sum(p.costs["params"] for p in plan.partitions)}


def _print_replicas(rows: list[dict], replicas: int, n: int) -> None:
    print(f"\ndata-parallel replicas: {replicas} replicas x 1 stage ({replicas} processes, rows r::{replicas} of each "
          f"batch) vs 1 process and 1 replica x {n} stages, same rounds")
    for r in rows:
        rep = r["rep"]
        print(f"  {r['name']:<15} 1 process {r['one']:.1f} img/s · 1x{n} stages {r['many']:.1f} img/s "
              f"({r['many'] / r['one']:.2f}x) · {replicas}x1 replicas {rep['ips']:.1f} img/s "
              f"({rep['ips'] / r['one']:.2f}x) · all-reduce {rep['ar_bytes']:.0f} B/step per replica "
              f"(cost model {rep['pred_bytes']}), {rep['ar_s']:.2f} s in all-reduce over the run")
        if replicas == 2:
            sp = rep["ips"] / r["one"]
            print(f"  target 2 replicas >= 1.6x one process: {r['name']} {'ok' if sp >= 1.6 else 'MISS'} ({sp:.2f}x)")


if __name__ == "__main__":
    main()
