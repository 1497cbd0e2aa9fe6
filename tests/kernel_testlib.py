"""Helpers shared by the kernel numerics tests (interpreter and GPU)."""

import torch

import kernels


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error over the largest reference element."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run_loss(q_s, k_s, q_t, k_t, keep_idx, grad_out, **kw):
    """Loss and (dq_s, dk_s) of ``kernels.relation_loss`` for the given grad_output."""
    q = q_s.detach().clone().requires_grad_(True)
    k = k_s.detach().clone().requires_grad_(True)
    loss = kernels.relation_loss(q, k, q_t, k_t, keep_idx, **kw)
    loss.backward(grad_out)
    return loss.detach(), q.grad, k.grad
