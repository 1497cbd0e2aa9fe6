"""run.compile: the student + head, the teachers' forwards and the loss under torch.compile.

Compiled and eager runs agree (losses, gradients, the weights after real optimizer steps), every part is one graph
without graph breaks, and nothing recompiles after the second step (``error_on_recompile``). Graph capture is
tested on the ``aot_eager`` backend (dynamo + AOTAutograd, no C++ codegen: seconds on a CPU); one test runs
inductor's generated code on the student + loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch._dynamo
from ds_testlib import run_ranks

import kernels
from hybrid_distill.config import load_config
from hybrid_distill.errors import ConfigError
from hybrid_distill.model.task import HybridDistillTask, compile_options

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _images(step: int, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 256, (batch, 3, 64, 64), generator=g, dtype=torch.uint8)


def _train(overrides: list[str], compile_backend: str | None, steps: int = 4) -> tuple[list[float], dict]:
    """``steps`` AdamW steps of the tiny task on fixed batches; the losses and the final weights."""
    cfg = load_config("tiny", overrides=["loss.relation_impl=torch", *overrides])
    torch.manual_seed(0)
    task = HybridDistillTask(cfg)
    opt = torch.optim.AdamW(task.trainable.parameters(), lr=1e-3)
    if compile_backend is not None:
        cfg.run.compile, cfg.run.compile_backend = "default", compile_backend
        options = compile_options(cfg.run)
        task.trainable.compile(**options)  # what DeepSpeed's engine.compile does to its module
        task.compile_forwards(**options)
    losses = []
    for step in range(steps):
        with torch._dynamo.config.patch(error_on_recompile=step >= 2):
            loss = task(_images(step))["loss"]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in task.trainable.named_parameters()}


@pytest.mark.parametrize("overrides", [[], ["student.grad_checkpointing=true"], ["masking.teacher_prunes=true"]],
                         ids=["plain", "grad_checkpointing", "teacher_prunes"])
def test_compiled_training_matches_eager_without_graph_breaks_or_recompiles(overrides):
    want_losses, want = _train(overrides, None)
    got_losses, got = _train(overrides, "aot_eager")
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 4  # student + head, MIM teacher, feature teacher, loss
    assert got_losses == pytest.approx(want_losses, rel=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_inductor_compiled_student_and_loss_match_eager():
    """Inductor's generated C++ (the CPU's codegen) for the student + head and the loss; the teachers eager."""
    cfg = load_config("tiny", overrides=["loss.relation_impl=torch"])
    torch.manual_seed(0)
    task = HybridDistillTask(cfg)
    images = _images(0, batch=2)
    targets = task.targets(images)
    out = task.losses(images, targets)
    out["loss"].backward()
    want = {n: p.grad.clone() for n, p in task.trainable.named_parameters()}
    task.trainable.zero_grad(set_to_none=True)
    task.trainable.compile(backend="inductor", dynamic=False)
    task.loss_terms = torch.compile(task.loss_terms, backend="inductor", dynamic=False)
    got_out = task.losses(images, targets)
    got_out["loss"].backward()
    torch.testing.assert_close(got_out["loss"], out["loss"], rtol=1e-5, atol=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(task.trainable.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_triton_relation_op_is_inside_the_compiled_loss_graph(monkeypatch):
    """The fused relation loss is a torch custom op: dynamo keeps it in the graph (no break) and the compiled loss
    equals the eager one (kernels under the Triton interpreter on the CPU)."""
    pytest.importorskip("triton")  # optional dependency: kernels fall back to the reference without it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    graphs: list[str] = []

    @torch._dynamo.register_backend(name="hd_record_graph")
    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    cfg = load_config("tiny", overrides=["loss.relation_impl=triton"])
    torch.manual_seed(0)
    task = HybridDistillTask(cfg)
    images = _images(0, batch=2)
    targets = task.targets(images)
    pred, qk = task.trainable((images.float() - task.mean) / task.std, targets.keep_idx)
    want = task.loss_terms(pred, qk, targets)["relation_loss"]
    task.compile_forwards(backend="hd_record_graph", dynamic=False)
    got = task.loss_terms(pred, qk, targets)["relation_loss"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    loss_graph = [g for g in graphs if "smooth_l1" in g]
    assert len(loss_graph) == 1 and "hd_kernels.relation_loss" in loss_graph[0]
    assert not torch._dynamo.utils.counters["graph_break"]
    assert kernels.HAS_TRITON


def test_unknown_compile_backend_is_a_config_error_before_start_up():
    from hybrid_distill.loop import check_compile_backend

    cfg = load_config("tiny", overrides=["run.compile=default", "run.compile_backend=inductr"])
    with pytest.raises(ConfigError, match=r"run.compile_backend='inductr' is not a torch.compile backend.*inductor"):
        check_compile_backend(cfg)
    with pytest.raises(ConfigError, match="run.compile="):
        load_config("tiny", overrides=["run.compile=fast"])


# ----------------------------------------------------------------------------------------------------------------
# Under the real DeepSpeed engine


def _scenario_engine_compile(ds_config: str, steps: int, out: str) -> dict:
    """The loop's own build_run + train_step on the tiny preset, eager and then compiled (engine.compile inside);
    the losses of both and the compiled run's graph statistics."""
    from hybrid_distill import loop
    from hybrid_distill.runtime import cluster

    env = cluster.setup_dist_env()
    result = {}
    for backend in (None, "aot_eager"):
        overrides = ["data.synthetic_size=32", "data.batch_size=2", "optim.global_batch_size=8",
                     "loss.relation_impl=torch", f"run.output_dir={out}/{backend or 'eager'}"]
        if backend:
            overrides += ["run.compile=default", f"run.compile_backend={backend}"]
        cfg = load_config("tiny", overrides=overrides)
        Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
        args = argparse.Namespace(ds_config=str(REPO / "ds_configs" / ds_config), resume="none")
        run, _, _ = loop.build_run(cfg, args, env, torch.device("cpu"))
        data = loop.batches(run)
        losses = []
        for step in range(steps):
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                losses.append(loop.train_step(run, data, timed=True).losses["loss"])
            run.step += 1
        result[backend or "eager"] = losses
        result[f"{backend or 'eager'}_compiled"] = bool(getattr(run.engine, "is_compiled", False))
    counters = torch._dynamo.utils.counters
    return {**result, "graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize(("ds_config", "world_size"), [("zero2.json", 1), ("zero3.json", 2)])
def test_compiled_run_under_deepspeed_matches_eager(ds_config, world_size, tmp_path):
    """ZeRO-2 on one process: the student + head, both teachers and the loss are 4 graphs without a break. ZeRO-3
    (parameters partitioned, two processes): the student stays eager (DeepSpeed's gather hooks would break its graph
    at every module), the teachers and the loss are 3 graphs without a break. Either way the compiled run's losses
    equal the eager run's and steps 3-4 recompile nothing."""
    ranks = run_ranks(_scenario_engine_compile, world_size=world_size, ds_config=ds_config, steps=4, out=str(tmp_path),
                      timeout=600)
    zero3 = ds_config == "zero3.json"
    for r in ranks:
        assert r["aot_eager_compiled"] is not zero3 and not r["eager_compiled"]
        assert r["aot_eager"] == pytest.approx(r["eager"], rel=1e-5)
        assert r["breaks"] == 0 and r["graphs"] == (3 if zero3 else 4)
