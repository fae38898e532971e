"""Drive an agent's gRPC API with a third-party client, in a process of its own; prints one JSON document.

    python tests/grpc_clients.py triton|kserve HOST:PORT TOKEN PIXELS.npy

``tritonclient.grpc`` and KServe each register the ``inference`` proto package in
protobuf's default descriptor pool, so the two cannot be imported into one
process (nor next to a test module that imported the other): tests/test_grpc.py
runs each here. Raw output bytes come back as hex, to be compared bit for bit.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np


def triton(url: str, token: str, pixels: np.ndarray) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    result: dict[str, Any] = {}
    client = grpcclient.InferenceServerClient(url=url)
    result["live"] = client.is_server_live()
    result["ready"] = client.is_server_ready()
    result["model_ready"] = client.is_model_ready("digits")
    result["unknown_ready"] = client.is_model_ready("no-such-model")
    result["server_metadata"] = client.get_server_metadata(as_json=True)
    result["metadata"] = client.get_model_metadata("digits", as_json=True)
    inp = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    response = client.infer("digits", [inp], request_id="r-7")
    result["id"] = response.get_response().id
    result["outputs"] = {name: _array(response.as_numpy(name)) for name in ("probabilities", "label")}
    only_label = client.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("label")])
    result["only_label"] = [o.name for o in only_label.get_response().outputs]
    # The model repository extension: refused without the token, done with it.
    try:
        client.get_model_repository_index()
        result["index_without_token"] = "accepted"
    except InferenceServerException as exc:
        result["index_without_token"] = exc.status()
    auth = {"authorization": f"Bearer {token}"}
    index = client.get_model_repository_index(headers=auth, as_json=True)
    result["index"] = index.get("models", [])
    client.unload_model("digits", headers=auth)
    result["ready_after_unload"] = client.is_model_ready("digits")
    client.load_model("digits", headers=auth)
    result["ready_after_load"] = client.is_model_ready("digits")
    client.close()
    return result


def kserve(url: str, token: str, pixels: np.ndarray) -> dict[str, Any]:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def main() -> dict[str, Any]:
        result: dict[str, Any] = {}
        client = InferenceGRPCClient(url=url, timeout=60)
        try:
            result["live"] = await client.is_server_live()
            result["ready"] = await client.is_server_ready()
            result["model_ready"] = await client.is_model_ready("digits")
            outputs = {}
            for binary in (True, False):  # raw_input_contents, then the typed contents fields
                inp = InferInput("pixels", list(pixels.shape), "FP32")
                inp.set_data_from_numpy(pixels, binary_data=binary)
                response = await client.infer(InferRequest("digits", [inp], request_id=f"k-{binary}"))
                outputs[str(binary)] = {o.name: _array(o.as_numpy()) for o in response.outputs}
            result["outputs"] = outputs
        finally:
            await client.close()
        return result

    return asyncio.run(main())


def _array(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape), "hex": array.tobytes().hex()}


if __name__ == "__main__":
    which, url, token, path = sys.argv[1:5]
    data = np.load(path)
    print(json.dumps({"triton": triton, "kserve": kserve}[which](url, token, data)))
