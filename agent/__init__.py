"""edge-agent: an edge inference daemon serving signed WebAssembly model images."""

__version__ = "0.1.0"
