"""The corpus of adapter_config.json files as published (../shared/data/peft-configs, sources in its SOURCES.md).

Each LoRA / IA3 / FourierFT file loads with PEFT parity on a tiny model of its family (built from a small
config of that model type): PEFT builds the adapter from the file on the tiny model, its weights are saved
beside the file's own config, loraloom loads that folder with PEFT's outputs, and loraloom's save loads back
in PEFT with the same outputs. Every other file (other peft_types, non-PEFT files, an LFS pointer) is refused
with a message naming what it is. Families without a transformers class (custom code) are skipped, named.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import tiny_models
import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    SiglipConfig,
    SiglipModel,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import loraloom as ll
from loraloom.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "peft-configs"
V = tiny_models.VOCAB

# ---- tiny models of each family ----------------------------------------------------------------

DECODER = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # v_proj 32 x 32: room for FourierFT's 1000 coefficients
    max_position_embeddings=64,
    pad_token_id=0,
)
ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
T5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)

# family -> (Auto class, model_type, config kwargs, inputs)
FAMILIES = {
    "bert-cls": (AutoModelForSequenceClassification, "bert", {**ENC, "num_labels": 3}, "text"),
    "roberta-cls": (AutoModelForSequenceClassification, "roberta", {**ENC, "max_position_embeddings": 72}, "text"),
    "deberta-cls": (AutoModelForSequenceClassification, "deberta", {**ENC, "max_position_embeddings": 64}, "text"),
    "gpt2-cls": (AutoModelForSequenceClassification, "gpt2", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0), "text"),
    "gpt2": (AutoModelForCausalLM, "gpt2", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0), "text"),
    "qwen2-cls": (AutoModelForSequenceClassification, "qwen2", DECODER, "text"),
    "llama-cls": (AutoModelForSequenceClassification, "llama", DECODER, "text"),
    "llama": (AutoModelForCausalLM, "llama", DECODER, "text"),
    "llama-biases": (AutoModelForCausalLM, "llama", {**DECODER, "attention_bias": True, "mlp_bias": True}, "text"),
    "llama-base": (AutoModel, "llama", DECODER, "text"),
    "mistral": (AutoModelForCausalLM, "mistral", DECODER, "text"),
    "qwen2": (AutoModelForCausalLM, "qwen2", DECODER, "text"),
    "qwen3": (AutoModelForCausalLM, "qwen3", {**DECODER, "head_dim": 8}, "text"),
    "qwen3_5": (AutoModelForCausalLM, "qwen3_5_text", {**DECODER, "head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}, "text"),
    "gemma3": (AutoModelForCausalLM, "gemma3_text", {**DECODER, "head_dim": 8, "sliding_window": 16}, "text"),
    "gemma4": (AutoModelForCausalLM, "gemma4_text", {**DECODER, "head_dim": 8, "global_head_dim": 8, "sliding_window": 16, "vocab_size_per_layer_input": V, "hidden_size_per_layer_input": 8}, "text"),
    "nemotron_h": (AutoModelForCausalLM, "nemotron_h", {**DECODER, "num_hidden_layers": 3, "head_dim": 8, "hybrid_override_pattern": "M*-", "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1}, "text"),
    "phi": (AutoModelForCausalLM, "phi", {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}, "text"),
    "opt": (AutoModelForCausalLM, "opt", dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0), "text"),
    "bloom": (AutoModelForCausalLM, "bloom", dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0), "text"),
    "falcon": (AutoModelForCausalLM, "falcon", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0), "text"),
    "gpt_neox": (AutoModelForCausalLM, "gpt_neox", {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}, "text"),
    "t5": (AutoModelForSeq2SeqLM, "t5", T5, "seq2seq"),
    "mt5": (AutoModelForSeq2SeqLM, "mt5", T5, "seq2seq"),
    "bart": (AutoModelForSeq2SeqLM, "bart", dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64), "seq2seq"),
    "whisper": (WhisperForConditionalGeneration, WhisperConfig, dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16, decoder_start_token_id=0, pad_token_id=0), "whisper"),
    "vit": (AutoModelForImageClassification, "vit", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8, num_labels=3), "image"),
    "siglip": (SiglipModel, SiglipConfig, dict(text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16), vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8)), "image"),
    "unet": (None, None, None, "unet"),
}  # fmt: skip


def build(family: str) -> torch.nn.Module:
    auto, model_type, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    if family == "unet":
        return tiny_models.tiny_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = model_type(**kwargs) if isinstance(model_type, type) else AutoConfig.for_model(model_type, **kwargs)
        model = auto(config) if auto in (WhisperForConditionalGeneration, SiglipModel) else auto.from_config(config)
    return model.eval()


@torch.no_grad()
def features(model: torch.nn.Module, family: str) -> torch.Tensor:
    """The outputs and the last hidden state (a fresh head alone would hide what the adapter does)."""
    kind = FAMILIES[family][3]
    g = torch.Generator().manual_seed(1)
    if kind == "unet":
        sample, t, text = tiny_models.unet_inputs()
        return model(sample, t, encoder_hidden_states=text).sample.flatten()
    if kind == "image":
        out = model(pixel_values=torch.randn(2, 3, 16, 16, generator=g), output_hidden_states=True)
        return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])
    inputs = {"input_ids": torch.randint(3, V, (2, 7), generator=g)}
    if kind == "whisper":
        inputs = {"input_features": torch.randn(2, 8, 32, generator=g)}
    if kind in ("seq2seq", "whisper"):
        inputs["decoder_input_ids"] = torch.randint(3, V, (2, 5), generator=g)
    out = model(**inputs, output_hidden_states=True)
    hidden = out.decoder_hidden_states if kind in ("seq2seq", "whisper") else out.hidden_states
    main = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return torch.cat([main.flatten(), hidden[-1].flatten()])


# ---- what each file should do --------------------------------------------------------------------

SKIP = "skip"
REFUSED = "refused"
# prefix -> family (loads with parity), or (REFUSED, what the message names), or (SKIP, why)
EXPECTED: dict[str, str | tuple[str, str]] = {
    "01": "bert-cls",
    "02": "roberta-cls",
    "03": "deberta-cls",  # DoRA
    "04": "gpt2-cls",
    "05": "gpt2",
    "06": "qwen2-cls",
    "07": "llama-cls",  # task from auto_mapping
    "08": "whisper",
    "09": "unet",
    "10": "t5",
    "11": "bart",
    "12": "mt5",
    # transformers 5 renamed ViT's query/value to q_proj/v_proj: PEFT refuses this file on ViT too
    "13": (REFUSED, r"target_modules \['value', 'query'\] matched no layer of ViTForImageClassification.*q_proj"),
    # PEFT leaves bare parameters in modules_to_save untrained and unsaved without a word: loraloom says so
    "14": (REFUSED, r"modules_to_save \['logit_scale', 'logit_bias'\] not found .*a parameter, not a module"),
    "15": "opt",  # BLIP-2's language model (OPT)
    "16": "llama",
    "17": (REFUSED, r"field 'enable_lora' = \[True, False, True\] is not supported .*MergedLinear"),
    "18": (SKIP, "Baichuan2 is custom code (trust_remote_code): no transformers class to build"),
    "19": "bloom",
    "20": "gpt_neox",  # 'xxx' matches nothing, as in PEFT: the other target does
    "21": "falcon",
    "22": "mistral",  # lm_head adapted
    "23": "qwen2",  # DoRA
    "24": "llama-biases",  # rsLoRA and bias='lora_only' on layers that have biases
    "25": "qwen2",  # Qwen2.5-VL's language model: the regex names model.layers.N
    "26": "gemma3",
    "27": "gemma4",
    "28": "phi",
    "29": "llama",
    "30": "nemotron_h",
    "31": "llama-base",  # auto_mapping LlamaModel
    "32": "qwen3",  # Cosmos-Reason2's (Qwen3-VL) language model; modules_to_save embed_tokens
    "33": "qwen3_5",  # task_type SEQ_2_SEQ_LM on a decoder-only model
    "34": (SKIP, "stella_en_400M_v5 is custom code (model_type 'new'): no transformers class to build"),
    "35": (SKIP, "GLM-4-9b-chat is ChatGLM custom code (query_key_value names): no transformers class to build"),
    "36": (REFUSED, r"peft_type 'ADALORA' \(AdaLoRA\) is not supported"),
    "37": (REFUSED, r"peft_type 'ADALORA' \(AdaLoRA\) is not supported"),
    "38": (REFUSED, r"peft_type 'PREFIX_TUNING' \(prefix tuning\) is not supported"),
    "39": (REFUSED, r"peft_type 'PROMPT_TUNING' \(prompt tuning\) is not supported"),
    "40": "mt5",  # IA3, feedforward_modules []
    "41": "opt",  # IA3
    "42": "llama",  # FourierFT
    "43": (REFUSED, r"peft_type 'LOHA' \(LoHa\) is not supported"),
    "44": "opt",
    "45": "qwen3_5",  # PiSSA: loraloom re-derives the residual base on load, as PEFT does
    "46": (REFUSED, r"no field 'peft_type': an mlx-lm LoRA training config"),
    "47": (REFUSED, r"no field 'peft_type': an AdapterHub .* adapter config"),
    "48": (REFUSED, r"a Git LFS pointer, not the file itself"),
    "49": (REFUSED, r"no field 'peft_type': a transformers model config"),
}
FILES = sorted(CORPUS.glob("[0-9][0-9]-*.json")) if CORPUS.is_dir() else []
PARITY = [f for f in FILES if isinstance(EXPECTED[f.name[:2]], str)]
NOT_LOADED = [f for f in FILES if not isinstance(EXPECTED[f.name[:2]], str)]
needs_corpus = pytest.mark.skipif(not FILES, reason=f"corpus not found at {CORPUS} (../shared is absent)")


def test_every_corpus_file_has_an_expectation():
    if not FILES:
        pytest.skip(f"corpus not found at {CORPUS} (../shared is absent)")
    assert len(FILES) == 49 and sorted(f.name[:2] for f in FILES) == sorted(EXPECTED)


def folder_with(config_file: Path, folder: Path, weights: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(config_file, folder / CONFIG_NAME)
    if weights is not None:
        save_file(weights, folder / WEIGHTS_NAME)
    return folder


@needs_corpus
@pytest.mark.parametrize("file", PARITY, ids=[f.name[:2] for f in PARITY])
def test_corpus_file_loads_with_peft_parity(file, tmp_path):
    family = EXPECTED[file.name[:2]]
    if family == "unet" and not hasattr(tiny_models, "tiny_unet"):
        pytest.skip("no tiny diffusers UNet in tests/tiny_models.py")
    # PEFT builds the adapter the file describes on the tiny model; training is stood in for by noise.
    peft_config = peft.PeftConfig.from_pretrained(folder_with(file, tmp_path / "file"))
    peft_config.inference_mode = False  # the adapter's parameters are then the trainable ones
    if peft_config.task_type == "SEQ_2_SEQ_LM" and FAMILIES[family][0] is AutoModelForCausalLM:
        peft_config.task_type = None  # file 33: PEFT's seq2seq wrapper cannot run a decoder-only model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(family), peft_config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    expected = features(pm, family)
    assert (expected - features(build(family), family)).abs().max() > 1e-3  # the adapter matters
    pm.save_pretrained(tmp_path / "peft")
    shutil.copy(file, tmp_path / "peft" / CONFIG_NAME)  # the file as published, with PEFT's weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a key of a newer PEFT
        model = ll.load_adapter(build(family), tmp_path / "peft", verbose=False)
    torch.testing.assert_close(features(model, family), expected, atol=1e-5, rtol=0)
    ll.save_adapter(model, tmp_path / "loraloom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build(family), tmp_path / "loraloom")
    torch.testing.assert_close(features(back.eval(), family), expected, atol=1e-5, rtol=0)


@needs_corpus
@pytest.mark.parametrize("file", NOT_LOADED, ids=[f.name[:2] for f in NOT_LOADED])
def test_corpus_file_is_refused_by_name(file, tmp_path):
    kind, what = EXPECTED[file.name[:2]]
    if kind == SKIP:
        pytest.skip(what)
    family = {"13": "vit", "14": "siglip"}.get(file.name[:2], "llama")
    model = build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = folder_with(file, tmp_path / "adapter", weights={})
    with pytest.raises(ll.AdapterError, match=what) as e:
        ll.load_adapter(model, folder, verbose=False)
    assert str(e.value).startswith(str(folder)) and "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_corpus
def test_file_13_is_refused_by_peft_too(tmp_path):
    """The ViT file targets names transformers 5 no longer has: PEFT refuses it as well."""
    config = peft.PeftConfig.from_pretrained(folder_with(next(f for f in FILES if f.name[:2] == "13"), tmp_path / "f"))
    with pytest.raises(ValueError, match="No modules were targeted"):
        peft.get_peft_model(build("vit"), config)


@needs_corpus
def test_corpus_counts():
    """How the corpus splits (for the report): loads with parity / refused / skipped."""
    kinds = [EXPECTED[f.name[:2]] for f in FILES]
    parity = sum(isinstance(k, str) for k in kinds)
    refused = sum(isinstance(k, tuple) and k[0] == REFUSED for k in kinds)
    skipped = sum(isinstance(k, tuple) and k[0] == SKIP for k in kinds)
    types = {json.loads(f.read_text()).get("peft_type") for f in PARITY}
    assert (parity, refused, skipped) == (34, 12, 3) and types == {"LORA", "IA3", "FOURIERFT"}
