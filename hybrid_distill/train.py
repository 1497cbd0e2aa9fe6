"""The training job: ``main(argv)``, behind ``launch.py``, ``python -m hybrid_distill.train`` and ``hybrid-distill``.

``main`` installs the preemption handlers, parses the command line, builds and checks the config and every file
it names and takes the run directory's lock, all before torch is imported: ``--help`` is instant, a typo fails in a
second with one message and exit code 2, and a signal during the start-up is a stop request. ``--print-config``
exits before the file checks, ``--dry-run`` after them; neither takes the lock nor creates anything. Only then does
it hand over to the loop (``hybrid_distill.loop.run_job``).

Exit codes (the README's table): 0 finished; 2 bad input (config, files, checkpoints that do not fit, a run
directory in use); 3 too many non-finite losses in a row (nothing saved: the newest checkpoint is the last good
one); 65 too many undecodable samples (checkpoint saved first); 69 a rank stopped answering (named in the log);
74 the run directory cannot be written (disk full); 75 stopped on request (preemption signal, stop file, the
DeepSpeed launcher gone, ``run.stop_after_steps``) after saving a checkpoint: resume with ``--resume auto``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import yaml

from hybrid_distill.config import Config, load_config, parse_override, to_dict
from hybrid_distill.config.files import check_inputs
from hybrid_distill.config.presets import PRESETS
from hybrid_distill.errors import ConfigError, HybridDistillError
from hybrid_distill.runtime import watchdog
from hybrid_distill.runtime.cluster import EXIT_BAD_INPUT, EXIT_IO, StopRequest, dist_timeout, resolve_dist_env
from hybrid_distill.runtime.lock import RunLock

log = logging.getLogger("hybrid_distill")


def help_epilog() -> str:
    """The presets (with their one-line summaries) and every config section with its keys, for ``--help``."""
    lines = ["presets (--preset NAME):"]
    width = max(len(name) for name in PRESETS)
    for name, make in PRESETS.items():
        lines.append(f"  {name:<{width}}  {(make.__doc__ or '').strip().splitlines()[0]}")
    lines += ["", "config sections (override any key as section.key=value; README.md has the table):"]
    for name, section in vars(Config()).items():
        lines.append(f"  {name}: {', '.join(f.name for f in dataclasses.fields(section))}")
    lines += ["", "examples:", "  deepspeed launch.py --ds_config ds_configs/zero2.json --preset tiny run.max_steps=20",
              "  hybrid-distill --preset vitb_in1k_deit_mae --print-config"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: launcher flags, config sources and dotted overrides (``optim.base_lr=3e-4``)."""
    p = argparse.ArgumentParser(prog="launch.py", description="Hybrid Distillation trainer (DeepSpeed).",
                                epilog=help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default="ds_configs/zero2.json",
                   help="DeepSpeed JSON with engine knobs (ZeRO stage, bf16, buckets)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--preset", default=None, help="named preset (default: tiny, or the config file's `preset:`)")
    p.add_argument("--config", default=None, help="YAML file with config sections")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None, help="run directory")
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a checkpoint path")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (preset, --config file, overrides) as YAML and exit")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the plan (keep schedule, FLOPs per image, accumulation, lr, GPU memory per device for "
                        "WORLD_SIZE or 1 processes) and exit; builds nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run (--resume none) in a run directory that holds another run: its "
                        "checkpoints, metrics, TensorBoard events and export are deleted first")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=3e-4 run.max_steps=100")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset/file/overrides -> validated config, with ``--output-dir`` applied (given once)."""
    if args.output_dir and any(parse_override(o)[0] == "run.output_dir" for o in args.overrides):
        raise ConfigError("the run directory is given twice (--output-dir and run.output_dir=): give it once")
    cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.overrides, fallback_preset="tiny")
    if args.output_dir:
        cfg.run.output_dir = args.output_dir
    return cfg


def dry_run(cfg: Config, args: argparse.Namespace) -> int:
    """``--dry-run``: print the plan (``runtime.plan``; torch is not imported), then check the named files."""
    from hybrid_distill.runtime import plan

    print(plan.describe(cfg, args.ds_config, plan.world_size_for_plan()), flush=True)
    check_inputs(cfg, args.ds_config, args.resume)
    return 0


def resolve_resume_args(args: argparse.Namespace) -> None:
    """``--overwrite`` means a fresh start (``--resume none``). A requeued SLURM job re-runs its command line, so
    ``--resume none`` / ``--overwrite`` act on its first run only, or the requeue would throw away what the first
    run trained: later runs resume (``auto``)."""
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restart > 0 and (args.resume == "none" or args.overwrite):
        print(f"[hybrid_distill] SLURM restart {restart}: --resume none/--overwrite applied to the first run only; "
              "resuming with --resume auto", file=sys.stderr)
        args.resume, args.overwrite = "auto", False
    if args.overwrite:
        if args.resume not in ("auto", "none"):
            raise ConfigError(f"--overwrite starts a fresh run: it cannot be combined with --resume {args.resume}")
        args.resume = "none"


def take_lock(cfg: Config) -> RunLock | None:
    """The run directory's lock (the main rank takes it for the job; the other ranks None)."""
    if not resolve_dist_env(os.environ, node_addr=lambda host: None, port=lambda: 0)[0].is_main:
        return None
    lock = RunLock(cfg.run.output_dir).acquire()
    watchdog.BEFORE_EXIT.append(lock.release)
    return lock


def main(argv: list[str] | None = None) -> int:
    """Handlers, parse, check, lock, then train (``loop.run_job``). Returns the process exit code."""
    stop = StopRequest().install()  # first: a signal during the start-up is a stop request, not a kill
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.print_config:  # before the file checks: inspect a config for a machine that has the data
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        resolve_resume_args(args)
        if args.dry_run:  # no lock, nothing created
            return dry_run(cfg, args)
        check_inputs(cfg, args.ds_config, args.resume)
        dist_timeout()  # HD_DIST_TIMEOUT_S
    except HybridDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # an unreadable --config / --ds_config
        print(f"error: cannot read an input file ({type(e).__name__}: {e})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        lock = take_lock(cfg)
    except HybridDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # the run directory cannot be written (e.g. a full disk while taking the lock)
        print(f"error: cannot write the run directory {cfg.run.output_dir} ({type(e).__name__}: {e}): free space "
              "(or fix the file system), then run again", file=sys.stderr)
        return EXIT_IO
    stop.add_stop_file(Path(cfg.run.output_dir) / "STOP")
    try:
        from hybrid_distill.loop import run_job  # heavy: torch, timm, DeepSpeed

        return run_job(cfg, args, stop)
    finally:
        if lock is not None:
            for path in stop.discard_stop_files():  # touched after the last step: must not stop the next job
                log.warning("removed the stop file %s, created after this run's last stop check", path)
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
