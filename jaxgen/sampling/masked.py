"""MaskGIT's parallel decoding (Chang et al., 2022): one jitted `lax.while_loop` of `decode_step` over a
`MaskedState`, from `start_iter` to T, as upstream's `maskgit/libml/parallel_decode.py`.

Sequences are `[B, L]`, L = 1 + N: the class token, then the image tokens, -1 where masked. Per step t:

    logits_fn(ids)[..., :K]      the transformer; with cfg_scale > 1 on [cond; null] rows, then
                                 uncond + (cond - uncond) * cfg_scale; then temperature and top-k if set
    draw                         argmax(logits + Gumbel) (= jax.random.categorical), kept where the id is -1
    mask_len                     floor(n0 * schedule((t + 1) / T)) in float32, clamped to [1, #masked - 1]
    re-mask                      the mask_len least confident draws, confidence = log p(draw) + choice_temperature
                                 * (1 - (t + 1) / T) * Gumbel (`remask.mask_by_confidence`), +inf where known

Keys: `key, sample_key = split(key, 2)`, then `key, choice_key = split(key)`, as upstream, so the same key decodes
the same tokens. The result is the draw of the last step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from jaxgen.models.generators.masked import MaskedTransformer
from jaxgen.sampling.common import ClassConditionalSampler, check_labels
from jaxgen.sampling.filters import filter_logits
from jaxgen.sampling.guidance import guide_from_uncond, split_guided, with_null_class
from jaxgen.sampling.mask_schedule import check_schedule, schedule
from jaxgen.sampling.remask import mask_by_confidence

MASK = -1  # the mask id of the decoded sequences (the transformer reads any negative id as its mask row)


@dataclasses.dataclass(frozen=True)
class MaskedSampling:
    """Decode settings (defaults: the paper's 8 steps at 256 px with the release's choice temperature)."""

    num_iter: int = 8  # T
    start_iter: int = 0  # first step run (editing: upstream's demo uses 2 of 12)
    choice_temperature: float = 4.5  # re-masking noise, annealed by (1 - (t + 1) / T)
    schedule: str = "cosine"  # see jaxgen.sampling.mask_schedule
    temperature: float = 1.0  # token draw; 1.0 is upstream's sampling
    top_k: int = 0  # 0: off
    cfg_scale: float = 0.0  # > 1: classifier-free guidance (needs a model with a null class); 0 or 1: off
    return_steps: bool = False  # also return the per-step `MaskedTrace`

    def __post_init__(self):
        check_schedule(self.schedule)
        if self.num_iter < 1:
            raise ValueError(f"MaskedSampling: num_iter must be >= 1, got {self.num_iter}")
        if not 0 <= self.start_iter < self.num_iter:
            raise ValueError(
                f"MaskedSampling: start_iter must be in [0, num_iter={self.num_iter}), got {self.start_iter}"
            )
        if self.temperature <= 0:
            raise ValueError(f"MaskedSampling: temperature must be > 0 (1.0 = upstream), got {self.temperature}")
        if self.choice_temperature < 0:
            raise ValueError(f"MaskedSampling: choice_temperature must be >= 0, got {self.choice_temperature}")
        if self.top_k < 0 or self.cfg_scale < 0:
            raise ValueError(
                f"MaskedSampling: top_k and cfg_scale must be >= 0 (0: off), got {self.top_k}, {self.cfg_scale}"
            )

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


@flax.struct.dataclass
class MaskedTrace:
    """What each step saw and decided, `[T, ...]` (the fixture's `dec_*_step_*` layouts); rows before start_iter
    are zeros."""

    step_ids: jax.Array  # int32 [T, B, L]: the ids fed to the model
    step_logits: jax.Array  # float32 [T, B, L, K]: the logits sampled from (guided and filtered)
    step_gumbel_sample: jax.Array  # float32 [T, B, L, K]: the draw's Gumbel noise
    step_gumbel_choice: jax.Array  # float32 [T, B, L]: the re-masking noise
    step_mask_len: jax.Array  # int32 [T, B]
    step_mask_ratio: jax.Array  # float32 [T] ([T, B] for the n-dependent log and exp schedules)
    step_confidence: jax.Array  # float32 [T, B, L]: +inf where the id was known
    step_masking: jax.Array  # int8 [T, B, L]: 1 where re-masked after the step

    @classmethod
    def zeros(cls, num_iter: int, b: int, seq: int, k: int, ratio_shape: tuple[int, ...]) -> MaskedTrace:
        f, t = jnp.float32, num_iter
        return cls(
            jnp.zeros((t, b, seq), jnp.int32), jnp.zeros((t, b, seq, k), f), jnp.zeros((t, b, seq, k), f),
            jnp.zeros((t, b, seq), f), jnp.zeros((t, b), jnp.int32), jnp.zeros((t, *ratio_shape), f),
            jnp.zeros((t, b, seq), f), jnp.zeros((t, b, seq), jnp.int8),
        )  # fmt: skip


@flax.struct.dataclass
class MaskedState:
    """What the decode loop carries from one step to the next."""

    step: jax.Array  # int32 []: the step about to run
    ids: jax.Array  # int32 [B, L]: the current sequence, -1 where masked
    key: jax.Array  # typed PRNG key, split twice per step
    final_seqs: jax.Array  # int32 [B, T, L]: row t = the ids after step t's draw
    trace: MaskedTrace | None


@flax.struct.dataclass
class MaskedSample:
    tokens: jax.Array  # int32 [B, N], row-major over the tokenizer's grid
    decoded: jax.Array  # float32 [B, H, W, 3], raw decoder output ([-1, 1] scale)
    images: jax.Array  # float32 [B, H, W, 3] in [0, 1]
    final_seqs: jax.Array  # int32 [B, T, 1 + N]: upstream's return value
    trace: MaskedTrace | None = None  # with `return_steps`

    def token_arrays(self) -> dict[str, jax.Array]:
        """The tokens by name, for saving."""
        return {"tokens": self.tokens}


# ids [B, L] -> logits [B', L, >= K] float32; B' = 2B ([cond; null]) when guided
LogitsFn = Callable[[jax.Array], jax.Array]


def typed_key(key: jax.Array) -> jax.Array:
    """A typed key as is; a raw uint32 `[2]` key (`jax.random.PRNGKey`) wrapped, which draws the same noise."""
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def decode_step(
    state: MaskedState, logits_fn: LogitsFn, settings: MaskedSampling, n0_b: Int[Array, " B"], codebook_size: int
) -> MaskedState:
    """One draw-and-re-mask step on `state.ids` `[B, L]` (see the module docstring); n0 `[B]`: the masked count
    at the start. The trace's choice noise is redrawn from `choice_key` (bit-identical to what
    `mask_by_confidence` drew)."""
    ids, step = state.ids, state.step
    logits = logits_fn(ids)[..., :codebook_size]
    if settings.guided:
        logits = guide_from_uncond(*split_guided(logits), settings.cfg_scale)
    logits = filter_logits(logits, temperature=settings.temperature, top_k=settings.top_k)
    key, sample_key = jax.random.split(state.key, 2)
    noise = jax.random.gumbel(sample_key, logits.shape, jnp.float32)
    unknown = ids == MASK
    drawn = jnp.where(unknown, jnp.argmax(logits + noise, axis=-1).astype(jnp.int32), ids)

    ratio = (step + 1).astype(jnp.float32) / jnp.float32(settings.num_iter)
    mask_ratio = schedule(ratio, n0_b, settings.schedule)
    mask_len = jnp.floor(n0_b * mask_ratio)[:, None]  # float32, as upstream
    mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, axis=-1, keepdims=True) - 1, mask_len))
    probs = jax.nn.softmax(logits, axis=-1)
    selected = jnp.take_along_axis(probs, drawn[..., None], axis=-1)[..., 0]
    selected = jnp.where(unknown, selected, jnp.inf)
    key, choice_key = jax.random.split(key)
    choice_t = jnp.float32(settings.choice_temperature) * (1.0 - ratio)
    masking = mask_by_confidence(choice_key, selected, mask_len, choice_t)

    trace = state.trace
    if trace is not None:
        choice_noise = jax.random.gumbel(choice_key, selected.shape, jnp.float32)  # what mask_by_confidence drew
        rows = dict(
            step_ids=ids, step_logits=logits, step_gumbel_sample=noise, step_gumbel_choice=choice_noise,
            step_mask_len=mask_len[:, 0].astype(jnp.int32), step_mask_ratio=mask_ratio,
            step_confidence=jnp.log(selected) + choice_t * choice_noise, step_masking=masking.astype(jnp.int8),
        )  # fmt: skip
        trace = trace.replace(**{k: getattr(trace, k).at[step].set(v) for k, v in rows.items()})
    return MaskedState(
        step=step + 1,
        ids=jnp.where(masking, MASK, drawn),
        key=key,
        final_seqs=state.final_seqs.at[:, step].set(drawn),
        trace=trace,
    )


def parallel_decode(
    logits_fn: LogitsFn,
    init_ids: Int[Array, "B L"],
    key: jax.Array,
    settings: MaskedSampling,
    codebook_size: int,
    start_iter: int | jax.Array | None = None,
) -> tuple[Int[Array, "B T L"], MaskedTrace | None]:
    """Decode `init_ids` `[B, L]` (-1 = masked; known ids are never changed) from step `start_iter` (default
    `settings.start_iter`; may be traced) to T. Returns (final_seqs `[B, T, L]` int32, the trace or None); the
    result is `final_seqs[:, -1]`. Traceable."""
    init_ids = jnp.asarray(init_ids, jnp.int32)
    b, seq = init_ids.shape
    t = settings.num_iter
    n0 = jnp.sum(init_ids == MASK, axis=-1)
    trace = None
    if settings.return_steps:
        ratio_shape = jax.eval_shape(lambda: schedule(jnp.float32(0.5), n0, settings.schedule)).shape
        trace = MaskedTrace.zeros(t, b, seq, codebook_size, ratio_shape)
    state = MaskedState(
        step=jnp.asarray(settings.start_iter if start_iter is None else start_iter, jnp.int32),
        ids=init_ids,
        key=typed_key(key),
        final_seqs=jnp.tile(init_ids[:, None], (1, t, 1)),
        trace=trace,
    )
    body = lambda s: decode_step(s, logits_fn, settings, n0, codebook_size)
    state = jax.lax.while_loop(lambda s: s.step < t, body, state)
    return state.final_seqs, state.trace


def transformer_logits(transformer: MaskedTransformer, params, labels_b: Int[Array, " B"], guided: bool) -> LogitsFn:
    """The transformer as a `LogitsFn`; guided, the rows are doubled with the null class token in column 0."""
    c = transformer.config

    def logits_fn(ids_bl):
        if guided:
            class_tokens = c.class_token(with_null_class(labels_b, c.null_class))  # [2B]: labels, then the null class
            ids_bl = jnp.concatenate([ids_bl, ids_bl]).at[:, 0].set(class_tokens)
        return transformer.apply({"params": params}, ids_bl)

    return logits_fn


def edit_masked(
    transformer: MaskedTransformer,
    tokenizer,
    settings: MaskedSampling,
    transformer_params,
    tokenizer_params,
    labels_b: Int[Array, " B"],
    canvas_bn: Int[Array, "B N"],
    key: jax.Array,
    start_iter: int | jax.Array,
) -> MaskedSample:
    """Fill the -1 of `canvas` `[B, N]` for classes `[B]` (traceable; `MaskedSampler` jits it). `tokenizer`: any
    `jaxgen.models.tokenizers.protocol.Tokenizer` over the same K codes."""
    c = transformer.config
    init = jnp.concatenate([c.class_token(labels_b)[:, None], canvas_bn], axis=1).astype(jnp.int32)
    logits_fn = transformer_logits(transformer, transformer_params, labels_b, settings.guided)
    final_seqs, trace = parallel_decode(logits_fn, init, key, settings, c.codebook_size, start_iter)
    tokens = final_seqs[:, -1, 1:]
    decoded = tokenizer.apply({"params": tokenizer_params}, tokens, method="decode_ids")
    return MaskedSample(tokens, decoded, (jnp.clip(decoded, -1.0, 1.0) + 1.0) / 2.0, final_seqs, trace)


def sample_masked(transformer, tokenizer, settings, transformer_params, tokenizer_params, labels_b, key):
    """Class-conditional generation: `edit_masked` from an all-mask canvas at `settings.start_iter`."""
    canvas = jnp.full((labels_b.shape[0], transformer.config.num_tokens), MASK, jnp.int32)
    return edit_masked(transformer, tokenizer, settings, transformer_params, tokenizer_params, labels_b, canvas, key,
                       settings.start_iter)  # fmt: skip


class MaskedSampler(ClassConditionalSampler):
    """`sampler(transformer_params, tokenizer_params, labels [B], key) -> MaskedSample` and `sampler.edit(...,
    labels, canvas [B, N], key, start_iter=None)`, each compiled once per batch size; inputs are checked on the
    host first."""

    def __init__(self, transformer: MaskedTransformer, tokenizer, settings: MaskedSampling | None = None):
        c, settings = transformer.config, settings or MaskedSampling()
        if tokenizer.vocab_size != c.codebook_size:
            raise ValueError(
                f"the transformer predicts {c.codebook_size} codes but the tokenizer has {tokenizer.vocab_size}: use "
                f"a transformer config with codebook_size={tokenizer.vocab_size} or the matching tokenizer"
            )
        if settings.num_iter > c.num_tokens:
            raise ValueError(
                f"more decode steps than tokens: num_iter={settings.num_iter} > {c.num_tokens} image tokens; "
                f"lower sampling.num_iter"
            )
        if settings.guided and not c.has_null_class:
            raise ValueError(
                f"cfg_scale={settings.cfg_scale} needs a transformer trained with a null class "
                f"(class_dropout_prob > 0); set sampling.cfg_scale=0"
            )
        super().__init__(sample_masked, transformer, tokenizer, settings, c.num_classes)
        self._edit = jax.jit(lambda gp, tp, labels, canvas, key, start: edit_masked(
            transformer, tokenizer, settings, gp, tp, labels, canvas, key, start))  # fmt: skip

    def __call__(self, transformer_params, tokenizer_params, labels, key: jax.Array) -> MaskedSample:
        check_labels(labels, self.num_classes, allow_null=False)
        return self._fn(transformer_params, tokenizer_params, jnp.asarray(labels, jnp.int32), key)

    def edit(
        self, transformer_params, tokenizer_params, labels, canvas, key: jax.Array, start_iter: int | None = None
    ) -> MaskedSample:
        """Inpainting, outpainting, class-conditional editing: generate where `canvas` `[B, N]` is -1, keep every
        other token. `start_iter` (default `settings.start_iter`) skips the first steps, as upstream's editing."""
        check_labels(labels, self.num_classes, allow_null=False)
        c, s = self.generator.config, self.settings
        canvas = np.asarray(canvas)
        b = np.asarray(labels).shape[0]
        if canvas.shape != (b, c.num_tokens) or not np.issubdtype(canvas.dtype, np.integer):
            raise ValueError(f"canvas must be integer ids [B={b}, N={c.num_tokens}], got {canvas.dtype} {canvas.shape}")
        if canvas.size and (canvas.min() < MASK or canvas.max() >= c.codebook_size):
            raise ValueError(
                f"canvas ids must be codes in [0, {c.codebook_size}) or -1 (generate here); got min {canvas.min()} "
                f"max {canvas.max()}"
            )
        start = s.start_iter if start_iter is None else start_iter
        if not 0 <= start < s.num_iter:
            raise ValueError(f"start_iter must be in [0, num_iter={s.num_iter}), got {start}")
        labels = jnp.asarray(labels, jnp.int32)
        return self._edit(transformer_params, tokenizer_params, labels, jnp.asarray(canvas, jnp.int32), key,
                          jnp.int32(start))  # fmt: skip
