"""TiTok-style 1D tokenizer (Yu et al. 2024, "An Image is Worth 32 Tokens for Reconstruction and Generation").

A ViT encoder reads the P = (S / patch)^2 patch tokens of an image together with K learned latent tokens; only the
K latent outputs are kept, projected to the code width and vector-quantised, so an image becomes K token ids
whatever its size. A ViT decoder reads the K (projected) codes together with P mask tokens and turns the mask-token
outputs back into patches.

Images `[B, S, S, 3]` in [-1, 1]; tokens `[B, K]` int32; quantised latents `[B, K, C]`. The quantizer is the
shared `VectorQuantizer` (which works on NHWC maps), applied to the latents viewed as a `[B, 1, K, C]` map.

Logical axes (`jaxgen.parallel.rules`): dense kernels ('embed', 'heads' | 'mlp' | 'latent') and back, positional
tables and latent tokens ('length', 'embed'), norm scales / biases ('norm',); activations ('batch', 'length', ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxgen.models.attention import dot_product_attention
from jaxgen.models.layers import dense, layer_norm
from jaxgen.models.tokenizers.convnets import conv
from jaxgen.models.tokenizers.protocol import TokenLayout
from jaxgen.models.tokenizers.quantizers import VectorQuantizer, check_codebook_options
from jaxgen.parallel.logical import constrain, logical

TOKEN_AXES = ("batch", "length", "embed")  # logical axes of a token sequence [B, L, D]


@dataclasses.dataclass(frozen=True)
class TiTokConfig:
    """Hyper-parameters of the TiTok tokenizer (defaults: a tiny test-sized model)."""

    image_size: int = 16
    patch_size: int = 4
    num_latent_tokens: int = 32  # K: the paper uses 32..256; any K >= 1 works
    width: int = 128  # transformer width D of both encoder and decoder
    depth: int = 2  # ViT blocks in the encoder and in the decoder (each)
    num_heads: int = 4
    mlp_ratio: float = 4.0
    codebook_size: int = 256
    codebook_embed_dim: int = 16
    l2_norm: bool = True
    beta: float = 0.25
    ema_decay: float = 0.0  # > 0: EMA codebook (see quantizers.py); training only
    dead_code_threshold: float = 0.0  # > 0 (EMA only): restart codes whose EMA cluster size falls below it
    dtype: str = "float32"  # compute dtype of the matmuls; params and outputs stay float32

    def __post_init__(self):
        positive = {k: getattr(self, k) for k in ("image_size", "patch_size", "num_latent_tokens", "width", "depth")}
        positive |= {k: getattr(self, k) for k in ("num_heads", "codebook_size", "codebook_embed_dim")}
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ValueError(f"TiTokConfig: these fields must be >= 1, got {bad}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"TiTokConfig: image_size={self.image_size} must be divisible by patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"TiTokConfig: width={self.width} must be divisible by num_heads={self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"TiTokConfig: mlp_ratio must be > 0, got {self.mlp_ratio}")
        check_codebook_options(self.ema_decay, self.dead_code_threshold, "TiTokConfig")

    @property
    def grid(self) -> int:
        """Patches per side: image_size // patch_size (the encoder sees grid^2 patch tokens)."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: K = num_latent_tokens."""
        return self.num_latent_tokens


# ---- building blocks ----------------------------------------------------------------------------------------------
def _table(module: nn.Module, name: str, rows: int, width: int, names=("length", "embed")) -> jax.Array:
    """A learned `[rows, width]` float32 table drawn N(0, 1/width), as TiTok initialises its embeddings."""
    init = nn.initializers.normal(width**-0.5)
    return module.param(name, logical(init, names), (rows, width), jnp.float32)


class ViTBlock(nn.Module):
    """Pre-norm ViT block: x += Attn(LN(x)); x += MLP(LN(x)). `[B, L, D]` float32 -> `[B, L, D]` float32.

    Full bidirectional attention with scale head_dim^-0.5; MLP D -> mlp_ratio * D -> D with (exact) GELU."""

    num_heads: int
    mlp_ratio: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bld: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        b, seq, d = x_bld.shape
        h, hd = self.num_heads, d // self.num_heads
        x_bld = constrain(x_bld, TOKEN_AXES)

        y = layer_norm(1e-5, name="ln_1")(x_bld).astype(self.dtype)
        q, k, v = (
            constrain(
                dense(d, ("embed", "heads"), dtype=self.dtype, name=n)(y).reshape(b, seq, h, hd).transpose(0, 2, 1, 3),
                ("batch", "heads", "length", "kv"),
            )
            for n in ("query", "key", "value")
        )
        att = dot_product_attention(q, k, v, scale=hd**-0.5)  # [B, H, L, hd]
        att = constrain(att.transpose(0, 2, 1, 3).reshape(b, seq, d), ("batch", "length", "heads"))
        x_bld = x_bld + dense(d, ("heads", "embed"), dtype=self.dtype, name="out")(att).astype(jnp.float32)

        y = layer_norm(1e-5, name="ln_2")(x_bld).astype(self.dtype)
        y = dense(int(d * self.mlp_ratio), ("embed", "mlp"), dtype=self.dtype, name="fc1")(y)
        y = constrain(nn.gelu(y, approximate=False), ("batch", "length", "mlp"))
        x_bld = x_bld + dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(y).astype(jnp.float32)
        return constrain(x_bld, TOKEN_AXES)


class ViT(nn.Module):
    """`depth` ViT blocks then a final LayerNorm: `[B, L, D]` -> `[B, L, D]` float32."""

    depth: int
    num_heads: int
    mlp_ratio: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bld: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        for i in range(self.depth):
            x_bld = ViTBlock(self.num_heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(x_bld)
        return layer_norm(1e-5, name="ln_post")(x_bld)


class TiTokEncoder(nn.Module):
    """Image `[B, S, S, 3]` -> un-normalised latents `[B, K, C]` (the K latent-token outputs, projected to C)."""

    config: TiTokConfig

    @nn.compact
    def __call__(self, img_bhwc: Float[Array, "B S S 3"]) -> Float[Array, "B K C"]:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        b, p, k = img_bhwc.shape[0], c.grid**2, c.num_tokens
        patches = conv(c.width, c.patch_size, "patch_embed", stride=c.patch_size, padding="VALID", dtype=dtype)(
            img_bhwc.astype(dtype)
        )  # [B, grid, grid, D]
        patches = patches.reshape(b, p, c.width).astype(jnp.float32) + _table(self, "pos_embed", p, c.width)
        latents = _table(self, "latent_tokens", k, c.width) + _table(self, "latent_pos_embed", k, c.width)
        x = jnp.concatenate([patches, jnp.broadcast_to(latents, (b, k, c.width))], axis=1)  # [B, P + K, D]
        x = ViT(c.depth, c.num_heads, c.mlp_ratio, dtype, name="transformer")(constrain(x, TOKEN_AXES))
        z = dense(c.codebook_embed_dim, ("embed", "latent"), dtype=dtype, name="to_latent")(x[:, p:].astype(dtype))
        return z.astype(jnp.float32)


class TiTokDecoder(nn.Module):
    """Quantised latents `[B, K, C]` -> raw image `[B, S, S, 3]` float32 (not clamped).

    The P patch positions are queried with one learned mask token (shared, as in TiTok) plus the patch positional
    embedding; the mask-token outputs become the patches."""

    config: TiTokConfig

    @nn.compact
    def __call__(self, quant_bkc: Float[Array, "B K C"]) -> Float[Array, "B S S 3"]:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        b, k, g, ps = quant_bkc.shape[0], c.num_tokens, c.grid, c.patch_size
        p = g * g
        lat = dense(c.width, ("latent", "embed"), dtype=dtype, name="from_latent")(quant_bkc.astype(dtype)).astype(
            jnp.float32
        )
        lat = lat + _table(self, "latent_pos_embed", k, c.width)
        mask = _table(self, "mask_token", 1, c.width, (None, "embed")) + _table(self, "pos_embed", p, c.width)
        x = jnp.concatenate([jnp.broadcast_to(mask, (b, p, c.width)), lat], axis=1)  # [B, P + K, D]
        x = ViT(c.depth, c.num_heads, c.mlp_ratio, dtype, name="transformer")(constrain(x, TOKEN_AXES))
        out = dense(ps * ps * 3, ("embed", None), dtype=dtype, name="to_pixels")(x[:, :p].astype(dtype)).astype(
            jnp.float32
        )
        out = out.reshape(b, g, g, ps, ps, 3).transpose(0, 1, 3, 2, 4, 5)  # [B, gy, py, gx, px, 3]
        return out.reshape(b, g * ps, g * ps, 3)


# ---- the tokenizer ----------------------------------------------------------------------------------------------
class TiTok(nn.Module):
    """1D tokenizer: image `[B, S, S, 3]` <-> K token ids `[B, K]` (API mirrors `VQGAN`, without the 2D grid)."""

    config: TiTokConfig
    last_layer = ("decoder", "to_pixels", "kernel")  # where VQGAN's adaptive GAN weight is measured

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def token_layout(self, image_size: int) -> TokenLayout:
        """K 1D tokens of an image of exactly `config.image_size` px."""
        if image_size != self.config.image_size:
            raise ValueError(
                f"data.image_size={image_size} does not fit the tokenizer: titok.image_size="
                f"{self.config.image_size}. Set one to the other."
            )
        return TokenLayout(self.config.num_tokens)

    def setup(self):
        c = self.config
        self.encoder = TiTokEncoder(c)
        self.decoder = TiTokDecoder(c)
        self.quantize = VectorQuantizer(
            codebook_size=c.codebook_size,
            embed_dim=c.codebook_embed_dim,
            l2_norm=c.l2_norm,
            beta=c.beta,
            ema_decay=c.ema_decay,
            dead_code_threshold=c.dead_code_threshold,
        )

    def check_image(self, img_bhwc) -> None:
        """A clear ValueError unless `img_bhwc` is `[B, S, S, 3]` with S = config.image_size."""
        s = self.config.image_size
        if img_bhwc.ndim != 4 or tuple(img_bhwc.shape[1:]) != (s, s, 3):
            raise ValueError(f"TiTok expects images [B, {s}, {s}, 3] (image_size={s}), got {tuple(img_bhwc.shape)}")

    def _check_latents(self, x, what: str, trailing: tuple[int, ...]) -> None:
        """A clear ValueError unless `x` is `[B, K, *trailing]`."""
        k = self.config.num_tokens
        if x.ndim != 2 + len(trailing) or x.shape[1] != k or tuple(x.shape[2:]) != trailing:
            want = ", ".join(["B", str(k), *map(str, trailing)])
            raise ValueError(f"TiTok {what} must be [{want}] (num_latent_tokens={k}), got {tuple(x.shape)}")

    def pre_quant(self, img_bhwc: Float[Array, "B S S 3"]) -> Float[Array, "B K C"]:
        """The un-normalised latent vectors the quantizer sees."""
        self.check_image(img_bhwc)
        return constrain(self.encoder(img_bhwc), ("batch", "length", "latent"))

    def _quantize(self, z_bkc: Float[Array, "B K C"]):
        """VQ of `[B, K, C]` through the NHWC quantizer as a `[B, 1, K, C]` map: (quant `[B, K, C]`, loss, ids)."""
        quant, loss, idx = self.quantize(z_bkc[:, None])
        return quant[:, 0], loss, idx

    def encode(self, img_bhwc: Float[Array, "B S S 3"]) -> tuple[Float[Array, "B K C"], Int[Array, "B K"]]:
        """Image -> (quantised latents `[B, K, C]`, token ids `[B, K]` int32)."""
        quant, _, idx = self._quantize(self.pre_quant(img_bhwc))
        return quant, idx

    def decode(self, quant_bkc: Float[Array, "B K C"]) -> Float[Array, "B S S 3"]:
        """Quantised latents `[B, K, C]` -> raw reconstruction `[B, S, S, 3]` float32 (not clamped)."""
        self._check_latents(quant_bkc, "latents", (self.config.codebook_embed_dim,))
        return self.decoder(quant_bkc)

    def decode_code(self, idx_bk: Int[Array, "B K"]) -> Float[Array, "B S S 3"]:
        """Token ids `[B, K]` -> raw image `[B, S, S, 3]`."""
        self._check_latents(idx_bk, "token ids", ())
        return self.decode(self.quantize.codes(idx_bk, (1, self.config.num_tokens))[:, 0])

    def encode_ids(self, img_bhwc: Float[Array, "B S S 3"]) -> Int[Array, "B K"]:
        """Image -> token ids `[B, K]` int32."""
        return self.encode(img_bhwc)[1]

    def decode_ids(self, idx_bk: Int[Array, "B K"]) -> Float[Array, "B S S 3"]:
        """Token ids -> raw image (= `decode_code`)."""
        return self.decode_code(idx_bk)

    def codebook(self) -> Float[Array, "V C"]:
        """The code vectors as the quantizer uses them `[V, C]` (unit-norm with `l2_norm`)."""
        return self.quantize.codebook()

    def __call__(self, img_bhwc: Float[Array, "B S S 3"]):
        """Training forward: (raw reconstruction `[B, S, S, 3]`, VQ loss scalar, token ids `[B, K]`)."""
        quant, loss, idx = self._quantize(self.pre_quant(img_bhwc))
        return self.decode(quant), loss, idx
