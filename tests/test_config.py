import pytest

from kvlib import project_root
from kvlib.config import ModelShape, TokenizerConfig, TrainConfig, check_study, from_dict, parse_yaml
from kvlib.distill import FusionConfig, GroupConfig, KVConfig


def test_from_dict_builds_and_rejects_unknown_keys():
    assert from_dict(TrainConfig, {"steps": 5}).steps == 5
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['stpes'\]; valid keys: \['steps'"):
        from_dict(TrainConfig, {"stpes": 5})


def test_group_config_parses_nested_sections():
    g = GroupConfig.from_params({"teachers": ["A", "B"], "kv": {"weight": 0.1}, "fusion": {"kind": "router"}})
    assert g.kv == KVConfig(weight=0.1) and g.fusion == FusionConfig(kind="router")
    assert GroupConfig.from_params({"teachers": []}).kv is None


def test_model_shape_rejects_unknown_family():
    with pytest.raises(ValueError, match="family must be one of"):
        ModelShape("bert", 2, 4, 2, 8, 32)


def test_model_shape_rejects_empty_sizes():
    with pytest.raises(ValueError, match="num_layers must be > 0, got 0"):
        ModelShape("llama", 0, 4, 2, 8, 32)


def test_train_config_rejects_negative_warmup():
    with pytest.raises(ValueError, match="warmup_steps=-1, share_every=0, eval_every=0 and weight_decay=0.01 must be"):
        TrainConfig(warmup_steps=-1, share_every=0)


def test_kv_config_rejects_unknown_time_alignment():
    with pytest.raises(ValueError, match="time_align must be one of"):
        KVConfig(time_align="dtw")


def test_kv_config_rejects_negative_weights():
    with pytest.raises(ValueError, match="weights must be >= 0, got weight=-1"):
        KVConfig(weight=-1)


def test_tokenizer_config_rejects_unknown_kind():
    with pytest.raises(ValueError, match="tokenizer kind must be one of"):
        TokenizerConfig(kind="wordpiece")


def test_fusion_config_rejects_zero_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        FusionConfig(temperature=0)


def test_group_with_teachers_needs_kv_settings():
    with pytest.raises(ValueError, match=r"a group with teachers \['A'\] needs kv settings"):
        GroupConfig(teachers=["A"])


def test_group_with_several_teachers_needs_fusion():
    with pytest.raises(ValueError, match=r"teachers \['A', 'B'\] needs fusion settings"):
        GroupConfig(teachers=["A", "B"], kv=KVConfig())


def test_group_rejects_a_teacher_listed_twice():
    with pytest.raises(ValueError, match=r"teachers \['A', 'A'\] are listed twice"):
        GroupConfig(teachers=["A", "A"], kv=KVConfig(), fusion=FusionConfig())


def test_a_study_name_with_a_dot_is_refused_as_dvc_reads_it_as_nesting():
    """``S-w0.1`` renamed so everywhere in the default params: only the name's '.' is wrong with them."""
    text = (project_root() / "params" / "default.yaml").read_text(encoding="utf-8")
    assert "S-w0p1" in text
    dotted = parse_yaml(text.replace("S-w0p1", "S-w0.1"), "default.yaml with S-w0.1")
    check_study(parse_yaml(text, "default.yaml"))
    with pytest.raises(ValueError, match=r"study names \['S-w0.1'\] .* DVC params paths .* \(S-w0p1, not S-w0.1\)"):
        check_study(dotted)
