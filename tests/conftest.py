"""Shared fixtures."""

import os
import signal

import pytest
import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Each test leaves ``os.environ`` and the stop-signal handlers as it found them.

    An entry point run in-process (``evaluate.main``, ``train.main``) writes ``RANK``/``WORLD_SIZE``/``MASTER_*``
    into ``os.environ`` and installs stop handlers; leaked, the first sends every later ``sbatch`` job (which inherits
    the environment) into a one-rank world, and the second makes this pytest ignore SIGTERM.
    """
    environ = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    os.environ.clear()
    os.environ.update(environ)
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is much faster than two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
