"""The tiny models of the demo world: a word-level tokenizer and a small T5, built from nothing.

The zoo's base and the LoRA walk-through (``loraloom demo lora``) both start here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2: T5's own layout


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, *, add_eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for ``texts`` (split on whitespace) with a character fallback; pad 0, eos 1, unk 2.

    The vocabulary: the special tokens, every character seen (alone, and as a WordPiece "##" continuation,
    so any word made of seen characters can be spelled out), then the most frequent words up to
    ``vocab_size`` entries in all. Ties go alphabetically, so the same texts always give the same ids
    (the ``tokenizers`` WordPiece trainer numbers tied pieces differently from one process to the next).
    Decoding joins words with single spaces: text with normalised whitespace round-trips. With
    ``add_eos`` (T5's convention) every encoding ends with eos; causal LMs want ``add_eos=False``.
    """
    counts = Counter(word for text in texts for word in text.split())
    chars = sorted({c for word in counts for c in word})
    entries = [PAD, EOS, UNK, *chars, *(f"##{c}" for c in chars)]
    known = set(entries)
    frequent = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
    entries += frequent[: max(vocab_size - len(entries), 0)]
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(entries)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(cleanup=False)  # cleanup would glue "a ." into "a."
    if add_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, entries.index(EOS))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_demo_t5(
    tokenizer: PreTrainedTokenizerFast,
    *,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
) -> T5ForConditionalGeneration:
    """A small randomly initialised T5 whose vocabulary and special ids are the tokenizer's."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        dropout_rate=0.0,  # tiny data, short runs: dropout only slows learning down here
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config).eval()


__all__ = ["EOS", "PAD", "UNK", "build_demo_t5", "train_tokenizer"]
