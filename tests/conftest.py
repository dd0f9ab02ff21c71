import os
import tempfile

# One persistent XLA compilation cache for the whole session, inherited by the subprocesses the tests start (the
# CLI runs, the kill -9 resume, the fake-device meshes): the same tiny train step and sampler are compiled once
# instead of in every process. Cached executables are the same code, so results stay bitwise identical.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dreambooth-jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest

from reference_models import TINY_SD1, TINY_SD2, save_flux_pipeline, save_pipeline, save_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A diffusers folder (fp32 safetensors) of a tiny random-weight SD-1.x-shaped pipeline."""
    return save_pipeline(TINY_SD1, tmp_path_factory.mktemp("tiny_sd1") / "model")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """A tiny SD-2.x-shaped pipeline saved with fp16 variant files, as the SD 2.1 hub repo ships them."""
    return save_pipeline(TINY_SD2, tmp_path_factory.mktemp("tiny_sd2") / "model", variant="fp16")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A diffusers folder of a tiny random-weight SDXL-shaped pipeline (StableDiffusionXLPipeline.save_pretrained)."""
    return save_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A diffusers folder of a tiny random-weight FLUX.1-dev-shaped pipeline (FluxPipeline.save_pretrained)."""
    return save_flux_pipeline(tmp_path_factory.mktemp("tiny_flux") / "model")
