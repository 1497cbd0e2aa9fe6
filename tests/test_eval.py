"""Feature evaluation (hybrid_distill.eval, python -m hybrid_distill.evaluate) against independent computations.

k-NN and the linear probe against scikit-learn; the centre crop against torchvision; labels from every source kind;
the CLI end to end on a labelled image set whose answer is known, on 1 and on 2 processes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import sklearn  # noqa: F401 - the `test` extra: the independent implementations the classifiers are checked against
import torch
from ds_testlib import REPO, free_port
from PIL import Image

from hybrid_distill.config import EvalConfig
from hybrid_distill.errors import DataError
from hybrid_distill.eval.data import EvalSet, centre_crop
from hybrid_distill.eval.features import Features, extract_features, pool_tokens
from hybrid_distill.eval.knn import knn_scores, topk_accuracy
from hybrid_distill.eval.linear_probe import fit_linear_probe
from hybrid_distill.eval.monitor import check_same_classes
from hybrid_distill.eval.protocols import classify

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 40)]  # class c: colour c


def blobs(n: int, dim: int, classes: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    return make_classification(n_samples=n, n_features=dim, n_informative=dim // 2, n_classes=classes,
                               n_clusters_per_class=2, class_sep=sep, random_state=seed)


def colour_image(label: int, i: int, size: tuple[int, int]) -> Image.Image:
    """A class-coloured image with per-image noise and a grey square: the class is the colour, nothing else."""
    rng = np.random.default_rng([label, i])
    img = np.clip(np.array(COLOURS[label], np.float32) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    img[y:y + size[1] // 3, x:x + size[0] // 3] = 128
    return Image.fromarray(img.astype(np.uint8))


def write_colour_folders(root: Path, per_class: int, offset: int = 0, classes: tuple[int, ...] = (0, 1, 2, 3)) -> Path:
    for c in classes:
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = colour_image(c % len(COLOURS), offset + i, (30 + i % 5, 26 + i % 3))
            image.save(root / f"class_{c}" / f"{i:03d}.png")
    return root


def encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def tiny_vit_dir(tmp_path: Path) -> Path:
    """A random 32 px timm ViT saved as a timm local-dir (config.json + model.safetensors)."""
    import timm
    from timm.models import save_for_hf

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **kw)
    out = tmp_path / "tiny_vit"
    save_for_hf(model, str(out), model_config={"model_args": kw, "pretrained_cfg": {"mean": (0.5,) * 3,
                                                                                    "std": (0.5,) * 3}},
                safe_serialization=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# k-NN and the linear probe against scikit-learn


def test_knn_votes_equal_scikit_learns_distance_weighted_neighbours():
    from sklearn.neighbors import KNeighborsClassifier

    x, y = blobs(900, 16, 7, 1.0, seed=0)
    k, temperature = 20, 0.07
    # sklearn's cosine distance is 1 - similarity: DINO's weight exp(sim / T) as a function of the distance
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / temperature)).fit(x[:600], y[:600])
    votes = knn_scores(torch.tensor(x[:600]), torch.tensor(y[:600]), torch.tensor(x[600:]), 7, k, temperature)
    np.testing.assert_allclose((votes / votes.sum(1, keepdim=True)).numpy(), ref.predict_proba(x[600:]), atol=1e-5)
    acc = topk_accuracy(votes, torch.tensor(y[600:]))
    assert acc[1] == pytest.approx(100 * (ref.predict(x[600:]) == y[600:]).mean())
    top5 = np.argsort(-ref.predict_proba(x[600:]), axis=1, kind="stable")[:, :5]
    assert acc[5] == pytest.approx(100 * (top5 == y[600:, None]).any(1).mean())
    assert 30 < acc[1] < 95  # a set where neighbours disagree: the weighting is exercised


def test_knn_k_and_temperature_matter_and_k_is_capped_by_the_training_set():
    x, y = blobs(400, 8, 4, 0.8, seed=1)
    tr, tr_y, te = torch.tensor(x[:300]), torch.tensor(y[:300]), torch.tensor(x[300:])
    a = knn_scores(tr, tr_y, te, 4, k=20, temperature=0.07)
    assert not torch.allclose(a, knn_scores(tr, tr_y, te, 4, k=5, temperature=0.07))
    assert not torch.allclose(a, knn_scores(tr, tr_y, te, 4, k=20, temperature=0.5))
    assert knn_scores(tr[:3], tr_y[:3], te, 4, k=20).shape == (100, 4)  # 3 neighbours only


def test_top5_ranks_equal_votes_by_class_index():
    scores = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    acc = topk_accuracy(scores, torch.tensor([3, 6]))
    assert acc == {1: 0.0, 5: 50.0}  # class 3 is among 1, 0, 2, 3, 4; class 6 is not


def test_linear_probe_reaches_scikit_learns_logistic_regression_optimum():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(1000, 12, 5, 1.0, seed=2)
    xtr, ytr, xte = x[:700], y[:700], x[700:]
    wd = 1e-2
    probe = fit_linear_probe(torch.tensor(xtr), torch.tensor(ytr), 5, weight_decay=wd, epochs=200)
    mean, std = xtr.mean(0), xtr.std(0)  # the probe standardises with the training statistics
    ref = LogisticRegression(C=1 / (wd * len(ytr)), tol=1e-10, max_iter=10000).fit((xtr - mean) / std, ytr)
    ours = probe.logits(torch.tensor(xte)).softmax(1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba((xte - mean) / std), atol=2e-3)
    assert (ours.argmax(1) == ref.predict((xte - mean) / std)).mean() > 0.99
    assert 40 < topk_accuracy(torch.tensor(ours), torch.tensor(y[700:]))[1] < 95


def test_linear_probe_weight_decay_matters_and_chunking_does_not():
    x, y = blobs(300, 10, 3, 0.5, seed=3)
    x, y = torch.tensor(x), torch.tensor(y)
    a = fit_linear_probe(x, y, 3, weight_decay=1e-3, epochs=50)
    b = fit_linear_probe(x, y, 3, weight_decay=1e-3, epochs=50, chunk=7)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-4)
    assert a.weight.norm() > 1.25 * fit_linear_probe(x, y, 3, weight_decay=1e-1, epochs=50).weight.norm()


def test_classify_scores_every_protocol_and_pool_on_a_separable_set():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 4, (400,), generator=g).numpy()
    feats = 10 * torch.eye(8)[y] + torch.randn(400, 8, generator=g)  # one axis per class: the answer is 100 %
    train = Features(pools={"cls": feats[:300], "avg": -feats[:300]}, labels=torch.tensor(y[:300]),
                     positions=torch.arange(300))
    val = Features(pools={"cls": feats[300:], "avg": -feats[300:]}, labels=torch.tensor(y[300:]),
                   positions=torch.arange(100))
    out = classify(train, val, ["knn", "linear"], EvalConfig())
    assert set(out) == {f"{p}_{pool}_top{k}" for p in ("knn", "linear") for pool in ("cls", "avg") for k in (1, 5)}
    assert all(v == 100.0 for v in out.values()), out


def test_pools_are_the_cls_token_and_the_mean_of_the_patch_tokens():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # 2 prefix tokens + 3 patches
    torch.testing.assert_close(pool_tokens(tokens, 2, "cls"), tokens[:, 0])
    torch.testing.assert_close(pool_tokens(tokens, 2, "avg"), tokens[:, 2:].sum(1) / 3)
    with pytest.raises(ValueError, match="class token"):
        pool_tokens(tokens, 0, "cls")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation sets


@pytest.mark.parametrize("size, crop_pct", [((40, 30), 0.875), ((17, 33), 1.0), ((64, 64), 0.9)])
def test_centre_crop_equals_torchvisions_resize_and_center_crop(size, crop_pct):
    import math

    from torchvision import transforms

    img = colour_image(1, 3, size)
    ref = transforms.Compose([transforms.Resize(math.floor(24 / crop_pct), transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(24)])(img)
    np.testing.assert_array_equal(centre_crop(encode(img), 24, crop_pct), np.asarray(ref))


def test_folder_set_labels_subset_and_rank_shares(tmp_path):
    root = write_colour_folders(tmp_path / "train", per_class=5)
    full = EvalSet(f"folder:{root}", "--train", 16, cache_dir=tmp_path / "cache")
    assert len(full) == 20 and full.classes == [f"class_{c}" for c in range(4)]
    images, labels = full.take(20)
    assert labels.tolist() == [c for c in range(4) for _ in range(5)]
    assert images.shape == (20, 3, 16, 16) and images.dtype == torch.uint8
    brightest = images.float().mean((2, 3)).argmax(1).tolist()
    assert brightest[:15] == [c for c in range(3) for _ in range(5)]  # red, green, blue: the colour is the label
    sub = EvalSet(f"folder:{root}", "--train", 16, num_samples=7, seed=3, cache_dir=tmp_path / "cache")
    again = EvalSet(f"folder:{root}", "--train", 16, num_samples=7, seed=3, cache_dir=tmp_path / "cache")
    assert len(sub) == 7 and sub.indices.tolist() == again.indices.tolist() == sorted(sub.indices.tolist())
    shares = [EvalSet(f"folder:{root}", "--train", 16, rank=r, world_size=3, cache_dir=tmp_path / "cache")
              for r in range(3)]
    seen = [p for s in shares for b in s.loader(4) for p in b["positions"].tolist()]
    assert sorted(seen) == list(range(20)) and shares[1].positions() == list(range(1, 20, 3))


def test_hf_label_column_and_wds_cls_members(tmp_path):
    labels = [3, 1, 0, 2, 3, 0]
    images = [colour_image(c, i, (20, 20)) for i, c in enumerate(labels)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    datasets.Dataset.from_dict({"image": [{"bytes": encode(im), "path": None} for im in images], "label": labels},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "shard-000.tar", "w") as tar:
        for i, (im, c) in enumerate(zip(images, labels, strict=True)):
            for ext, data in (("png", encode(im)), ("cls", str(c).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for source, streaming in ((f"hf:{tmp_path / 'hf'}", False), (f"wds:{tmp_path}/wds/shard-000.tar", False),
                              (f"wds:{tmp_path}/wds/shard-000.tar", True)):
        s = EvalSet(source, "--val", 16, num_samples=6, streaming=streaming, cache_dir=tmp_path / "cache")
        got = sorted((p, y) for b in s.loader(4) for p, y in zip(b["positions"].tolist(), b["labels"].tolist(),
                                                                 strict=True))
        assert [y for _, y in got] == labels, source
        assert s.take(2)[1].tolist() == labels[:2]


def test_sets_without_labels_or_with_other_classes_are_refused(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    colour_image(0, 0, (20, 20)).save(flat / "a.png")
    with pytest.raises(DataError, match="--train=folder.*evaluation needs ROOT/CLASS"):
        EvalSet(f"folder:{flat}", "--train", 16, cache_dir=tmp_path / "cache")
    datasets.Dataset.from_dict({"image": [{"bytes": encode(colour_image(0, 0, (9, 9))), "path": None}]},
                               features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        str(tmp_path / "nolabel"))
    with pytest.raises(DataError, match="eval.val_source=hf:.*no integer label column"):
        EvalSet(f"hf:{tmp_path / 'nolabel'}", "eval.val_source", 16)
    with pytest.raises(DataError, match="eval.train_source=folder:/no/such.*does not exist"):
        EvalSet("folder:/no/such", "eval.train_source", 16, cache_dir=tmp_path / "cache")
    a = EvalSet(f"folder:{write_colour_folders(tmp_path / 'a', 2)}", "--train", 16, cache_dir=tmp_path / "cache")
    b = EvalSet(f"folder:{write_colour_folders(tmp_path / 'b', 2, classes=(0, 1, 5))}", "--val", 16,
                cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="different class folders"):
        check_same_classes(a, b)


def test_an_undecodable_image_is_skipped_and_named(tmp_path, caplog):
    root = write_colour_folders(tmp_path / "train", per_class=3)
    (root / "class_2" / "000.png").write_bytes(b"not a png")
    s = EvalSet(f"folder:{root}", "--train", 16, cache_dir=tmp_path / "cache")
    batches = list(s.loader(5))
    assert sum(len(b["labels"]) for b in batches) == 11
    assert "class_2/000.png" in caplog.text and "skipped undecodable evaluation image" in caplog.text


def test_features_do_not_depend_on_the_batch_composition(tmp_path):
    import timm

    root = write_colour_folders(tmp_path / "train", per_class=5)
    s = EvalSet(f"folder:{root}", "--train", 32, cache_dir=tmp_path / "cache")
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0).eval()
    a = extract_features(model, s, (0.5,) * 3, (0.5,) * 3, ["cls", "avg"], batch_size=8)
    # another share of the same set: the rows rank 1 of 2 would compute, in other batches
    half = EvalSet(f"folder:{root}", "--train", 32, rank=1, world_size=2, cache_dir=tmp_path / "cache")
    b = extract_features(model, half, (0.5,) * 3, (0.5,) * 3, ["cls", "avg"], batch_size=8)
    assert b.positions.tolist() == list(range(1, 20, 2)) and a.positions.tolist() == list(range(20))
    for pool in ("cls", "avg"):
        assert torch.equal(a.pools[pool][1::2], b.pools[pool])  # bit-identical: full-size batches only
    assert torch.equal(a.labels, torch.tensor([c for c in range(4) for _ in range(5)]))


# ----------------------------------------------------------------------------------------------------------------
# The CLI: a labelled set with a known answer, on 1 and 2 processes


def _evaluate_cmd(procs: int, model: Path, train: Path, val: Path, out: Path, cache: Path) -> list[str]:
    args = [str(model), "--train", f"folder:{train}", "--val", f"folder:{val}", "--out", str(out), "--num-workers",
            "1", "--batch-size", "6", "--cache-dir", str(cache)]
    if procs == 1:
        return [sys.executable, "-m", "hybrid_distill.evaluate", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            str(free_port()), "-m", "hybrid_distill.evaluate", *args]


@pytest.mark.slow
def test_cli_finds_the_known_answer_identically_on_one_and_two_processes(tmp_path):
    model = tiny_vit_dir(tmp_path)
    train = write_colour_folders(tmp_path / "train", per_class=9)
    val = write_colour_folders(tmp_path / "val", per_class=5, offset=100)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"eval{procs}.json"
        run = subprocess.run(_evaluate_cmd(procs, model, train, val, out, tmp_path / "cache"), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr[-4000:]
        results[procs] = json.loads(out.read_text())
        lines = [line for line in run.stdout.splitlines() if line.startswith(("knn_", "linear_"))]
        assert len(lines) == 8 and lines[0].split()[0] == "knn_cls_top1"  # one table line per metric
    one, two = results[1], results[2]
    assert (one["num_train"], one["num_val"], one["world_size"], two["world_size"]) == (36, 20, 1, 2)
    assert one["metrics"] == two["metrics"]  # the same numbers, whatever the number of processes
    assert one["metrics"]["knn_cls_top1"] == one["metrics"]["linear_avg_top1"] == 100.0  # the known answer
    assert one["settings"]["knn_k"] == 20 and one["settings"]["knn_temperature"] == 0.07


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from hybrid_distill.evaluate import main

    model = tiny_vit_dir(tmp_path)
    assert main([str(model), "--train", "folder:/no/such", "--val", "synthetic", "--cache-dir", str(tmp_path)]) == 2
    assert "evaluate: error: --train=folder:/no/such" in capsys.readouterr().err
    assert main(["no_such_timm_model", "--train", "synthetic", "--val", "synthetic"]) == 2
    assert "no_such_timm_model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The trainer's online evaluation, in process


def test_online_evaluation_takes_no_draw_from_the_training_runs_random_state(tmp_path):
    from types import SimpleNamespace

    from torch import nn

    from hybrid_distill.config import load_config
    from hybrid_distill.eval.monitor import OnlineEval
    from hybrid_distill.model.student import build_student

    cfg = load_config("tiny", overrides=["eval.train_source=synthetic", "eval.val_source=synthetic",
                                         "eval.train_samples=16", "eval.val_samples=8", "eval.num_workers=1",
                                         "eval.attention_images=4", "data.synthetic_size=16"])
    torch.manual_seed(0)
    trained = build_student(cfg.student)
    engine = SimpleNamespace(module=nn.ModuleDict({"student": trained}))
    state = torch.get_rng_state()
    monitor = OnlineEval(cfg, 0, 1, torch.device("cpu"), str(tmp_path / "cache"))
    got = monitor.evaluate(engine)
    assert torch.equal(torch.get_rng_state(), state)  # drop path / augmentation draws of the next step unchanged
    for a, b in zip(monitor.student.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the evaluation copy holds the engine's weights
    assert set(got) >= {"knn_cls_top1", "linear_avg_top5", "attn_distance_b0", "attn_nmi_b5", "eval_time_s"}
    assert monitor.due(1000, 5000) and monitor.due(5000, 5000) and not monitor.due(999, 5000)
