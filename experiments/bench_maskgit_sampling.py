"""MaskGIT parallel-decode throughput: jaxgen vs google-research/maskgit (both JAX) and vs LlamaGen's next-token
decode at the same token count.

    python experiments/bench_maskgit_sampling.py [--size=small|released] --steps=8,12 --batch=1,64 \
        [--official=.upstream/maskgit] [--sampler-batch=auto] [--repeats=3] [--out=...json]

Random weights (speed does not depend on them); float32; class-conditional, no guidance; choice temperature 4.5 and
the cosine schedule. Rows (`model`, `what`):

- `maskgit`, `decode`: `jaxgen.sampling.masked.parallel_decode` over `MaskedTransformer`, jitted: class token + N
  masks -> final_seqs `[B, T, 1 + N]`, T full passes of the transformer over 1 + N positions.
- `maskgit`, `decode`, impl `official_jax` (with --official): upstream's `maskgit.libml.parallel_decode.decode` over
  upstream's `maskgit.nets.maskgit_transformer.Transformer`, fed the same params (jaxgen's tree is upstream's leaf for
  leaf; checked here), the same init ids and the same raw keys, jitted the same way. `same_tokens` says whether both
  returned identical final_seqs for every key compared.
- `maskgit`, `sampler`: `MaskedSampler` (decode + `MaskGITVQ.decode_ids` -> 16N px images); `tokenizer_decode_s`
  is the tokenizer's decoder alone at that batch.
- `llamagen`, `decode` / `sampler`: `NextTokenSampler` with cfg_scale 1.0 (no guidance), top-k / top-p off, over a
  `NextTokenTransformer` of the same width, depth and heads (vocab K, block_size N, SwiGLU width 2/3 of the MLP, so
  about the same parameters): N sequential KV-cached steps. `decode` uses a no-op tokenizer (the GPT loop alone),
  `sampler` the same MaskGIT tokenizer as MaskGIT's sampler rows.

`maskgit_over_llamagen` is MaskGIT's images/s over LlamaGen's for the same batch and `what` (the paper's "fewer
steps"); `jaxgen_over_official_jax` is jaxgen's decode images/s over upstream's. Compile time is reported apart from
run time; each time is the median of --repeats runs after one warm-up (`timing.py`). The report is rewritten after
every row, so a run stopped by a time limit keeps the rows it finished. `--sampler-batch=auto` runs the sampler rows
at every batch, except on CPU at the first one only (the 256 px decoder costs 0.25-0.45 s per image on two cores).

The official source: `git -C <mirror> archive HEAD maskgit | tar -x -C .upstream/maskgit`, passed as --official
(put on sys.path; upstream has no setup.py). Its `parallel_decode.State` annotates with `jnp.DeviceArray`, gone from
JAX: the one shim is `jax.numpy.DeviceArray = jax.Array` before the import.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import compile_timed, emit, median_time, write_report

from jaxgen.convert.common import count_params
from jaxgen.families import get_family, init_family_params
from jaxgen.families.llamagen import generator_inputs as llamagen_inputs
from jaxgen.models.generators.masked import MaskedConfig, MaskedTransformer
from jaxgen.models.generators.next_token import NextTokenConfig, NextTokenTransformer
from jaxgen.models.registry import init_params
from jaxgen.models.tokenizers.maskgit_vq import MaskGITVQ, MaskGITVQConfig
from jaxgen.sampling.masked import MASK, MaskedSampler, MaskedSampling, parallel_decode
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling

SIZES = {
    # two busy CPU cores: a few minutes for the default steps and batches
    "small": dict(hidden=256, layers=4, heads=4, mlp=1024, tokens=256, codebook=1024, classes=1000, filters=32),
    # the released ImageNet 256 px transformer (172,457,193 params) and tokenizer (54,515,587)
    "released": dict(hidden=768, layers=24, heads=16, mlp=3072, tokens=256, codebook=1024, classes=1000, filters=128),
}
NEXT_TOKEN = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)  # no guidance: one GPT row per sample


class NoDecoder(nn.Module):
    """A tokenizer whose decoder does nothing (tokens -> `[B, N, 1, 1]` float): the sampler's GPT loop alone."""

    vocab_size: int

    def decode_ids(self, ids_bl: jax.Array) -> jax.Array:
        return ids_bl.astype(jnp.float32)[:, :, None, None]


def build(sz: dict):
    """(MaskGIT tokenizer, MaskGIT transformer, LlamaGen GPT) of the sizes `sz`."""
    tok = MaskGITVQ(MaskGITVQConfig(codebook_size=sz["codebook"], filters=sz["filters"]))
    gen = MaskedTransformer(
        MaskedConfig(
            codebook_size=sz["codebook"],
            num_classes=sz["classes"],
            num_tokens=sz["tokens"],
            hidden_size=sz["hidden"],
            num_layers=sz["layers"],
            num_heads=sz["heads"],
            intermediate_size=sz["mlp"],
        )
    )
    # LlamaGen's SwiGLU width rule int(8 * dim / 3) * ffn_dim_multiplier, rounded up to multiple_of: with the
    # multiplier mlp / (4 * dim) and multiple_of 32 it is ~2/3 of MaskGIT's MLP (3 matrices vs 2: the same params).
    mult = sz["mlp"] / (4 * sz["hidden"])
    gpt = NextTokenTransformer(
        NextTokenConfig(
            vocab_size=sz["codebook"],
            num_classes=sz["classes"],
            dim=sz["hidden"],
            n_layer=sz["layers"],
            n_head=sz["heads"],
            multiple_of=32,
            ffn_dim_multiplier=None if mult == 1 else mult,
            block_size=sz["tokens"],
        )
    )
    return tok, gen, gpt


def import_official(checkout: str):
    """Upstream's `maskgit_transformer` and `parallel_decode` modules from the checkout at `checkout`."""
    jax.numpy.DeviceArray = jax.Array  # upstream's State annotations; the alias left JAX in 0.4.x
    path = str(Path(checkout).absolute())
    if path not in sys.path:
        sys.path.insert(0, path)  # upstream imports itself as `maskgit.*`
    from maskgit.libml import parallel_decode as official_decode
    from maskgit.nets import maskgit_transformer

    return maskgit_transformer, official_decode


def official_model(module, c: MaskedConfig):
    """Upstream's Transformer with the sizes of jaxgen's config (as its inference.py builds it)."""
    return module.Transformer(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size,
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attention_dropout,
        max_position_embeddings=c.seq_len,
    )


def same_tree(a, b) -> bool:
    """Same structure, names and leaf shapes."""
    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(shapes(a)) == jax.tree.leaves(shapes(b))


def init_ids(c: MaskedConfig, batch: int) -> jax.Array:
    """`[B, 1 + N]`: class token K + label, then N masks (-1, which upstream's decode also uses)."""
    labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
    masks = jnp.full((batch, c.num_tokens), MASK, jnp.int32)
    return jnp.concatenate([c.class_token(labels)[:, None], masks], axis=1)


def jaxgen_decode(gen: MaskedTransformer, settings: MaskedSampling):
    k = gen.config.codebook_size

    def fn(params, ids, key):
        return parallel_decode(lambda x: gen.apply({"params": params}, x), ids, key, settings, k)[0]

    return jax.jit(fn)


def official_decode(model, decode_module, k: int, settings: MaskedSampling):
    def fn(params, ids, key):
        tokens_to_logits = lambda seq: model.apply({"params": params}, seq, deterministic=True)[..., :k]
        return decode_module.decode(
            ids,
            key,
            tokens_to_logits,
            mask_token_id=MASK,
            num_iter=settings.num_iter,
            choice_temperature=settings.choice_temperature,
            mask_scheduling_method=settings.schedule,
        )

    return jax.jit(fn)


def timed(lower, args: tuple, key_fn, repeats: int, out_of) -> tuple[dict, dict]:
    """Compile `lower(*args, key_fn(0))` (a jitted function's or a sampler's `.lower`), run it on `(*args,
    key_fn(i))` (one warm-up, `repeats` timed) and return ({compile_s, run_s, runs, times_s}, {0: output of the
    warm-up, 1: of the first timed run}). `out_of(result)` is what to block on."""
    keys = [key_fn(i) for i in range(repeats + 1)]  # made before timing
    compiled, compile_s = compile_timed(lower(*args, keys[0]))
    kept = {}

    def run(i):
        out = jax.block_until_ready(out_of(compiled(*args, keys[i])))
        if i < 2:
            kept[i] = out

    run_s, times = median_time(run, repeats)
    return {"compile_s": round(compile_s, 3), "run_s": round(run_s, 5), "runs": len(times),
            "times_s": [round(t, 5) for t in times]}, kept  # fmt: skip


def identity(x):
    return x


def time_tokenizer(tok: MaskGITVQ, tp, batch: int, n: int, repeats: int) -> float:
    """The tokenizer's decoder alone: `[B, N]` ids -> images, median seconds."""
    decode = jax.jit(lambda p, x: tok.apply({"params": p}, x, method="decode_ids"))
    zeros = jnp.zeros((batch, n), jnp.int32)
    return round(median_time(lambda _: jax.block_until_ready(decode(tp, zeros)), repeats)[0], 5)


def rates(batch: int, tokens: int, run_s: float) -> dict:
    return {"images_per_s": round(batch / run_s, 4), "tokens_per_s": round(batch * tokens / run_s, 1)}


def ratios(results: list[dict]) -> tuple[dict, dict]:
    """(jaxgen / official decode images/s, MaskGIT / LlamaGen images/s) by row name."""
    ours = [r for r in results if r["impl"] == "jaxgen"]
    vs_official, vs_llamagen = {}, {}
    for r in results:
        if r["impl"] == "official_jax":
            twin = [x for x in ours if x["model"] == "maskgit" and x["what"] == "decode" and
                    (x["steps"], x["batch"]) == (r["steps"], r["batch"])]  # fmt: skip
            if twin:
                ratio = twin[0]["images_per_s"] / r["images_per_s"]
                vs_official[f"decode_T{r['steps']}_b{r['batch']}"] = round(ratio, 3)
    for r in ours:
        if r["model"] != "maskgit":
            continue
        ar = [x for x in ours if x["model"] == "llamagen" and (x["what"], x["batch"]) == (r["what"], r["batch"])]
        if ar:
            name = f"{r['what']}_T{r['steps']}_b{r['batch']}"
            vs_llamagen[name] = round(r["images_per_s"] / ar[0]["images_per_s"], 3)
    return vs_official, vs_llamagen


def checkout_commit(checkout: str) -> str | None:
    """The checkout's own commit (None for an archive: a parent repository's HEAD is not upstream's)."""
    if not (Path(checkout) / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="preset; the flags below override it")
    for name in SIZES["small"]:
        p.add_argument(f"--{name}", type=int, default=None, help=f"{name} (default: the preset's)")
    p.add_argument("--steps", default="8,12", help="comma list of decode steps T")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--sampler-batch", default="auto", help="batches of the sampler rows: comma list, 'none', 'auto'")
    p.add_argument("--choice-temperature", type=float, default=4.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official", default="", help="path to a google-research/maskgit source tree (optional)")
    p.add_argument("--official-commit", default="", help="recorded in the JSON (the archive has no .git)")
    p.add_argument("--no-llamagen", action="store_true", help="skip the LlamaGen rows")
    p.add_argument("--note", default="", help="free text recorded in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    sz = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in SIZES[args.size].items()}
    steps = [int(t) for t in args.steps.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if args.sampler_batch == "auto":
        sampler_batches = batches[:1] if jax.default_backend() == "cpu" else batches
    elif args.sampler_batch == "none":
        sampler_batches = []
    else:
        sampler_batches = [int(b) for b in args.sampler_batch.split(",")]
    out = args.out or f"experiments/results/maskgit_sampling_{jax.default_backend()}.json"

    load_at_start = round(os.getloadavg()[0], 2)
    tok, gen, gpt = build(sz)
    c, n, k = gen.config, sz["tokens"], sz["codebook"]
    params = init_family_params(get_family("maskgit"), tok, gen, args.seed)
    gp, tp = params["maskgit"], params["vq"]
    model_info = {
        "size": args.size,
        **sz,
        "image_size": int(np.sqrt(n)) * tok.config.downsample,
        "vocab_rows": c.vocab_size,
        "params": {"maskgit": count_params(gp), "tokenizer": count_params(tp)},
    }
    official = None
    if args.official:
        module, decode_module = import_official(args.official)
        up = official_model(module, c)
        up_shapes = jax.eval_shape(lambda: up.init(jax.random.key(0), gen.example_ids()))["params"]
        official = {
            "checkout": args.official,
            "commit": args.official_commit or checkout_commit(args.official),
            "same_param_tree": same_tree(gp, up_shapes),
            "same_tokens": None,
        }
        if not official["same_param_tree"]:
            raise SystemExit("upstream's Transformer has another param tree than jaxgen's: cannot share params")
    settings_of = {t: MaskedSampling(num_iter=t, choice_temperature=args.choice_temperature) for t in steps}
    results: list[dict] = []
    compared: dict[str, bool] = {}

    def report():
        vs_official, vs_llamagen = ratios(results)
        if official is not None and compared:
            official["same_tokens"] = all(compared.values())
            official["same_tokens_by_case"] = dict(compared)
        settings = {"choice_temperature": args.choice_temperature, "schedule": "cosine", "temperature": 1.0}
        write_report(
            "maskgit_sampling",
            out,
            results,
            size=args.size,
            model=model_info,
            settings={**settings, "cfg_scale": 0.0, "steps": steps, "llamagen": NEXT_TOKEN},
            batches=batches,
            sampler_batches=sampler_batches,
            repeats=args.repeats,
            note=args.note,
            load_1m_at_start=load_at_start,
            official=official,
            same_tokens=None if official is None else official["same_tokens"],
            jaxgen_over_official_jax=vs_official,
            maskgit_over_llamagen=vs_llamagen,
        )

    def add(row):
        emit(results, row)
        report()

    if not args.no_llamagen:
        gpt_params = init_params(gpt, jax.random.key(args.seed + 1), *llamagen_inputs(gpt))
        model_info["params"]["llamagen_gpt"] = count_params(gpt_params)
        model_info["llamagen_ffn_hidden"] = gpt.config.ffn_hidden
        no_decoder = NextTokenSampler(gpt, NoDecoder(k), NextTokenSampling(**NEXT_TOKEN))
    raw_key = lambda i: jax.random.PRNGKey(1000 + i)  # a raw key, what upstream's decode takes
    typed_key = lambda i: jax.random.key(1000 + i)  # the same bits, typed
    decoded = {}  # (T, batch) -> jaxgen's decode for raw_key(0)
    for batch in batches:
        ids = init_ids(c, batch)
        labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
        for t in steps:
            row = {"model": "maskgit", "what": "decode", "steps": t, "batch": batch, "dtype": "float32"}
            timing, ours = timed(jaxgen_decode(gen, settings_of[t]).lower, (gp, ids), raw_key, args.repeats, identity)
            decoded[t, batch] = ours[0]
            add({"impl": "jaxgen", **row, "forward_passes": t, **timing, **rates(batch, n, timing["run_s"])})
            if official is not None:
                fn = official_decode(up, decode_module, k, settings_of[t])
                timing, theirs = timed(fn.lower, (gp, ids), raw_key, args.repeats, identity)
                pairs = [(ours[i], theirs[i]) for i in sorted(ours)]  # the same keys
                same = all(bool(jnp.array_equal(a, b)) for a, b in pairs)
                differ = int(sum(int(jnp.sum(a != b)) for a, b in pairs))
                compared[f"T{t}_b{batch}"] = same
                add({"impl": "official_jax", **row, "forward_passes": t, **timing,
                     **rates(batch, n, timing["run_s"]), "same_tokens_as_jaxgen": same,
                     "differing_ids": differ})  # fmt: skip
        if not args.no_llamagen:
            args_ = (gpt_params, {}, labels)
            timing, _ = timed(no_decoder.lower, args_, typed_key, args.repeats, lambda s: s.tokens)
            row = {"model": "llamagen", "what": "decode", "steps": n, "batch": batch, "dtype": "float32"}
            add({"impl": "jaxgen", **row, "forward_passes": n, **timing, **rates(batch, n, timing["run_s"])})

    for batch in sampler_batches:
        labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
        tok_s = time_tokenizer(tok, tp, batch, n, args.repeats)
        for t in steps:
            sampler = MaskedSampler(gen, tok, settings_of[t])
            timing, kept = timed(sampler.lower, (gp, tp, labels), typed_key, args.repeats, identity)
            # The sampler draws what parallel_decode drew for the same key (a check that the rows do the same work).
            if (t, batch) not in decoded:  # a sampler batch without decode rows
                decoded[t, batch] = jaxgen_decode(gen, settings_of[t])(gp, init_ids(c, batch), raw_key(0))
            same = bool(jnp.array_equal(kept[0].final_seqs, decoded[t, batch]))
            row = {"model": "maskgit", "what": "sampler", "steps": t, "batch": batch, "dtype": "float32"}
            add({"impl": "jaxgen", **row, "forward_passes": t, **timing, **rates(batch, n, timing["run_s"]),
                 "tokenizer_decode_s": tok_s, "same_tokens_as_decode": same})  # fmt: skip
        if not args.no_llamagen:
            sampler = NextTokenSampler(gpt, tok, NextTokenSampling(**NEXT_TOKEN))
            timing, _ = timed(sampler.lower, (gpt_params, tp, labels), typed_key, args.repeats, lambda s: s.images)
            row = {"model": "llamagen", "what": "sampler", "steps": n, "batch": batch, "dtype": "float32"}
            add({"impl": "jaxgen", **row, "forward_passes": n, **timing, **rates(batch, n, timing["run_s"]),
                 "tokenizer_decode_s": tok_s})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
