"""Reference Stable Diffusion pipelines built with diffusers/transformers (PyTorch) and random weights.

Tests load these folders with our Flax code and compare against the torch modules on the same weights.
Built once per test session (see conftest.py); torch is a test-only dependency.
"""

import pathlib

import numpy as np

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"

# Small SD-1.x-shaped model: every block type, 2 resolutions, cross attention, conv projections.
TINY_SD1 = dict(
    unet=dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ),
    vae=dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    ),
    text_encoder=dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=32,
    ),
    scheduler=dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    ),
)

# Small SD-2.x-shaped model: linear projections, per-block head dims, upcast attention, gelu CLIP, v-prediction.
TINY_SD2 = dict(
    unet=dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(4, 8), norm_num_groups=8,
        use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=(1, 2),
    ),
    vae=TINY_SD1["vae"],
    text_encoder=dict(TINY_SD1["text_encoder"], hidden_act="gelu", layer_norm_eps=1e-5),
    scheduler=dict(TINY_SD1["scheduler"], prediction_type="v_prediction", timestep_spacing="trailing"),
)


# Small SDXL-shaped model: two text encoders (the second with a projection, padding with "!"), text_time added
# conditioning, no attention at the first level, per-level transformer depth, VAE scaling 0.13025 with force_upcast.
TINY_SDXL = dict(
    unet=dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=8,
        cross_attention_dim=32 + 48, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 40,
    ),
    vae=dict(TINY_SD1["vae"], scaling_factor=0.13025, force_upcast=True),
    text_encoder=dict(TINY_SD1["text_encoder"], num_hidden_layers=3),
    text_encoder_2=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5,
                        projection_dim=40),
    scheduler=dict(TINY_SD1["scheduler"], timestep_spacing="leading"),
)


def build_sdxl_pipeline(spec: dict = TINY_SDXL, seed: int = 0):
    """A diffusers StableDiffusionXLPipeline with random weights (perturbed norms and biases), DDIM scheduler."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]))
    vocab, merges = str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt")
    tokenizer = CLIPTokenizer(vocab, merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!")  # as SDXL's second tokenizer
    _perturb(seed, unet, vae, text_encoder, text_encoder_2)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=DDIMScheduler(**spec["scheduler"]), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sdxl_pipeline(path: pathlib.Path, spec: dict = TINY_SDXL, seed: int = 0, **save_kwargs) -> pathlib.Path:
    build_sdxl_pipeline(spec, seed).save_pretrained(str(path), **save_kwargs)
    return path


def _perturb(seed: int, *modules):
    """Default inits leave norm scales at 1 and many biases at 0, which would hide layout mistakes."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build_pipeline(spec: dict, seed: int = 0):
    """Returns a diffusers StableDiffusionPipeline with random weights (non-trivial norms and biases)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(**spec["scheduler"])
    _perturb(seed, unet, vae, text_encoder)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(spec: dict, path: pathlib.Path, seed: int = 0, **save_kwargs) -> pathlib.Path:
    pipe = build_pipeline(spec, seed)
    pipe.save_pretrained(str(path), **save_kwargs)
    return path


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().float().numpy()


# Sentences the tiny T5 tokenizer is trained on (the real T5 spiece model is not reachable offline).
T5_TOKENIZER_SENTENCES = (
    "a photo of sks dog", "a dog on the beach", "a photo of a dog in a bucket", "a red cube on a blue sphere",
    "an oil painting of a cat", "the quick brown fox jumps over the lazy dog", "a sks dog wearing a hat",
    "a close-up photo of a corgi with sunglasses", "two puppies playing in the snow at night",
)


def build_t5_tokenizer(model_max_length: int = 512):
    """A tiny T5 tokenizer (transformers.T5TokenizerFast over a Unigram model trained here with `tokenizers`), with
    T5's special ids: pad "<pad>" 0, eos "</s>" 1, unk "<unk>" 2; no extra ids. save_pretrained writes it as a
    folder's tokenizer_2/."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(T5_TOKENIZER_SENTENCES, trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [tuple(piece) for piece in json.loads(trained.to_str())["model"]["vocab"]]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    return tokenizer


# T5 v1.1-shaped (gated-gelu) tiny encoder; few buckets and a short max distance so that a 40-token sequence reaches
# the log-spaced and the clipped relative-position buckets.
TINY_T5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0)

# Flux.1's VAE shape in miniature: 16 latent channels, no quant convs, a shift factor (FLUX.1-dev's values).
TINY_FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.1159, scaling_factor=0.3611,
)

# A tiny FLUX.1-dev-shaped pipeline: guidance-distilled transformer (2 double + 2 single blocks, 2 heads of 16, rope
# axes 4/6/6) over the 16-channel VAE's packed latents (64 = 16 x 2 x 2), T5 context (its d_model) and the CLIP
# pooled output (its hidden size); the dev scheduler config (resolution-dependent shift).
TINY_FLUX = dict(
    transformer=dict(patch_size=1, in_channels=4 * TINY_FLUX_VAE["latent_channels"], num_layers=2,
                     num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=TINY_T5["d_model"],
                     pooled_projection_dim=TINY_SD1["text_encoder"]["hidden_size"], guidance_embeds=True,
                     axes_dims_rope=(4, 6, 6)),
    vae=TINY_FLUX_VAE,
    text_encoder=TINY_SD1["text_encoder"],
    text_encoder_2=TINY_T5,
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096),
)


def build_flux_pipeline(spec: dict = TINY_FLUX, seed: int = 0):
    """A diffusers FluxPipeline with random weights (perturbed norms and biases), the trained tiny T5 tokenizer and
    the CLIP tokenizer. Its VAE has two levels, so FluxPipeline's vae_scale_factor is 2 (pixels = 2 x latents)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**spec["transformer"])
    vae = AutoencoderKL(**spec["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    text_encoder_2 = T5EncoderModel(T5Config(**spec["text_encoder_2"]))
    tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)
    tokenizer_2 = build_t5_tokenizer()
    assert len(tokenizer_2) <= spec["text_encoder_2"]["vocab_size"]
    _perturb(seed, transformer, vae, text_encoder, text_encoder_2)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_flux_pipeline(path: pathlib.Path, spec: dict = TINY_FLUX, seed: int = 0, **save_kwargs) -> pathlib.Path:
    build_flux_pipeline(spec, seed).save_pretrained(str(path), **save_kwargs)
    return path
