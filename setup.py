"""Packaging for hybrid-distill (distribution name), packages `hybrid_distill` and `kernels`."""

from setuptools import find_packages, setup

setup(
    name="hybrid-distill",
    version="0.1.0",  # keep in step with hybrid_distill.__version__
    description="DeepSpeed-scaled trainer for Hybrid Distillation (MAE relations + CLIP/DeiT features)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hybrid_distill", "hybrid_distill.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "timm>=1.0.15,<2",
        "open_clip_torch>=2.26,<4",
        "deepspeed>=0.16,<0.21",
        "datasets>=3.0,<6",
        "safetensors>=0.4",
        "pyyaml>=6",
        "pillow>=10",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    entry_points={"console_scripts": ["hybrid-distill = hybrid_distill.train:main"]},
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2", "ruff>=0.5", "scikit-learn>=1.3"], "wandb": ["wandb"]},
)
