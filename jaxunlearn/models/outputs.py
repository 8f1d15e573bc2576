"""Output types shared by the model ports and the scoring layer.

`Head` lets scoring compute logits in vocabulary chunks from the final hidden states,
so losses and metrics never need the full [batch, seq, vocab] array in memory.
"""

from typing import Any, NamedTuple

import jax


class Head(NamedTuple):
    """Final hidden states and the unembedding they are projected with.

    Attributes:
      hidden: [batch, seq, hidden] final-normed hidden states.
      kernel: [hidden, vocab] unembedding matrix (the tied embedding transposed, or lm_head).
    """

    hidden: jax.Array
    kernel: jax.Array


class CausalLMOutput(NamedTuple):
    """What a causal LM port returns.

    Attributes:
      logits: [batch, seq, vocab] next-token logits, or None when `return_logits=False`.
      head: the `Head` the logits are (or would be) computed from.
      hidden_states: {layer index: [batch, seq, hidden] output of that decoder layer}
        for the layers requested with `hidden_layers`.
      cache: the updated KV cache when decoding with one, else None.
    """

    logits: jax.Array | None
    head: Head
    hidden_states: dict[int, jax.Array]
    cache: Any = None
