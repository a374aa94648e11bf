"""HMAR: Markovian next-scale prediction with masked refinement (Kumbong et al., CVPR 2025; NVlabs/HMAR).

VAR's transformer (`next_scale.NextScaleTransformer`: its block, embeddings, head and start tokens) with the
block-diagonal "Markov" mask (a token sees its own scale only) and the released HMAR layout:

    base_blocks_0..D-n-1     shared by both branches
    ns_blocks_0..n-1         + ns_head_nm / ns_head: the next-scale branch (stage 1; VAR-d{D} param for param)
    mask_blocks_0..n-1       + mask_head_nm / mask_head: the masked-prediction branch (stage 2)
    word_embed (no bias) + word_embed_bias, mask_embed [1, C], class_emb, pos_start, pos_1LC, lvl_embed

with n = `HMARConfig.mask_layers` (upstream's `n_layers_train`, 8 in every release). Inputs, for a scale s with side
p and f_hat the codes accumulated over the scales before s:

    next-scale       W area(f_hat, p) + b + lvl[s] + pos[s]                      (VAR's input)
    masked           the same + (W area(Phi_s(bicubic(codes(T_s))), p), or mask_embed where T_s is masked)

so the mask branch sees the coarser context and this scale's own, partly masked, tokens (never accumulated).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxgen.models.generators.next_scale import KVCache, NextScaleConfig, NextScaleTransformer, _trunc
from jaxgen.parallel.logical import logical

LOSS_WEIGHTINGS = ("lognorm", "equal", "mean")
# the params stage 2 trains (the rest is shared with the next-scale branch and frozen); every other top-level name
# belongs to stage 1
MASK_BRANCH = ("mask_blocks", "mask_blocks_", "mask_head_nm", "mask_head", "mask_embed")


@dataclasses.dataclass(frozen=True)
class HMARConfig(NextScaleConfig):
    """VAR's fields (`NextScaleConfig`; the mask is always HMAR's block-diagonal one) and HMAR's own."""

    attn_mask: str = "scale_block_diagonal"
    mask_layers: int = 8  # n: blocks of each branch on top of the depth - n shared ones (upstream n_layers_train)
    # stage-1 per-token loss weights: "lognorm" (every released recipe), "equal" (each scale totals 1), "mean" (1/L)
    loss_weighting: str = "lognorm"

    def __post_init__(self):
        super().__post_init__()
        if self.attn_mask != "scale_block_diagonal":
            raise ValueError(
                f"HMARConfig.attn_mask={self.attn_mask!r}: HMAR is the Markov model, each scale sees only itself; "
                f"drop the field (or use family 'var' for VAR's scale-causal mask)"
            )
        if not 1 <= self.mask_layers <= self.depth:
            raise ValueError(f"HMARConfig.mask_layers={self.mask_layers} must be in [1, depth={self.depth}]")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"HMARConfig.loss_weighting={self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")

    @property
    def base_layers(self) -> int:
        return self.depth - self.mask_layers


def in_mask_branch(name: str) -> bool:
    """Whether a top-level param name belongs to the masked-prediction branch (what stage 2 trains)."""
    return any(name == m or (m.endswith("_") and name.startswith(m)) for m in MASK_BRANCH)


class HMARTransformer(NextScaleTransformer):
    """`__call__(labels [B], x [B, L-first_l, Cvae]) -> next-scale logits [B, L, V]` (stage 1, teacher forcing);
    `masked_forward` is stage 2's; `decode_scale` / `decode_masked_scale` are the sampler's per-scale passes."""

    config: HMARConfig

    def setup(self):
        c = self.config
        self.setup_embeddings(word_embed_bias=False)
        if c.base_layers:
            self.base_blocks = self.make_blocks(0, c.base_layers)
        self.ns_blocks = self.make_blocks(c.base_layers, c.mask_layers)
        self.mask_blocks = self.make_blocks(c.base_layers, c.mask_layers)
        self.ns_head_nm, self.ns_head = self.make_head()
        self.mask_head_nm, self.mask_head = self.make_head()
        init = logical(_trunc(self.init_std), ("classes", "embed"))
        self.mask_embed = nn.Embed(1, c.embed_dim, embedding_init=init)

    def __call__(
        self, labels_b: Int[Array, " B"], x_blcv: Float[Array, "B L1 Cv"], train: bool = False
    ) -> Float[Array, "B L V"]:
        logits = super().__call__(labels_b, x_blcv, train)
        if self.is_initializing():  # the mask branch's params too (an unused branch would have none)
            self.masked_forward(labels_b, x_blcv, x_blcv, jnp.zeros((1, x_blcv.shape[1]), bool))
        return logits

    def embed_codes(self, x_blcv: jax.Array) -> jax.Array:
        return self.word_embed(x_blcv.astype(jnp.float32)) + self.word_embed_bias

    def trunk(self, x_blc, cond_bd, mask_ll=None, caches: KVCache | None = None, train: bool = False):
        """The next-scale branch: base blocks, ns blocks, ns head."""
        segments = [*self.shared_segment(), (self.ns_blocks, self.config.base_layers, self.config.mask_layers)]
        return self.stack(segments, self.ns_head_nm, self.ns_head, x_blc, cond_bd, mask_ll, caches, train)

    def mask_trunk(self, x_blc, cond_bd, mask_ll=None, train: bool = False) -> jax.Array:
        """The masked-prediction branch: base blocks, mask blocks, mask head -> logits `[B, l, V]`."""
        segments = [*self.shared_segment(), (self.mask_blocks, self.config.base_layers, self.config.mask_layers)]
        return self.stack(segments, self.mask_head_nm, self.mask_head, x_blc, cond_bd, mask_ll, None, train)[0]

    def shared_segment(self) -> list:
        """The base blocks shared by both branches as a `stack` segment (none when mask_layers == depth)."""
        return [(self.base_blocks, 0, self.config.base_layers)] if self.config.base_layers else []

    def with_own_tokens(self, x_blc: jax.Array, own_blcv: jax.Array, masked_bl: jax.Array) -> jax.Array:
        """Add the scale's own tokens to next-scale input tokens `[B, l, C]`: W own `[B, l, Cvae]`, or `mask_embed`
        where `masked_bl` (`[B or 1, l]` bool) is set."""
        own = jnp.where(
            masked_bl[..., None], self.mask_embed.embedding[0], self.word_embed(own_blcv.astype(jnp.float32))
        )
        return x_blc + own

    def decode_masked_scale(self, x_blc: jax.Array, cond_bd: jax.Array) -> jax.Array:
        """One refinement pass over one scale's tokens (no mask: they see each other): logits `[B, p^2, V]`."""
        return self.mask_trunk(x_blc, cond_bd)

    def masked_forward(
        self,
        labels_b: Int[Array, " B"],
        x_blcv: Float[Array, "B L1 Cv"],
        own_blcv: Float[Array, "B L1 Cv"],
        masked_bl: Bool[Array, "B L1"],
        train: bool = False,
    ) -> Float[Array, "B L V"]:
        """Stage 2, teacher forcing: next-scale inputs `x` (VAR's), each scale's own codes `own` (area(Phi(bicubic(
        codes(T_s))))), the masked positions (`[B or 1, L - first_l]`; the start token is never masked) ->
        mask-head logits `[B, L, V]`, block-diagonal mask."""
        self.check_input(x_blcv)
        self.check_input(own_blcv, "own-token input")
        cond = self.cond_embed(self.drop_labels(labels_b, train))
        tokens = self.with_own_tokens(self.embed_codes(x_blcv), own_blcv, masked_bl)
        return self.mask_trunk(self.sequence(cond, tokens), cond, self.mask(), train)
