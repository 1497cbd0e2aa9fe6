"""Attention analysis: metrics vs explicit loops / closed forms, maps vs timm blocks by hand, CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from hybrid_distill.analysis import (
    analyse,
    attention_maps,
    attention_nmi,
    average_head_distance,
    eval_transform,
    load_image,
    load_model,
    main,
    nmi_per_image,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_attn(B: int, H: int, N: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(B, H, N, N, generator=g, dtype=torch.float64), -1)  # (B, H, N, N)


# ---------------------------------------------------------------------------------------------- head distance


def _distance_loop(attn: torch.Tensor, gh: int, gw: int, ph: int, pw: int) -> list[float]:
    """Per-head mean distance by explicit loops: drop prefix, renormalise each query row, average."""
    B, H, N, _ = attn.shape
    prefix = N - gh * gw
    out = []
    for h in range(H):
        total = 0.0
        for b in range(B):
            for qi in range(gh * gw):
                row = [float(attn[b, h, prefix + qi, prefix + ki]) for ki in range(gh * gw)]
                z = sum(row)
                qr, qc = divmod(qi, gw)
                for ki, a in enumerate(row):
                    kr, kc = divmod(ki, gw)
                    total += a / z * math.hypot((qr - kr) * ph, (qc - kc) * pw)
        out.append(total / (B * gh * gw))
    return out


def test_head_distance_self_attention_is_zero():
    attn = torch.eye(5).expand(2, 3, 5, 5).clone()  # (B, H, N, N): CLS + 2x2 patches, each attends to itself
    attn[:, :, 0] = 0.2  # the CLS query row is ignored
    torch.testing.assert_close(average_head_distance(attn, 2, 16), torch.zeros(3))


def test_head_distance_uniform_2x2_closed_form():
    ph, pw = 16, 8
    attn = torch.full((1, 2, 5, 5), 0.2)  # uniform over CLS + 4 patches; renormalised over patches -> 1/4 each
    # every query sees the 4 patches at distances 0, ph, pw, sqrt(ph^2 + pw^2)
    expected = (ph + pw + math.hypot(ph, pw)) / 4
    torch.testing.assert_close(average_head_distance(attn, (2, 2), (ph, pw)), torch.full((2,), expected))


def test_head_distance_attending_cls_only_ignored_by_renormalisation():
    attn = torch.zeros(1, 1, 5, 5)
    attn[..., 0] = 0.9  # mostly CLS
    attn[..., 1:, 4] = 0.1  # remaining mass on the bottom-right patch (row 1, col 1)
    # queries (0,0), (0,1), (1,0), (1,1) -> distances sqrt(2)p, p, p, 0 with p = 10
    expected = (math.sqrt(2) * 10 + 10 + 10 + 0) / 4
    torch.testing.assert_close(average_head_distance(attn, 2, 10), torch.tensor([expected]))


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_head_distance_random_vs_loop(prefix):
    gh, gw, ph, pw = 2, 3, 4, 8
    attn = _random_attn(2, 3, prefix + gh * gw, seed=prefix).float()
    got = average_head_distance(attn, (gh, gw), (ph, pw))
    torch.testing.assert_close(got, torch.tensor(_distance_loop(attn, gh, gw, ph, pw), dtype=torch.float32))


def test_patch_order_matches_timm_row_major():
    """The patch at grid (row r, col c) is token r * gw + c in timm's patch embedding (distance convention)."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=(16, 24), patch_size=8, num_classes=0)
    pe = model.patch_embed
    with torch.no_grad():
        pe.proj.bias.zero_()
        img = torch.zeros(1, 3, 16, 24)
        img[..., 8:16, 8:16] = 1.0  # row 1, col 1 of a 2x3 grid
        tokens = pe(img)[0]  # (P, D)
    assert tokens.abs().sum(-1).nonzero().flatten().tolist() == [1 * 3 + 1]


# ---------------------------------------------------------------------------------------------- NMI


def _nmi_loop(attn: torch.Tensor) -> list[float]:
    """Per-head NMI by explicit loops over one image at a time, then averaged over images."""
    B, H, N, _ = attn.shape
    out = []
    for h in range(H):
        acc = 0.0
        for b in range(B):
            a = attn[b, h].tolist()
            p_k = [sum(a[q][k] for q in range(N)) / N for k in range(N)]
            mi = sum(a[q][k] / N * math.log((a[q][k] / N) / (p_k[k] / N))
                     for q in range(N) for k in range(N) if a[q][k] > 0)
            h_k = -sum(p * math.log(p) for p in p_k if p > 0)
            acc += mi / math.sqrt(math.log(N) * h_k)
        out.append(acc / B)
    return out


def test_nmi_identity_is_one():
    torch.testing.assert_close(attention_nmi(torch.eye(7).expand(2, 3, 7, 7)), torch.ones(3))


def test_nmi_permutation_hard_attention_is_one():
    attn = torch.eye(6)[torch.tensor([3, 0, 5, 1, 2, 4])].expand(1, 2, 6, 6)  # distinct one-hot rows
    torch.testing.assert_close(attention_nmi(attn), torch.ones(2))


def test_nmi_uniform_is_zero():
    torch.testing.assert_close(attention_nmi(torch.full((2, 3, 9, 9), 1 / 9)), torch.zeros(3))


def test_nmi_collapse_to_one_key_is_zero_not_nan():
    attn = torch.zeros(1, 1, 5, 5)
    attn[..., 2] = 1.0  # every query attends only to token 2: H(k) = 0
    assert attention_nmi(attn).tolist() == [0.0]


@pytest.mark.parametrize("sharpness", [0.5, 3.0, 20.0])
def test_nmi_random_vs_loop(sharpness):
    attn = _random_attn(2, 3, 6, seed=7, sharpness=sharpness)
    got = attention_nmi(attn.float())
    torch.testing.assert_close(got, torch.tensor(_nmi_loop(attn), dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert ((got > 0) & (got < 1)).all()


def test_nmi_is_per_image_then_averaged():
    a, b = torch.eye(4).view(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.25)
    torch.testing.assert_close(nmi_per_image(torch.cat([a, b])), torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(attention_nmi(torch.cat([a, b])), torch.tensor([0.5]))


# ---------------------------------------------------------------------------------------------- attention maps


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                              num_classes=0, qk_norm=True, reg_tokens=2).eval()
    with torch.no_grad():  # non-trivial embeddings, biases and q/k norms
        model.pos_embed.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
        model.reg_token.normal_(0, 0.5)
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0, 0.3)
            blk.attn.qkv.bias.normal_(0, 0.2)
            for norm in (blk.attn.q_norm, blk.attn.k_norm, blk.norm1):
                norm.weight.normal_(1, 0.3)
                norm.bias.normal_(0, 0.2)
    return model


def _by_hand(model, images):
    """Per block: softmax(q k^T / sqrt(d)) from the block weights, and the attention output attn @ v -> proj."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))  # (B, N, D)
    maps, refs = [], []
    for blk in model.blocks:
        a = blk.attn
        h = blk.norm1(x)
        B, N, D = h.shape
        qkv = F.linear(h, a.qkv.weight, a.qkv.bias).view(B, N, 3, a.num_heads, D // a.num_heads)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, H, N, d)
        q = F.layer_norm(q, (q.shape[-1],), a.q_norm.weight, a.q_norm.bias, a.q_norm.eps)
        k = F.layer_norm(k, (k.shape[-1],), a.k_norm.weight, a.k_norm.bias, a.k_norm.eps)
        maps.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1))  # (B, H, N, N)
        refs.append(a(h))  # the block's own (fused) attention output (B, N, D)
        x = blk(x)
    return maps, refs


def _output_from_map(blk, h, attn):
    a = blk.attn
    B, N, D = h.shape
    v = F.linear(h, a.qkv.weight, a.qkv.bias).view(B, N, 3, a.num_heads, D // a.num_heads)[:, :, 2].transpose(1, 2)
    return a.proj(a.norm((attn @ v).transpose(1, 2).reshape(B, N, D)))  # (B, N, D)


def test_attention_maps_match_hand_computation_and_block_output(vit):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, refs = _by_hand(vit, images)
        maps = attention_maps(vit, images)
        assert [m.shape for m in maps] == [(2, 2, 3 + 16, 3 + 16)] * 3  # CLS + 2 registers + 4x4 patches
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for blk, attn, want, ref in zip(vit.blocks, maps, expected, refs, strict=True):
            torch.testing.assert_close(attn, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(_output_from_map(blk, blk.norm1(x), attn), ref, rtol=1e-4, atol=1e-5)
            x = blk(x)


def test_attention_maps_block_subset_order_and_cleanup(vit):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    vit.train()
    try:
        full = attention_maps(vit, images)
        subset = attention_maps(vit, images, blocks=[-1, 0, 2])
        assert vit.training  # mode restored
    finally:
        vit.eval()
    assert all(not blk.attn.qkv._forward_hooks for blk in vit.blocks)  # hooks removed
    for got, i in zip(subset, [2, 0, 2], strict=True):
        torch.testing.assert_close(got, full[i])
    with pytest.raises(IndexError, match="block 3 out of range"):
        attention_maps(vit, images, blocks=[3])


def test_analyse_streams_chunks_consistently(vit):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    result = analyse(vit, images, batch_size=2)
    assert (result["num_images"], result["grid_size"], result["patch_size"]) == (5, [4, 4], [8, 8])
    assert (result["num_prefix_tokens"], result["num_heads"]) == (3, 2)
    maps = attention_maps(vit, images)
    assert [b["block"] for b in result["blocks"]] == [0, 1, 2]
    for b, attn in zip(result["blocks"], maps, strict=True):
        dist, nmi = average_head_distance(attn, 4, 8), attention_nmi(attn)
        assert b["head_distance_per_head"] == pytest.approx(dist.tolist(), rel=1e-5)
        assert b["nmi_per_head"] == pytest.approx(nmi.tolist(), rel=1e-5)
        assert b["head_distance"] == pytest.approx(dist.mean().item(), rel=1e-5)
        assert b["nmi"] == pytest.approx(nmi.mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- images + CLI


def _transform(size, mean, std):
    """timm's eval transform without the crop margin: resize to cover ``size``, centre crop, normalise."""
    from timm.data import create_transform

    return create_transform(input_size=(3, *size), crop_pct=1.0, interpolation="bicubic", mean=mean, std=std)


def test_load_image_resize_center_crop_normalise(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (48, 16))  # three 16x16 vertical bands: red, green, blue
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        img.paste(colour, (16 * i, 0, 16 * (i + 1), 16))
    img.save(tmp_path / "bands.png")
    x = load_image(tmp_path / "bands.png", _transform((16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))
    assert x.shape == (3, 16, 16)  # shorter side already 16: no resize, centre crop keeps the green band
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([-2.0, 1.0, -0.5]))
    Image.new("RGB", (40, 30), (51, 102, 204)).save(tmp_path / "flat.jpg", quality=100)
    y = load_image(tmp_path / "flat.jpg", _transform((8, 12), mean=(0, 0, 0), std=(1, 1, 1)))
    assert y.shape == (3, 8, 12)
    torch.testing.assert_close(y.mean((1, 2)), torch.tensor([0.2, 0.4, 0.8]), atol=0.01, rtol=0)


def test_cli_timm_name_synthetic(tmp_path, capsys):
    out = tmp_path / "analysis.json"
    assert main(["test_vit", "--images", "synthetic", "--num-images", "3", "--batch-size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "test_vit" and result["num_images"] == 3 and len(result["blocks"]) == 6
    for b in result["blocks"]:
        assert len(b["head_distance_per_head"]) == len(b["nmi_per_head"]) == result["num_heads"]
        assert 0 < b["head_distance"] < 160 * math.sqrt(2) and 0 <= b["nmi"] <= 1
    assert "block  5" in capsys.readouterr().out


def test_cli_export_dir_with_image_folder_and_plot(tmp_path, vit):
    from PIL import Image
    from timm.models import save_for_hf

    export = tmp_path / "export"
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0, qk_norm=True,
                  reg_tokens=2)
    save_for_hf(vit, str(export), model_config={"model_args": kwargs}, safe_serialization=True)
    (export / "export.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "kwargs": kwargs,
                                                    "weights": "model.safetensors", "mean": [0.5] * 3,
                                                    "std": [0.5] * 3}))
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(4)
    for i in range(3):
        pixels = (torch.rand(40 + 8 * i, 36, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "imgs" / ("sub" if i else ".") / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    assert main([str(export), "--images", str(tmp_path / "imgs"), "--num-images", "8", "--out", str(out),
                 "--plot", str(png), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = [tmp_path / "imgs" / "0.png", tmp_path / "imgs" / "sub" / "1.png", tmp_path / "imgs" / "sub" / "2.png"]
    transform = eval_transform(load_model(str(export)))  # timm's, from the export's pretrained_cfg (mean/std 0.5)
    assert transform.transforms[-1].mean.tolist() == [0.5] * 3
    images = torch.stack([load_image(f, transform) for f in files])
    direct = analyse(vit, images)  # same weights as the export, same images
    assert result["num_images"] == 3
    for got, want in zip(result["blocks"], direct["blocks"], strict=True):
        assert got["nmi_per_head"] == pytest.approx(want["nmi_per_head"], rel=1e-5)
        assert got["head_distance_per_head"] == pytest.approx(want["head_distance_per_head"], rel=1e-5)


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["test_vit", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")]) == 2
    assert "neither an export directory" in capsys.readouterr().err
    assert main(["no_such_timm_model", "--out", str(tmp_path / "x.json")]) == 2
    assert "no_such_timm_model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# teachers: attention maps through the Backbone adapters


def test_backbone_maps_of_a_timm_teacher_equal_the_hooked_forward_maps():
    from hybrid_distill.analysis import iter_attention_maps, iter_backbone_attention_maps, summarise
    from hybrid_distill.model.backbones import TimmBackbone

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                              num_classes=0).eval()
    x = torch.randn(3, 3, 32, 32)
    hooked = dict(iter_attention_maps(model, x))
    adapted = dict(iter_backbone_attention_maps(TimmBackbone(model), x, blocks=[0, 2]))
    assert sorted(adapted) == [0, 2]
    for i, attn in adapted.items():
        torch.testing.assert_close(attn, hooked[i], rtol=1e-5, atol=1e-6)
    one = summarise([iter_backbone_attention_maps(TimmBackbone(model), x)], 3, (32, 32), 8)
    ref = analyse(model, x, batch_size=2)  # summarise of the adapter's maps = analyse
    assert {k: v for k, v in one.items() if k != "blocks"} == {k: v for k, v in ref.items() if k != "blocks"}
    for a, b in zip(one["blocks"], ref["blocks"], strict=True):
        assert a["block"] == b["block"] and a["nmi_per_head"] == pytest.approx(b["nmi_per_head"], rel=1e-5)
        assert a["head_distance_per_head"] == pytest.approx(b["head_distance_per_head"], rel=1e-6)


def test_backbone_maps_of_an_open_clip_tower_equal_its_own_attention_weights():
    import open_clip

    from hybrid_distill.analysis import iter_backbone_attention_maps
    from hybrid_distill.model.backbones import OpenClipBackbone

    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1, "layers": 1}}
    visual = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).visual.eval()
    backbone = OpenClipBackbone(visual)
    x = torch.randn(2, 3, 32, 32)
    maps = dict(iter_backbone_attention_maps(backbone, x))
    with torch.no_grad():
        h = backbone.embed(x)
        for i, block in enumerate(backbone.blocks):
            y = block.ln_1(h)
            _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)  # (B, H, N, N)
            torch.testing.assert_close(maps[i], weights, rtol=1e-4, atol=1e-6)
            h = block(h)
