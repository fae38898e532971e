"""The wasm runtime: engine and compile cache, instances, pools, loaded versions."""

from agent.runtime.engine import WasmRuntime
from agent.runtime.loaded import LoadedModel, LoadSettings, load_version
from agent.runtime.pool import InstancePool

__all__ = ["InstancePool", "LoadSettings", "LoadedModel", "WasmRuntime", "load_version"]
