"""Named configurations. Each preset is a function returning a fresh ``Config``.

``tiny`` runs on a CPU in seconds (random weights, synthetic data). The others are the paper's recipes
and load pretrained teachers (``weights="pretrained"`` downloads from the hub; point ``weights`` at a
local checkpoint for offline clusters).
"""

from __future__ import annotations

from collections.abc import Callable

from hybrid_distill.config.schema import (
    Config,
    DataConfig,
    MaskingConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
)
from hybrid_distill.errors import ConfigError


def tiny() -> Config:
    """CPU-sized ViTs with random weights on synthetic 64 px images; 8x8 patch grid for all three models.

    The feature teacher is timm's CLIP tower with 7 px patches, so it sees the crop at 56 px: the same
    grid alignment the ViT-L recipe does with CLIP-L/14 at 196 px.
    """
    dims = dict(embed_dim=64, depth=6, num_heads=4, patch_size=8)
    return Config(
        student=StudentConfig(model="vit_small_patch16_224", img_size=64, **dims),
        mim_teacher=TeacherConfig(model="vit_base_patch16_224.mae", **dims),
        feature_teacher=TeacherConfig(model="vit_base_patch16_clip_224.openai", embed_dim=96, depth=4,
                                      num_heads=4, patch_size=7),
        masking=MaskingConfig(drop_ratio=0.3),
        data=DataConfig(source="synthetic", synthetic_size=64, batch_size=8, num_workers=0),
        optim=OptimConfig(base_lr=1.5e-3 * 1024 / 16, min_lr=1e-5, global_batch_size=16, warmup_epochs=0.5),
        run=RunConfig(epochs=4, seed=0, output_dir="runs/tiny", log_every=2, ckpt_every=8, keep_last=2,
                      teacher_dtype="float32"),
    )


def vitb_in1k_deit_mae() -> Config:
    """ViT-B/16 student from MAE-B (relations) + DeiT-B (features) on ImageNet-1K, 300 epochs."""
    return Config(
        student=StudentConfig(model="vit_base_patch16_224", img_size=224),
        mim_teacher=TeacherConfig(model="vit_base_patch16_224.mae", weights="pretrained"),
        feature_teacher=TeacherConfig(model="deit_base_patch16_224.fb_in1k", weights="pretrained"),
        data=DataConfig(source="folder:data/imagenet-1k/train", batch_size=128, num_workers=10),
        optim=OptimConfig(global_batch_size=1024, warmup_epochs=10),
        run=RunConfig(epochs=300, output_dir="runs/vitb_in1k_deit_mae"),
    )


def vitb_in1k_clip_mae() -> Config:
    """ViT-B/16 student from MAE-B + CLIP ViT-B/16 (OpenAI weights via open_clip) on ImageNet-1K."""
    cfg = vitb_in1k_deit_mae()
    cfg.feature_teacher = TeacherConfig(library="open_clip", model="ViT-B-16", weights="pretrained",
                                        pretrained_tag="openai", force_quick_gelu=True)
    cfg.run.output_dir = "runs/vitb_in1k_clip_mae"
    return cfg


def vitl_in21k_clip_mae() -> Config:
    """The paper's ViT-L recipe: MAE-L/16 + CLIP-L/14 (at 196 px) teachers, ImageNet-21K, 40 epochs."""
    return Config(
        student=StudentConfig(model="vit_large_patch16_224", img_size=224),
        mim_teacher=TeacherConfig(model="vit_large_patch16_224.mae", weights="pretrained"),
        feature_teacher=TeacherConfig(library="open_clip", model="ViT-L-14", weights="pretrained",
                                      pretrained_tag="openai", force_quick_gelu=True),
        data=DataConfig(source="hf:timm/imagenet-22k-wds", streaming=True, batch_size=64, num_workers=10),
        optim=OptimConfig(global_batch_size=1024, warmup_epochs=2),
        run=RunConfig(epochs=40, output_dir="runs/vitl_in21k_clip_mae", ckpt_every=500),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    f.__name__: f for f in (tiny, vitb_in1k_deit_mae, vitb_in1k_clip_mae, vitl_in21k_clip_mae)
}


def get_preset(name: str) -> Config:
    """A fresh config for preset ``name``; ``ConfigError`` lists the valid names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
