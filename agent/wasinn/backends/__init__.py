"""WASI-NN backends, one module each; imported only when a graph needs them (see agent.wasinn.backend)."""
