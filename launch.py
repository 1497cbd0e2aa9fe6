#!/usr/bin/env python
"""Train a Hybrid Distillation student.

    deepspeed launch.py --ds_config ds_configs/zero2.json [--preset NAME | --config FILE] [key=value ...]
    torchrun --nproc_per_node N launch.py ...       # or plain: python launch.py ...

With no arguments beyond ``--ds_config`` it runs the ``tiny`` preset on built-in synthetic data.
"""

import signal
import sys

# First: from here on a preemption signal is a stop request, not a kill (see cluster.hold_stop_signals).
_early: list[int] = []
for _sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(_sig, lambda signum, frame: _early.append(signum))

from hybrid_distill.runtime.cluster import hold_stop_signals  # noqa: E402

hold_stop_signals(_early)

from hybrid_distill.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
