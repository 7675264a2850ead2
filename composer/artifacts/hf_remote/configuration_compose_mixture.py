"""The configuration of a carry-on mixture exported by `compose export --format hf`.

Written by compose, read by transformers; imports transformers only. The bases' own configs
are kept whole (`bases`, name -> the dict of their config.json), so each base is built by
transformers exactly as it builds that base alone.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class ComposeMixtureConfig(PretrainedConfig):
    """A mixture: frozen bases over the anchor's tokens, and the carry-on stack on top.

    anchor        the base whose final state and LM head are the output
    bases         name -> the base's config (config.json as a dict), every base that runs
    base_dtypes   name -> the dtype the base runs in ("float32", "bfloat16", "float16")
    taps          "base@layer" in the carry-on's source order; layer 0 is the embeddings,
                  layer N (the base's layer count) its final-norm output
    carry_on      width, heads, mlp_hidden, rope_theta, router ("anchor" or "shared"),
                  gate ("elementwise" or "none"), alpha_learnable, blocks (the shortcut taps
                  of each block), experts (bases whose heads are pooled with the anchor's)
    write_at      the anchor layer the correction is added after; None: its final state
    """

    model_type = "compose_mixture"

    def __init__(
        self,
        anchor: str = "",
        bases: dict[str, dict[str, Any]] | None = None,
        base_dtypes: dict[str, str] | None = None,
        taps: list[str] | None = None,
        carry_on: dict[str, Any] | None = None,
        write_at: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.anchor = anchor
        self.bases = dict(bases or {})
        self.base_dtypes = dict(base_dtypes or {})
        self.taps = list(taps or [])
        self.carry_on = dict(carry_on or {})
        self.write_at = write_at
        kwargs.setdefault("tie_word_embeddings", False)  # each base ties its own, as it says
        super().__init__(**kwargs)
