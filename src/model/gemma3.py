"""Gemma 3 text models: Gemma 2's layer with a `(1 + w)` RMSNorm over each head of q and k,
five sliding-window layers to one global (their own rope base: `rope_local_base_freq`), and
no attention soft-capping by default."""

from __future__ import annotations

from shardline.model.gemma2 import Gemma2ForCausalLM
from shardline.model.layers import GemmaRMSNorm


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 1B (text only) and the text decoder of the larger checkpoints."""

    qk_norm = GemmaRMSNorm
