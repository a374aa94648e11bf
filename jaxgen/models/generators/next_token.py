"""LlamaGen: class-conditional next-token prediction with a LLaMA-style transformer (Sun et al., 2024).

Sequence layout: position 0 is the class token (the class embedding row of the label, or of `num_classes` = the null
class), positions 1.. are image tokens in raster order (token t sits at grid row t // grid, column t % grid and at
sequence position 1 + t). Pre-norm blocks: x + wo(attn(RMSNorm(x))), then h + w2(silu(w1 n) * w3 n), n = RMSNorm(h).
2D RoPE (see `jaxgen.models.layers.rope_2d_table`) on q and k; the class token's table row is all zeros, so its q and
k are exactly 0. Parameter names follow upstream (`layers_3/attention/wqkv` for `layers.3.attention.wqkv`).

Sampling runs with a functional KV cache: `init_cache` -> `prefill` (the class token, position 0) -> `decode_step`
(the previous token at position 1, 2, ..., a traced int32, so the step compiles once and runs inside `lax.scan`).

Attention backend (`NextTokenConfig.attn_backend`, see `jaxgen.models.attention.attention`): teacher forcing (causal
mask) and `prefill` (static valid-prefix mask) run on it; `decode_step` always runs the dense path, whatever the
backend, because its valid-prefix mask depends on the traced position (the block-sparse kernel needs a static mask)
and a length-1 query gains nothing from a block-sparse or flash kernel.

Logical axes (`jaxgen.parallel.rules`): width 'embed', packed q|k|v 'qkv', heads * head_dim 'heads', SwiGLU hidden
'mlp', vocabulary 'vocab', class table rows 'classes', norm scales 'norm'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxgen.models.attention import attention, attention_mask, check_backend, check_mask
from jaxgen.models.layer_stack import check_layer_stack, make_blocks, run_blocks
from jaxgen.models.layers import RMSNorm, apply_rope, dense, rope_1d_table, rope_2d_table
from jaxgen.parallel.logical import constrain, logical

# Per layer (k, v), each [B, kv_heads, max_len, head_dim] in the compute dtype; slot p holds sequence position p.
# Head-major, so a decode step reads each head's keys contiguously (no per-step transpose of the cache). With
# `scan_layers` one (k, v) stacked over the layers instead, each [n_layer, B, kv_heads, max_len, head_dim].
KVCache = tuple[tuple[jax.Array, jax.Array], ...] | tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class NextTokenConfig:
    """Hyper-parameters of the LlamaGen GPT (defaults: GPT-B, c2i, 256 px with the 16x downsampling VQ)."""

    vocab_size: int = 16384
    num_classes: int = 1000
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped KV heads (None = n_head)
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    cls_token_num: int = 1  # class-conditional: exactly one class token
    block_size: int = 256  # image tokens (grid * grid)
    rope_2d: bool = True  # False: 1D RoPE over the image-token positions
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance, training only (label -> num_classes)
    dtype: str = "float32"  # compute dtype of the matmuls and the KV cache; params, norms, RoPE, softmax stay float32
    # attention kernel, see `jaxgen.models.attention.attention`: "xla" (dense masked), "cudnn" (GPU, bf16/fp16),
    # "pallas" (block-sparse, skips the empty tiles of the causal mask); `decode_step` is always dense
    attn_backend: str = "xla"
    # which positions a position sees in teacher forcing (`jaxgen.models.attention.attention_mask`): "causal"
    # (next-token prediction; what the KV-cached sampler needs) or "full" (a bidirectional model)
    attn_mask: str = "causal"
    # the layers as one scanned layer (compiled once, params `layers` [n_layer, ...]) instead of an unrolled loop
    # (params `layers_0..`); same outputs, checkpoints convert either way (`jaxgen.models.layer_stack`)
    scan_layers: bool = False
    remat: str = "none"  # what the backward pass keeps per layer: `jaxgen.models.layer_stack.REMAT_POLICIES`

    def __post_init__(self):
        check_backend(self.attn_backend, "NextTokenConfig.attn_backend")
        check_layer_stack(self.scan_layers, self.remat, "NextTokenConfig")
        check_mask(self.attn_mask, ("causal", "full"), "NextTokenConfig.attn_mask")
        if self.dim % self.n_head:
            raise ValueError(f"NextTokenConfig: dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"NextTokenConfig: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head} "
                f"(each KV head serves n_head / n_kv_head query heads)"
            )
        if self.cls_token_num != 1:
            raise ValueError(
                f"NextTokenConfig: cls_token_num={self.cls_token_num}; the class-conditional model has exactly one "
                f"class token (text conditioning with several caption tokens is not implemented)"
            )
        if self.rope_2d:
            g = math.isqrt(self.block_size)
            if g * g != self.block_size:
                raise ValueError(
                    f"NextTokenConfig: block_size {self.block_size} is not a square grid, which 2D RoPE needs; "
                    f"use (image_size // downsample)**2 or rope_2d=False"
                )
            if self.head_dim % 4:
                raise ValueError(f"NextTokenConfig: 2D RoPE needs head_dim % 4 == 0, got head_dim {self.head_dim}")
        elif self.head_dim % 2:
            raise ValueError(f"NextTokenConfig: RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_hidden(self) -> int:
        """LlamaGen's SwiGLU width: int(2 * 4 * dim / 3), times ffn_dim_multiplier if set, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def grid_size(self) -> int:
        """Side of the token grid (2D RoPE); int(sqrt(block_size))."""
        return math.isqrt(self.block_size)

    @property
    def num_positions(self) -> int:
        """Rows of the RoPE table = the longest sequence `__call__` accepts: cls_token_num + block_size."""
        return self.cls_token_num + self.block_size

    @property
    def seq_len(self) -> int:
        """Positions a full generation feeds: the class token and every image token but the last
        (= the KV-cache length `init_cache` uses by default, and the teacher-forcing length)."""
        return self.cls_token_num + self.block_size - 1

    @property
    def class_rows(self) -> int:
        """Rows of the class table: num_classes, plus the null class (index num_classes) when class_dropout_prob > 0
        (upstream's rule; every released model has it)."""
        return self.num_classes + int(self.class_dropout_prob > 0)

    @property
    def null_class(self) -> int:
        """The unconditional label (classifier-free guidance)."""
        return self.num_classes

    def rope_table(self) -> np.ndarray:
        """`[num_positions, head_dim // 2, 2]` float32 (cos, sin); row p is sequence position p."""
        if self.rope_2d:
            return rope_2d_table(self.grid_size, self.head_dim, self.rope_base, self.cls_token_num)
        return rope_1d_table(self.block_size, self.head_dim, self.rope_base, self.cls_token_num)


def init_cache(config: NextTokenConfig, batch: int, max_len: int | None = None) -> KVCache:
    """Zeros: per layer (k, v), each `[batch, kv_heads, max_len, head_dim]` in the compute dtype (with
    `scan_layers`, one (k, v) of `[n_layer, batch, kv_heads, max_len, head_dim]`).

    `max_len` defaults to `config.seq_len` (a whole generation). A plain function: no params needed."""
    max_len = config.seq_len if max_len is None else max_len
    shape = (batch, config.kv_heads, max_len, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    if config.scan_layers:
        return jnp.zeros((config.n_layer, *shape), dtype), jnp.zeros((config.n_layer, *shape), dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer))


def cache_slots(config: NextTokenConfig, cache: KVCache) -> int:
    """The max_len of a cache from `init_cache`."""
    return cache[0].shape[3] if config.scan_layers else cache[0][0].shape[2]


def _dense(features: int, dtype, names: tuple[str, str], name: str | None = None) -> nn.Dense:
    """Bias-free Dense, kernel N(0, 0.02^2) (upstream's init)."""
    return dense(features, names, kernel_init=nn.initializers.normal(0.02), use_bias=False, dtype=dtype, name=name)


class Attention(nn.Module):
    """Packed `wqkv` (output = [q: n_head*hd | k: kv*hd | v: kv*hd], head-major), RoPE on q and k, `wo`."""

    n_head: int
    kv_heads: int
    dtype: Any = jnp.float32
    attn_backend: str = "xla"

    @nn.compact
    def __call__(self, x_bld, rope_lp2, mask, cache=None, start=None, backend: str | None = None):
        """x `[B, L, C]`, rope `[L, D/2, 2]`, mask (broadcastable to `[B, 1, 1, L, Lk]`; with "cudnn" / "pallas"
        to `[L, Lk]`, and static for "pallas"). Without a cache the keys are this call's own; with one, k/v are
        written at slots [start, start + L) of the `[B, K, S, hd]` cache and the queries attend over all S slots.
        `backend` overrides `attn_backend` for this call. Returns (out `[B, L, C]` float32, updated (k, v) or
        None)."""
        b, seq, c = x_bld.shape
        hd = c // self.n_head
        qkv = _dense((self.n_head + 2 * self.kv_heads) * hd, self.dtype, ("embed", "qkv"), name="wqkv")(x_bld)
        q, k, v = jnp.split(qkv, [self.n_head * hd, (self.n_head + self.kv_heads) * hd], axis=-1)
        q = apply_rope(q.reshape(b, seq, self.n_head, hd), rope_lp2)
        k = jnp.swapaxes(apply_rope(k.reshape(b, seq, self.kv_heads, hd), rope_lp2), 1, 2)  # [B, K, L, hd]
        v = jnp.swapaxes(v.reshape(b, seq, self.kv_heads, hd), 1, 2)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        if cache is not None:
            k_cache, v_cache = cache
            zero = jnp.zeros((), jnp.int32)
            idx = (zero, zero, jnp.asarray(start, jnp.int32), zero)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), idx)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), idx)
        k, v = (constrain(t, ("batch", "heads", "length", "kv")) for t in (k, v))
        new_cache = None if cache is None else (k, v)
        backend = self.attn_backend if backend is None else backend
        out = attention(jnp.swapaxes(q, 1, 2), k, v, mask=mask, scale=1.0 / math.sqrt(hd), backend=backend)
        out = constrain(jnp.swapaxes(out, 1, 2), ("batch", "length", "heads", "kv"))  # [B, L, H, hd]
        out = _dense(c, self.dtype, ("heads", "embed"), name="wo")(out.reshape(b, seq, c))
        return out.astype(jnp.float32), new_cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bld):
        c = x_bld.shape[-1]
        gate = nn.silu(_dense(self.hidden, self.dtype, ("embed", "mlp"), name="w1")(x_bld))
        h = constrain(
            gate * _dense(self.hidden, self.dtype, ("embed", "mlp"), name="w3")(x_bld), ("batch", "length", "mlp")
        )
        return _dense(c, self.dtype, ("mlp", "embed"), name="w2")(h).astype(jnp.float32)


class TransformerBlock(nn.Module):
    config: NextTokenConfig

    @nn.compact
    def __call__(self, x_bld, rope_lp2, mask, cache=None, start=None, backend: str | None = None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x_bld = constrain(x_bld, ("batch", "length", "embed"))
        attn_in = RMSNorm(c.norm_eps, name="attention_norm")(x_bld).astype(dtype)
        attn_out, new_cache = Attention(c.n_head, c.kv_heads, dtype, c.attn_backend, name="attention")(
            attn_in, rope_lp2, mask, cache, start, backend
        )
        h = x_bld + attn_out
        ffn_out = FeedForward(c.ffn_hidden, dtype, name="feed_forward")(
            RMSNorm(c.norm_eps, name="ffn_norm")(h).astype(dtype)
        )
        return constrain(h + ffn_out, ("batch", "length", "embed")), new_cache


class NextTokenTransformer(nn.Module):
    """LlamaGen GPT (c2i). `__call__(labels [B], tokens [B, N-1]) -> logits [B, N, V]` (teacher forcing);
    `prefill` / `decode_step` for KV-cached sampling. Use every method through `model.apply(..., method=...)`."""

    config: NextTokenConfig

    def setup(self):
        c = self.config
        emb_init = nn.initializers.normal(0.02)
        # last row of cls_embedding: the null class
        self.cls_embedding = nn.Embed(c.class_rows, c.dim, embedding_init=logical(emb_init, ("classes", "embed")))
        self.tok_embeddings = nn.Embed(c.vocab_size, c.dim, embedding_init=logical(emb_init, ("vocab", "embed")))
        self.layers = make_blocks(lambda i: TransformerBlock(c), c.n_layer, c.scan_layers)
        self.norm = RMSNorm(c.norm_eps)
        # Upstream zero-initialises the output layer.
        out_init = logical(nn.initializers.zeros, ("embed", "vocab"))
        self.output = nn.Dense(c.vocab_size, use_bias=False, dtype=jnp.dtype(c.dtype), kernel_init=out_init)

    def _head(self, x_bld: jax.Array) -> jax.Array:
        logits = self.output(self.norm(x_bld).astype(jnp.dtype(self.config.dtype)))
        return constrain(logits, ("batch", "length", "vocab")).astype(jnp.float32)

    def _trunk(self, x_bld, rope_lp2, mask, cache: KVCache | None = None, start=None, backend: str | None = None):
        """The layers and the head; `backend` (None: `config.attn_backend`) picks the attention kernel."""
        c = self.config
        body = lambda layer, x, layer_cache: layer(x, rope_lp2, mask, layer_cache, start, backend)
        x_bld, new_cache = run_blocks(body, self.layers, x_bld, cache, length=c.n_layer, remat=c.remat)
        if cache is None:
            return self._head(x_bld), None
        return self._head(x_bld), (new_cache if c.scan_layers else tuple(new_cache))

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        c = self.config
        if c.scan_layers:
            layers, got = (cache[0].shape[0], cache[0].shape[1:]) if len(cache) == 2 and cache[0].ndim == 5 else (0, ())
        else:
            layers, got = len(cache), cache[0][0].shape
        if layers != c.n_layer:
            raise ValueError(
                f"cache has {layers} layers, the model {c.n_layer} (scan_layers={c.scan_layers}); build it with "
                f"init_cache(config)"
            )
        want = (batch, c.kv_heads, c.head_dim)
        if len(got) != 4 or (got[0], got[1], got[3]) != want:
            raise ValueError(
                f"cache entries are {tuple(got)}, expected [B={batch}, {c.kv_heads}, max_len, {c.head_dim}] "
                f"(init_cache(config, batch, max_len))"
            )

    def __call__(
        self, labels_b: Int[Array, " B"], tokens_bl: Int[Array, "B T"], train: bool = False
    ) -> Float[Array, "B N V"]:
        """Teacher forcing: sequence [class token, tokens...] of N = 1 + T positions, causal attention, RoPE rows
        0..N-1. Logits at position p predict image token p. Label dropout (rng 'dropout') only when `train`."""
        c = self.config
        if labels_b.ndim != 1 or tokens_bl.ndim != 2 or tokens_bl.shape[0] != labels_b.shape[0]:
            raise ValueError(
                f"NextTokenTransformer expects labels [B] and image tokens [B, T] (T <= {c.block_size}), got "
                f"labels {tuple(labels_b.shape)} and tokens {tuple(tokens_bl.shape)}"
            )
        n = c.cls_token_num + tokens_bl.shape[1]
        if n > c.num_positions:
            raise ValueError(
                f"sequence of {n} positions ({c.cls_token_num} class token + {tokens_bl.shape[1]} image tokens) is "
                f"longer than the {c.num_positions} the RoPE table covers (cls_token_num + block_size = "
                f"{c.cls_token_num} + {c.block_size}): feed at most {c.block_size} tokens (usually block_size - 1 = "
                f"{c.block_size - 1}) or raise NextTokenConfig.block_size"
            )
        if train and c.class_dropout_prob > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), c.class_dropout_prob, labels_b.shape)
            labels_b = jnp.where(drop, c.null_class, labels_b)
        x = jnp.concatenate([self.cls_embedding(labels_b)[:, None], self.tok_embeddings(tokens_bl)], axis=1)
        rope = jnp.asarray(c.rope_table()[:n])
        logits, _ = self._trunk(x, rope, attention_mask(c.attn_mask, n))
        return logits

    def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """Same as the module-level `init_cache(config, batch, max_len)` (which needs no params)."""
        return init_cache(self.config, batch, max_len)

    def prefill(self, labels_b: Int[Array, " B"], cache: KVCache) -> tuple[Float[Array, "B V"], KVCache]:
        """Run the class token at position 0, write its k/v into cache slot 0; return (logits of position 0
        `[B, V]` float32, which predict image token 0, and the cache). The mask over the cache (slot 0 only) is
        static, so this runs on `config.attn_backend`."""
        c = self.config
        self._check_cache(cache, labels_b.shape[0])
        x = self.cls_embedding(labels_b)[:, None]  # [B, 1, C]
        slots = cache_slots(c, cache)
        mask = np.arange(slots)[None, :] < c.cls_token_num  # [1, S]
        rope = jnp.asarray(c.rope_table()[: c.cls_token_num])
        logits, cache = self._trunk(x, rope, mask, cache, jnp.zeros((), jnp.int32))
        return logits[:, -1], cache

    def decode_step(
        self, tokens_b: Int[Array, " B"], pos: Int[Array, ""], cache: KVCache
    ) -> tuple[Float[Array, "B V"], KVCache]:
        """Feed image tokens `[B]` at sequence position `pos` (traced int32 scalar: image token t goes at position
        1 + t); write k/v at cache slot `pos`, attend to slots <= pos, RoPE row `pos`. Returns (logits `[B, V]`
        float32, which predict the token at `pos`, i.e. image token `pos`, and the cache).

        No bounds check on a traced `pos`: keep 1 <= pos < min(max_len, num_positions) (out-of-range indices are
        clamped by XLA).

        Attention here is always the dense "xla" path, whatever `config.attn_backend`: the valid-prefix mask
        (slots <= pos) is traced, which the block-sparse kernel cannot take (it plans its tiles from a static mask),
        and a length-1 query reads every valid key once anyway, so a block-sparse or flash kernel gains nothing."""
        c = self.config
        self._check_cache(cache, tokens_b.shape[0])
        pos = jnp.asarray(pos, jnp.int32)
        x = self.tok_embeddings(tokens_b)[:, None]  # [B, 1, C]
        slots = cache_slots(c, cache)
        mask = (jnp.arange(slots) <= pos)[None, :]  # [1, S]
        rope = jax.lax.dynamic_slice_in_dim(jnp.asarray(c.rope_table()), pos, 1, axis=0)  # [1, D/2, 2]
        logits, cache = self._trunk(x, rope, mask, cache, pos, backend="xla")
        return logits[:, 0], cache
