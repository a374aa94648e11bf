"""A GPT over the K ids of the 1D TiTok tokenizer: LlamaGen's objective and sampler on another tokenizer."""

from __future__ import annotations

from jaxgen.families import llamagen
from jaxgen.families.base import Family, config_from_dict, derive, plain_section
from jaxgen.models.generators.next_token import NextTokenConfig, NextTokenTransformer
from jaxgen.models.tokenizers.titok import TiTok, TiTokConfig


def build(titok_section, gpt_section):
    """TiTok and a GPT over its K tokens: vocabulary = codebook size, block_size = K, and 1D RoPE (the K tokens have
    no 2D grid) unless the section says otherwise."""
    titok = TiTok(config_from_dict(TiTokConfig, plain_section(titok_section), "titok"))
    if not gpt_section:
        return titok, None
    kw = derive(plain_section(gpt_section), "gpt", vocab_size=titok.vocab_size, block_size=titok.config.num_tokens)
    kw.setdefault("rope_2d", False)
    return titok, NextTokenTransformer(config_from_dict(NextTokenConfig, kw, "gpt"))


FAMILY = Family(
    name="titok",
    tokenizer_key="titok",
    generator_key="gpt",
    build=build,
    generator_inputs=llamagen.generator_inputs,
    objective=llamagen.objective,
    sampler=llamagen.sampler,
    image_size=lambda titok, gpt: titok.config.image_size,
    check=llamagen.check_token_count,
)
