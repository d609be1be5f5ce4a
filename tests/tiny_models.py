"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 128


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


FACTORIES = {"t5": tiny_t5, "gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert_cls}


def tiny_unet(seed: int = 0):
    """A diffusers UNet2DConditionModel (SD's layout: cross-attention and resnet blocks) of ~0.4M parameters."""
    from diffusers import UNet2DConditionModel  # imported here: only the image-model tests pay for it

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def tiny_clip_text(seed: int = 0):
    """A transformers CLIPTextModel (SD's text encoder) with hidden size 32, as the UNet's cross_attention_dim."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return CLIPTextModel(cfg).eval()


def unet_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, timesteps, text embeddings) for ``tiny_unet``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def model_inputs(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return inputs


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def tiny_word_tokenizer(texts, add_bos: bool = False, add_eos: bool = False):
    """A word-level tokenizer over ``texts`` (whitespace-split), ids below VOCAB: pad 0, eos 1, bos 2, unk 3.

    With ``add_bos`` every encoding starts with bos (Llama's convention), with ``add_eos`` it ends with eos (T5's).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    words = sorted({w for t in texts for w in t.split()} - set(specials))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    if len(vocab) > VOCAB:
        raise ValueError(f"{len(vocab)} words do not fit the tiny models' vocabulary of {VOCAB}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos or add_eos:
        single = ("<s> " if add_bos else "") + "$A" + (" </s>" if add_eos else "")
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 2), ("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
