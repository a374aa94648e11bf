"""Shared test helpers: where the reference fixtures live, and tiny model builders."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.generators.next_scale import NextScaleConfig, NextScaleTransformer
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE

SHARED = Path(os.environ.get("JAXGEN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VAR_FIXTURES = SHARED / "fixtures" / "var"
VAR_FIXTURE_A = VAR_FIXTURES / "var_fixture_A.npz"
HMAR_FIXTURES = SHARED / "fixtures" / "hmar"
HMAR_FIXTURE_A = HMAR_FIXTURES / "hmar_fixture_A.npz"
AXIAL_FIXTURES = SHARED / "fixtures" / "axial"
AXIAL_FIXTURE_A = AXIAL_FIXTURES / "axial_fixture_A.npz"
EVAL_FIXTURES = SHARED / "fixtures" / "eval"
EVAL_FIXTURE_A = EVAL_FIXTURES / "eval_fixture_A.npz"


@functools.lru_cache(maxsize=8)
def tiny_var(patch_nums=(1, 2, 3, 4), shared_aln=False, num_classes=10, seed=0, **var_kw):
    """A tiny VQVAE (two levels, x2 downsampling) + VAR with random weights: (vae, var, vae_params, var_params)."""
    vae = MultiScaleVQVAE(
        MSVQConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=patch_nums)
    )
    var = NextScaleTransformer(
        NextScaleConfig(
            vocab_size=32,
            z_channels=8,
            num_classes=num_classes,
            depth=2,
            embed_dim=64,
            num_heads=4,
            patch_nums=patch_nums,
            shared_aln=shared_aln,
            **var_kw,
        )
    )
    s = vae.config.image_size
    x = jnp.zeros((1, var.config.seq_len - var.config.first_l, 8))
    vae_shapes = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"]
    var_shapes = jax.eval_shape(var.init, jax.random.key(0), jnp.zeros((1,), jnp.int32), x)["params"]
    return vae, var, random_params(vae_shapes, seed), random_params(var_shapes, seed + 1)


def random_params(shapes, seed: int = 0):
    """Random weights for a tree of shapes, drawn with numpy (no XLA compile of the initialisers), with no branch
    starting at zero (upstream init zeroes biases and shrinks AdaLN gammas and the head): kernels N(0, 1/fan_in),
    norm scales 1 + N(0, 0.1^2), embeddings N(0, 1), everything else N(0, 0.2^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("['kernel']"):
            return jnp.asarray(z / np.sqrt(leaf.size // leaf.shape[-1]))
        if name.endswith("['scale']"):
            return jnp.asarray(1 + 0.1 * z)
        if name.endswith("['embedding']"):
            return jnp.asarray(z)
        return jnp.asarray(0.2 * z)

    return jax.tree_util.tree_map_with_path(draw, shapes)
