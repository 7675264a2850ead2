"""compose: frozen LLMs composed through a trained carry-on (GPT Carry-On, arXiv 2504.07513)."""

from typing import Any

__all__ = ["load_mixture"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import composer` stays cheap and has no side effects.
    if name == "load_mixture":
        from composer.artifacts.load import load_mixture

        return load_mixture
    raise AttributeError(name)
