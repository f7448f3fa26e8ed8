"""Runtime: load a plan + GGUF and execute it (cpu reference backend; cuda backend)."""
