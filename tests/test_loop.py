"""The training loop on 2 real ranks (DeepSpeed ZeRO-2, gloo): a non-finite loss on one rank only.

``train_step`` all-reduces "non-finite on any rank" once per micro-batch: every rank must skip the same micro-batch
(no backward anywhere, or the ranks' gradient all-reduces would fall out of step) and the weights must stay identical.
"""

from __future__ import annotations

import pytest
from ds_testlib import REPO, run_ranks


def _scenario_one_rank_sees_nan(tmp: str, poisoned: list[int], max_nonfinite: int) -> dict:
    """Build the real run, poison rank 1's loss on the micro-batches numbered in ``poisoned``, take one step."""
    import argparse
    from pathlib import Path

    import torch

    from hybrid_distill.config import load_config
    from hybrid_distill.loop import batches, build_run, train_step
    from hybrid_distill.runtime import cluster

    cfg = load_config("tiny", overrides=[f"run.output_dir={tmp}/run", "data.synthetic_size=32",
                                         f"run.max_nonfinite={max_nonfinite}"])
    env = cluster.setup_dist_env()
    Path(tmp, "run").mkdir(exist_ok=True)
    args = argparse.Namespace(ds_config=str(REPO / "ds_configs" / "zero2.json"), resume="none", overwrite=False)
    run, _, _ = build_run(cfg, args, env, torch.device("cpu"))
    real_losses, calls = run.task.losses, []

    def losses(images, targets, student):
        out = real_losses(images, targets, student=student)
        calls.append(len(calls) + 1)
        if env.rank == 1 and calls[-1] in poisoned:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    run.task.losses = losses
    result = train_step(run, batches(run), timed=True)
    weights = torch.cat([p.detach().double().flatten() for p in run.engine.module.parameters()])
    return {"updated": result.updated, "calls": len(calls), "nonfinite": run.nonfinite,
            "position": run.loader.state_dict()["position"], "weights": weights.sum().item(),
            "weights_abs": weights.abs().sum().item(), "loss": result.losses.get("loss")}


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_both_and_they_stay_in_step(tmp_path):
    r0, r1 = run_ranks(_scenario_one_rank_sees_nan, world_size=2, tmp=str(tmp_path), poisoned=[1], max_nonfinite=5)
    assert r0["updated"] and r1["updated"]
    assert r0["calls"] == r1["calls"] == 2  # both skipped the first micro-batch and trained on the second
    assert r0["position"] == r1["position"] == 2 * 16  # the same data consumed: the next step stays aligned
    assert r0["nonfinite"] == r1["nonfinite"] == 0  # reset by the finite micro-batch
    assert r0["weights"] == r1["weights"] and r0["weights_abs"] == r1["weights_abs"]  # bit-identical replicas
    assert r0["loss"] is not None and r0["loss"] == r0["loss"]  # the logged loss is the finite micro-batch's


@pytest.mark.slow
def test_nan_on_one_rank_max_nonfinite_times_ends_the_step_on_both(tmp_path):
    r0, r1 = run_ranks(_scenario_one_rank_sees_nan, world_size=2, tmp=str(tmp_path), poisoned=[1, 2],
                       max_nonfinite=2)
    assert not r0["updated"] and not r1["updated"]  # both return to train(), which exits 3 on every rank
    assert r0["calls"] == r1["calls"] == 2 and r0["nonfinite"] == r1["nonfinite"] == 2
