"""MaskGIT's bidirectional transformer (Chang et al., 2022): BERT-style, post-LayerNorm, predicts every masked token
of the sequence at once.

Sequence layout `[B, 1 + N]`: position 0 is the class token (id K + label), positions 1..N the image tokens in the
tokenizer's order (row-major), each a code id 0..K-1 or the mask. Vocabulary rows: 0..K-1 codes, K..K+C-1 classes,
then the null class K+C when `class_dropout_prob` > 0 (guidance; not in the release), and the mask id last
(`mask_id` = V-1). Upstream writes the mask as -1 and reads the last row because negative indices wrap in
`jnp.take`; `__call__` maps every negative id to `mask_id`, so -1 works here too.

Embedding: word table + learned positions, LayerNorm, dropout. Layer: multi-head self-attention with biases (the
shared `jaxgen.models.attention.attention` with the `full` mask), dropout, LayerNorm(attn + x); Dense, tanh-GELU,
Dense, dropout, LayerNorm(y + h). Head: Dense, GELU, LayerNorm, logits = h @ word_table^T (tied) + a per-vocab
bias. Every LayerNorm has eps 1e-12.

Parameter names are upstream's Flax names (`TransformerLayer_3/Attention_0/self_attention/query/kernel` `[D, H,
hd]`, `MlmLayer_0/mlm_bias/bias`), so released checkpoints load leaf for leaf. Logical axes: width 'embed', heads
'heads', head_dim 'kv', MLP 'mlp', vocabulary rows 'vocab', positions 'length', norms 'norm'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxgen.models.attention import attention, attention_mask, check_backend
from jaxgen.models.layer_stack import check_layer_stack, make_blocks, run_blocks
from jaxgen.models.layers import layer_norm
from jaxgen.parallel.logical import constrain, logical
from jaxgen.sampling.mask_schedule import check_schedule

LAYER_NORM_EPS = 1e-12  # BERT's


@dataclasses.dataclass(frozen=True)
class MaskedConfig:
    """Hyper-parameters of the masked generator (defaults: the released ImageNet 256 px model, 172,457,193 params)."""

    codebook_size: int = 1024  # K: image codes (the tokenizer's vocabulary)
    num_classes: int = 1000  # C
    num_tokens: int = 256  # N image tokens (16 x 16); the position table has N + 1 rows
    hidden_size: int = 768
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 3072
    dropout: float = 0.1  # after the embeddings, the attention output and the MLP (training only)
    attention_dropout: float = 0.1  # on the attention probabilities (training only; the 'xla' backend)
    class_dropout_prob: float = 0.0  # > 0: label dropout to a null class row, for classifier-free guidance
    mask_schedule: str = "cosine"  # training: a sample masks ceil(gamma(r) * N) tokens, r ~ U[0, 1)
    label_smoothing: float = 0.1  # training: of the cross-entropy on the masked tokens
    initializer_range: float = 0.02  # truncated normal (+-2 sd) for kernels and tables
    dtype: str = "float32"  # compute dtype of the matmuls; params, LayerNorms, softmax and logits stay float32
    attn_backend: str = "xla"  # "xla" | "cudnn" | "pallas" (see jaxgen.models.attention)
    # the layers as one scanned layer (compiled once, params `TransformerLayer` [num_layers, ...]) instead of an
    # unrolled loop (`TransformerLayer_0..`); same outputs, checkpoints convert either way (`jaxgen.models.layer_stack`)
    scan_layers: bool = False
    remat: str = "none"  # what the backward pass keeps per layer: `jaxgen.models.layer_stack.REMAT_POLICIES`

    def __post_init__(self):
        check_backend(self.attn_backend, "MaskedConfig.attn_backend")
        check_layer_stack(self.scan_layers, self.remat, "MaskedConfig")
        check_schedule(self.mask_schedule)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"MaskedConfig: label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"MaskedConfig: class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"MaskedConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        for name in ("codebook_size", "num_classes", "num_tokens", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"MaskedConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.attention_dropout > 0 and self.attn_backend != "xla":
            raise ValueError(
                f"MaskedConfig: attention_dropout={self.attention_dropout} needs attn_backend='xla' (the fused kernels "
                f"have no dropout on the attention probabilities); set attention_dropout=0.0 to train on "
                f"{self.attn_backend!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def seq_len(self) -> int:
        """Positions: the class token and the N image tokens (upstream's max_position_embeddings)."""
        return self.num_tokens + 1

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def null_class(self) -> int:
        """The unconditional label (its token is K + C); exists only with `class_dropout_prob` > 0."""
        return self.num_classes

    @property
    def vocab_size(self) -> int:
        """Rows of the word table: K codes + C classes (+ the null class) + the mask."""
        return self.codebook_size + self.num_classes + int(self.has_null_class) + 1

    @property
    def mask_id(self) -> int:
        """The mask's row: always the last (what upstream's -1 reads)."""
        return self.vocab_size - 1

    def class_token(self, labels):
        """Label (or the null class) -> its token id K + label."""
        return labels + self.codebook_size


def _init(config: MaskedConfig, names):
    """Upstream's initialiser: truncated normal in [-2, 2] sd, times `initializer_range`."""
    std = config.initializer_range

    def init(key, shape, dtype=jnp.float32):
        return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * std

    return logical(init, names)


def _zeros(names):
    return logical(nn.initializers.zeros_init(), names)


class HeadsDense(nn.Module):
    """Flax's `DenseGeneral` layout of a q / k / v projection: `[B, L, D]` @ kernel `[D, H, hd]` + bias `[H, hd]`
    -> `[B, L, H, hd]`."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, x_bld: jax.Array) -> jax.Array:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        shape = (x_bld.shape[-1], c.num_heads, c.head_dim)
        kernel = self.param("kernel", _init(c, ("embed", "heads", "kv")), shape, jnp.float32)
        bias = self.param("bias", _zeros(("heads", "kv")), shape[1:], jnp.float32)
        y = jnp.einsum("bld,dhk->blhk", x_bld.astype(dtype), kernel.astype(dtype))
        return y + bias.astype(dtype)


class HeadsOut(nn.Module):
    """The attention output projection: `[B, L, H, hd]` @ kernel `[H, hd, D]` + bias `[D]` -> `[B, L, D]`."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, x_blhk: jax.Array) -> jax.Array:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        shape = (c.num_heads, c.head_dim, c.hidden_size)
        kernel = self.param("kernel", _init(c, ("heads", "kv", "embed")), shape, jnp.float32)
        bias = self.param("bias", _zeros(("embed",)), shape[-1:], jnp.float32)
        return jnp.einsum("blhk,hkd->bld", x_blhk.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention in Flax's layout (`query` / `key` / `value` / `out`, see `HeadsDense`,
    `HeadsOut`): softmax(q k^T / sqrt(hd)) over every position (the `full` mask)."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, x_bld: jax.Array, train: bool) -> jax.Array:
        c = self.config
        seq = x_bld.shape[1]
        q, k, v = (jnp.swapaxes(HeadsDense(c, name=n)(x_bld), 1, 2) for n in ("query", "key", "value"))  # [B,H,L,hd]
        rate = c.attention_dropout if train else 0.0
        out = attention(q, k, v, mask=attention_mask("full", seq), scale=1.0 / math.sqrt(c.head_dim),
                        backend=c.attn_backend, dropout_rate=rate,
                        dropout_rng=self.make_rng("dropout") if rate > 0 else None)  # fmt: skip
        out = constrain(jnp.swapaxes(out, 1, 2), ("batch", "length", "heads", "kv"))  # [B, L, H, hd]
        return HeadsOut(c, name="out")(out)


def _dense(config: MaskedConfig, features: int, names, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=jnp.dtype(config.dtype),
        kernel_init=_init(config, names),
        bias_init=_zeros(names[1:]),
        name=name,
    )


class Attention(nn.Module):
    """Self-attention, dropout, then LayerNorm(attn + x) (post-LN)."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, x_bld: jax.Array, train: bool) -> jax.Array:
        h = SelfAttention(self.config, name="self_attention")(x_bld, train)
        h = nn.Dropout(self.config.dropout, deterministic=not train)(h)
        return layer_norm(LAYER_NORM_EPS, name="attention_output_ln")(h.astype(jnp.float32) + x_bld)


class Mlp(nn.Module):
    """Dense D->I, tanh-GELU, Dense I->D, dropout, then LayerNorm(y + x) (post-LN)."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, x_bld: jax.Array, train: bool) -> jax.Array:
        c = self.config
        h = jax.nn.gelu(_dense(c, c.intermediate_size, ("embed", "mlp"), "intermediate_output")(x_bld))
        h = constrain(h, ("batch", "length", "mlp"))
        y = _dense(c, c.hidden_size, ("mlp", "embed"), "layer_output")(h)
        y = nn.Dropout(c.dropout, deterministic=not train)(y)
        return layer_norm(LAYER_NORM_EPS, name="layer_output_ln")(y.astype(jnp.float32) + x_bld)


class TransformerLayer(nn.Module):
    config: MaskedConfig

    @nn.compact
    def __call__(self, x_bld: jax.Array, train: bool) -> jax.Array:
        x_bld = constrain(x_bld, ("batch", "length", "embed"))
        h = Attention(self.config, name="Attention_0")(x_bld, train)
        return Mlp(self.config, name="Mlp_0")(h, train)


class Embed(nn.Module):
    """Word + position embeddings, LayerNorm, dropout: ids `[B, L]` -> `[B, L, D]` float32; also returns the word
    table (the tied output head reads it)."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, ids_bl: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        c = self.config
        words = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_init(c, ("vocab", "embed")),
                         name="word_embeddings")  # fmt: skip
        positions = nn.Embed(c.seq_len, c.hidden_size, embedding_init=_init(c, ("length", "embed")),
                             name="position_embeddings")  # fmt: skip
        x = words(ids_bl) + positions(jnp.arange(ids_bl.shape[-1])[None])
        x = layer_norm(LAYER_NORM_EPS, name="embeddings_ln")(x)
        return nn.Dropout(c.dropout, deterministic=not train)(x), words.embedding


class MlmLayer(nn.Module):
    """Dense D->D, GELU, LayerNorm, logits = h @ word_table^T + bias: `[B, L, D]` -> `[B, L, V]` float32."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, x_bld: jax.Array, word_table_vd: jax.Array) -> jax.Array:
        c = self.config
        h = jax.nn.gelu(_dense(c, c.hidden_size, ("embed", None), "mlm_dense")(x_bld))
        h = layer_norm(LAYER_NORM_EPS, name="mlm_ln")(h)
        dtype = jnp.dtype(c.dtype)
        logits = jnp.einsum("bld,vd->blv", h.astype(dtype), word_table_vd.astype(dtype),
                            preferred_element_type=jnp.float32)  # fmt: skip
        bias = MlmBias(c.vocab_size, name="mlm_bias")()
        return constrain(logits + bias, ("batch", "length", "vocab"))


class MlmBias(nn.Module):
    """The per-vocab output bias `[V]` (its own module, as upstream names it `mlm_bias/bias`)."""

    vocab_size: int

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("bias", _zeros(("vocab",)), (self.vocab_size,), jnp.float32)


class MaskedTransformer(nn.Module):
    """MaskGIT's transformer. `__call__(ids [B, L]) -> logits [B, L, V]` float32 over every vocabulary row (the
    samplers and the loss read the first K columns). L <= N + 1; a negative id is the mask."""

    config: MaskedConfig

    @nn.compact
    def __call__(self, ids_bl: Int[Array, "B L"], train: bool = False) -> Float[Array, "B L V"]:
        c = self.config
        if ids_bl.ndim != 2 or ids_bl.shape[1] > c.seq_len:
            raise ValueError(
                f"MaskedTransformer expects ids [B, L] with L <= {c.seq_len} (the class token + {c.num_tokens} image "
                f"tokens), got shape {tuple(ids_bl.shape)}"
            )
        ids = jnp.asarray(ids_bl, jnp.int32)
        ids = jnp.where(ids < 0, c.mask_id, ids)
        x, word_table = Embed(c, name="Embed_0")(ids, train)
        name = lambda i: "TransformerLayer" if c.scan_layers else f"TransformerLayer_{i}"
        layers = make_blocks(lambda i: TransformerLayer(c, name=name(i)), c.num_layers, c.scan_layers)
        body = lambda layer, h, _: (layer(h, train), None)
        x, _ = run_blocks(body, layers, x, length=c.num_layers, remat=c.remat)
        return MlmLayer(c, name="MlmLayer_0")(x, word_table)

    def example_ids(self, batch: int = 1) -> Any:
        """Zero ids `[batch, N + 1]` for `init`."""
        return jnp.zeros((batch, self.config.seq_len), jnp.int32)
