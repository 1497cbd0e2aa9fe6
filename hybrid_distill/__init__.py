"""hybrid-distill: a DeepSpeed-scaled trainer for Hybrid Distillation.

Public entry points (import the module you need; importing the package itself stays light so that
``python -m hybrid_distill.runtime.cluster`` in a batch script does not load torch):

* ``hybrid_distill.config.load_config`` and ``hybrid_distill.config.presets`` — the typed config tree;
* ``hybrid_distill.model.task.HybridDistillTask`` — student, head, both teachers and the loss;
* ``hybrid_distill.model.masking.progressive_keep_indices`` — redundant-token masking (Eq. 4);
* ``hybrid_distill.train.main`` — the trainer (``launch.py``);
* ``hybrid_distill.export.export_student`` — the student as a timm checkpoint;
* ``hybrid_distill.analysis.analyse`` — attention distance and NMI per layer;
* ``hybrid_distill.evaluate.main`` and ``hybrid_distill.eval`` — k-NN and linear-probe evaluation of a ViT.
"""

__version__ = "0.1.0"
