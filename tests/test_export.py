"""hybrid_distill.export: ZeRO checkpoint -> timm checkpoint that timm reloads with identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ds_testlib import run_ranks, tiny_config

from hybrid_distill.export import ExportError, export_student, main
from hybrid_distill.runtime import checkpoint as ck


def _scenario_train_and_save(tmp: str, stages: list[int]) -> dict:
    """For each ZeRO stage: a run dir with config.yaml + a real checkpoint, and the student's reference outputs."""
    from deepspeed.utils import safe_get_full_fp32_param
    from ds_testlib import REPO
    from torch import nn

    from hybrid_distill.config import save_config
    from hybrid_distill.model.student import build_student
    from hybrid_distill.runtime.engine import build_engine, resolve_ds_config

    class Trainable(nn.Module):
        def __init__(self, student, target_dim):
            super().__init__()
            self.student, self.head = student, nn.Linear(student.embed_dim, target_dim)

        def forward(self, x):
            return self.head(self.student.forward_features(x))

    runs = {}
    for stage in stages:
        cfg = tiny_config(batch_size=2, global_batch_size=2)
        run_dir = Path(tmp) / f"run_zero{stage}"
        run_dir.mkdir()
        save_config(cfg, run_dir / "config.yaml")
        torch.manual_seed(stage)
        ds = resolve_ds_config(REPO / "ds_configs" / f"zero{stage}.json", cfg, 1, "cpu")
        engine = build_engine(Trainable(build_student(cfg.student), 96), cfg, ds)
        for i in range(2):
            x = torch.rand(2, 3, cfg.student.img_size, cfg.student.img_size, generator=torch.Generator().manual_seed(i))
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        ck.save(engine, run_dir / "checkpoints", 2, {"step": 2}, keep_last=2)
        weights = {n.removeprefix("student."): safe_get_full_fp32_param(p).clone()
                   for n, p in engine.module.named_parameters() if n.startswith("student.")}
        reference = build_student(cfg.student).eval()
        reference.load_state_dict(weights)
        image = torch.rand(2, 3, cfg.student.img_size, cfg.student.img_size, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            torch.save({"image": image, "features": reference.forward_features(image)}, run_dir / "reference.pt")
        runs[stage] = str(run_dir)
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("export")
    made = run_ranks(_scenario_train_and_save, tmp=str(tmp), stages=[2, 3])[0]
    return {int(stage): Path(path) for stage, path in made.items()}


@pytest.mark.parametrize("stage", [2, 3])
def test_export_round_trip_identical_outputs(runs, tmp_path, stage):
    import timm
    from safetensors.torch import load_file

    run_dir = runs[stage]
    weights = export_student(run_dir, tmp_path / "export")  # in-process: no process group needed
    info = json.loads((tmp_path / "export" / "export.json").read_text())
    assert weights == tmp_path / "export" / "model.safetensors"
    assert info["model"] == "vit_small_patch16_224" and info["step"] == 2
    assert info["kwargs"] == {"img_size": 64, "num_classes": 0, "patch_size": 8, "embed_dim": 64, "depth": 6,
                              "num_heads": 4}
    keys = load_file(weights).keys()
    assert not any(k.startswith(("head.", "student.")) for k in keys) and "pos_embed" in keys  # head dropped
    ref = torch.load(run_dir / "reference.pt")
    model = timm.create_model(info["model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                              **info["kwargs"]).eval()
    local = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    printed = eval(info["load"], {"timm": timm}).eval()  # the line export.json and the README give users
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # student.mean/std default
    with torch.no_grad():
        for loaded in (model, local, printed):
            torch.testing.assert_close(loaded.forward_features(ref["image"]), ref["features"], rtol=0, atol=1e-6)
    for loaded in (local, printed):  # timm's data config for fine-tuning = the normalisation the student learnt
        data_cfg = timm.data.resolve_data_config(model=loaded)
        assert {k: tuple(data_cfg[k]) for k in imagenet} == imagenet
    assert (info["mean"], info["std"]) == (list(imagenet["mean"]), list(imagenet["std"]))
    assert info["load"] in (tmp_path / "export" / "README.md").read_text()


def test_cli_with_tag_dir_and_tag(runs, tmp_path, capsys):
    tag_dir = runs[2] / "checkpoints" / "step_00000002"
    assert main([str(tag_dir), "--out", str(tmp_path / "a")]) == 0
    assert "load with: timm.create_model(" in capsys.readouterr().out
    assert main([str(runs[2]), "--out", str(tmp_path / "b"), "--tag", "step_00000002"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_clear_errors(runs, tmp_path, capsys):
    with pytest.raises(ExportError, match="nowhere.*does not exist"):
        export_student(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match="no complete checkpoint.*empty_run"):
        export_student(tmp_path / "empty_run", tmp_path / "out")
    with pytest.raises(ExportError, match="checkpoint 'step_00000099'"):
        export_student(runs[2], tmp_path / "out", tag="step_00000099")
    partial = tmp_path / "partial_run" / "checkpoints" / "step_00000005"
    partial.mkdir(parents=True)
    with pytest.raises(ExportError, match="step_00000005.*incomplete"):
        export_student(partial, tmp_path / "out")
    ck.write_marker(partial, {"step": 5, "world_size": 1})
    with pytest.raises(ExportError, match="partial_run/config.yaml.*not found"):
        export_student(partial, tmp_path / "out")
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "export: error:" in capsys.readouterr().err


def test_torn_checkpoint_is_a_clear_error(runs, tmp_path):
    """A shard cut short after its marker was written: exit 2 naming the checkpoint, not a DeepSpeed traceback."""
    import shutil

    run_dir = tmp_path / "torn"
    shutil.copytree(runs[2], run_dir)
    shard = next((run_dir / "checkpoints" / "step_00000002").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ExportError, match="cannot read the fp32 weights of .*torn/checkpoints/step_00000002"):
        export_student(run_dir, tmp_path / "out")
    assert main([str(run_dir), "--out", str(tmp_path / "out")]) == 2


def _readme_flags(readme: str) -> dict[str, list[str]]:
    """``{flag: [values]}`` of the ``torchrun ... train.py`` command in an export's README."""
    import shlex

    command = readme.split("```bash\n", 1)[1].split("\n```", 1)[0].replace("\\\n", " ")
    flags, current = {}, None
    for token in shlex.split(command):
        if token.startswith("-") and not token[1:2].isdigit():
            current = token.lstrip("-")
            flags[current] = []
        elif current is not None:
            flags[current].append(token)
    return flags


def test_readme_gives_the_papers_finetuning_command_with_the_recorded_input(runs, tmp_path):
    export_student(runs[2], tmp_path / "export")
    readme = (tmp_path / "export" / "README.md").read_text()
    flags = _readme_flags(readme)
    assert flags["model"] == [f"local-dir:{(tmp_path / 'export').resolve()}"] and "pretrained" in flags
    assert flags["img-size"] == ["64"] and flags["mean"] == ["0.485", "0.456", "0.406"]  # the export's own input
    assert (flags["lr"], flags["b"], flags["nproc_per_node"]) == (["3e-4"], ["32"], ["8", "train.py"])  # 32 x 8 = 256
    assert (flags["layer-decay"], flags["drop-path"], flags["epochs"]) == (["0.65"], ["0.1"], ["100"])  # dBOT ViT-B
    assert flags["gp"] == ["avg"] and flags["mixup"] == ["0.8"] and flags["cutmix"] == ["1"]
    for source in ("appendix C", "DOWNSTREAM.md", "run.sh", "run_finetune.py", "datasets.py", "FINETUNE.md"):
        assert source in readme, source


def test_vit_b_and_vit_l_students_get_dbots_values_for_their_size():
    from hybrid_distill.export import finetune_recipe, size_name

    norm = {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert (size_name(768, 12), size_name(1024, 24), size_name(64, 6)) == ("ViT-B", "ViT-L", None)
    large = {flag: value for flag, value, _ in finetune_recipe("ViT-L", {"img_size": 224}, norm)}
    assert (large["layer-decay"], large["drop-path"], large["epochs"], large["warmup-epochs"]) == (0.8, 0.2, 50, 5)
    assert large["lr"] == 3e-4 and large["img-size"] == 224


def test_a_short_finetune_through_timms_own_api_with_the_readme_values(runs, tmp_path, one_thread):
    """The export loads with ``local-dir:`` as the README says (new head, MAE/dBOT pooling), and a few optimizer
    steps with timm's layer-decayed AdamW, Mixup/CutMix and its training transform run and train it."""
    import timm
    from safetensors.torch import load_file
    from timm.data import Mixup, create_transform, resolve_data_config
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    export_student(runs[2], tmp_path / "export")
    f = _readme_flags((tmp_path / "export" / "README.md").read_text())
    num_classes = 4
    model = timm.create_model(f["model"][0], pretrained=True, num_classes=num_classes, global_pool=f["gp"][0],
                              drop_path_rate=float(f["drop-path"][0]))
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.fc_norm.weight, torch.ones(64)) and model.head.out_features == num_classes
    data_cfg = resolve_data_config(model=model)
    assert data_cfg["input_size"] == (3, 64, 64) and tuple(data_cfg["mean"]) == (0.485, 0.456, 0.406)
    transform = create_transform(**{**data_cfg, "interpolation": f["train-interpolation"][0]}, is_training=True,
                                 auto_augment=f["aa"][0], re_prob=float(f["reprob"][0]))
    optimizer = create_optimizer_v2(model, "adamw", lr=float(f["lr"][0]), weight_decay=float(f["weight-decay"][0]),
                                    layer_decay=float(f["layer-decay"][0]))
    scales = sorted({round(g["lr_scale"], 6) for g in optimizer.param_groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.65 ** 7, rel=1e-4)  # 6 blocks + embedding: 7 decays
    mixup = Mixup(mixup_alpha=float(f["mixup"][0]), cutmix_alpha=float(f["cutmix"][0]),
                  label_smoothing=float(f["smoothing"][0]), num_classes=num_classes)
    g = torch.Generator().manual_seed(0)
    from PIL import Image

    pictures = [Image.fromarray(torch.randint(0, 256, (80, 90, 3), generator=g, dtype=torch.uint8).numpy())
                for _ in range(8)]
    labels = torch.arange(8) % num_classes
    before = model.head.weight.detach().clone()
    loss_fn = SoftTargetCrossEntropy()
    model.train()
    for _ in range(3):
        x, y = mixup(torch.stack([transform(p) for p in pictures]), labels)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert not torch.equal(model.head.weight, before)
