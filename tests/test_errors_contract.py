"""The error contract: every error class's HTTP status, CLI exit code and MQTT wire code."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent
import agent.cli
import agent.errors
from agent.errors import AgentError, ConfigError, NotFound
from agent.mqtt.dispatch import error_code_of

# THIS IS THE PROTOCOL. Class -> (HTTP status, CLI exit code, MQTT error.code), as the
# agent answered before the codes were declared explicitly (the wire codes were then
# derived from class names; TooLarge was _TooLarge, hence its code). Fleet tools, scripts
# and systemd units act on these numbers and strings: changing one is a protocol change
# and needs a migration note (docs/MQTT.md, the changelog), not just an edit here.
CONTRACT: dict[str, tuple[int, int, str]] = {
    "AgentError": (500, 1, "agent_error"),
    "BadRequest": (400, 1, "bad_request"),
    "InvalidValue": (400, 1, "invalid_value"),
    "NotFound": (404, 1, "not_found"),
    "Unavailable": (503, 1, "unavailable"),
    "Forbidden": (403, 1, "forbidden"),
    "ModelError": (500, 1, "model_error"),
    "InferenceTimeout": (504, 1, "inference_timeout"),
    "DeadlineOverrun": (504, 1, "deadline_overrun"),
    "InvalidModel": (400, 1, "invalid_model"),
    "ConversionRefused": (400, 65, "conversion_refused"),
    "CorruptBlob": (500, 1, "corrupt_blob"),
    "ConfigError": (500, 78, "config_error"),
    "GpuUnavailable": (503, 69, "gpu_unavailable"),
    "GpuBusy": (503, 75, "gpu_busy"),
    "StateDirError": (500, 73, "state_dir_error"),
    "ListenError": (500, 71, "listen_error"),
    "TokenFileError": (500, 73, "token_file_error"),
    "ClientError": (500, 1, "client_error"),
    "ImageError": (500, 1, "image_error"),
    "BadReference": (400, 2, "bad_reference"),
    "ImageRefused": (422, 65, "image_refused"),
    "SignatureError": (422, 65, "signature_error"),
    "RegistryError": (502, 69, "registry_error"),
    "RegistryUnreachable": (502, 75, "registry_unreachable"),
    "AuthError": (401, 69, "auth_error"),
    "NotInRegistry": (404, 69, "not_in_registry"),
    "TooLarge": (502, 69, "__too_large"),
    "LayoutError": (400, 65, "layout_error"),
    "KeyFileError": (500, 65, "key_file_error"),
}

CODES = ("http_status", "exit_code", "wire_code")


def _error_classes() -> list[type[AgentError]]:
    """Every AgentError subclass the agent package defines, wherever it is defined."""
    for mod in pkgutil.walk_packages(agent.__path__, "agent."):
        if not mod.name.endswith("__main__"):  # runs the CLI when imported
            importlib.import_module(mod.name)

    def walk(cls: type[AgentError]) -> Iterator[type[AgentError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    return [cls for cls in walk(AgentError) if cls.__module__.split(".")[0] == "agent"]


def test_every_error_class_lives_in_agent_errors_and_declares_its_three_codes() -> None:
    for cls in _error_classes():
        assert cls.__module__ == "agent.errors", f"{cls.__module__}.{cls.__qualname__} belongs in agent/errors.py"
        missing = [name for name in CODES if name not in vars(cls)]
        assert not missing, f"{cls.__name__} inherits {missing}: declare them in its own body"


def test_the_table_is_the_protocol() -> None:
    table = {cls.__name__: (cls.http_status, cls.exit_code, cls.wire_code) for cls in _error_classes()}
    assert table == CONTRACT


def test_wire_codes_are_unique() -> None:
    codes = [wire for _, _, wire in CONTRACT.values()]
    assert len(codes) == len(set(codes))


def test_renaming_a_class_does_not_change_its_wire_code() -> None:
    renamed = type("SomethingElseEntirely", (NotFound,), {})
    assert error_code_of(renamed("x")) == "not_found"
    assert error_code_of(agent.errors.InvalidValue("x")) == "invalid_value"


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_the_cli_exits_with_the_errors_code(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = getattr(agent.errors, name)
    if name == "ClientError":
        error = cls("no agent", 69)
        expected = 69  # a ClientError carries the code its verb chose
    elif name == "TooLarge":
        error, expected = cls(10, 5, "manifest"), CONTRACT[name][1]
    else:
        error, expected = cls("x"), CONTRACT[name][1]

    def fail(args: argparse.Namespace) -> int:
        raise error

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=fail)
    monkeypatch.setattr(agent.cli, "build_parser", lambda: parser)
    assert agent.cli.main([]) == expected


def test_a_config_error_is_reported_as_one(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise ConfigError("[lifecycle] has no setting 'nope'")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=fail)
    monkeypatch.setattr(agent.cli, "build_parser", lambda: parser)
    assert agent.cli.main([]) == 78
    assert "configuration error: [lifecycle] has no setting 'nope'" in capsys.readouterr().err


def test_docs_mqtt_error_table_matches_the_contract() -> None:
    text = (Path(__file__).parent.parent / "docs" / "MQTT.md").read_text()
    block = text.split("<!-- error-contract: begin -->")[1].split("<!-- error-contract: end -->")[0]
    documented = {}
    for line in block.splitlines():
        match = re.match(r"\| `([a-z_]+)` \| (\d+) \| (\d+)", line)
        if match:
            documented[match[1]] = (int(match[2]), int(match[3]))
    assert documented == {wire: (http, code) for http, code, wire in CONTRACT.values()}
