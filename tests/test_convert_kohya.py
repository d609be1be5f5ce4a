"""kohya / A1111 single-file SD LoRA <-> PEFT folders, on a tiny diffusers UNet and CLIP text encoder."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_diffusers_lora import clip_out, unet_out
from tiny_models import tiny_clip_text, tiny_unet

import loraloom as ll
from loraloom.cli import main
from loraloom.convert import kohya_to_peft, peft_to_kohya, read_kohya

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def models():
    return {"unet": tiny_unet(), "text_encoder": tiny_clip_text()}


def trained_peft_folders(tmp_path):
    """PEFT folders for the UNet and the text encoder, with per-layer ranks and alphas, and their outputs."""
    torch.manual_seed(0)
    unet = ll.add_adapter(
        tiny_unet(),
        ll.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=UNET_TARGETS,
            init_lora_weights=False,
            rank_pattern={"conv1": 2},
            alpha_pattern={r"mid_block\.attentions\.0\.proj_in": 3},
        ),
        verbose=False,
    )
    te = ll.add_adapter(
        tiny_clip_text(),
        ll.LoraConfig(r=2, lora_alpha=5, target_modules=CLIP_TARGETS, init_lora_weights=False),
        verbose=False,
    )
    ll.save_adapter(unet, tmp_path / "peft" / "unet")
    ll.save_adapter(te, tmp_path / "peft" / "text_encoder")
    return unet_out(unet), clip_out(te)


def test_peft_to_kohya_and_back_gives_the_same_outputs(tmp_path):
    expected_unet, expected_te = trained_peft_folders(tmp_path)
    file = peft_to_kohya(
        {"unet": tmp_path / "peft" / "unet", "text_encoder": tmp_path / "peft" / "text_encoder"},
        tmp_path / "sd.safetensors",
    )
    keys = load_file(file)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha" in keys
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)

    written = kohya_to_peft(file, models(), tmp_path / "converted")
    assert set(written) == {"unet", "text_encoder"}
    unet = ll.load_adapter(tiny_unet(), written["unet"], verbose=False)
    te = ll.load_adapter(tiny_clip_text(), written["text_encoder"], verbose=False)
    torch.testing.assert_close(unet_out(unet), expected_unet, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_out(te), expected_te, atol=1e-5, rtol=0)
    config = ll.read_adapter(written["unet"])[0]
    assert config.r == 4 and set(config.rank_pattern.values()) == {2}
    # And back again: the same kohya tensors.
    again = load_file(peft_to_kohya(written, tmp_path / "again.safetensors"))
    assert again.keys() == keys.keys()
    for k, v in keys.items():
        torch.testing.assert_close(again[k], v, atol=0, rtol=0)


def test_hand_built_kohya_file_loads_as_its_merged_weights(tmp_path):
    """Keys written by hand as kohya's sd-scripts names them; the expected model adds alpha/r·up·down by hand."""
    g = torch.Generator().manual_seed(3)
    layers = {  # kohya name: (module path, down shape, up shape, alpha or None)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            (2, 32),
            (32, 2),
            1.0,
        ),
        "lora_unet_down_blocks_0_resnets_0_conv1": (
            "down_blocks.0.resnets.0.conv1",
            (3, 32, 3, 3),
            (32, 3, 1, 1),
            None,
        ),
        # a 1x1 conv written as a linear layer (2-D), as some trainers do
        "lora_unet_mid_block_attentions_0_proj_in": ("mid_block.attentions.0.proj_in", (2, 64), (64, 2), 4.0),
        "lora_te_text_model_encoder_layers_1_mlp_fc1": ("encoder.layers.1.mlp.fc1", (2, 32), (64, 2), 0.5),
    }
    tensors = {}
    expected = models()
    for name, (path, down_shape, up_shape, alpha) in layers.items():
        down, up = torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down.half(), up.half()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        r = down_shape[0]
        scale = (alpha if alpha is not None else r) / r
        model = expected["text_encoder" if name.startswith("lora_te_") else "unet"]
        w = model.get_submodule(path).weight
        delta = up.half().float().reshape(up.shape[0], r) @ down.half().float().reshape(r, -1)
        with torch.no_grad():
            w += scale * delta.reshape(w.shape)
    save_file(tensors, tmp_path / "hand.safetensors")

    written = kohya_to_peft(tmp_path / "hand.safetensors", models(), tmp_path / "out")
    unet = ll.load_adapter(tiny_unet(), written["unet"], verbose=False)
    te = ll.load_adapter(tiny_clip_text(), written["text_encoder"], verbose=False)
    assert (unet_out(unet) - unet_out(tiny_unet())).abs().max() > 1e-2
    torch.testing.assert_close(unet_out(unet), unet_out(expected["unet"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_out(te), clip_out(expected["text_encoder"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "keys, message",
    [
        (["unet.down_blocks.0.attentions.0.proj_in.lora.down.weight"], "diffusers-format LoRA"),
        (["base_model.model.conv_in.lora_A.weight"], "PEFT adapter"),
        (["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"], "LyCORIS"),
        (["some.other.key"], "unknown key style"),
    ],
)
def test_unknown_key_styles_are_refused_with_the_keys(keys, message, tmp_path):
    save_file({k: torch.zeros(2, 2) for k in keys}, tmp_path / "x.safetensors")
    with pytest.raises(ll.AdapterError, match=message) as e:
        read_kohya(tmp_path / "x.safetensors")
    assert keys[0] in str(e.value) and "x.safetensors" in str(e.value)


def test_bad_kohya_files_name_the_problem(tmp_path):
    down, up = torch.zeros(2, 32), torch.zeros(32, 2)
    save_file(
        {"lora_unet_no_such_layer.lora_down.weight": down, "lora_unet_no_such_layer.lora_up.weight": up},
        tmp_path / "a.safetensors",
    )
    with pytest.raises(ll.AdapterError, match="match no layer of UNet2DConditionModel.*no_such_layer"):
        kohya_to_peft(tmp_path / "a.safetensors", models(), tmp_path / "out")
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, tmp_path / "b.safetensors")
    with pytest.raises(ll.AdapterError, match=r"text_encoder.*no such model was given"):
        kohya_to_peft(tmp_path / "b.safetensors", {"unet": tiny_unet()}, tmp_path / "out")
    save_file({f"{name}.lora_down.weight": down}, tmp_path / "c.safetensors")
    with pytest.raises(ll.AdapterError, match="without both lora_down and lora_up"):
        read_kohya(tmp_path / "c.safetensors")
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(2, 31), f"{name}.lora_up.weight": up}, tmp_path / "d.safetensors"
    )
    with pytest.raises(ll.AdapterError, match=r"lora_down: shape \(2, 31\) does not fit"):
        kohya_to_peft(tmp_path / "d.safetensors", models(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dora_has_no_kohya_form(tmp_path):
    model = ll.add_adapter(
        tiny_clip_text(), ll.LoraConfig(r=2, target_modules=CLIP_TARGETS, use_dora=True), verbose=False
    )
    ll.save_adapter(model, tmp_path / "te")
    with pytest.raises(ll.AdapterError, match="use_dora"):
        peft_to_kohya({"text_encoder": tmp_path / "te"}, tmp_path / "x.safetensors")


def test_cli_convert_both_ways_with_a_saved_pipeline(tmp_path, capsys):
    expected_unet, expected_te = trained_peft_folders(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "sd" / "unet")
    tiny_clip_text().save_pretrained(tmp_path / "sd" / "text_encoder")

    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "sd.safetensors")]) == 0
    assert (
        main(["convert", str(tmp_path / "sd.safetensors"), str(tmp_path / "back"), "--base", str(tmp_path / "sd")]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    unet = ll.load_adapter(tiny_unet(), tmp_path / "back" / "unet", verbose=False)
    te = ll.load_adapter(tiny_clip_text(), tmp_path / "back" / "text_encoder", verbose=False)
    torch.testing.assert_close(unet_out(unet), expected_unet, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_out(te), expected_te, atol=1e-5, rtol=0)

    assert main(["convert", str(tmp_path / "sd.safetensors"), str(tmp_path / "x")]) == 2
    assert "needs --base" in capsys.readouterr().err


def tiny_clip_text_with_projection():
    """SDXL's second text encoder: CLIP with its projection (whose layers keep the text_model. level)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(5)
    cfg = CLIPTextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=16,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def test_two_text_encoders_are_te1_and_te2(tmp_path):
    torch.manual_seed(0)
    config = ll.LoraConfig(r=2, target_modules=[*CLIP_TARGETS, "text_projection"], init_lora_weights=False)
    te2 = ll.add_adapter(tiny_clip_text_with_projection(), config, verbose=False)
    te1 = ll.add_adapter(
        tiny_clip_text(), ll.LoraConfig(r=2, target_modules=CLIP_TARGETS, init_lora_weights=False), verbose=False
    )
    ll.save_adapter(te1, tmp_path / "peft" / "text_encoder")
    ll.save_adapter(te2, tmp_path / "peft" / "text_encoder_2")
    file = peft_to_kohya(
        {"text_encoder": tmp_path / "peft" / "text_encoder", "text_encoder_2": tmp_path / "peft" / "text_encoder_2"},
        tmp_path / "xl.safetensors",
    )
    keys = load_file(file)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_projection.alpha" in keys
    written = kohya_to_peft(
        file, {"text_encoder": tiny_clip_text(), "text_encoder_2": tiny_clip_text_with_projection()}, tmp_path / "out"
    )
    back = ll.load_adapter(tiny_clip_text_with_projection(), written["text_encoder_2"], verbose=False)
    with torch.no_grad():
        ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(back(input_ids=ids).text_embeds, te2(input_ids=ids).text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        clip_out(ll.load_adapter(tiny_clip_text(), written["text_encoder"], verbose=False)), clip_out(te1)
    )


# The original SD UNet's names for the tiny UNet's layers (layers_per_block=1: each down block is one
# input_blocks entry per layer plus one for its downsampler; each up block has two output_blocks entries).
SGM_NAMES = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_1_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_1_transformer_blocks_0_ff_net_2": "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "out_2": "conv_out",
}


def kohya_file(path, layers: dict[str, str], unet, seed: int = 4) -> None:
    """Random rank-2 LoRA tensors, alpha 1 (scale 0.5), in kohya's fp16, for {kohya UNet layer name: the
    diffusers module it adapts (for its shape)}."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module_path in layers.items():
        base = unet.get_submodule(module_path)
        kernel = tuple(base.weight.shape[2:])
        d_in, d_out = (base.in_channels, base.out_channels) if kernel else (base.in_features, base.out_features)
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, d_in, *kernel, generator=g).half()
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(d_out, 2, *(1,) * len(kernel), generator=g).half()
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    save_file(tensors, path)


def diffusers_loaded(path):
    """The tiny UNet with the kohya file loaded by diffusers' own converter and loader (the oracle)."""
    from diffusers import StableDiffusionPipeline

    unet = tiny_unet()
    state, alphas = StableDiffusionPipeline.lora_state_dict(load_file(path), unet_config=unet.config)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet)
    return unet


def test_original_sd_block_names_map_to_the_diffusers_layers(tmp_path):
    kohya_file(tmp_path / "sgm.safetensors", SGM_NAMES, tiny_unet())
    config = ll.read_adapter(kohya_to_peft(tmp_path / "sgm.safetensors", models(), tmp_path / "out")["unet"])[0]
    assert sorted(config.target_modules) == sorted(SGM_NAMES.values())


@pytest.mark.parametrize("style", ["diffusers", "sgm"])
def test_kohya_file_matches_diffusers_own_loader(style, tmp_path):
    if style == "sgm":  # diffusers maps an upsampler outside attention blocks wrongly: leave it out
        layers = {name: path for name, path in SGM_NAMES.items() if name != "output_blocks_1_1_conv"}
    else:
        layers = {path.replace(".", "_"): path for path in SGM_NAMES.values()}
    kohya_file(tmp_path / "k.safetensors", layers, tiny_unet())
    written = kohya_to_peft(tmp_path / "k.safetensors", models(), tmp_path / "out")
    ours = ll.load_adapter(tiny_unet(), written["unet"], verbose=False)
    expected = unet_out(diffusers_loaded(tmp_path / "k.safetensors"))
    assert (expected - unet_out(tiny_unet())).abs().max() > 1e-2
    torch.testing.assert_close(unet_out(ours), expected, atol=1e-5, rtol=0)


TE_Q = "text_model_encoder_layers_0_self_attn_q_proj"


def two_names_for_one_layer(tmp_path, first: str, second: str, unet_path: str | None = None):
    """A kohya file naming one layer twice (the same tensors under both names)."""
    if unet_path is not None:
        base = tiny_unet().get_submodule(unet_path)
        down, up = torch.randn(2, base.in_features), torch.randn(base.out_features, 2)
    else:
        down, up = torch.randn(2, 32), torch.randn(32, 2)
    tensors = {}
    for name in (first, second):
        tensors |= {f"{name}.lora_down.weight": down.clone(), f"{name}.lora_up.weight": up.clone()}
    save_file(tensors, tmp_path / "twice.safetensors")
    return tmp_path / "twice.safetensors"


def test_te_and_te1_for_one_layer_is_an_error_naming_both(tmp_path):
    file = two_names_for_one_layer(tmp_path, f"lora_te_{TE_Q}", f"lora_te1_{TE_Q}")
    with pytest.raises(ll.AdapterError, match=r"keys '.*' and '.*' are the same layer") as e:
        kohya_to_peft(file, models(), tmp_path / "out")
    assert f"'lora_te_{TE_Q}." in str(e.value) and f"'lora_te1_{TE_Q}." in str(e.value)
    assert not (tmp_path / "out").exists()


def test_diffusers_and_sgm_names_for_one_block_is_an_error_naming_both(tmp_path):
    sgm, path = next((n, p) for n, p in SGM_NAMES.items() if p.endswith("to_q"))
    file = two_names_for_one_layer(tmp_path, f"lora_unet_{path.replace('.', '_')}", f"lora_unet_{sgm}", path)
    with pytest.raises(ll.AdapterError, match=rf"unet layers '.*' and '.*' are both '{path}'"):
        kohya_to_peft(file, models(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("down", "up", "alpha", "message"),
    [
        (torch.tensor(1.0), torch.zeros(32, 2), None, r"lora_down: a 0-dim tensor"),
        (torch.zeros(2, 32), torch.zeros(32), None, r"lora_up: a 1-dim tensor"),
        (torch.zeros(0, 32), torch.zeros(32, 0), None, r"lora_down has rank 0 but lora_up 0"),
        (torch.zeros(2, 32), torch.zeros(32, 3), None, r"lora_down has rank 2 but lora_up 3"),
        (torch.zeros(2, 32), torch.zeros(32, 2), torch.ones(2), r"\.alpha: holds 2 values"),
        (torch.zeros(2, 32), torch.zeros(32, 2), torch.tensor(float("nan")), r"\.alpha: is nan"),
        (torch.full((2, 32), float("inf")), torch.zeros(32, 2), None, r"lora_down \(as float32\) holds NaN or inf"),
        (torch.full((2, 32), 1e300, dtype=torch.float64), torch.zeros(32, 2), None, r"lora_down \(as float32\) holds"),
        (torch.zeros(2, 32, dtype=torch.int8), torch.zeros(32, 2), None, r"has dtype I8"),
    ],
)
def test_a_kohya_layer_loraloom_would_refuse_is_never_written(tmp_path, down, up, alpha, message):
    tensors = {f"lora_te_{TE_Q}.lora_down.weight": down, f"lora_te_{TE_Q}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"lora_te_{TE_Q}.alpha"] = alpha
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ll.AdapterError, match=message):
        kohya_to_peft(tmp_path / "bad.safetensors", models(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
