import pytest

from core.config import (
    ConfigError,
    PlatformConfig,
    flatten,
    load_platform_config,
    parse_overrides,
)


def test_defaults_are_the_tiny_embedded_setting():
    cfg = load_platform_config()
    assert cfg.weights.preset == "tiny"
    assert cfg.ray.address == "local"
    assert cfg.tracking.tracking_uri.startswith("sqlite:///")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  crop_size: 128\ntrain:\n  lr: 0.001\n")
    cfg = load_platform_config(path, ["ingest.crop_size=256", "reader.abstraction=mean"])
    assert cfg.ingest.crop_size == 256
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.reader.abstraction == "mean"


def test_sd15_config_loads():
    from core.paths import CONFIG_DIR

    cfg = load_platform_config(CONFIG_DIR / "sd15.yaml")
    assert cfg.weights.preset == "sd15" and cfg.ingest.crop_size == 512
    assert cfg.model.audio_layers == 12 and cfg.model.audio_dim == 768


def test_unknown_key_names_the_path():
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_platform_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="nosuchsection"):
        load_platform_config(None, ["nosuchsection.x=1"])


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="ingest.crop_size"):
        load_platform_config(None, ["ingest.crop_size=big"])
    with pytest.raises(ConfigError, match="reader.abstraction"):
        load_platform_config(None, ["reader.abstraction=median"])


def test_override_syntax():
    assert parse_overrides(["a.b=[1, 2]", "c=x"]) == {"a": {"b": [1, 2]}, "c": "x"}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_flatten_for_mlflow():
    flat = flatten(PlatformConfig())
    assert flat["reader.clip_frames"] == 12 and "train.lr" in flat


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_platform_config(tmp_path / "nope.yaml")


def test_removed_key_null_is_dropped_and_set_value_names_its_new_place(tmp_path):
    """Packages written before serve.auth_token was removed (null there) still load; a config that
    still sets a token is refused with a message that says where tokens go, without the token."""
    old = tmp_path / "old.yaml"
    old.write_text("serve:\n  auth_token: null\n")
    cfg = load_platform_config(old)
    assert not hasattr(cfg.serve, "auth_token")
    secret = tmp_path / "secret.yaml"
    secret.write_text("serve:\n  auth_token: s3cr3t-value\n")
    with pytest.raises(ConfigError) as err:
        load_platform_config(secret)
    assert "serve.auth_token" in str(err.value) and "LOOPY_SERVE_TOKENS" in str(err.value)
    assert "s3cr3t" not in str(err.value)


def test_retired_key_is_dropped_whatever_its_value(tmp_path):
    """Packages and ingest folders written while ingest.scale_search_s existed (5.0 there) still
    load; a typo beside it is still an error."""
    old = tmp_path / "old.yaml"
    old.write_text("ingest:\n  scale_search_s: 5.0\n  scale_search_frames: 7\n")
    cfg = load_platform_config(old)
    assert cfg.ingest.scale_search_frames == 7 and not hasattr(cfg.ingest, "scale_search_s")
    typo = tmp_path / "typo.yaml"
    typo.write_text("ingest:\n  scale_search_s: 5.0\n  scale_serch_frames: 7\n")
    with pytest.raises(ConfigError, match="ingest.scale_serch_frames"):
        load_platform_config(typo)
