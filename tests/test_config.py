"""Config tree: presets validate, dotted overrides are typed, bad keys/values/combinations fail naming the key."""

from __future__ import annotations

import dataclasses

import pytest

from hybrid_distill.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    save_config,
    to_dict,
    validate,
)
from hybrid_distill.config.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = PRESETS[name]()
    assert isinstance(cfg, Config)
    assert validate(cfg) is cfg
    assert load_config(preset=name) == cfg


def test_presets_return_fresh_objects():
    a, b = get_preset("tiny"), get_preset("tiny")
    a.optim.base_lr = 123.0
    assert b.optim.base_lr != 123.0


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ConfigError) as e:
        get_preset("vit_huge_nonexistent")
    for name in PRESETS:
        assert name in str(e.value)


def test_vitl_preset_is_the_papers_recipe():
    cfg = get_preset("vitl_in21k_clip_mae")
    assert cfg.student.model == "vit_large_patch16_224" and cfg.student.img_size == 224
    assert cfg.mim_teacher.model.startswith("vit_large_patch16_224.mae")
    assert cfg.feature_teacher.library == "open_clip" and cfg.feature_teacher.model == "ViT-L-14"
    assert cfg.optim.base_lr == 6e-4 and cfg.optim.weight_decay == 0.05 and cfg.optim.global_batch_size == 1024
    assert cfg.loss.alpha == 1.0 and cfg.masking.drop_ratio == 0.3 and cfg.run.epochs == 40


def test_defaults_match_the_design():
    cfg = Config()
    assert (cfg.loss.alpha, cfg.loss.feature_beta, cfg.loss.relation_beta) == (1.0, 2.0, 1.0)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.clip_grad == 3.0 and cfg.student.drop_path_rate == 0.0
    assert cfg.masking.teacher_prunes is False and cfg.loss.head_reduce == "none"


def test_student_normalisation_defaults_are_timms_imagenet_constants():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = Config()
    assert cfg.student.mean == IMAGENET_DEFAULT_MEAN and cfg.student.std == IMAGENET_DEFAULT_STD


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.base_lr=3e-2", "optim.base_lr", 3e-2),  # 3e-4 would put tiny's peak lr below its min_lr
        ("optim.base_lr=1", "optim.base_lr", 1.0),
        ("run.max_steps=10", "run.max_steps", 10),
        ("run.max_steps=none", "run.max_steps", None),
        ("run.max_steps=null", "run.max_steps", None),
        ("data.hflip=false", "data.hflip", False),
        ("data.hflip=true", "data.hflip", True),
        ("optim.betas=0.9,0.99", "optim.betas", (0.9, 0.99)),
        ("optim.betas=[0.8, 0.9]", "optim.betas", (0.8, 0.9)),
        ("masking.layers=[0,4,8]", "masking.layers", [0, 4, 8]),
        ("masking.layers=1,2", "masking.layers", [1, 2]),
        ("mim_teacher.mean=0.5,0.5,0.5", "mim_teacher.mean", (0.5, 0.5, 0.5)),
        ("feature_teacher.img_size=196", "feature_teacher.img_size", 196),
        ("loss.head_reduce=mean", "loss.head_reduce", "mean"),
        ("masking.teacher_prunes=1", "masking.teacher_prunes", True),
    ],
)
def test_overrides_are_converted_to_the_field_type(override, key, expected):
    cfg = load_config(preset="tiny", overrides=[override])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, (list, tuple)):
        assert all(type(v) is type(e) for v, e in zip(value, expected, strict=True))


def test_a_key_given_twice_is_refused_naming_it():  # last-wins silently dropped the first value
    with pytest.raises(ConfigError, match=r"optim\.base_lr is given 2 times .*optim\.base_lr=1e-3.*give it once"):
        load_config(preset="tiny", overrides=["optim.base_lr=1e-3", "optim.base_lr=2e-3"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("run.max_steps=abc", "run.max_steps"),
        ("run.max_steps=1.5", "run.max_steps"),
        ("optim.base_lr=fast", "optim.base_lr"),
        ("data.hflip=maybe", "data.hflip"),
        ("optim.betas=0.9", "optim.betas"),
        ("optim.betas=0.9,0.95,0.99", "optim.betas"),
        ("data.batch_size=true", "data.batch_size"),
    ],
)
def test_wrong_type_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(preset="tiny", overrides=[override])


@pytest.mark.parametrize("override, named", [("optim.lr_typo=1", "lr_typo"), ("nosection.x=1", "nosection"),
                                             ("optim.base_lr.x=1", "optim.base_lr")])
def test_unknown_keys_are_rejected_naming_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=[override])
    assert named in str(e.value)


def test_unknown_field_error_lists_the_valid_fields():
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=["optim.lr_typo=1"])
    assert "base_lr" in str(e.value) and "weight_decay" in str(e.value)


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="optim.base_lr"):
        load_config(preset="tiny", overrides=["optim.base_lr"])


@pytest.mark.parametrize(
    "override, key, choices",
    [
        ("loss.head_reduce=max", "loss.head_reduce", ["none", "mean"]),
        ("mim_teacher.library=hf", "mim_teacher.library", ["timm", "open_clip"]),
        ("feature_teacher.grid_align=crop", "feature_teacher.grid_align", ["resize", "resample"]),
        ("run.teacher_dtype=int8", "run.teacher_dtype", ["bfloat16", "float16", "float32"]),
        ("loss.relation_impl=cuda", "loss.relation_impl", ["auto", "torch", "triton"]),
        ("loss.relation_scale=sqrt", "loss.relation_scale", ["sqrt_d", "none"]),
    ],
)
def test_bad_choice_names_the_key_and_the_valid_choices(override, key, choices):
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=[override])
    message = str(e.value)
    assert key in message
    for choice in choices:
        assert choice in message


EVAL = ["eval.train_source=folder:/data/train", "eval.val_source=folder:/data/val"]


def test_eval_section_is_off_by_default_and_parses_its_lists():
    assert load_config(preset="tiny").eval.train_source is None
    cfg = load_config(preset="tiny", overrides=[*EVAL, "eval.protocols=knn", "eval.pools=[avg]", "eval.every=50",
                                                "eval.val_samples=null"])
    assert (cfg.eval.protocols, cfg.eval.pools, cfg.eval.every, cfg.eval.val_samples) == (["knn"], ["avg"], 50, None)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.batch_size=8", "optim.global_batch_size=12"], "optim.global_batch_size"),
        (["data.batch_size=16", "optim.global_batch_size=8"], "optim.global_batch_size"),
        (["masking.drop_ratio=1.0"], "masking.drop_ratio"),
        (["masking.drop_ratio=-0.1"], "masking.drop_ratio"),
        (["data.crop_scale=0.8,0.2"], "data.crop_scale"),
        (["loss.alpha=-1"], "loss.alpha"),
        (["data.source=s3://bucket"], "data.source"),
        (["mim_teacher.grid_align=resample"], "mim_teacher.grid_align"),  # keep_idx lives on the MIM grid
        # open_clip would silently build random weights: weights=pretrained needs the tag to download
        (["feature_teacher.library=open_clip", "feature_teacher.model=ViT-B-16", "feature_teacher.weights=pretrained"],
         "feature_teacher.pretrained_tag"),
        (["run.log_every=0"], "run.log_every"),  # ZeroDivisionError in the training loop
        (["run.max_nonfinite=0"], "run.max_nonfinite"),
        (["run.max_steps=0"], "run.max_steps"),  # was silently treated as unset
        (["run.max_steps=-3"], "run.max_steps"),
        (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
        (["optim.min_lr=-1e-6"], "optim.min_lr"),
        (["optim.min_lr=0.01"], "optim.min_lr"),  # above tiny's peak lr 1.5e-3
        (["optim.base_lr=1e-6"], "optim.min_lr"),  # scaled peak 1.6e-8 falls below min_lr 1e-5
        (["optim.lr=1e-4", "optim.min_lr=2e-4"], "optim.min_lr"),  # above an explicit lr
        (["optim.base_lr=0"], "optim.base_lr"),
        (["optim.lr=-1e-4"], "optim.lr"),
        (["optim.weight_decay=-0.05"], "optim.weight_decay"),
        (["optim.betas=0.9,1.0"], "optim.betas"),
        (["optim.eps=0"], "optim.eps"),
        (["optim.clip_grad=-1"], "optim.clip_grad"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["data.synthetic_size=0"], "data.synthetic_size"),
        (["data.num_samples=0"], "data.num_samples"),
        (["data.shuffle_buffer=-1"], "data.shuffle_buffer"),
        (["eval.train_source=synthetic"], "eval.train_source/val_source"),  # one without the other
        (EVAL + ["eval.val_source=s3://x"], "eval.val_source"),
        (EVAL + ["eval.protocols=knn,svm"], "eval.protocols"),
        (EVAL + ["eval.pools=cls,max"], "eval.pools"),
        (EVAL + ["eval.every=0"], "eval.every"),
        (EVAL + ["eval.train_samples=0"], "eval.train_samples"),
        (EVAL + ["eval.knn_k=0"], "eval.knn_k"),
        (EVAL + ["eval.knn_temperature=0"], "eval.knn_temperature"),
        (EVAL + ["eval.linear_weight_decay=0"], "eval.linear_weight_decay"),
        (EVAL + ["eval.crop_pct=1.5"], "eval.crop_pct"),
    ],
)
def test_invalid_combinations_are_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(preset="tiny", overrides=overrides)


def test_range_limits_themselves_are_accepted():
    cfg = load_config(preset="tiny", overrides=["run.log_every=1", "run.max_nonfinite=1", "run.max_steps=1",
                                                "optim.warmup_epochs=0", "optim.lr=1e-4", "optim.min_lr=1e-4",
                                                "data.num_workers=0", "optim.clip_grad=0", "data.shuffle_buffer=0"])
    assert cfg.run.max_steps == 1 and cfg.optim.min_lr == cfg.optim.lr == 1e-4
    assert load_config(preset="tiny", overrides=["optim.min_lr=0"]).optim.min_lr == 0.0


def test_min_lr_error_shows_the_peak_lr_and_where_it_comes_from():
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=["optim.min_lr=0.01"])
    assert "[0, 0.0015]" in str(e.value) and "optim.base_lr x optim.global_batch_size / 1024" in str(e.value)


def test_peak_lr_has_one_definition():
    from hybrid_distill import config
    from hybrid_distill.runtime import engine

    assert engine.peak_lr is config.peak_lr


def test_global_batch_multiple_of_micro_batch_is_accepted():
    cfg = load_config(preset="tiny", overrides=["data.batch_size=4", "optim.global_batch_size=12"])
    assert cfg.optim.global_batch_size == 12


def test_yaml_file_with_preset_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "preset: tiny\n"
        "optim:\n  base_lr: 1e-3\n  betas: [0.8, 0.9]\n"  # PyYAML reads 1e-3 as a string: must still be a float
        "masking:\n  layers: [0, 2, 4]\n  drop_ratio: 0.5\n"
        "run:\n  max_steps: 7\n"
    )
    cfg = load_config(preset=None, config_file=path)
    tiny = get_preset("tiny")
    assert cfg.student == tiny.student and cfg.mim_teacher == tiny.mim_teacher  # came from the preset
    assert cfg.optim.base_lr == 1e-3 and type(cfg.optim.base_lr) is float
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.masking.layers == [0, 2, 4] and cfg.masking.drop_ratio == 0.5
    assert cfg.run.max_steps == 7 and type(cfg.run.max_steps) is int


def test_yaml_preset_is_used_and_cli_overrides_the_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: vitb_in1k_deit_mae\noptim:\n  base_lr: 0.001\n")
    cfg = load_config(preset=None, config_file=path, overrides=["optim.base_lr=0.002"], fallback_preset="tiny")
    assert cfg.student == get_preset("vitb_in1k_deit_mae").student
    assert cfg.optim.base_lr == 0.002
    assert load_config(preset="vitb_in1k_deit_mae", config_file=path).student == cfg.student  # the same: fine
    with pytest.raises(ConfigError, match="--preset tiny contradicts 'preset: vitb_in1k_deit_mae'"):
        load_config(preset="tiny", config_file=path)  # the YAML's silently won


@pytest.mark.parametrize("text, named", [("optim:\n  lr_typo: 1\n", "lr_typo"), ("bogus:\n  x: 1\n", "bogus"),
                                         ("run:\n  max_steps: abc\n", "run.max_steps")])
def test_yaml_with_unknown_key_or_wrong_type_is_rejected(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", config_file=path)
    assert named in str(e.value)


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(preset="tiny", config_file=tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_round_trips(name):
    cfg = load_config(preset=name, overrides=["masking.layers=[0,1,2]", "mim_teacher.mean=0.1,0.2,0.3"])
    values = to_dict(cfg)
    assert isinstance(values["optim"]["betas"], list)  # plain YAML/JSON types
    back = config_from_dict(values)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert type(back.optim.betas) is tuple and type(back.mim_teacher.mean) is tuple


def test_saved_yaml_reloads_to_the_same_config(tmp_path):
    cfg = load_config(preset="tiny", overrides=["run.max_steps=3", "data.hflip=false"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(preset=None, config_file=path) == cfg
