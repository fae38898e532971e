"""The OpenAI-compatible API of a language model served by a real agent, checked token for token
against llama-cpp-python called directly on the same GGUF with the same messages and arguments,
and through the official ``openai`` client."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S, AgentThread, http
from llmkit import llm_model_dir

from agent.config import Config
from agent.wiring import attach_lifecycle, attach_llm

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the ggml backend) is not installed")

CTX = 8192
CHATS = [
    [{"role": "user", "content": "tell me a story"}],
    [
        {"role": "system", "content": "you are a small robot"},
        {"role": "user", "content": "what is the capital of france"},
        {"role": "assistant", "content": "paris"},
        {"role": "user", "content": "tell me about the city"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}],
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentThread, Path]]:
    """An agent serving tinychat:1 (a tiny GGUF behind a command app) and the bundled digits model."""
    tmp = tmp_path_factory.mktemp("openai")
    model = llm_model_dir(tmp / "tinychat", ctx_size=CTX)
    small = llm_model_dir(tmp / "smallctx", name="smallctx", ctx_size=200, gguf=model / "model.gguf")

    def setup(agent: Any) -> None:
        for directory, name in ((model, "tinychat"), (small, "smallctx")):
            agent.repository.import_dir(directory)
            agent.db.set_active(name, "1")
        attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
        attach_llm(agent)

    config = Config.load(
        env={},
        overrides={"state_dir": tmp / "state", "listen": "127.0.0.1:0", "grpc_listen": "off", "log_level": "warning"},
    )
    agent = AgentThread(config, setup)
    yield agent, model / "model.gguf"
    agent.stop()


@pytest.fixture(scope="module")
def reference(served: tuple[AgentThread, Path]) -> Iterator[Any]:
    """llama-cpp-python itself, on the same file, with the context the model's config asks for."""
    llama = llama_cpp.Llama(model_path=str(served[1]), n_ctx=CTX, verbose=False)
    yield llama
    llama.close()


def post(agent: AgentThread, path: str, doc: dict[str, Any]) -> tuple[int, Any]:
    return http("POST", agent.url + path, doc)


def sse(agent: AgentThread, path: str, doc: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The events of a streamed answer (parsed), and its raw text (to check the framing)."""
    req = urllib.request.Request(agent.url + path, data=json.dumps({**doc, "stream": True}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]], raw


def chat_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


# -- token for token ---------------------------------------------------------------------------------
@pytest.mark.parametrize("messages", CHATS, ids=["one-turn", "multi-turn", "text-parts"])
@pytest.mark.parametrize("max_tokens", [1, 17, 120])
def test_chat_completion_is_llama_cpp_pythons_token_for_token(served, reference, messages, max_tokens):
    agent, _ = served
    status, body = post(
        agent,
        "/v1/chat/completions",
        {"model": "tinychat", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 7},
    )
    assert status == 200, body
    plain = [
        {**m, "content": "".join(p["text"] for p in m["content"]) if isinstance(m["content"], list) else m["content"]}
        for m in messages
    ]
    want = reference.create_chat_completion(messages=plain, max_tokens=max_tokens, temperature=0, seed=7)
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": want["choices"][0]["message"]["content"]}
    assert choice["finish_reason"] == want["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == want["usage"]
    assert body["object"] == "chat.completion" and body["model"] == "tinychat"
    assert body["id"].startswith("chatcmpl-")


def test_seeded_sampling_is_llama_cpp_pythons_too(served, reference):
    agent, _ = served
    args = {"max_tokens": 40, "temperature": 0.9, "top_p": 0.9, "seed": 1234}
    status, body = post(agent, "/v1/chat/completions", {"model": "tinychat", "messages": CHATS[0], **args})
    assert status == 200, body
    want = reference.create_chat_completion(messages=CHATS[0], **args)
    assert body["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]


def test_streamed_chat_yields_the_same_text(served, reference):
    agent, _ = served
    doc = {"model": "tinychat", "messages": CHATS[1], "max_tokens": 50, "temperature": 0}
    chunks, _ = sse(agent, "/v1/chat/completions", doc)
    want = reference.create_chat_completion(messages=CHATS[1], max_tokens=50, temperature=0)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tinychat" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chat_text(chunks) == want["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 10  # piece by piece, not at once


def test_stop_sequences_end_the_answer_as_llama_cpp_python_ends_it(served, reference):
    agent, _ = served
    full = reference.create_chat_completion(messages=CHATS[0], max_tokens=60, temperature=0)
    text = full["choices"][0]["message"]["content"]
    words = text.split()
    stop_word = next(w for w in words[3:] if text.index(w) > 5)
    for stop in (stop_word, ["zzz-never", stop_word]):
        doc = {"model": "tinychat", "messages": CHATS[0], "max_tokens": 60, "temperature": 0, "stop": stop}
        status, body = post(agent, "/v1/chat/completions", doc)
        assert status == 200, body
        want = reference.create_chat_completion(messages=CHATS[0], max_tokens=60, temperature=0, stop=stop)
        got = body["choices"][0]
        assert got["message"]["content"] == want["choices"][0]["message"]["content"]
        assert got["finish_reason"] == want["choices"][0]["finish_reason"] == "stop"
        assert len(got["message"]["content"]) < len(text) and stop_word not in got["message"]["content"]
        chunks, _ = sse(agent, "/v1/chat/completions", doc)
        assert chat_text(chunks) == got["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_match_and_stream(served, reference):
    agent, _ = served
    doc = {"model": "tinychat", "prompt": "once upon a time", "max_tokens": 25, "temperature": 0}
    status, body = post(agent, "/v1/completions", doc)
    assert status == 200, body
    want = reference.create_completion(prompt="once upon a time", max_tokens=25, temperature=0)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == want["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"] == want["usage"]
    chunks, _ = sse(agent, "/v1/completions", doc)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["choices"][0]["text"]


def test_models_are_listed_and_addressed_by_name_or_version(served):
    agent, _ = served
    status, body = http("GET", agent.url + "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["smallctx", "tinychat"]  # digits is no language model
    assert all(m["object"] == "model" and m["owned_by"] == "edge-agent" for m in body["data"])
    assert http("GET", agent.url + "/v1/models/tinychat:1")[1]["id"] == "tinychat:1"
    doc = {"model": "tinychat:1", "prompt": "hi", "max_tokens": 2}
    assert post(agent, "/v1/completions", doc)[0] == 200
    status, body = post(agent, "/v1/completions", {**doc, "model": "tinychat:9"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


# -- errors in OpenAI's shape ---------------------------------------------------------------------------
def openai_error(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_errors_are_answered_in_openais_shape(served):
    agent, _ = served
    status, body = http("POST", agent.url + "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and openai_error(body)["type"] == "invalid_request_error"
    status, body = post(agent, "/v1/chat/completions", {"model": "tinychat", "messages": [], "max_tokens": 3})
    assert status == 400 and openai_error(body)["param"] == "messages"
    status, body = post(agent, "/v1/chat/completions", {"model": "tinychat", "messages": CHATS[0], "temperature": 9})
    assert status == 400 and openai_error(body)["param"] == "temperature"
    status, body = post(agent, "/v1/chat/completions", {"model": "nope", "messages": CHATS[0]})
    assert status == 404 and openai_error(body)["code"] == "model_not_found"
    status, body = post(agent, "/v1/chat/completions", {"model": "digits", "messages": CHATS[0]})
    assert status == 404 and "not a language model" in openai_error(body)["message"]
    status, body = http("GET", agent.url + "/v1/chat/completions")
    assert status == 405 and openai_error(body)
    status, body = http("GET", agent.url + "/v1/embeddings")
    assert status == 404 and openai_error(body)
    # A prompt longer than the model's context (200 tokens, padded to 256 as llama.cpp pads it): a 400.
    long_prompt = " ".join(["tell me a story"] * 100)
    status, body = post(agent, "/v1/completions", {"model": "smallctx", "prompt": long_prompt, "max_tokens": 2})
    assert status == 400 and openai_error(body)["code"] == "context_length_exceeded"
    chunks_status, raw = sse_error(agent, {"model": "smallctx", "prompt": long_prompt, "max_tokens": 2})
    assert chunks_status == 200 and '"context_length_exceeded"' in raw and "[DONE]" not in raw


def sse_error(agent: AgentThread, doc: dict[str, Any]) -> tuple[int, str]:
    req = urllib.request.Request(agent.url + "/v1/completions", data=json.dumps({**doc, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, resp.read().decode()


def test_inference_paths_need_no_token_and_v2_still_serves(served):
    agent, _ = served
    # No Authorization header anywhere above; the v2 API answers beside /v1.
    status, body = http("GET", agent.url + "/v2/models/tinychat")
    assert status == 200 and body["inputs"][0]["datatype"] == "BYTES"


# -- the official client -------------------------------------------------------------------------------
def test_the_official_openai_client_works(served, reference):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    agent, _ = served
    client = openai.OpenAI(base_url=agent.url + "/v1", api_key="x", max_retries=0, timeout=60)

    assert sorted(m.id for m in client.models.list()) == ["smallctx", "tinychat"]
    assert client.models.retrieve("tinychat").id == "tinychat"

    want = reference.create_chat_completion(messages=CHATS[1], max_tokens=30, temperature=0)
    chat = client.chat.completions.create(model="tinychat", messages=CHATS[1], max_tokens=30, temperature=0)
    assert chat.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 30

    stream = client.chat.completions.create(
        model="tinychat", messages=CHATS[1], max_tokens=30, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want["choices"][0]["message"]["content"]

    done = client.completions.create(model="tinychat", prompt="once upon a time", max_tokens=12, temperature=0)
    assert (
        done.choices[0].text
        == reference.create_completion(prompt="once upon a time", max_tokens=12, temperature=0)["choices"][0]["text"]
    )
    pieces = client.completions.create(
        model="tinychat", prompt="once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHATS[0])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tinychat", messages=CHATS[0], top_p=7)
    assert bad.value.param == "top_p"
