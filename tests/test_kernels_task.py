"""The task's loss with the Triton relation kernel (CPU interpreter) equals the PyTorch reference path.

Runs the real ``HybridDistillTask`` of the ``tiny`` preset (fp32 on CPU, 4 heads of d = 16, N' = 23 kept
tokens of 65) twice on the same batch, with ``loss.relation_impl=triton`` and ``=torch``, and compares the
loss dict and the student's gradients. Same fp32 contract as ``tests/test_kernels_interpret.py``.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from hybrid_distill import config as config_mod
from hybrid_distill.model import task as task_mod


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(impl: str, images: torch.Tensor):
    torch.manual_seed(0)
    task = task_mod.HybridDistillTask(config_mod.load_config(preset="tiny", overrides=[f"loss.relation_impl={impl}"]))
    out = task(images)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in task.trainable.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def test_tiny_task_loss_triton_equals_torch(monkeypatch):
    images = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    calls = []
    orig = kernels._relation.relation_loss_triton
    monkeypatch.setattr(kernels._relation, "relation_loss_triton", lambda *a: calls.append(1) or orig(*a))
    got, got_grads = _run("triton", images)
    assert calls, "the triton path was not taken"
    want, want_grads = _run("torch", images)
    for key in ("loss", "feature_loss", "relation_loss", "keep_ratio"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name, g in got_grads.items():
        scale = want_grads[name].abs().max().clamp_min(1e-12)
        assert (g - want_grads[name]).abs().max() / scale < 1e-4, name
