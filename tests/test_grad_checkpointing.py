"""student.grad_checkpointing: timm's checkpoint_seq over the student's blocks, q/k still tapped at L-3, L-2."""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from hybrid_distill.config import load_config
from hybrid_distill.model.qk_capture import TAP_ATTR
from hybrid_distill.model.task import HybridDistillTask

pytestmark = pytest.mark.usefixtures("one_thread")
B = 8


def _task(checkpointing: bool, *overrides: str) -> HybridDistillTask:
    torch.manual_seed(0)
    return HybridDistillTask(load_config("tiny", overrides=[f"student.grad_checkpointing={checkpointing}",
                                                            "loss.relation_impl=torch", *overrides]))


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (B, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _loss_and_grads(task: HybridDistillTask) -> tuple[dict, dict]:
    out = task(_images())
    out["loss"].backward()
    return ({k: v.detach() for k, v in out.items()},
            {n: p.grad.clone() for n, p in task.trainable.named_parameters()})


@pytest.mark.parametrize("overrides", [[], ["student.drop_path_rate=0.1"]], ids=["plain", "drop_path"])
def test_checkpointed_student_has_the_same_loss_and_gradients(overrides):
    """Recomputation replays the forward exactly (drop path included: checkpoint_seq restores the RNG state)."""
    want_out, want = _loss_and_grads(_task(False, *overrides))
    got_out, got = _loss_and_grads(_task(True, *overrides))
    for key in want_out:
        torch.testing.assert_close(got_out[key], want_out[key], rtol=0, atol=0)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=name)


def _peak_bytes(task: HybridDistillTask) -> int:
    images = _images()
    targets = task.targets(images)
    tracker = MemTracker()
    tracker.track_external(task.trainable)
    with tracker:
        task.losses(images, targets)["loss"].backward()
    return sum(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())


def test_checkpointing_lowers_the_peak_memory_of_forward_and_backward():
    """Measured with torch's MemTracker (live tensors, CPU): the 6 blocks' activations are not kept."""
    plain, checkpointed = _peak_bytes(_task(False)), _peak_bytes(_task(True))
    assert checkpointed < 0.75 * plain, (plain, checkpointed)


def test_recomputed_blocks_do_not_refill_the_q_k_taps():
    """The backward recomputes blocks L-3, L-2; their taps must stay empty (else each would keep the recomputed
    block's graph alive until the next forward)."""
    task = _task(True)
    task(_images())["loss"].backward()
    blocks = task.trainable.student.blocks
    assert [getattr(blocks[i].attn.qkv, TAP_ATTR) for i in task.trainable.relation_blocks] == [None, None]


def test_checkpointing_is_off_by_default_and_reaches_timm():
    assert not load_config("tiny").student.grad_checkpointing
    assert _task(True).trainable.student.grad_checkpointing


def test_a_resume_may_switch_checkpointing_and_continue_checkpoints_saved_without_the_key():
    """It changes memory, not the recipe: --resume auto must not refuse it (nor a checkpoint from before the key)."""
    from hybrid_distill.config import to_dict
    from hybrid_distill.runtime.resume import recipe_changes

    saved = to_dict(load_config("tiny"))
    current = to_dict(load_config("tiny", overrides=["student.grad_checkpointing=true"]))
    assert recipe_changes(saved, current) == ([], ["student.grad_checkpointing"])
    del saved["student"]["grad_checkpointing"]
    assert recipe_changes(saved, current)[0] == []
