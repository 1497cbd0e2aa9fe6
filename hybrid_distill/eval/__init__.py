"""Feature evaluation of a ViT: fixed labelled image sets, frozen features, weighted k-NN and a linear probe.

* ``data`` — ``EvalSet``: a fixed, labelled subset of any source kind the trainer reads (class folders, an HF label
  column, webdataset ``.cls``), centre-cropped, split over ranks;
* ``features`` — frozen CLS / mean-pooled patch features of a timm ViT, extracted on each rank's share and gathered;
* ``knn`` — DINO's weighted k-NN classifier; ``linear_probe`` — an L2-regularised multinomial logistic regression;
* ``protocols`` — both on both pools, as the metrics dict the CLI and the trainer log;
* ``monitor`` — the trainer's online evaluation (``eval`` config section).

The job is ``python -m hybrid_distill.evaluate`` (``hybrid_distill/evaluate.py``); see ``docs/evaluation.md``.
"""
