"""Configuration layering: defaults < TOML file < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, parse_listen
from agent.errors import ConfigError


def test_layers_apply_in_order(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[agent]\nlisten = "127.0.0.1:1000"\npool_size = 3\nnode_id = "file"\n[mqtt]\nhost = "broker"\n')
    env = {"EDGE_AGENT_LISTEN": "127.0.0.1:2000", "EDGE_AGENT_NODE_ID": "env", "EDGE_AGENT_MQTT__PORT": "1884"}
    config = Config.load(file=cfg, env=env, overrides={"listen": "127.0.0.1:3000", "pool_size": None})
    assert config.listen == "127.0.0.1:3000"  # flag beats env and file
    assert config.node_id == "env"  # env beats file
    assert config.pool_size == 3  # file beats default; a flag left unset changes nothing
    assert config.section("mqtt") == {"host": "broker", "port": "1884"}


def test_config_file_named_by_environment(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('state_dir = "/srv/edge"\n')
    config = Config.load(env={"EDGE_AGENT_CONFIG": str(cfg)})
    assert config.state_dir == Path("/srv/edge")


def test_env_values_are_typed():
    config = Config.load(
        env={"EDGE_AGENT_POOL_SIZE": "5", "EDGE_AGENT_SEED_BUNDLED": "no", "EDGE_AGENT_DRAIN_TIMEOUT_S": "2.5"}
    )
    assert (config.pool_size, config.seed_bundled, config.drain_timeout_s) == (5, False, 2.5)


def test_compile_cache_follows_systemd_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from agent.daemon import Agent

    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    config = Config.load(env={}, overrides={"state_dir": tmp_path / "state"})
    assert config.compile_cache_dir is None
    assert Agent(config).runtime.cache_dir == tmp_path / "state" / "compiled"
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    config = Config.load(env={}, overrides={"state_dir": tmp_path / "state"})
    assert Agent(config).runtime.cache_dir == tmp_path / "cache" / "compiled"
    assert Config.load(env={"EDGE_AGENT_COMPILE_CACHE_DIR": ""}).compile_cache_dir is None


def test_systemd_state_directory_is_the_default():
    assert Config.load(env={}).state_dir  # some default always exists
    import os

    old = os.environ.get("STATE_DIRECTORY")
    os.environ["STATE_DIRECTORY"] = "/var/lib/edge-agent-test"
    try:
        assert Config.load(env={}).state_dir == Path("/var/lib/edge-agent-test")
    finally:
        if old is None:
            del os.environ["STATE_DIRECTORY"]
        else:
            os.environ["STATE_DIRECTORY"] = old


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGE_AGENT_POOL_SIZE": "many"}, "pool_size: cannot use 'many'"),
        ({"EDGE_AGENT_POOL_SIZE": "0"}, "pool_size must be at least 1"),
        ({"EDGE_AGENT_LISTEN": "nowhere"}, "listen must be HOST:PORT"),
        ({"EDGE_AGENT_LOG_FORMAT": "xml"}, "log_format"),
        ({"EDGE_AGENT_GRPC_LISTEN": "nowhere"}, "grpc_listen must be HOST:PORT, or off"),
        ({"EDGE_AGENT_GRPC_TLS_CERT": "/c.pem"}, "grpc_tls_cert and grpc_tls_key go together"),
        ({"EDGE_AGENT_GRPC_MAX_CONCURRENT_RPCS": "0"}, "grpc_max_concurrent_rpcs must be at least 1"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(env: dict[str, str], message: str):
    with pytest.raises(ConfigError, match=message):
        Config.load(env=env)


def test_unknown_setting_and_bad_toml_are_refused(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[agent]\nlisten_port = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*listen_port"):
        Config.load(file=cfg, env={})
    cfg.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(file=cfg, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(file=tmp_path / "missing.toml", env={})


def test_parse_listen():
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen(":9") == ("0.0.0.0", 9)


def test_grpc_listen_layers_and_off(tmp_path: Path):
    assert Config.load(env={}).grpc_host_port == ("127.0.0.1", 8081)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[agent]\ngrpc_listen = "0.0.0.0:9001"\n')
    assert Config.load(file=cfg, env={}).grpc_host_port == ("0.0.0.0", 9001)
    env = {"EDGE_AGENT_GRPC_LISTEN": "[::1]:9002"}
    assert Config.load(file=cfg, env=env).grpc_host_port == ("::1", 9002)
    assert Config.load(file=cfg, env=env, overrides={"grpc_listen": "127.0.0.1:9003"}).grpc_host_port == (
        "127.0.0.1",
        9003,
    )
    for off in ("off", "OFF", ""):
        assert Config.load(env={"EDGE_AGENT_GRPC_LISTEN": off}).grpc_host_port is None
