"""The local HTTP API: the HTTP/1.1 server and the Open Inference Protocol routes."""
