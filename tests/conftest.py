import os
import tempfile

import xla_flags

# One persistent XLA compilation cache for the whole session, inherited by the subprocesses the tests start (the
# CLI runs, the kill -9 resume, the fake-device meshes): the same tiny train step and sampler are compiled once
# instead of in every process. Cached executables are the same code, so results stay bitwise identical.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dreambooth-jax-xla-cache-"))
# Every program, however quick to compile (the product's own default): the random init's many small programs cost a
# CLI subprocess 14 s with a 0.5 s threshold and 5 s with none, warm (tiny model).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite is compile-bound: its programs compile with cheaper code generation (tests/xla_flags.py: LLVM at -O0,
# XLA's older fusion emitter), which rounds some results differently in the last bits: every test passes unchanged,
# the golden step's values stay within 1e-7 of the pinned ones (tolerance 1e-5). Every comparison within the suite
# runs under the same flags: subprocesses inherit them (the xdist workers too), and tests that add flags (fake
# devices) append to them. The one claim that needs the product's rounding (the base-output prior loss is exactly 0
# at step 0) runs in a subprocess under XLA's defaults (tests/test_base_output.py). Set any of these flags in
# XLA_FLAGS yourself to test under your value.
_flags = xla_flags.with_suite_flags(os.environ.get("XLA_FLAGS", ""))
if _flags != os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit the controller's: only it probes XLA
  os.environ["XLA_FLAGS"] = xla_flags.known_to_xla(_flags)

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


# The test files that take longest, longest first (measured on 2 cores). With `--dist loadfile` a file runs whole on
# one worker, and xdist hands out files in collection order (pyproject: --no-loadscope-reorder; its default order is
# by test count, which left these few-test files for last, one worker running alone at the end). Longest first
# keeps both workers busy to the end; the other files follow in their usual order.
LONGEST_FIRST = ("test_sharding.py", "test_sdxl.py", "test_golden_step.py", "test_golden_equalities.py",
                 "test_train.py", "test_sampling.py", "test_concepts.py", "test_single_file_io.py", "test_buckets.py",
                 "test_plan.py", "test_flux_train.py", "test_train_lora.py", "test_models.py", "test_masked_loss.py",
                 "test_models_sdxl.py", "test_weights.py", "test_cli_errors.py", "test_schedulers.py",
                 "test_eval_metrics.py", "test_lora.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file and test order kept
