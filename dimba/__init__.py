"""DIMBA: diffusion language models with a Mamba-2 denoiser. The Python API is `dimba.load` (dimba/api.py):

    from dimba import load
    m = load("runs/tiny/model")
    print(m.generate("Alice was", length=32)[0].text)
"""


def __getattr__(name):          # lazy: `import dimba` stays cheap, `dimba.load` imports torch and the stack
    if name in ("load", "Model", "Sample"):
        from dimba import api
        return getattr(api, name)
    raise AttributeError(f"module 'dimba' has no attribute {name!r}")


__all__ = ["load", "Model", "Sample"]
