"""VAR: next-scale prediction with an AdaLN transformer (Tian et al., 2024).

Sequence layout: the S scales' token maps (p_k x p_k, row-major) concatenated, L = sum p_k^2 tokens; token 0 is the
class "start" token, the others are the teacher-forcing inputs `[B, L - p_0^2, Cvae]` (see
`MultiScaleResidualQuantizer.teacher_forcing_input`). The attention mask is `NextScaleConfig.attn_mask`:
"scale_causal" (VAR: a token sees its own scale and all coarser ones) or "scale_block_diagonal" (HMAR: its own scale
only), so the Markov variant is this module with another mask. Attention runs on `NextScaleConfig.attn_backend`
(`jaxgen.models.attention.attention`: "xla" | "cudnn" | "pallas") in teacher forcing (the static `[L, L]` mask) and
in sampling (`decode_scale`: no mask, the keys being exactly the KV cache so far (scale_causal; none with the Markov
mask) plus this scale). Parameter names follow upstream
(`blocks_3/attn/mat_qkv` for `blocks.3.attn.mat_qkv`).

Logical axes (`jaxgen.parallel.rules`): width C 'embed', packed q|k|v 'qkv', heads * head_dim 'heads', FFN hidden
'mlp', AdaLN outputs 'adaln', vocabulary 'vocab', tokenizer code width 'latent', token positions 'length'.
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
from jaxgen.models.layer_stack import check_layer_stack, make_blocks, per_layer_values, run_blocks
from jaxgen.models.layers import dense, l2_normalize, layer_norm
from jaxgen.parallel.logical import constrain, logical

# Per stack of blocks (VAR: one; HMAR: shared + branch): per block (k, v), each [B, H, L_so_far, head_dim], a list
# unrolled, or with `scan_layers` one (k, v) stacked [n, B, H, L_so_far, head_dim].
KVCache = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class NextScaleConfig:
    """Hyper-parameters of the VAR transformer (defaults: VAR-d16 on the released VQVAE)."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: width of the tokenizer's code vectors
    num_classes: int = 1000
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    cond_drop_rate: float = 0.1  # label dropout for classifier-free guidance, training only
    drop_path_rate: float = 0.0
    dtype: str = "float32"  # compute dtype of the matmuls (params, norms and softmax stay float32)
    # attention kernel, see `jaxgen.models.attention.attention`: "xla" (dense masked), "cudnn" (GPU, bf16/fp16),
    # "pallas" (block-sparse: skips the tiles the scale-causal mask leaves empty)
    attn_backend: str = "xla"
    # which tokens a token sees (`jaxgen.models.attention.attention_mask`): "scale_causal" (VAR: its scale and the
    # coarser ones, KV-cached sampling) or "scale_block_diagonal" (HMAR's Markov mask: its own scale only, each scale
    # sampled in its own forward pass)
    attn_mask: str = "scale_causal"
    # the blocks as one scanned layer (compiled once, params `blocks` [depth, ...]) instead of an unrolled loop
    # (params `blocks_0..`); same outputs, checkpoints convert either way (`jaxgen.models.layer_stack`)
    scan_layers: bool = False
    remat: str = "none"  # what the backward pass keeps per block: `jaxgen.models.layer_stack.REMAT_POLICIES`

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        check_backend(self.attn_backend, "NextScaleConfig.attn_backend")
        check_layer_stack(self.scan_layers, self.remat, type(self).__name__)
        check_mask(self.attn_mask, ("scale_causal", "scale_block_diagonal"), "NextScaleConfig.attn_mask")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"NextScaleConfig: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def kv_cached(self) -> bool:
        """Whether sampling keeps the coarser scales' keys: yes with "scale_causal", no with the Markov mask."""
        return self.attn_mask == "scale_causal"

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def scale_bounds(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale in the token sequence."""
        ends = np.cumsum([p * p for p in self.patch_nums])
        return [(int(e - p * p), int(e)) for p, e in zip(self.patch_nums, ends, strict=True)]


def level_ids(patch_nums) -> np.ndarray:
    """Scale index of every token: `[L]` int32."""
    return np.concatenate([np.full(p * p, k, np.int32) for k, p in enumerate(patch_nums)])


# ---- initialisers (VAR's init_weights) ----------------------------------------------------------------------------
def _trunc(std: float):
    return nn.initializers.truncated_normal(std)


def _ada_lin_init(std: float, width: int, gamma_gain: float = 1e-5, gain: float = 0.5):
    """AdaLN linear init: gammas (first 2 chunks) near zero so each block starts as the identity."""

    def init(key, shape, dtype=jnp.float32):
        w = _trunc(std)(key, shape, dtype)
        return w.at[:, : 2 * width].multiply(gamma_gain).at[:, 2 * width :].multiply(gain)

    return init


class SelfAttention(nn.Module):
    """VAR attention: packed qkv (bias = q_bias | 0 | v_bias), optional L2-normalised q/k with a learnable per-head
    log-scale clamped at ln(100). The attention itself runs on `attn_backend` (`jaxgen.models.attention.attention`)."""

    embed_dim: int
    num_heads: int
    l2_norm: bool
    init_std: float
    out_std: float
    dtype: Any = jnp.float32
    attn_backend: str = "xla"

    @nn.compact
    def __call__(
        self, x_blc: jax.Array, mask_ll: np.ndarray | None = None, cache: tuple[jax.Array, jax.Array] | None = None
    ):
        b, seq, c = x_blc.shape
        h, hd = self.num_heads, c // self.num_heads
        qkv_init = _trunc(self.init_std)
        qkv = dense(3 * c, ("embed", "qkv"), kernel_init=qkv_init, use_bias=False, dtype=self.dtype, name="mat_qkv")(
            x_blc
        )
        q_bias = self.param("q_bias", logical(nn.initializers.zeros, ("heads",)), (c,))
        v_bias = self.param("v_bias", logical(nn.initializers.zeros, ("heads",)), (c,))
        qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        q, k, v = jnp.transpose(qkv.reshape(b, seq, 3, h, hd), (2, 0, 3, 1, 4))  # 3 x [B, H, L, hd]
        q, k, v = (constrain(t, ("batch", "heads", "length", "kv")) for t in (q, k, v))
        if self.l2_norm:
            log_init = logical(nn.initializers.constant(math.log(4.0)), ("heads",))
            log_scale = self.param("scale_mul_1H11", log_init, (h,))
            scale_mul = jnp.exp(jnp.minimum(log_scale, np.float32(math.log(100.0))))
            q = (l2_normalize(q) * scale_mul[None, :, None, None].astype(q.dtype)).astype(q.dtype)
            k = l2_normalize(k)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        if cache is not None:
            k = jnp.concatenate([cache[0], k], axis=2)
            v = jnp.concatenate([cache[1], v], axis=2)
        out = attention(q, k, v, mask=mask_ll, scale=scale, backend=self.attn_backend)
        out = constrain(jnp.transpose(out, (0, 2, 1, 3)).reshape(b, seq, c), ("batch", "length", "heads"))
        out = dense(c, ("heads", "embed"), kernel_init=_trunc(self.out_std), dtype=self.dtype, name="proj")(out)
        return out.astype(jnp.float32), (k, v)


class FFN(nn.Module):
    hidden: int
    init_std: float
    out_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = dense(self.hidden, ("embed", "mlp"), kernel_init=_trunc(self.init_std), dtype=self.dtype, name="fc1")(x)
        h = constrain(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        return dense(c, ("mlp", "embed"), kernel_init=_trunc(self.out_std), dtype=self.dtype, name="fc2")(h).astype(
            jnp.float32
        )


def _drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth: drop the whole residual branch per sample with probability `rate` (training only; a
    traced rate in a scanned stack)."""
    if rng is None or (isinstance(rate, float) and rate <= 0.0):
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class AdaLNSelfAttn(nn.Module):
    """x += g1 * Attn(LN(x)(1+s1) + b1); x += g2 * FFN(LN(x)(1+s2) + b2).

    (g1, g2, s1, s2, b1, b2) come from the class condition: a per-block `ada_lin` on SiLU(cond), or (shared_aln)
    the shared projection plus this block's `ada_gss`."""

    embed_dim: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float
    shared_aln: bool
    attn_l2_norm: bool
    drop_path: float
    init_std: float
    out_std: float
    dtype: Any = jnp.float32
    attn_backend: str = "xla"

    @nn.compact
    def __call__(self, x_blc, cond, mask_ll=None, cache=None, train: bool = False, drop_path=None):
        """`drop_path` overrides the attribute (a scanned stack passes each block's rate)."""
        c = self.embed_dim
        drop_path = self.drop_path if drop_path is None else drop_path
        x_blc = constrain(x_blc, ("batch", "length", "embed"))
        if self.shared_aln:  # cond: [B, 6, C] from the shared projection
            gss = self.param("ada_gss", logical(nn.initializers.normal(c**-0.5), (None, "embed")), (6, c)) + cond
        else:  # cond: [B, D]
            ada_init = _ada_lin_init(self.init_std, c)
            gss = dense(6 * c, ("embed", "adaln"), kernel_init=ada_init, name="ada_lin")(nn.silu(cond))
            gss = gss.reshape(-1, 6, c)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (gss[:, None, i] for i in range(6))  # [B, 1, C]
        ln = layer_norm(self.norm_eps, affine=False)
        rng = self.make_rng("dropout") if train and not (isinstance(drop_path, float) and drop_path <= 0) else None
        rngs = jax.random.split(rng) if rng is not None else (None, None)
        attn_out, kv = SelfAttention(
            c,
            self.num_heads,
            self.attn_l2_norm,
            self.init_std,
            self.out_std,
            dtype=self.dtype,
            attn_backend=self.attn_backend,
            name="attn",
        )((ln(x_blc) * (1 + scale1) + shift1).astype(self.dtype), mask_ll, cache)
        x_blc = x_blc + _drop_path(attn_out * gamma1, drop_path, rngs[0])
        ffn_out = FFN(round(c * self.mlp_ratio), self.init_std, self.out_std, dtype=self.dtype, name="ffn")(
            (ln(x_blc) * (1 + scale2) + shift2).astype(self.dtype)
        )
        x_blc = x_blc + _drop_path(ffn_out * gamma2, drop_path, rngs[1])
        return constrain(x_blc, ("batch", "length", "embed")), kv


class AdaLNBeforeHead(nn.Module):
    """LN(x) * (1 + scale) + shift with (scale, shift) = `ada_lin`(SiLU(cond))."""

    norm_eps: float
    init_std: float

    @nn.compact
    def __call__(self, x_blc, cond_bd):
        c = x_blc.shape[-1]
        ss = dense(2 * c, ("embed", "adaln"), kernel_init=_trunc(self.init_std * 0.5), name="ada_lin")(nn.silu(cond_bd))
        scale, shift = ss.reshape(-1, 2, c)[:, None, 0], ss.reshape(-1, 2, c)[:, None, 1]
        return layer_norm(self.norm_eps, affine=False)(x_blc) * (1 + scale) + shift


class NextScaleTransformer(nn.Module):
    """VAR transformer. `__call__(labels [B], x [B, L-first_l, Cvae]) -> logits [B, L, V]` (teacher forcing)."""

    config: NextScaleConfig

    def setup(self):
        self.setup_embeddings()
        self.blocks = self.make_blocks(0, self.config.depth)
        self.head_nm, self.head = self.make_head()

    # ---- building blocks of the layout (HMAR's `HMARTransformer` builds its own layout from the same pieces) -----
    @property
    def init_std(self) -> float:
        return math.sqrt(1 / self.config.embed_dim / 3)

    def setup_embeddings(self, word_embed_bias: bool = True) -> None:
        """`word_embed` (codes -> width; with `word_embed_bias=False` bias-free, the bias a separate param named
        `word_embed_bias`, HMAR's layout), `class_emb`, `pos_start`, `pos_1LC`, `lvl_embed` (and `shared_ada_lin`)."""
        c, w, std = self.config, self.config.embed_dim, self.init_std
        self.word_embed = dense(w, ("latent", "embed"), kernel_init=_trunc(std), use_bias=word_embed_bias)
        if not word_embed_bias:
            self.word_embed_bias = self.param("word_embed_bias", logical(nn.initializers.zeros, ("embed",)), (w,))
        # last row of class_emb: the null class
        self.class_emb = nn.Embed(c.num_classes + 1, w, embedding_init=logical(_trunc(std), ("classes", "embed")))
        self.pos_start = self.param("pos_start", logical(_trunc(std), ("length", "embed")), (c.first_l, w))
        self.pos_1LC = self.param("pos_1LC", logical(_trunc(std), ("length", "embed")), (c.seq_len, w))
        self.lvl_embed = nn.Embed(len(c.patch_nums), w, embedding_init=logical(_trunc(std), ("scales", "embed")))
        if c.shared_aln:
            self.shared_ada_lin = dense(6 * w, ("embed", "adaln"), kernel_init=_ada_lin_init(std, w))

    def make_block(self, i: int) -> AdaLNSelfAttn:
        """The block at depth `i` of `config.depth` (its drop-path rate and output init depend on it)."""
        c = self.config
        dpr = np.linspace(0, c.drop_path_rate, c.depth)
        return AdaLNSelfAttn(
            c.embed_dim,
            c.num_heads,
            c.mlp_ratio,
            c.norm_eps,
            c.shared_aln,
            c.attn_l2_norm,
            float(dpr[i]),
            self.init_std,
            self.init_std / math.sqrt(2 * c.depth),
            dtype=jnp.dtype(c.dtype),
            attn_backend=c.attn_backend,
        )

    def make_blocks(self, first: int, n: int) -> list[AdaLNSelfAttn] | AdaLNSelfAttn:
        """Blocks `first .. first + n - 1` of the depth: a list, or with `scan_layers` one block that `stack` scans
        (`jaxgen.models.layer_stack`)."""
        return make_blocks(lambda i: self.make_block(first + i), n, self.config.scan_layers)

    def make_head(self) -> tuple[AdaLNBeforeHead, nn.Module]:
        """The AdaLN before the head and the head (width -> vocabulary logits)."""
        c = self.config
        head_nm = AdaLNBeforeHead(c.norm_eps, self.init_std)
        return head_nm, dense(c.vocab_size, ("embed", "vocab"), kernel_init=_trunc(self.init_std * 0.02))

    # ---- pieces shared by teacher forcing and sampling --------------------------------------------------------------
    def level_pos(self) -> jax.Array:
        """Scale + position embedding of every token `[L, C]`."""
        return self.lvl_embed(jnp.asarray(level_ids(self.config.patch_nums))) + self.pos_1LC

    def cond_embed(self, labels_b: jax.Array) -> jax.Array:
        """Class labels `[B]` (num_classes = null) -> condition `[B, C]`."""
        return constrain(self.class_emb(labels_b), ("batch", "embed"))

    def first_tokens(self, cond_bd: jax.Array) -> jax.Array:
        """The start tokens `[B, first_l, C]` of scale 0."""
        return cond_bd[:, None] + self.pos_start[None] + self.level_pos()[None, : self.config.first_l]

    def embed_scale(self, x_blcv: jax.Array, si: int) -> jax.Array:
        """Next-scale input `[B, p_si^2, Cvae]` -> tokens `[B, p_si^2, C]` with their scale/position embeddings."""
        begin, end = self.config.scale_bounds[si]
        return self.embed_codes(x_blcv) + self.level_pos()[None, begin:end]

    def embed_codes(self, x_blcv: jax.Array) -> jax.Array:
        """Code vectors `[B, l, Cvae]` -> `[B, l, C]` through `word_embed` (with its bias)."""
        return self.word_embed(x_blcv.astype(jnp.float32))

    def drop_labels(self, labels_b: jax.Array, train: bool) -> jax.Array:
        """Label dropout to the null class with `cond_drop_rate` (training only; rng 'dropout')."""
        c = self.config
        if train and c.cond_drop_rate > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), c.cond_drop_rate, labels_b.shape)
            labels_b = jnp.where(drop, c.num_classes, labels_b)
        return labels_b

    def stack(self, segments, head_nm, head, x_blc, cond_bd, mask_ll=None, caches: KVCache | None = None,
              train: bool = False):  # fmt: skip
        """`segments` (`(blocks, first depth index, n)` each, from `make_blocks`) one after the other, then
        `head(head_nm(.))`: tokens `[B, l, C]` -> (logits `[B, l, V]` float32, the new KVCache: one entry per
        segment)."""
        c = self.config
        cond = cond_bd
        if c.shared_aln:
            cond = self.shared_ada_lin(nn.silu(cond_bd)).reshape(-1, 6, c.embed_dim)
        rates = np.linspace(0, c.drop_path_rate, c.depth)
        use_rates = train and c.drop_path_rate > 0

        def body(block, x, xs):
            cache, rate = xs
            return block(x, cond, mask_ll, cache, train, rate)

        new_caches = []
        for k, (blocks, first, n) in enumerate(segments):
            cache = None if caches is None else caches[k]
            rate = per_layer_values(rates[first : first + n], c.scan_layers) if use_rates else None
            if not c.scan_layers:  # per block: (cache, rate)
                per_layer = [(None if cache is None else cache[i], None if rate is None else rate[i]) for i in range(n)]
            else:
                per_layer = (cache, rate)
            x_blc, kv = run_blocks(body, blocks, x_blc, per_layer, length=n, remat=c.remat)
            new_caches.append(kv)
        logits = constrain(head(head_nm(x_blc, cond_bd)), ("batch", "length", "vocab"))
        return logits.astype(jnp.float32), tuple(new_caches)

    def trunk(self, x_blc, cond_bd, mask_ll=None, caches: KVCache | None = None, train: bool = False):
        """The blocks and the head: tokens `[B, l, C]` -> (logits `[B, l, V]` float32, per-block (k, v))."""
        segments = [(self.blocks, 0, self.config.depth)]
        return self.stack(segments, self.head_nm, self.head, x_blc, cond_bd, mask_ll, caches, train)

    def decode_scale(self, x_blc: jax.Array, cond_bd: jax.Array, caches: KVCache | None):
        """One sampling step: this scale's tokens attend to `caches` (the coarser scales' keys; None with the Markov
        mask, whose tokens see only their own scale) and themselves, with no mask.

        The keys are the cache concatenated with this scale's own (a static length per scale, the scale loop being
        unrolled), so every key is valid: the mask is all-True, static, and every backend runs it (with 'pallas'
        as a full `[p^2, L_so_far]` mask). Returns (logits `[B, p^2, V]`, the cache including this scale)."""
        return self.trunk(x_blc, cond_bd, None, caches)

    def __call__(
        self, labels_b: Int[Array, " B"], x_blcv: Float[Array, "B L1 Cv"], train: bool = False
    ) -> Float[Array, "B L V"]:
        self.check_input(x_blcv)
        cond = self.cond_embed(self.drop_labels(labels_b, train))
        logits, _ = self.trunk(self.sequence(cond, self.embed_codes(x_blcv)), cond, self.mask(), None, train)
        return logits

    def check_input(self, x_blcv: jax.Array, what: str = "teacher-forcing input") -> None:
        c = self.config
        want = (c.seq_len - c.first_l, c.z_channels)
        if x_blcv.ndim != 3 or tuple(x_blcv.shape[1:]) != want:
            raise ValueError(
                f"{type(self).__name__} expects {what} [B, {want[0]}, {want[1]}] for patch_nums {c.patch_nums}, "
                f"got {tuple(x_blcv.shape)}"
            )

    def sequence(self, cond_bd: jax.Array, tokens_blc: jax.Array) -> jax.Array:
        """The teacher-forcing sequence `[B, L, C]`: the start tokens, then the embedded inputs `[B, L - first_l, C]`,
        with the scale + position embeddings."""
        sos = cond_bd[:, None] + self.pos_start[None]
        return jnp.concatenate([sos, tokens_blc], axis=1) + self.level_pos()[None]

    def mask(self) -> np.ndarray:
        """The static `[L, L]` teacher-forcing attention mask of `config.attn_mask`."""
        c = self.config
        return attention_mask(c.attn_mask, c.seq_len, c.patch_nums)
