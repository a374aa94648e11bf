"""The Axial Transformer (Ho, Kalchbrenner, Weissenborn, Salimans 2019): an autoregressive model of 8-bit pixels in
raster order, with attention along one image axis at a time.

One channel (`PixelDecoder2D`, upstream's `Transformer2d`, param scope `transformer2d`), pixels `x` `[B, H, W]`:

    e = embs[x]                                   [B, H, W, D]
    pos[h, w] = pos_embs_h[h] + pos_embs_w[w]
    outer decoder:  u = e + pos (+ cond); pairs of (unmasked row, causal column) blocks; shift down one row
    inner decoder:  r = shift_right(e) + u + pos (+ cond); causal row blocks
    logits = final_dense(final_ln(r))             [B, H, W, 256]

Row r's context u only sees rows above r (the column attention is causal, then the shift), and the inner decoder
adds the pixels to the left of each position in the row, so pixel (r, c) depends on exactly the pixels before it in
raster order.

Several channels (`AxialTransformer` with `channels` > 1, upstream's `Transformer3d` / `ar_decoder`) model one
channel at a time with the one shared `transformer2d`: channel k's conditioning map is a 3x3 conv of [the channels
< k as value / 255 (later channels 0), a one-hot of k], plus the stack's own position tables, through pairs of
unmasked row and column blocks; it is added as `cond` to both decoders.

A block is pre-norm: x += proj_out(attn(LN(x))); x += MLP(LN(x)), the MLP Dense -> x * sigmoid(1.702 x) -> Dense;
LayerNorm eps 1e-5 (two-pass variance). Attention is `jaxgen.models.attention.axial_attention` (backends 'xla',
'cudnn', 'pallas' = `pallas_kernels.axial_attention`). `num_classes` > 0 adds a class embedding as the external
`cond` (upstream's slot for it; unconditional, as released, when 0).

Parameter names are upstream's TF scopes (`transformer2d/outer_row_0/attn/q`, `exterior_input_conv`, ...) with
Flax's leaf names (`kernel` [in, out], `bias`, LayerNorm `scale` / `bias`), so a TF variable maps by name.
Logical axes: width 'embed', q / k / v outputs 'heads', MLP 'mlp', values 'vocab', positions 'height' / 'width'.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxgen.models.attention import attention, axial_attention, check_backend
from jaxgen.models.layers import dense, layer_norm
from jaxgen.parallel.logical import constrain, logical

LAYER_NORM_EPS = 1e-5
NUM_VALUES = 256  # 8-bit pixels
_ACT_AXES = ("batch", "height", "width", "embed")


@dataclasses.dataclass(frozen=True)
class AxialConfig:
    """Hyper-parameters (defaults: the ImageNet 32x32 release, 341,178,112 params; `configs/axial_imagenet.py`)."""

    height: int = 32  # H (image rows)
    width: int = 32  # W
    channels: int = 3  # C: 1 is the one-channel model alone; more adds the conditioning (exterior) stack
    hidden_size: int = 1536  # D (upstream emb_dim)
    num_heads: int = 16
    mlp_factor: int = 1  # MLP hidden = D * mlp_factor (upstream hdim_factor)
    num_outer_layers: int = 8  # row + column blocks of the outer decoder (even)
    num_inner_layers: int = 8  # causal row blocks of the inner decoder
    num_exterior_layers: int = 8  # row + column blocks of the conditioning stack (channels > 1; even)
    num_classes: int = 0  # > 0: class-conditional (an embedding row per class added as cond); 0: unconditional
    dropout: float = 0.0  # on the two residual branches of every block (training only)
    emb_init_scale: float = 5.0  # embeddings and position tables ~ N(0, (scale / sqrt(D))^2)
    res_init_scale: float = 1e-10  # variance-scaling scale of each block's two output projections
    logits_init_scale: float = 1e-10  # ... and of final_dense
    dtype: str = "float32"  # compute dtype of the matmuls; params, LayerNorms, softmax and logits stay float32
    attn_backend: str = "xla"  # "xla" | "cudnn" | "pallas" (jaxgen.models.attention.axial_attention)

    def __post_init__(self):
        check_backend(self.attn_backend, "AxialConfig.attn_backend")
        checks = [
            (self.height >= 1 and self.width >= 1, f"height / width must be >= 1, got {self.height} x {self.width}"),
            (self.channels >= 1, f"channels must be >= 1, got {self.channels}"),
            (self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}"),
            (self.num_outer_layers % 2 == 0 and self.num_outer_layers >= 0,
             f"num_outer_layers must be even (row / column pairs), got {self.num_outer_layers}"),
            (self.channels == 1 or self.num_exterior_layers % 2 == 0,
             f"num_exterior_layers must be even (row / column pairs), got {self.num_exterior_layers}"),
            (self.num_inner_layers >= 1, f"num_inner_layers must be >= 1, got {self.num_inner_layers}"),
            (self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"AxialConfig: {message}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def num_subpixels(self) -> int:
        return self.height * self.width * self.channels


def _emb_init(scale: float):
    """N(0, (scale / sqrt(D))^2), D the last dimension (upstream's embedding init)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) * (scale / np.sqrt(shape[-1]))

    return init


def _kernel_init(scale: float = 1.0):
    """TF's default variance scaling (fan_in, truncated normal) with `scale`."""
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def gelu_sigmoid(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU (not the erf or the tanh one)."""
    return x * jax.nn.sigmoid(1.702 * x)


def shift_down(x_bhwd: jax.Array) -> jax.Array:
    """Row r gets row r - 1; row 0 is zeros (the last row is dropped)."""
    return jnp.pad(x_bhwd[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))


def shift_right(x_bhwd: jax.Array) -> jax.Array:
    """Column c gets column c - 1; column 0 is zeros."""
    return jnp.pad(x_bhwd[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))


class AttentionProjections(nn.Module):
    """q, k, v (Dense D -> D with biases, head-major: unit h * head_dim + j is head h) and proj_out."""

    config: AxialConfig

    def setup(self):
        c = self.config
        dt = c.compute_dtype
        self.q = dense(c.hidden_size, ("embed", "heads"), kernel_init=_kernel_init(), dtype=dt)
        self.k = dense(c.hidden_size, ("embed", "heads"), kernel_init=_kernel_init(), dtype=dt)
        self.v = dense(c.hidden_size, ("embed", "heads"), kernel_init=_kernel_init(), dtype=dt)
        self.proj_out = dense(c.hidden_size, ("heads", "embed"), kernel_init=_kernel_init(c.res_init_scale), dtype=dt)

    def split(self, x: Float[Array, "... D"]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`[..., D]` -> q, k, v `[..., heads, head_dim]`."""
        shape = (*x.shape[:-1], self.config.num_heads, self.config.head_dim)
        return tuple(f(x).reshape(shape) for f in (self.q, self.k, self.v))

    def __call__(self, heads: Float[Array, "... N hd"]) -> Float[Array, "... D"]:
        return self.proj_out(heads.reshape((*heads.shape[:-2], -1)))


class Mlp(nn.Module):
    config: AxialConfig

    def setup(self):
        c = self.config
        dt = c.compute_dtype
        self.proj_in = dense(c.hidden_size * c.mlp_factor, ("embed", "mlp"), kernel_init=_kernel_init(), dtype=dt)
        self.proj_out = dense(c.hidden_size, ("mlp", "embed"), kernel_init=_kernel_init(c.res_init_scale), dtype=dt)

    def __call__(self, x):
        return self.proj_out(gelu_sigmoid(self.proj_in(x)))


class AxialBlock(nn.Module):
    """Pre-norm transformer block with attention along `axis` ("row": over W, "col": over H), causal if `causal`."""

    config: AxialConfig
    axis: str
    causal: bool

    def setup(self):
        self.layernorm_attn = layer_norm(LAYER_NORM_EPS)
        self.attn = AttentionProjections(self.config)
        self.layernorm_mlp = layer_norm(LAYER_NORM_EPS)
        self.mlp = Mlp(self.config)
        self.drop = nn.Dropout(self.config.dropout)

    def _residuals(self, x, heads, train: bool):
        branch = self.attn(heads)
        self.sow("intermediates", "attn_branch", branch)
        x = x + self.drop(branch, deterministic=not train)
        self.sow("intermediates", "resid_mid", x)
        h = self.layernorm_mlp(x)
        self.sow("intermediates", "layernorm_mlp_out", h)
        branch = self.mlp(h)
        self.sow("intermediates", "mlp_branch", branch)
        return x + self.drop(branch, deterministic=not train)

    def __call__(self, x: Float[Array, "B H W D"], train: bool = False) -> Float[Array, "B H W D"]:
        c = self.config
        h = self.layernorm_attn(x)
        self.sow("intermediates", "layernorm_attn_out", h)
        q, k, v = self.attn.split(h)
        for name, t in (("q", q), ("k", k), ("v", v)):
            self.sow("intermediates", name, t)
        heads = axial_attention(q, k, v, axis=self.axis, causal=self.causal, scale=c.head_dim**-0.5,
                                backend=c.attn_backend)  # fmt: skip
        self.sow("intermediates", "attn_heads", heads)
        out = constrain(self._residuals(x, heads, train), _ACT_AXES)
        self.sow("intermediates", "out", out)
        return out

    def decode(self, x_nd: Float[Array, "N D"], cache: tuple, index: jax.Array) -> tuple[jax.Array, tuple]:
        """One position per line: `x_nd` `[N, D]` is position `index` (traced) of N lines along this block's axis;
        `cache` (k, v) `[N, heads, L, head_dim]` holds the positions before it and gets this one. Causal blocks only
        (an unmasked block needs the whole line: run `__call__` on it)."""
        c = self.config
        q, k, v = self.attn.split(self.layernorm_attn(x_nd))  # [N, heads, hd]
        ck, cv = (jax.lax.dynamic_update_slice_in_dim(t, u[:, :, None].astype(t.dtype), index, axis=2)
                  for t, u in zip(cache, (k, v), strict=True))  # fmt: skip
        seen = (jnp.arange(ck.shape[2]) <= index)[None, :]  # [1, L]
        heads = attention(q[:, :, None], ck, cv, mask=seen, scale=c.head_dim**-0.5, backend="xla")[:, :, 0]
        return self._residuals(x_nd, heads, train=False), (ck, cv)


def check_pixel_values(x) -> None:
    """8-bit values 0..255 (integers) when `x` is concrete; a traced `x` is not checked (nothing to read)."""
    if isinstance(x, jax.core.Tracer):
        return
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"axial: pixels must be integers 0..255, got dtype {arr.dtype} (images in [-1, 1] become "
                         f"pixels through the pixel tokenizer's encode_ids)")  # fmt: skip
    if arr.size and (arr.min() < 0 or arr.max() > NUM_VALUES - 1):
        raise ValueError(f"axial: pixel values must be in [0, 255], got min {arr.min()} max {arr.max()}")


def _blocks(module: nn.Module, names: list[str]) -> list[AxialBlock]:
    return [getattr(module, n) for n in names]


def _pair_names(prefix: str, num_layers: int) -> list[str]:
    """[prefix_row_0, prefix_col_0, prefix_row_1, ...]: `num_layers` / 2 (row, column) pairs."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers // 2) for kind in ("row", "col")]


class PixelDecoder2D(nn.Module):
    """The one-channel model (upstream `Transformer2d`): pixels `[B, H, W]` (+ cond `[B, H, W, D]`) -> logits
    `[B, H, W, 256]` (module docstring). Its pieces (`embed`, `outer`, `inner`, `to_logits`, the decode steps) are
    separate methods for the sampler."""

    config: AxialConfig

    def setup(self):
        c = self.config
        d = c.hidden_size
        emb = _emb_init(c.emb_init_scale)
        self.embs = self.param("embs", logical(emb, ("vocab", "embed")), (NUM_VALUES, d))
        self.pos_embs_h = self.param("pos_embs_h", logical(emb, ("height", "embed")), (c.height, d))
        self.pos_embs_w = self.param("pos_embs_w", logical(emb, ("width", "embed")), (c.width, d))
        self.outer_names = _pair_names("outer", c.num_outer_layers)
        for name in self.outer_names:
            setattr(self, name, AxialBlock(c, axis="row" if "_row_" in name else "col", causal="_col_" in name))
        self.inner_names = [f"inner_row_{i}" for i in range(c.num_inner_layers)]
        for name in self.inner_names:
            setattr(self, name, AxialBlock(c, axis="row", causal=True))
        self.final_ln = layer_norm(LAYER_NORM_EPS)
        self.final_dense = dense(NUM_VALUES, ("embed", "vocab"), kernel_init=_kernel_init(c.logits_init_scale),
                                 dtype=c.compute_dtype)  # fmt: skip

    def pos(self) -> Float[Array, "H W D"]:
        return self.pos_embs_h[:, None, :] + self.pos_embs_w[None, :, :]

    def embed(self, x: Int[Array, ...]) -> Float[Array, "... D"]:
        return jnp.take(self.embs, x, axis=0)

    def outer(self, e_bhwd, cond, train: bool = False) -> Float[Array, "B H W D"]:
        """The outer decoder's context u (shifted down one row)."""
        u = e_bhwd + self.pos() + (0.0 if cond is None else cond)
        self.sow("intermediates", "outer_in", u)
        for block in _blocks(self, self.outer_names):
            u = block(u, train)
        u = shift_down(u)
        self.sow("intermediates", "u", u)
        return u

    def inner(self, e_bhwd, u_bhwd, cond, train: bool = False) -> Float[Array, "B H W D"]:
        r = shift_right(e_bhwd) + u_bhwd + self.pos() + (0.0 if cond is None else cond)
        self.sow("intermediates", "inner_in", r)
        for block in _blocks(self, self.inner_names):
            r = block(r, train)
        return r

    def to_logits(self, h: Float[Array, "... D"]) -> Float[Array, "... 256"]:
        h = self.final_ln(h)
        self.sow("intermediates", "final_ln_out", h)
        return self.final_dense(h).astype(jnp.float32)

    def __call__(self, x_bhw: Int[Array, "B H W"], cond=None, train: bool = False) -> Float[Array, "B H W 256"]:
        e = self.embed(x_bhw)
        self.sow("intermediates", "emb", e)
        return self.to_logits(self.inner(e, self.outer(e, cond, train), cond, train))

    # -- the fast sampler's steps (`jaxgen.sampling.axial`) --------------------------------------------------------

    def outer_row(self, x_bw: Int[Array, "B W"], cond_bwd, row: jax.Array, cache: tuple) -> tuple[jax.Array, tuple]:
        """The outer decoder on one finished row `row` (traced) of pixels `[B, W]`: its output `[B, W, D]` (the
        context u of row + 1) and the column blocks' caches `((k, v) [B * W, heads, H, hd], ...)` with it added."""
        b, w = x_bw.shape
        d = self.config.hidden_size
        pos = jax.lax.dynamic_index_in_dim(self.pos(), row, axis=0, keepdims=False)  # [W, D]
        h = self.embed(x_bw) + pos + (0.0 if cond_bwd is None else cond_bwd)
        new_cache, i = [], 0
        for block in _blocks(self, self.outer_names):
            if block.axis == "row":  # unmasked over the (complete) row
                h = block(h[:, None])[:, 0]
            else:  # causal over rows: this row against the cached rows above it
                out, layer_cache = block.decode(h.reshape(b * w, d), cache[i], row)
                h, i = out.reshape(b, w, d), i + 1
                new_cache.append(layer_cache)
        return h, tuple(new_cache)

    def inner_pixel(self, x_in_bd, col: jax.Array, cache: tuple) -> tuple[jax.Array, tuple]:
        """The inner decoder at column `col` (traced) of the current row, from its input `[B, D]` (the embedding of
        the pixel to the left, or 0, + u + pos + cond): logits `[B, 256]` and the row caches
        `((k, v) [B, heads, W, hd], ...)` with this column added."""
        h, new_cache = x_in_bd, []
        for block, layer_cache in zip(_blocks(self, self.inner_names), cache, strict=True):
            h, layer_cache = block.decode(h, layer_cache, col)
            new_cache.append(layer_cache)
        return self.to_logits(h), tuple(new_cache)


class AxialTransformer(nn.Module):
    """The generator: pixels `[B, H, W, C]` int (0..255) and class labels `[B]` -> logits `[B, H, W, C, 256]` (all
    channels, teacher forcing). One channel: `transformer2d` alone; several: one channel at a time with the
    conditioning stack (module docstring)."""

    config: AxialConfig

    def setup(self):
        c = self.config
        d = c.hidden_size
        self.transformer2d = PixelDecoder2D(c)
        if c.channels > 1:
            emb = _emb_init(c.emb_init_scale)
            self.pos_embs_h = self.param("pos_embs_h", logical(emb, ("height", "embed")), (c.height, d))
            self.pos_embs_w = self.param("pos_embs_w", logical(emb, ("width", "embed")), (c.width, d))
            self.exterior_input_conv = nn.Conv(
                d, (3, 3), padding="SAME", dtype=c.compute_dtype,
                kernel_init=logical(_kernel_init(), ("conv_h", "conv_w", "conv_in", "conv_out")),
                bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)),
            )  # fmt: skip
            self.exterior_names = _pair_names("exterior", c.num_exterior_layers)
            for name in self.exterior_names:
                setattr(self, name, AxialBlock(c, axis="row" if "_row_" in name else "col", causal=False))
        if c.num_classes:
            init = _emb_init(c.emb_init_scale)
            self.class_embs = self.param("class_embs", logical(init, ("classes", "embed")), (c.num_classes, d))

    def check_input(self, x_bhwc, labels_b=None) -> None:
        """Shape errors before compiling, and values outside 0..255 when `x_bhwc` is concrete (not traced)."""
        c = self.config
        want = (c.height, c.width, c.channels)
        if x_bhwc.ndim != 4 or tuple(x_bhwc.shape[1:]) != want:
            raise ValueError(f"axial: pixels must be [B, H, W, C] = [B, {c.height}, {c.width}, {c.channels}] (the "
                             f"model's height, width, channels), got shape {tuple(x_bhwc.shape)}")  # fmt: skip
        if labels_b is not None and tuple(labels_b.shape) != (x_bhwc.shape[0],):
            raise ValueError(f"axial: labels must be [B] = [{x_bhwc.shape[0]}], got {tuple(labels_b.shape)}")
        check_pixel_values(x_bhwc)

    def class_cond(self, labels_b) -> jax.Array | None:
        """The external cond `[B, 1, 1, D]` of class-conditional models (None when unconditional)."""
        if not self.config.num_classes:
            return None
        return jnp.take(self.class_embs, labels_b, axis=0)[:, None, None, :]

    def conditioning(self, x_bhwc, channel_b, labels_b=None, train: bool = False) -> jax.Array | None:
        """What the 2D model adds as cond when it models channel `channel_b` `[B]` (int): for one channel the class
        cond (or None); for several, the exterior stack on [channels < k as value / 255, one-hot of k]."""
        c = self.config
        ext = self.class_cond(labels_b) if labels_b is not None else None
        if c.channels == 1:
            return ext
        k = jnp.arange(c.channels)
        before = (k[None, :] < channel_b[:, None])[:, None, None, :]  # [B, 1, 1, C]
        planes = jnp.where(before, x_bhwc.astype(jnp.float32) / 255.0, 0.0)
        one_hot = jnp.broadcast_to((k[None, :] == channel_b[:, None])[:, None, None, :], planes.shape)
        planes = jnp.concatenate([planes, one_hot.astype(jnp.float32)], axis=-1)  # [B, H, W, 2C]
        self.sow("intermediates", "ext_input_planes", planes)
        h = self.exterior_input_conv(planes).astype(jnp.float32)
        self.sow("intermediates", "ext_conv", h)
        h = h + self.pos_embs_h[None, :, None, :] + self.pos_embs_w[None, None, :, :]
        if ext is not None:
            h = h + ext
        self.sow("intermediates", "ext_in", h)
        for block in _blocks(self, self.exterior_names):
            h = block(h, train)
        self.sow("intermediates", "cond", h)
        return h

    def channel_logits(self, labels_b, x_bhwc, channel_b, train: bool = False) -> Float[Array, "B H W 256"]:
        """Logits of channel `channel_b[i]` of each image (upstream `compute_slice_logits`)."""
        cond = self.conditioning(x_bhwc, channel_b, labels_b, train)
        current = jnp.take_along_axis(x_bhwc, channel_b[:, None, None, None], axis=-1)[..., 0]
        return self.transformer2d(current, cond, train)

    def __call__(self, labels_b, x_bhwc, train: bool = False) -> Float[Array, "B H W C 256"]:
        self.check_input(x_bhwc, labels_b)
        b = x_bhwc.shape[0]
        out = [self.channel_logits(labels_b, x_bhwc, jnp.full((b,), k, jnp.int32), train)
               for k in range(self.config.channels)]  # fmt: skip
        return jnp.stack(out, axis=3)

    def example_inputs(self) -> tuple[jax.Array, jax.Array]:
        c = self.config
        return jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.height, c.width, c.channels), jnp.int32)

    # -- the sampler's pieces --------------------------------------------------------------------------------------

    def embed_value(self, x):
        return self.transformer2d.embed(x)

    def pos2d(self):
        return self.transformer2d.pos()

    def outer_row(self, x_bw, cond_bwd, row, cache):
        return self.transformer2d.outer_row(x_bw, cond_bwd, row, cache)

    def inner_pixel(self, x_in_bd, col, cache):
        return self.transformer2d.inner_pixel(x_in_bd, col, cache)


def bits_per_dim(logits: Float[Array, "... K"], x: Int[Array, ...]) -> tuple[jax.Array, jax.Array]:
    """(per (sub)pixel negative log-likelihood in nats `[...]`, its mean over the trailing axes of each image in bits
    `[B]`): sparse softmax cross-entropy, / ln 2."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, x[..., None].astype(jnp.int32), axis=-1)[..., 0]
    bpd = nll.reshape(nll.shape[0], -1).mean(axis=1) / np.log(2.0)
    return nll, bpd
