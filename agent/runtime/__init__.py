"""The wasm runtime: engine and compile cache, instances, pools, loaded versions."""

from agent.runtime.engine import WasmRuntime
from agent.runtime.loaded import LoadedModel, LoadSettings, load_version
from agent.runtime.pool import InstanceBudget, InstancePool
from agent.runtime.reaper import InstanceReaper

__all__ = [
    "InstanceBudget",
    "InstancePool",
    "InstanceReaper",
    "LoadSettings",
    "LoadedModel",
    "WasmRuntime",
    "load_version",
]
