#!/usr/bin/env python
"""Train a Hybrid Distillation student.

    deepspeed launch.py --ds_config ds_configs/zero2.json [--preset NAME | --config FILE] [key=value ...]
    torchrun --nproc_per_node N launch.py ...       # or plain: python launch.py ...

With no arguments beyond ``--ds_config`` it runs the ``tiny`` preset on built-in synthetic data.
"""

import sys

from hybrid_distill.train import main

if __name__ == "__main__":
    sys.exit(main())
