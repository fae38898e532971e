"""Generated gRPC code for the Open Inference Protocol (scripts/gen_grpc.py); edit inference.proto, not these."""
