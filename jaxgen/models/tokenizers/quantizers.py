"""Vector quantizers. `MultiScaleResidualQuantizer` is VAR's residual quantizer over a pyramid of scales.

Feature maps are NHWC `[B, h, w, C]`; per-scale token ids are `[B, p*p]` int32, flattened row-major.
Codebooks `[V, C]` carry the logical axes ('codebook', 'latent') (see `jaxgen.parallel.rules`).

Codebook training, per quantizer (`ema_decay`):
  * 0 (default): the codebook is the param `embedding/embedding [V, C]` (an `nn.Embed`) trained by the gradients of
    the codebook term of the VQ loss.
  * > 0: the codebook is updated by exponential moving averages (van den Oord et al. 2017, appendix A.1; VQ-VAE-2) and
    is not a param. It lives in the variable collection "codebook" of the quantizer module:
        embedding    [V, C]  the codes as stored (`embed_sum / Laplace-smoothed cluster_size`)
        cluster_size [V]     EMA of the number of vectors assigned to each code
        embed_sum    [V, C]  EMA of the sum of the vectors assigned to each code
    The update runs in the training forward (`__call__`) only when the collection is mutable and the module is not
    initialising (Flax's BatchNorm pattern): `apply(variables, x, mutable=["codebook"])`; every other call reads the
    stored codebook unchanged. The codebook term of the loss is dropped (only the commitment term remains).
  * `dead_code_threshold` > 0 (EMA only): in an update, every code whose EMA `cluster_size` falls below the threshold
    is restarted from a random vector of the batch; needs `rngs={"codebook": key}`. The number of restarted codes is
    sown as `intermediates/.../restarted_codes` (int32 scalar).
  * One update per train step, also with gradient accumulation: a step of A micro-batches traces each micro-batch's
    forward inside `micro_batch(i, A)` (jaxgen.train.step does), and the update then equals the one the whole batch
    would make: micro-batch 0 decays the statistics once, every micro-batch adds its counts and sums, and the last
    recomputes `embedding` and restarts dead codes (from its own vectors). Until then `embedding` stays the codebook
    of the step's start, so every micro-batch looks up the codes the whole batch would. `restarted_codes` is sown
    only by the last micro-batch, times A, so that the step's mean over its micro-batches is the step's count.
`lookup` sows `intermediates/.../code_logits` `[N, V]` float32 (one entry per call: MSVQ sows one per scale), with the
same argmax as the returned ids and gradients flowing to the looked-up vectors; a no-op unless "intermediates" is
mutable.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.layers import l2_normalize
from jaxgen.models.tokenizers.convnets import conv
from jaxgen.models.tokenizers.resize import area_resize, bicubic_resize
from jaxgen.parallel.logical import logical

HIGHEST = jax.lax.Precision.HIGHEST


def phi_schedule(num_phis: int, num_scales: int) -> tuple[int, ...]:
    """Which Phi conv each scale uses: the one whose tick is nearest to k / (S - 1).

    Ticks are linspace(1/(3K), 1 - 1/(3K), K) for K = 4 and linspace(1/(2K), 1 - 1/(2K), K) otherwise; computed in
    float64 like upstream, so ties decided by rounding come out the same (released 10 scales: 0,0,1,1,1,2,2,3,3,3).
    """
    if num_phis <= 1:
        return (0,) * num_scales
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    at = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return tuple(int(np.argmin(np.abs(ticks - a))) for a in at)


def codebook_init(key, shape, dtype=jnp.float32):
    """Uniform in [-1/V, 1/V], VAR's default codebook init."""
    return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])


CODEBOOK_INIT = logical(codebook_init, ("codebook", "latent"))
CODEBOOK_COLLECTION = "codebook"  # variable collection of the EMA codebook (also the name of its PRNG stream)
LAPLACE_EPS = 1e-5  # additive smoothing of the EMA cluster sizes

# (micro-batch index: int32 [] (may be traced), micro-batches per step: int) while a micro-batch's forward is traced
_MICRO_BATCH: contextvars.ContextVar[tuple[jax.Array, int] | None] = contextvars.ContextVar(
    "jaxgen_codebook_micro_batch", default=None
)


@contextlib.contextmanager
def micro_batch(index: jax.Array | int, count: int) -> Iterator[None]:
    """Trace, inside this block, the training forward of micro-batch `index` (int32 [], may be a tracer of the
    enclosing scan) of a train step of `count` micro-batches: EMA codebooks then make one update per step, the one
    the whole batch would make (module docstring). Read at trace time; outside it every forward is a whole step."""
    token = _MICRO_BATCH.set((jnp.asarray(index, jnp.int32), int(count)))
    try:
        yield
    finally:
        _MICRO_BATCH.reset(token)


def check_codebook_options(ema_decay: float, dead_code_threshold: float, where: str = "quantizer") -> None:
    """A clear error for invalid EMA / dead-code settings."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"{where}: ema_decay must be in [0, 1) (0 = gradient-trained codebook), got {ema_decay}")
    if dead_code_threshold < 0.0:
        raise ValueError(f"{where}: dead_code_threshold must be >= 0, got {dead_code_threshold}")
    if dead_code_threshold > 0.0 and ema_decay <= 0.0:
        raise ValueError(
            f"{where}: dead_code_threshold={dead_code_threshold} needs an EMA codebook (ema_decay > 0), got "
            f"ema_decay={ema_decay}; set ema_decay (e.g. 0.99) or dead_code_threshold=0"
        )


def _ema_variables(module: nn.Module, num_codes: int, dim: int):
    """Create (in `setup`) the EMA codebook variables: (embedding [V, C], cluster_size [V], embed_sum [V, C]).

    Init: embedding uniform in [-1/V, 1/V] (like the param codebook), cluster_size = 1, embed_sum = embedding, so the
    first update starts from a codebook equal to the initial one up to the Laplace smoothing.
    """
    emb = module.variable(
        CODEBOOK_COLLECTION, "embedding", lambda: CODEBOOK_INIT(module.make_rng("params"), (num_codes, dim))
    )
    size = module.variable(
        CODEBOOK_COLLECTION, "cluster_size", logical(lambda: jnp.ones((num_codes,), jnp.float32), ("codebook",))
    )
    esum = module.variable(CODEBOOK_COLLECTION, "embed_sum", logical(lambda: emb.value, ("codebook", "latent")))
    return emb, size, esum


def _updates_codebook(module: nn.Module) -> bool:
    """Whether this call updates the EMA codebook: collection mutable and not initialising (Flax BatchNorm)."""
    return module.is_mutable_collection(CODEBOOK_COLLECTION) and not module.is_initializing()


def _ema_update(module: nn.Module, emb, size, esum, z_nc: jax.Array, idx_n: jax.Array) -> None:
    """One EMA step of the codebook from the vectors `z [N, C]` assigned to the codes `idx [N]`.

        cluster_size <- d * cluster_size + (1 - d) * count_v
        embed_sum    <- d * embed_sum    + (1 - d) * sum_{i: idx_i = v} z_i
        embedding    <- embed_sum / ((cluster_size + eps) / (n + V eps) * n),   n = sum_v cluster_size, eps = 1e-5

    Dead codes (`cluster_size < dead_code_threshold` after the step) are restarted from batch vectors drawn from the
    "codebook" PRNG stream (without replacement when N >= V): embedding = the vector exactly, cluster_size = the
    threshold, embed_sum = threshold * vector (so embed_sum / cluster_size is the vector). A restarted code therefore
    survives the next step only if it gets at least `threshold` EMA-weighted assignments, the same liveness test as
    any other code; an unused restarted code is drawn again at the next step (as Jukebox does with threshold 1).

    Data parallel: the batch is one global (jitted, sharded) array, so the segment sums below are already sums over the
    global batch (XLA inserts the cross-device reduction); no pmean is needed.

    Inside `micro_batch(i, A)` with A > 1 this is the share of micro-batch i in the step's one update: the decay only
    at i = 0, the new embedding and the restarts only at i = A - 1 (so the A calls add up to the whole batch's update).
    """
    decay, threshold = float(module.ema_decay), float(module.dead_code_threshold)
    z = jax.lax.stop_gradient(z_nc.astype(jnp.float32))
    idx = jax.lax.stop_gradient(idx_n.reshape(-1))
    v = size.value.shape[0]
    counts = jax.ops.segment_sum(jnp.ones(idx.shape, jnp.float32), idx, num_segments=v)
    sums = jax.ops.segment_sum(z, idx, num_segments=v)
    micro = _MICRO_BATCH.get()
    if micro is not None and micro[1] > 1:
        index, count = micro
        step_decay = jnp.where(index == 0, decay, 1.0)  # decay once per step; later micro-batches only add
        last = index == count - 1
    else:
        count, step_decay, last = 1, decay, None
    cluster_size = step_decay * size.value + (1.0 - decay) * counts
    embed_sum = step_decay * esum.value + (1.0 - decay) * sums
    dead = new = None
    if threshold > 0.0:
        if not module.has_rng(CODEBOOK_COLLECTION):
            raise ValueError(
                f"dead_code_threshold={threshold} restarts codes at random: pass rngs={{'{CODEBOOK_COLLECTION}': key}} "
                f"to apply together with mutable=['{CODEBOOK_COLLECTION}']"
            )
        key = module.make_rng(CODEBOOK_COLLECTION)
        n = z.shape[0]
        pick = jax.random.permutation(key, n)[:v] if n >= v else jax.random.randint(key, (v,), 0, n)
        new = z[pick]
        dead = cluster_size < threshold
        if last is not None:  # restarts at the step's last micro-batch only
            dead = dead & last
        cluster_size = jnp.where(dead, threshold, cluster_size)
        embed_sum = jnp.where(dead[:, None], threshold * new, embed_sum)
        # x count: the step averages its micro-batches' metrics, and only the last one restarts
        module.sow("intermediates", "restarted_codes", jnp.sum(dead, dtype=jnp.int32) * count)
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + LAPLACE_EPS) / (total + v * LAPLACE_EPS) * total
    embedding = embed_sum / smoothed[:, None]
    if dead is not None:
        embedding = jnp.where(dead[:, None], new, embedding)
    if last is not None:  # until the last micro-batch, lookups keep the codebook of the step's start
        embedding = jnp.where(last, embedding, emb.value)
    emb.value, size.value, esum.value = embedding, cluster_size, embed_sum


class MultiScaleResidualQuantizer(nn.Module):
    """Residual quantisation of `f [B, P, P, C]` (P = patch_nums[-1]) into one token map per scale.

    For scale k with side p: z = area(f_rest, p) (f_rest itself at the last scale); idx = nearest code;
    h = Phi_k(bicubic(codes, P)) (no resize at the last scale); f_hat += h; f_rest -= h.
    Phi(h) = (1 - r) h + r conv3x3(h), with `share_quant_resi` convs shared over the scales (0: one per scale).

    `ema_decay` > 0: EMA codebook (module docstring); the statistics pool the vectors of every scale (the area-resized
    residual z of that scale with its ids) into the one shared codebook.
    """

    vocab_size: int
    z_channels: int
    patch_nums: Sequence[int]
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    using_znorm: bool = False
    beta: float = 0.25
    ema_decay: float = 0.0
    dead_code_threshold: float = 0.0

    @property
    def num_phis(self) -> int:
        if abs(self.quant_resi) <= 1e-6:
            return 0
        if self.share_quant_resi == 0:
            return self.default_qresi_counts or len(self.patch_nums)
        return self.share_quant_resi

    def setup(self):
        check_codebook_options(self.ema_decay, self.dead_code_threshold, type(self).__name__)
        if self.ema_decay > 0:
            self.ema_embedding, self.cluster_size, self.embed_sum = _ema_variables(
                self, self.vocab_size, self.z_channels
            )
        else:
            self.embedding = nn.Embed(self.vocab_size, self.z_channels, embedding_init=CODEBOOK_INIT)
        self.phi = [conv(self.z_channels, 3) for _ in range(self.num_phis)]
        self.phi_index = phi_schedule(self.num_phis, len(self.patch_nums))

    # ---- building blocks -------------------------------------------------------------------------------------
    def codebook(self) -> jax.Array:
        """The code vectors `[V, C]` (the param, or the EMA variable without gradient)."""
        if self.ema_decay > 0:
            return jax.lax.stop_gradient(self.ema_embedding.value)
        return self.embedding.embedding

    def apply_phi(self, h_bhwc: jax.Array, si: int) -> jax.Array:
        """Phi for scale `si` (identity when quant_resi is 0)."""
        if self.num_phis == 0:
            return h_bhwc
        r = abs(self.quant_resi)
        return h_bhwc * (1 - r) + self.phi[self.phi_index[si]](h_bhwc) * r

    def lookup(self, z_bhwc: jax.Array) -> jax.Array:
        """Nearest code per position: `[B, h, w, C] -> [B, h*w]` int32 (first index wins ties).

        Sows `code_logits [B*h*w, V]` float32: the cosine similarities with `using_znorm`, else minus the squared
        distances; argmax of the logits = the ids; gradients flow to z (and to a param codebook).
        """
        b, h, w, c = z_bhwc.shape
        z = z_bhwc.reshape(b * h * w, c).astype(jnp.float32)
        e = self.codebook().astype(jnp.float32)
        if self.using_znorm:
            zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
            en = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
            sim = jnp.dot(zn, en.T, precision=HIGHEST)
            idx = jnp.argmax(sim, axis=-1)
            self.sow("intermediates", "code_logits", sim)
        else:
            d = jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(e**2, axis=1)
            d = d - 2.0 * jnp.dot(z, e.T, precision=HIGHEST)
            idx = jnp.argmin(d, axis=-1)
            self.sow("intermediates", "code_logits", -d)
        return jax.lax.stop_gradient(idx.reshape(b, h * w).astype(jnp.int32))

    def codes(self, idx_bl: jax.Array) -> jax.Array:
        """Token ids `[B, p*p]` -> code map `[B, p, p, C]`."""
        b, n = idx_bl.shape
        p = round(n**0.5)
        if self.ema_decay > 0:
            return jnp.take(self.codebook(), idx_bl, axis=0).reshape(b, p, p, self.z_channels)
        return self.embedding(idx_bl).reshape(b, p, p, self.z_channels)

    def scale_residual(self, h_bhwc: jax.Array, si: int) -> jax.Array:
        """The contribution of scale `si` to f_hat: Phi(bicubic(h, P)) (no resize at the last scale)."""
        big = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_bhwc = bicubic_resize(h_bhwc, (big, big))
        return self.apply_phi(h_bhwc, si)

    # ---- tokenizer API -------------------------------------------------------------------------------------
    def quantize(self, f_bhwc: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """`f [B, P, P, C]` -> (per-scale ids `[B, p*p]`, cumulative f_hat after each scale `[B, P, P, C]`)."""
        indices, f_hats, _ = self._quantize(f_bhwc)
        return indices, f_hats

    def _quantize(self, f_bhwc: jax.Array) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
        """`quantize`, plus the vectors looked up at each scale (`[B, p, p, C]`, the EMA statistics' inputs).

        The residual carries gradients to f only (the subtracted h are stop-gradient), so that the sown code logits
        reach the encoder; it feeds nothing else (ids are stop-gradient), so the outputs and their gradients are those
        of the stop-gradient residual.
        """
        big = self.patch_nums[-1]
        if f_bhwc.shape[1:3] != (big, big):
            raise ValueError(f"quantizer expects a {big}x{big} latent (patch_nums[-1]), got {f_bhwc.shape[1:3]}")
        f_rest = f_bhwc.astype(jnp.float32)
        f_hat = jnp.zeros_like(f_rest)
        indices, f_hats, zs = [], [], []
        last = len(self.patch_nums) - 1
        for si, p in enumerate(self.patch_nums):
            z = area_resize(f_rest, (p, p)) if si != last else f_rest
            idx = self.lookup(z)
            h = self.scale_residual(self.codes(idx), si)
            f_hat = f_hat + h
            f_rest = f_rest - jax.lax.stop_gradient(h)
            indices.append(idx)
            f_hats.append(f_hat)
            zs.append(z)
        return indices, f_hats, zs

    def indices_to_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
        """Per-scale ids -> f_hat `[B, P, P, C]` (sum of the scales' residuals)."""
        self._check_scales(indices)
        f_hat = 0.0
        for si, idx in enumerate(indices):
            f_hat = f_hat + self.scale_residual(self.codes(idx), si)
        return f_hat

    def teacher_forcing_input(self, indices: Sequence[jax.Array]) -> jax.Array:
        """VAR's teacher-forcing input: for k < S-1, area(f_hat_k, p_{k+1}) flattened -> `[B, L - p_0^2, C]`."""
        self._check_scales(indices, need=len(self.patch_nums) - 1)
        f_hat, inputs = 0.0, []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.scale_residual(self.codes(indices[si]), si)
            nxt = self.patch_nums[si + 1]
            x = area_resize(f_hat, (nxt, nxt))
            inputs.append(x.reshape(x.shape[0], nxt * nxt, self.z_channels))
        return jnp.concatenate(inputs, axis=1)

    def own_scale_map(self, si: int, h_bhwc: jax.Array) -> jax.Array:
        """Scale `si`'s own codes `[B, p, p, C]` as its residual seen at its own side: area(Phi(bicubic(h, P)), p)
        `[B, p, p, C]` (HMAR's masked-prediction input; both resizes are identities at the last scale)."""
        p = h_bhwc.shape[1]
        h = self.scale_residual(h_bhwc, si)
        return h if si == len(self.patch_nums) - 1 else area_resize(h, (p, p))

    def own_scale_input(self, indices: Sequence[jax.Array]) -> jax.Array:
        """`own_scale_map` of every scale after the first, flattened -> `[B, L - p_0^2, C]` (aligned with
        `teacher_forcing_input`)."""
        self._check_scales(indices)
        maps = [self.own_scale_map(si, self.codes(indices[si])) for si in range(1, len(self.patch_nums))]
        return jnp.concatenate([m.reshape(m.shape[0], -1, self.z_channels) for m in maps], axis=1)

    def next_autoregressive_input(self, si: int, f_hat: jax.Array, h_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Sampling step: add scale `si`'s codes `[B, p, p, C]` to f_hat; return (f_hat, next scale's input map)."""
        f_hat = f_hat + self.scale_residual(h_bhwc, si)
        if si == len(self.patch_nums) - 1:
            return f_hat, f_hat
        nxt = self.patch_nums[si + 1]
        return f_hat, area_resize(f_hat, (nxt, nxt))

    def __call__(self, f_bhwc: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
        """Training forward: (straight-through f_hat `[B, P, P, C]`, VQ loss scalar, per-scale ids).

        The loss is mean over scales of beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2, as in VAR. With an EMA
        codebook the codes are constants, so the second term no longer trains the codebook (its codebook-loss role is
        dropped) but still trains the Phi convs (their only gradient); the loss keeps the same formula. A mutable
        "codebook" collection makes this call update the EMA codebook from the vectors and ids of all scales.
        """
        f32 = f_bhwc.astype(jnp.float32)
        indices, f_hats, zs = self._quantize(f32)  # f_hats carry gradients to the codebook and the Phi convs
        if self.ema_decay > 0 and _updates_codebook(self):
            z_all = jnp.concatenate([z.reshape(-1, self.z_channels) for z in zs], axis=0)
            idx_all = jnp.concatenate([i.reshape(-1) for i in indices], axis=0)
            _ema_update(self, self.ema_embedding, self.cluster_size, self.embed_sum, z_all, idx_all)
        loss = sum(
            self.beta * jnp.mean((jax.lax.stop_gradient(fh) - f32) ** 2)
            + jnp.mean((fh - jax.lax.stop_gradient(f32)) ** 2)
            for fh in f_hats
        ) / len(f_hats)
        f_hat_st = jax.lax.stop_gradient(f_hats[-1] - f32) + f32
        return f_hat_st.astype(f_bhwc.dtype), loss, indices

    def _check_scales(self, indices: Sequence[jax.Array], need: int | None = None) -> None:
        want = [p * p for p in self.patch_nums]
        got = [int(i.shape[-1]) for i in indices]
        need = len(want) if need is None else need
        if len(got) < need or got[: len(want)] != want[: len(got)]:
            raise ValueError(
                f"token maps per scale have lengths {got}; patch_nums {tuple(self.patch_nums)} "
                f"need {want[:need]} (one [B, p*p] array per scale)"
            )


class VectorQuantizer(nn.Module):
    """Single-scale VQ with an optionally L2-normalised codebook (LlamaGen / ViT-VQGAN style).

    With `l2_norm`, z and the codes are unit vectors and the lookup is the nearest code by cosine; the output is the
    (normalised) code vector with the straight-through estimator z + sg(e - z).

    `ema_decay` > 0: EMA codebook (module docstring); with `l2_norm` it averages the normalised z, and the stored
    codebook is renormalised on use (`codebook()`).
    """

    codebook_size: int
    embed_dim: int
    l2_norm: bool = True
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.0
    dead_code_threshold: float = 0.0

    def setup(self):
        check_codebook_options(self.ema_decay, self.dead_code_threshold, type(self).__name__)
        if self.ema_decay > 0:
            self.ema_embedding, self.cluster_size, self.embed_sum = _ema_variables(
                self, self.codebook_size, self.embed_dim
            )
        else:
            self.embedding = nn.Embed(self.codebook_size, self.embed_dim, embedding_init=CODEBOOK_INIT)

    def codebook(self) -> jax.Array:
        """The code vectors as used `[V, C]` (unit-norm with `l2_norm`; the EMA variable has no gradient)."""
        if self.ema_decay > 0:
            e = jax.lax.stop_gradient(self.ema_embedding.value).astype(jnp.float32)
        else:
            e = jnp.asarray(self.embedding.embedding, jnp.float32)  # host (numpy) params too: ids may be traced
        return l2_normalize(e) if self.l2_norm else e

    def lookup(self, z_bhwc: jax.Array) -> jax.Array:
        """Nearest code per position `[B, h, w, C] -> [B, h*w]` int32 (first index wins ties).

        Sows `code_logits [B*h*w, V]` float32 = -|z - e|^2 (on the unit vectors with `l2_norm`, i.e. 2 cos - 2); argmax
        of the logits = the ids; gradients flow to z (and to a param codebook).
        """
        b, h, w, c = z_bhwc.shape
        z = z_bhwc.reshape(b * h * w, c).astype(jnp.float32)
        z = l2_normalize(z) if self.l2_norm else z
        e = self.codebook()
        d = jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(e**2, axis=1) - 2.0 * jnp.dot(z, e.T, precision=HIGHEST)
        self.sow("intermediates", "code_logits", -d)
        return jax.lax.stop_gradient(jnp.argmin(d, axis=-1).reshape(b, h * w).astype(jnp.int32))

    def codes(self, idx_bl: jax.Array, hw: tuple[int, int]) -> jax.Array:
        """Token ids `[B, h*w]` -> code map `[B, h, w, C]`."""
        return self.codebook()[idx_bl].reshape(idx_bl.shape[0], *hw, self.embed_dim)

    def __call__(self, z_bhwc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(quantised `[B, h, w, C]` with straight-through gradients, codebook + commitment loss, ids `[B, h*w]`).

        EMA codebook: the loss is the commitment term only, and a mutable "codebook" collection makes this call update
        the codebook from the (normalised with `l2_norm`) z and their ids.
        """
        z = z_bhwc.astype(jnp.float32)
        z = l2_normalize(z) if self.l2_norm else z
        idx = self.lookup(z_bhwc)
        e = self.codes(idx, z.shape[1:3])
        if self.ema_decay > 0:
            loss = self.beta * jnp.mean((jax.lax.stop_gradient(e) - z) ** 2)
            if _updates_codebook(self):
                _ema_update(
                    self, self.ema_embedding, self.cluster_size, self.embed_sum, z.reshape(-1, self.embed_dim), idx
                )
        else:
            loss = jnp.mean((e - jax.lax.stop_gradient(z)) ** 2) + self.beta * jnp.mean(
                (jax.lax.stop_gradient(e) - z) ** 2
            )
        return z + jax.lax.stop_gradient(e - z), loss, idx
