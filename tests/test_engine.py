"""hybrid_distill.runtime.engine: DeepSpeed config resolution, parameter groups, lr schedule, real ZeRO steps on CPU."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from ds_testlib import REPO, run_ranks, tiny_config, tiny_trainable, train_steps

from hybrid_distill.config import ConfigError
from hybrid_distill.runtime.engine import lr_at, param_groups, peak_lr, resolve_ds_config

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def _write(tmp_path: Path, data: dict) -> Path:
    """``data`` as a DeepSpeed JSON, with ZeRO-2 unless it has its own ``zero_optimization`` (stage 0 is refused)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **data}))
    return path


def _contains_auto(node) -> bool:
    if isinstance(node, dict):
        return any(_contains_auto(v) for v in node.values())
    return node == "auto"


# ---------------------------------------------------------------------------------------------------------------
# resolve_ds_config


def test_shipped_configs_exist():
    assert {p.name for p in DS_CONFIGS} >= {"zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_resolves(path):
    raw = json.loads(path.read_text())
    assert "optimizer" not in raw and "scheduler" not in raw
    ds = resolve_ds_config(path, tiny_config(batch_size=8, global_batch_size=32), world_size=2, device_type="cpu")
    assert not _contains_auto(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 3.0
    assert ds["bf16"]["enabled"] is False  # CPU
    assert ds["zero_optimization"]["stage"] == int(re.search(r"zero(\d)", path.stem).group(1))
    assert ("offload_optimizer" in ds["zero_optimization"]) == ("offload" in path.stem)


def test_accumulation_from_global_batch(tmp_path):
    ds = resolve_ds_config(REPO / "ds_configs" / "zero2.json", tiny_config(batch_size=4, global_batch_size=64),
                           world_size=4, device_type="cpu")
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 4, 64)


@pytest.mark.parametrize("world_size", [3, 8])
def test_bad_accumulation_names_the_keys(world_size):
    cfg = tiny_config(batch_size=8, global_batch_size=32)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(REPO / "ds_configs" / "zero2.json", cfg, world_size=world_size, device_type="cpu")
    message = str(err.value)
    assert "optim.global_batch_size=32" in message and "data.batch_size=8" in message
    assert f"world size {world_size}" in message


def test_missing_and_invalid_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.json.*does not exist"):
        resolve_ds_config(tmp_path / "nope.json", tiny_config(), 1, "cpu")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json.*not valid JSON"):
        resolve_ds_config(bad, tiny_config(), 1, "cpu")


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_rejects_optimizer_and_scheduler_sections(tmp_path, section):
    path = _write(tmp_path, {section: {"type": "AdamW", "params": {}}, "zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match=f"remove the '{section}' section"):
        resolve_ds_config(path, tiny_config(), 1, "cpu")


def test_rejects_unresolvable_auto(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}})
    with pytest.raises(ConfigError, match="zero_optimization.stage3_prefetch_bucket_size"):
        resolve_ds_config(path, tiny_config(), 1, "cpu")


def test_numbers_must_agree_with_training_config(tmp_path):
    cfg = tiny_config(batch_size=2, global_batch_size=4, clip_grad=3.0)
    ok = resolve_ds_config(_write(tmp_path, {"gradient_clipping": 3, "train_micro_batch_size_per_gpu": 2}), cfg, 2,
                           "cpu")
    assert ok["gradient_clipping"] == 3 and ok["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 contradicts optim.clip_grad"):
        resolve_ds_config(_write(tmp_path, {"gradient_clipping": 1.0}), cfg, 2, "cpu")
    with pytest.raises(ConfigError, match="train_batch_size=8 contradicts"):
        resolve_ds_config(_write(tmp_path, {"train_batch_size": 8}), cfg, 2, "cpu")


def test_omitted_keys_are_filled_and_explicit_bf16_kept(tmp_path):
    ds = resolve_ds_config(_write(tmp_path, {"bf16": {"enabled": True}}), tiny_config(clip_grad=0.0), 1, "cpu")
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed >= 0.19.3 would default to 1.0 (docs/dependencies.md)
    assert ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 2


@pytest.mark.parametrize(
    "data, key, example",
    [
        ({"bf16": True}, "'bf16'", '"bf16": {"enabled": true}'),
        ({"bf16": None}, "'bf16'", '"bf16": {"enabled": true}'),
        ({"fp16": False}, "'fp16'", '"fp16": {"enabled": false}'),
        ({"zero_optimization": 2}, "'zero_optimization'", '"zero_optimization": {"stage": 2}'),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}}, "'zero_optimization.offload_optimizer'",
         '"offload_optimizer": {"device": "cpu"}'),
        ({"zero_optimization": {"stage": 3, "offload_param": True}}, "'zero_optimization.offload_param'",
         '"offload_param": {"device": "cpu"}'),
    ],
)
def test_section_that_is_not_an_object_names_the_key_and_the_expected_form(tmp_path, data, key, example):
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(_write(tmp_path, data), tiny_config(), 1, "cpu")
    message = str(err.value)
    assert "ds.json" in message and f"{key} must be a JSON object" in message and example in message


@pytest.mark.parametrize("enabled", [True, 1])
def test_fp16_enabled_is_rejected_pointing_to_bf16(tmp_path, enabled):
    """The trainer is bf16 only (no fp16 loss scaling): ``"fp16": {"enabled": true}`` is an error, not ignored."""
    with pytest.raises(ConfigError, match=r"ds\.json: fp16\.enabled=(true|1) is not supported.*bf16"):
        resolve_ds_config(_write(tmp_path, {"fp16": {"enabled": enabled}}), tiny_config(), 1, "cpu")


@pytest.mark.parametrize("enabled", ["auto", False])
def test_fp16_auto_or_false_resolves_to_disabled(tmp_path, enabled):
    ds = resolve_ds_config(_write(tmp_path, {"fp16": {"enabled": enabled}, "zero_optimization": {"stage": 2,
                           "offload_optimizer": None}}), tiny_config(), 1, "cpu")
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False


# ---------------------------------------------------------------------------------------------------------------
# param_groups


def _vit_with_everything():
    import timm

    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10, reg_tokens=2, init_values=1e-5)


NO_DECAY_PATTERN = re.compile(r"(\.bias$|(^|\.)norm\d?\.weight$|(^|\.)pos_embed$|(^|\.)cls_token$|(^|\.)reg_token$"
                              r"|\.ls\d\.gamma$)")


def _names(module, groups):
    """Groups as ``{weight_decay: [parameter names]}`` (parameters matched by identity)."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    return {g["weight_decay"]: [by_id[id(p)] for p in g["params"]] for g in groups}


def test_param_groups_split_by_name():
    model = _vit_with_everything()
    model.head.weight.requires_grad_(False)  # frozen parameters are left out
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected_no_decay = {n for n in names if NO_DECAY_PATTERN.search(n)}
    assert {"pos_embed", "cls_token", "reg_token", "norm.weight", "blocks.0.norm1.weight", "blocks.1.ls2.gamma",
            "blocks.0.attn.qkv.bias"} <= expected_no_decay
    groups = _names(model, param_groups(model, weight_decay=0.05))
    assert sorted(groups) == [0.0, 0.05]
    assert set(groups[0.0]) == expected_no_decay
    assert set(groups[0.05]) == set(names) - expected_no_decay
    assert "head.weight" not in groups[0.05] + groups[0.0]


def test_param_groups_on_trainable_module_prefixes():
    model = tiny_trainable()
    groups = _names(model, param_groups(model, weight_decay=0.1))
    no_decay = set(groups[0.0])
    assert {"student.pos_embed", "student.cls_token", "head.bias"} <= no_decay
    assert "head.weight" in groups[0.1] and "student.patch_embed.proj.weight" in groups[0.1]


# ---------------------------------------------------------------------------------------------------------------
# learning rate


def _hand_lr(step, total, warmup, peak, low):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t))


def test_lr_schedule_known_points():
    total, warmup, peak, low = 1000, 100, 1e-3, 1e-6
    assert lr_at(0, total, warmup, peak, low) == pytest.approx(peak / warmup)
    assert lr_at(49, total, warmup, peak, low) == pytest.approx(peak / 2)
    assert lr_at(warmup - 1, total, warmup, peak, low) == pytest.approx(peak)  # warmup end
    assert lr_at(warmup, total, warmup, peak, low) == pytest.approx(peak)  # cosine start
    assert lr_at(warmup + (total - warmup) // 2, total, warmup, peak, low) == pytest.approx((peak + low) / 2)
    assert lr_at(total, total, warmup, peak, low) == pytest.approx(low)
    assert lr_at(total + 50, total, warmup, peak, low) == pytest.approx(low)
    for step in (3, 250, 777, 999):
        assert lr_at(step, total, warmup, peak, low) == pytest.approx(_hand_lr(step, total, warmup, peak, low))
    cosine = [lr_at(s, total, warmup, peak, low) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 10, 0, 2e-3, 0.0) == pytest.approx(2e-3)
    assert lr_at(5, 10, 0, 2e-3, 0.0) == pytest.approx(1e-3)


def test_peak_lr_scaling():
    cfg = tiny_config(batch_size=8, global_batch_size=2048, base_lr=6e-4)
    assert peak_lr(cfg) == pytest.approx(1.2e-3)
    cfg.optim.lr = 3e-4
    assert peak_lr(cfg) == 3e-4


# ---------------------------------------------------------------------------------------------------------------
# build_engine: real DeepSpeed on CPU (fresh processes)


def _scenario_real_steps(configs: list[str]) -> dict:
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from hybrid_distill.runtime.engine import build_engine, grad_norm, set_lr, skipped_steps

    results = {}
    for name in configs:
        cfg = tiny_config(batch_size=2, global_batch_size=4)  # 2 micro-batches accumulated
        ds = resolve_ds_config(REPO / "ds_configs" / name, cfg, world_size=1, device_type="cpu")
        module = tiny_trainable()
        expected = sorted(n for n, _ in module.named_parameters())
        engine = build_engine(module, cfg, ds)
        before = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        set_lr(engine, 5e-3)
        losses = train_steps(engine, 4)  # 2 optimizer steps
        after = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        results[name] = dict(
            names=sorted(before), expected=expected, changed=len(changed), total=len(before), losses=losses,
            lrs=[g["lr"] for g in base.param_groups], wds=sorted(g["weight_decay"] for g in base.param_groups),
            global_steps=engine.global_steps, grad_norm=grad_norm(engine), skipped=skipped_steps(engine),
            stage=engine.zero_optimization_stage(), clip=engine.gradient_clipping(), optimizer=type(base).__name__)
    return results


def _check_real_steps(result: dict, stage: int) -> None:
    assert result["stage"] == stage
    assert result["names"] == result["expected"]  # exactly student.* + head.*, nothing else
    assert all(n.startswith(("student.", "head.")) for n in result["names"])
    assert result["changed"] == result["total"]  # every weight moved
    assert result["global_steps"] == 2  # 4 micro-batches, accumulation 2
    assert result["lrs"] == [5e-3, 5e-3] and result["wds"] == [0.0, 0.05]
    assert result["grad_norm"] is not None and result["grad_norm"] > 0 and result["skipped"] == 0
    assert result["clip"] == 3.0
    assert all(math.isfinite(x) for x in result["losses"])


def test_build_engine_real_zero_steps_on_cpu():
    results = run_ranks(_scenario_real_steps, configs=["zero2.json", "zero1.json", "zero3.json"])[0]
    for name, stage in (("zero2.json", 2), ("zero1.json", 1), ("zero3.json", 3)):
        _check_real_steps(results[name], stage)
        assert results[name]["optimizer"] == "AdamW"


@pytest.mark.slow
def test_build_engine_zero3_offload_uses_cpu_adam():
    """Offload needs DeepSpeedCPUAdam (a JIT C++ op, ~1 min to build the first time)."""
    result = run_ranks(_scenario_real_steps, timeout=600, configs=["zero3_offload.json"])[0]["zero3_offload.json"]
    _check_real_steps(result, 3)
    assert result["optimizer"] == "DeepSpeedCPUAdam"


def test_frozen_parameters_are_rejected():
    """Raised before deepspeed.initialize, so this runs in-process."""
    import torch

    from hybrid_distill.runtime.engine import build_engine

    module = tiny_trainable()
    module.teacher = torch.nn.Linear(4, 4).requires_grad_(False)  # a teacher attached by mistake
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"frozen parameters.*teacher\.weight"):
        build_engine(module, cfg, resolve_ds_config(REPO / "ds_configs" / "zero2.json", cfg, 1, "cpu"))
