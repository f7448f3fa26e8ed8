"""One frontend per GGUF architecture; each registers itself with @register_arch."""
import importlib

from ggfuse.compiler.frontends.common import FRONTENDS, register_arch

for _m in ("qwen35moe", "qwen35", "qwen3next", "qwen3moe", "gemma4"):
    importlib.import_module(f"ggfuse.compiler.frontends.{_m}")

__all__ = ["FRONTENDS", "register_arch"]
