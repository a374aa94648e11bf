"""Class-conditional next-token sampling (LlamaGen): one jitted function, a `lax.scan` over the image tokens.

The class token is prefilled into a preallocated KV cache; every step feeds the previous token at the next position.
With guidance (cfg_scale > 1) the batch runs doubled ([cond; null]) and the logits are
uncond + (cond - uncond) * cfg_scale, for the first `cfg_interval` + 1 decode steps (-1: every step); both halves
are fed the same token. Then temperature, top-k, top-p, and a draw.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxgen.models.generators.next_token import NextTokenTransformer
from jaxgen.sampling.cfg import guide_from_uncond
from jaxgen.sampling.common import ClassConditionalSampler
from jaxgen.sampling.filters import filter_logits, sample_categorical


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
class NextTokenSample:
    tokens: jax.Array  # int32 [B, N], row-major over the token grid
    decoded: jax.Array  # float32 [B, H, W, 3], raw decoder output
    images: jax.Array  # float32 [B, H, W, 3] in [0, 1]
    step_logits: jax.Array | None = None  # float32 [B, N, V], the guided logits each step sampled from

    def token_arrays(self) -> dict[str, jax.Array]:
        """The tokens by name, for saving."""
        return {"tokens": self.tokens}


def sample_next_token(
    gpt: NextTokenTransformer,
    vq,
    settings: NextTokenSampling,
    gpt_params,
    vq_params,
    labels_b: Int[Array, " B"],
    key: jax.Array,
) -> NextTokenSample:
    """The whole generation for labels `[B]` (traceable; `NextTokenSampler` jits it). `vq`: any tokenizer with a
    `decode_tokens(ids [B, N]) -> [B, H, W, 3]` method (the 2D VQGAN, the 1D TiTok)."""
    c = gpt.config
    b, n = labels_b.shape[0], c.block_size
    guided_run = settings.cfg_scale > 1.0
    labels = jnp.concatenate([labels_b, jnp.full_like(labels_b, c.num_classes)]) if guided_run else labels_b
    apply = lambda method, *a: gpt.apply({"params": gpt_params}, *a, method=method)
    top_p = settings.top_p if settings.top_p < 1.0 else 0.0

    def pick(logits_bv, step, key):
        if guided_run:
            cond, uncond = logits_bv[:b], logits_bv[b:]
            guided = guide_from_uncond(cond, uncond, settings.cfg_scale)
            if settings.cfg_interval > -1:
                guided = jnp.where(step > settings.cfg_interval, cond, guided)
            logits_bv = guided
        filtered = filter_logits(
            logits_bv, temperature=max(settings.temperature, 1e-5), top_k=settings.top_k, top_p=top_p
        )
        return sample_categorical(key, filtered), logits_bv

    cache = gpt.init_cache(labels.shape[0], c.cls_token_num + n - 1)
    logits, cache = apply(NextTokenTransformer.prefill, labels, cache)
    key, sub = jax.random.split(key)
    first, first_logits = pick(logits, -1, sub)  # the prefill step is always guided

    def step(carry, i):
        token, cache, key = carry
        fed = jnp.concatenate([token, token]) if guided_run else token
        logits, cache = apply(NextTokenTransformer.decode_step, fed, c.cls_token_num + i, cache)
        key, sub = jax.random.split(key)
        nxt, guided = pick(logits, i, sub)
        return (nxt, cache, key), (nxt, guided if settings.return_logits else None)

    _, (rest, rest_logits) = jax.lax.scan(step, (first, cache, key), jnp.arange(n - 1, dtype=jnp.int32))
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    decoded = vq.apply({"params": vq_params}, tokens, method="decode_tokens")  # any tokenizer: 2D grid or 1D
    step_logits = None
    if settings.return_logits:
        step_logits = jnp.concatenate([first_logits[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
    return NextTokenSample(tokens, decoded, (jnp.clip(decoded, -1.0, 1.0) + 1.0) / 2.0, step_logits)


class NextTokenSampler(ClassConditionalSampler):
    """`sampler(gpt_params, vq_params, labels, key) -> NextTokenSample`, compiled once per batch size."""

    def __init__(self, gpt: NextTokenTransformer, vq, settings: NextTokenSampling | None = None):
        if gpt.config.vocab_size != vq.config.codebook_size:
            raise ValueError(
                f"the GPT predicts {gpt.config.vocab_size} token ids but the tokenizer has "
                f"{vq.config.codebook_size} codes: use a GPT config with vocab_size="
                f"{vq.config.codebook_size} or the matching tokenizer"
            )
        super().__init__(sample_next_token, gpt, vq, settings or NextTokenSampling(), gpt.config.num_classes)
