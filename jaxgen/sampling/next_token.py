"""Class-conditional next-token sampling (LlamaGen, and GPTs over 1D tokens): one jitted function, a `lax.scan` of
`next_token_step` over a `NextTokenState`.

The class token is prefilled into a preallocated KV cache; every step feeds the previous token at the next position
through `logits_fn`. With guidance (cfg_scale > 1) the batch runs doubled ([cond; null]) and the logits are
uncond + (cond - uncond) * cfg_scale for the first `cfg_interval` + 1 decode steps (-1: every step); both halves
are fed the same token. Then temperature, top-k, top-p, and a draw (`jaxgen.sampling.filters`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxgen.models.generators.next_token import NextTokenTransformer
from jaxgen.sampling.common import ClassConditionalSampler
from jaxgen.sampling.filters import filter_logits, sample_categorical
from jaxgen.sampling.guidance import guide_from_uncond, split_guided, with_null_class


@dataclasses.dataclass(frozen=True)
class NextTokenSampling:
    """Sampling settings (defaults: LlamaGen's c2i sampling script)."""

    cfg_scale: float = 4.0
    cfg_interval: int = -1  # guide only the first cfg_interval + 1 decode steps; -1: all
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    return_logits: bool = False  # also return each step's guided logits [B, N, V]


@flax.struct.dataclass
class NextTokenState:
    """What the token loop carries from one step to the next."""

    token: jax.Array  # int32 [B]: the token drawn last (fed at the next position)
    cache: Any  # per layer (k, v), each [B or 2B, kv_heads, max_len, head_dim]
    key: jax.Array  # PRNG key, split once per step


@flax.struct.dataclass
class NextTokenSample:
    tokens: jax.Array  # int32 [B, N], in the tokenizer's layout (row-major over a 2D grid, or 1D)
    decoded: jax.Array  # float32 [B, H, W, 3], raw decoder output
    images: jax.Array  # float32 [B, H, W, 3] in [0, 1]
    step_logits: jax.Array | None = None  # float32 [B, N, V], the guided logits each step sampled from

    def token_arrays(self) -> dict[str, jax.Array]:
        """The tokens by name, for saving."""
        return {"tokens": self.tokens}


# (tokens fed [B'], sequence position int32 [], cache) -> (logits [B', V] float32, cache)
TokenLogitsFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
# (logits [B', V], decode step int32 [], key) -> (tokens [B] int32, the logits they were drawn from [B, V])
ChooseFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def guided_choice(settings: NextTokenSampling, guided: bool) -> ChooseFn:
    """LlamaGen's pick: guidance (on a doubled batch) within `cfg_interval`, then the filters and a draw."""
    top_p = settings.top_p if settings.top_p < 1.0 else 0.0

    def choose(logits, step, key):
        if guided:
            cond, uncond = split_guided(logits)
            logits = guide_from_uncond(cond, uncond, settings.cfg_scale)
            if settings.cfg_interval > -1:
                logits = jnp.where(step > settings.cfg_interval, cond, logits)
        filtered = filter_logits(logits, temperature=max(settings.temperature, 1e-5), top_k=settings.top_k, top_p=top_p)
        return sample_categorical(key, filtered), logits

    return choose


def next_token_step(
    state: NextTokenState, step: jax.Array, pos: jax.Array, logits_fn: TokenLogitsFn, choose: ChooseFn, doubled: bool
) -> tuple[NextTokenState, tuple[jax.Array, jax.Array]]:
    """Feed `state.token` at sequence position `pos`, choose the next token. Returns (state, (token, logits))."""
    fed = jnp.concatenate([state.token, state.token]) if doubled else state.token
    logits, cache = logits_fn(fed, pos, state.cache)
    key, sub = jax.random.split(state.key)
    token, used = choose(logits, step, sub)
    return NextTokenState(token=token, cache=cache, key=key), (token, used)


def sample_next_token(
    gpt: NextTokenTransformer,
    tokenizer,
    settings: NextTokenSampling,
    gpt_params,
    tokenizer_params,
    labels_b: Int[Array, " B"],
    key: jax.Array,
) -> NextTokenSample:
    """The whole generation for labels `[B]` (traceable; `NextTokenSampler` jits it). `tokenizer`: any
    `jaxgen.models.tokenizers.protocol.Tokenizer` (the 2D VQGAN, the 1D TiTok)."""
    c = gpt.config
    n = c.block_size
    doubled = settings.cfg_scale > 1.0
    labels = with_null_class(labels_b, c.null_class) if doubled else labels_b
    apply = lambda method, *a: gpt.apply({"params": gpt_params}, *a, method=method)
    choose = guided_choice(settings, doubled)
    logits_fn = lambda tokens, pos, cache: apply(NextTokenTransformer.decode_step, tokens, pos, cache)

    cache = gpt.init_cache(labels.shape[0], c.cls_token_num + n - 1)
    logits, cache = apply(NextTokenTransformer.prefill, labels, cache)
    key, sub = jax.random.split(key)
    first, first_logits = choose(logits, -1, sub)  # the prefill step is always guided

    def body(state, i):
        state, (token, used) = next_token_step(state, i, c.cls_token_num + i, logits_fn, choose, doubled)
        return state, (token, used if settings.return_logits else None)

    state = NextTokenState(token=first, cache=cache, key=key)
    _, (rest, rest_logits) = jax.lax.scan(body, state, jnp.arange(n - 1, dtype=jnp.int32))
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    decoded = tokenizer.apply({"params": tokenizer_params}, tokens, method="decode_ids")
    step_logits = None
    if settings.return_logits:
        step_logits = jnp.concatenate([first_logits[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
    return NextTokenSample(tokens, decoded, (jnp.clip(decoded, -1.0, 1.0) + 1.0) / 2.0, step_logits)


class NextTokenSampler(ClassConditionalSampler):
    """`sampler(gpt_params, tokenizer_params, labels, key) -> NextTokenSample`, compiled once per batch size."""

    def __init__(self, gpt: NextTokenTransformer, tokenizer, settings: NextTokenSampling | None = None):
        if gpt.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"the GPT predicts {gpt.config.vocab_size} token ids but the tokenizer has "
                f"{tokenizer.vocab_size} codes: use a GPT config with vocab_size="
                f"{tokenizer.vocab_size} or the matching tokenizer"
            )
        if gpt.config.attn_mask != "causal":
            raise ValueError(
                f"next-token sampling needs a causal GPT, but gpt.attn_mask={gpt.config.attn_mask!r}; a bidirectional "
                f"model samples with a masked decoder"
            )
        super().__init__(sample_next_token, gpt, tokenizer, settings or NextTokenSampling(), gpt.config.num_classes)
