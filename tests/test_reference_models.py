import numpy as np

from reference_models import TINY_SD1, TINY_SD2, build_pipeline


def test_reference_pipelines_build_and_run():
    import torch
    for spec in (TINY_SD1, TINY_SD2):
        pipe = build_pipeline(spec)
        out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (1, 64, 64, 3)


def test_flux_reference_folder_runs_and_loads_into_our_modules(tmp_path):
    """The tiny Flux folder is a valid FluxPipeline (from_pretrained, 2 steps) and each model component loads
    strictly into our modules from its config.json and safetensors."""
    import torch
    from diffusers import FluxPipeline
    from flax import nnx
    from reference_models import save_flux_pipeline
    from dreambooth_jax.io import diffusers_folder as weights, safetensors as safetensors_io
    from dreambooth_jax.models import clip_text, flux, t5, vae

    folder = save_flux_pipeline(tmp_path / "flux")
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, max_sequence_length=32,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer_2.eos_token_id == 1

    components = {
        "transformer": (flux.FluxConfig, flux.FluxTransformer2DModel, "diffusion_pytorch_model", lambda d: d),
        "vae": (vae.VAEConfig, vae.AutoencoderKL, "diffusion_pytorch_model", lambda d: d),
        "text_encoder": (clip_text.CLIPTextConfig, clip_text.CLIPTextModel, "model",
                         lambda d: weights.normalize_keys(d, "text")),
        "text_encoder_2": (t5.T5Config, t5.T5EncoderModel, "model", t5.t5_encoder_keys),
    }
    for name, (config_class, model_class, stem, keys) in components.items():
        config = config_class.from_dict(weights.read_json(folder / name / "config.json"))
        state_dict = keys(safetensors_io.load_file(folder / name / f"{stem}.safetensors"))
        weights.load_module(lambda: model_class(config, rngs=nnx.Rngs(0)), state_dict, where=name)
