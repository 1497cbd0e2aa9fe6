#!/usr/bin/env python
"""Kill the real trainer at random moments, resume it, and check that nothing was lost.

    python scripts/fault_soak.py --trials 20 --out /tmp/soak            # CPU, DeepSpeed on gloo
    python scripts/fault_soak.py --trials 5 --faults stop_rank --procs 2

Each trial starts a tiny run (``--procs`` 1 or 2 processes, ZeRO-2 or ZeRO-3 at random), waits a random time
(start-up, training steps, checkpoint saves and the end-of-run export are all hit) and injects one fault:

* ``kill9_all``: SIGKILL every process of the job (a node losing power);
* ``kill9_rank``: SIGKILL one rank (2 processes; the others must end on their own);
* ``sigterm_launcher``: SIGTERM the ``deepspeed`` launcher (2 processes; the ranks must checkpoint and exit 75);
* ``sigusr1``: SIGUSR1 to every rank (SLURM's preemption warning; exit 75);
* ``stop_rank``: SIGSTOP one rank (2 processes, ``HD_DIST_TIMEOUT_S=20``; exit 69 naming it).

Then it resumes with ``--resume auto`` until the run finishes and checks: the job ended with the code the fault
calls for (and within the time it allows); no process of it survived; every complete checkpoint that existed
right after the fault still loads (the newest is where the resume starts); ``metrics.jsonl`` holds steps
1..max_steps exactly once; the export exists. Prints one line per trial and a summary (tried / survived with
nothing lost), and writes ``<out>/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faultlib import TINY, Job, alive, checkpoints, kill, processes, steps  # noqa: E402

FAULTS = ("kill9_all", "kill9_rank", "sigterm_launcher", "sigusr1", "stop_rank")
TWO_RANKS = {"kill9_rank", "sigterm_launcher", "stop_rank"}
MAX_STEPS = 12


def tree(out: Path) -> list[int]:
    return [pid for pid, cmd in processes() if str(out) in cmd and alive(pid)]


def inject(job: Job, fault: str, rng: random.Random) -> None:
    ranks = [pid for pid in job.ranks() if alive(pid)]
    if fault == "kill9_all":
        for pid in [job.proc.pid, *tree(job.out)]:
            kill(pid, signal.SIGKILL)
    elif fault == "kill9_rank" and ranks:
        kill(rng.choice(ranks), signal.SIGKILL)
    elif fault == "sigterm_launcher":
        kill(job.proc.pid, signal.SIGTERM)
    elif fault == "sigusr1":
        for pid in ranks:
            kill(pid, signal.SIGUSR1)
    elif fault == "stop_rank" and ranks:
        kill(rng.choice(ranks), signal.SIGSTOP)


def wait_gone(job: Job, timeout: float) -> float:
    """Seconds until no process of the job is left (SIGKILLs stragglers after ``timeout``)."""
    start = time.monotonic()
    while tree(job.out) or job.proc.poll() is None:
        if time.monotonic() - start > timeout:
            job.kill_all()
            time.sleep(1)
            return float("inf")
        time.sleep(0.2)
    return time.monotonic() - start


def loadable(out: Path) -> list[str]:
    """Complete checkpoints whose files DeepSpeed's consolidation can read (a torn file fails here)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    good = []
    for name in checkpoints(out):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=name)
            good.append(name)
        except Exception:  # noqa: BLE001 - reported as a lost checkpoint
            pass
    return good


def trial(index: int, fault: str, root: Path, rng: random.Random) -> dict:
    out = root / f"trial{index:03d}_{fault}"
    procs = 2 if fault in TWO_RANKS else rng.choice((1, 2))
    ds = rng.choice(("ds_configs/zero2.json", "ds_configs/zero3.json"))
    args = [*TINY, f"run.max_steps={MAX_STEPS}", "run.ckpt_every=3", "run.keep_last=2"]
    extra = {"HD_DIST_TIMEOUT_S": "20"} if fault == "stop_rank" else {}
    job = Job(out, *args, procs=procs, ds=ds, extra_env=extra)
    delay = rng.uniform(0.5, 18.0)  # a 12-step run takes about 15-25 s on 2 shared cores, its export included
    time.sleep(delay)
    before = steps(out)
    landed = job.proc.poll() is None  # False: the run had already ended, nothing was injected
    inject(job, fault, rng)
    gone = wait_gone(job, timeout=90)
    code = job.proc.returncode
    after = checkpoints(out)
    good = loadable(out)
    problems = []
    if gone == float("inf"):
        problems.append("processes survived the fault")
    if set(after) != set(good):
        problems.append(f"unloadable complete checkpoints: {sorted(set(after) - set(good))}")
    if fault == "stop_rank" and code not in (69, 0) and gone > 35:
        problems.append(f"stopped rank: job took {gone:.0f} s")
    resumes, final, overwrite = 0, None, []
    while final != 0 and resumes < 4:
        resumes += 1
        again = Job(out, *args, *overwrite, procs=procs, ds=ds)
        final = again.wait(600)
        if final == 2 and "no complete checkpoint to resume" in again.log() and not good:
            overwrite = ["--overwrite"]  # it died before its first checkpoint: nothing to lose, start over
        resumed = re.search(r"resumed from \S+/(step_\d+)", again.log())
        if resumes == 1 and good and (resumed is None or resumed.group(1) != good[-1]):
            problems.append(f"resumed from {resumed.group(1) if resumed else 'nothing'}, not the newest {good[-1]}")
    if final != 0:
        problems.append(f"resume never finished (last exit {final})")
    rows = steps(out)
    if rows != list(range(1, MAX_STEPS + 1)):
        problems.append(f"metrics steps {rows}")
    if not (out / "export" / "model.safetensors").exists():
        problems.append("no export")
    return {"trial": index, "fault": fault, "landed": landed, "procs": procs, "ds": Path(ds).stem,
            "delay_s": round(delay, 1),
            "steps_before": len(before), "exit": code, "gone_s": round(gone, 1), "checkpoints_after_fault": after,
            "resumes": resumes, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/hd-fault-soak"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for i in range(args.trials):
        result = trial(i, args.faults[i % len(args.faults)], args.out, rng)
        results.append(result)
        verdict = "ok" if not result["problems"] else "LOST: " + "; ".join(result["problems"])
        when = "landed" if result["landed"] else "late  "
        print(f"{i:3d} {result['fault']:17s} {when} procs={result['procs']} {result['ds']} t={result['delay_s']:5.1f}s "
              f"exit={result['exit']} gone={result['gone_s']}s ckpts={len(result['checkpoints_after_fault'])} "
              f"resumes={result['resumes']} {verdict}", flush=True)
    survived = sum(not r["problems"] for r in results)
    landed = sum(r["landed"] for r in results)
    by_fault = {f: [sum(1 for r in results if r["fault"] == f), sum(1 for r in results if r["fault"] == f and
                                                                      not r["problems"])] for f in args.faults}
    summary = {"tried": len(results), "landed": landed, "survived_nothing_lost": survived, "by_fault": by_fault,
               "trials": results}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2))
    print(f"tried {len(results)} ({landed} landed while the job ran), survived with nothing lost {survived}; by fault "
          f"(tried, survived): {by_fault}")
    return 0 if survived == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
