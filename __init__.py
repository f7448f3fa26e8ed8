"""ggfuse: compile GGUF hybrid Gated-DeltaNet + MoE models into a fused prefill plan and run it.

    import ggfuse
    m = ggfuse.load("model.gguf", device="cpu")
    logits = m.prefill([1, 2, 3])     # [3, n_vocab]
    print(m.tokenizer.decode(m.generate("Once upon a time", 16)))
"""
__version__ = "0.1.0"


def load(path, device=None, chunk=None, gguf=None, vram_budget=None, precision=None, *, options=None, **kw):
    """See ggfuse.runtime.api.load; keywords are ggfuse.options.Options fields."""
    from ggfuse.runtime.api import load as _load
    return _load(path, device=device, chunk=chunk, gguf=gguf, vram_budget=vram_budget, precision=precision,
                 options=options, **kw)


def __getattr__(name):
    if name == "Options":
        from ggfuse.options import Options
        return Options
    if name == "Tokenizer":   # imported on first use: it needs the `tokenizers` package
        from ggfuse.runtime.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'ggfuse' has no attribute {name!r}")


__all__ = ["load", "Options", "Tokenizer", "__version__"]
