"""The anchor server: KServe's Python ModelServer serving the digits ONNX model with onnxruntime.

Run by bench_core.py inside .venv-bench (kserve pins its own dependency set):
    .venv-bench/bin/python bench/kserve_digits.py --model digits.onnx --http_port 8081 --grpc_port 8082
Run by bench_serving.py with --serve-grpc as well, for its KServe gRPC rows.
KServe parses its own flags (--http_port, --workers, ...) from the command line at import time.
"""

from __future__ import annotations

import argparse
import uuid

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class DigitsModel(Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        pixels = payload.inputs[0].as_numpy()
        probabilities, label = self.session.run(None, {"pixels": pixels})
        # Raw outputs when the request asks for them (REST binary_data_output, gRPC raw inputs), JSON lists
        # otherwise: what KServe's own servers answer (kserve.utils.utils.get_predict_response).
        binary = payload.use_binary_outputs
        outputs = []
        for name, value, datatype in (("probabilities", probabilities, "FP32"), ("label", label, "INT64")):
            data = None if binary else value.ravel().tolist()
            output = InferOutput(name=name, shape=list(value.shape), datatype=datatype, data=data)
            if binary:
                output.set_data_from_numpy(value, binary_data=True)
            outputs.append(output)
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=payload.id or str(uuid.uuid4()),
            use_binary_outputs=binary,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model", required=True)
    parser.add_argument("--serve-grpc", action="store_true", help="also serve gRPC on --grpc_port (off by default)")
    args, _ = parser.parse_known_args()
    ModelServer(
        http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=args.serve_grpc, enable_latency_logging=False
    ).start([DigitsModel("digits", args.model)])
