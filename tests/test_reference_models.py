from reference_models import TINY_SD1, TINY_SD2, build_pipeline


def test_reference_pipelines_build_and_run():
    import torch
    for spec in (TINY_SD1, TINY_SD2):
        pipe = build_pipeline(spec)
        out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (1, 64, 64, 3)
