"""Every config key is known (configs/common.py) or refused by name with the nearest known key: in a config file
(train and dry run), in the Python API, and in a run's saved config.json (keys added since take their defaults)."""

import json
import pathlib

import pytest

from dreambooth_jax import config_files
from dreambooth_jax.training import run, run_state
from test_cli_errors import run_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, arg", [("common.py", None), ("tiny.py", None), ("tiny.py", "lora"), ("dog.py", None),
                                       ("dog_sd21.py", None), ("dog_sdxl.py", None), ("dog_sdxl.py", "lora"),
                                       ("dog_flux.py", None), ("dog_flux.py", "1024"),
                                       ("two_subjects.py", "/data/dreambooth/dataset")])
def test_shipped_configs_set_only_known_keys(name, arg):
  config_files.check_known(config_files.load(ROOT / "configs" / name, arg))


def test_unknown_keys_are_named_with_the_nearest_known_one():
  config = config_files.load(ROOT / "configs" / "tiny.py")
  config.learning_rat = 1e-4
  config.concepts = [{"name": "dog", "instance_data_dir": "dog/"}, {"nmae": "cat"}]  # an entry's keys are checked too
  config.lora.rnak = 8
  assert config_files.unknown_keys(config) == ["concepts[1].nmae", "learning_rat", "lora.rnak"]
  with pytest.raises(ValueError) as error:
    config_files.check_known(config, "my.py")
  message = str(error.value)
  assert message.startswith("my.py: unknown setting(s) concepts[1].nmae (did you mean name?), learning_rat (did you "
                            "mean learning_rate?), lora.rnak (did you mean lora.rank?)"), message
  with pytest.raises(ValueError, match="learning_rat"):  # the Python API refuses before any work
    run.train(config, pathlib.Path("/nonexistent/never/created"))
  with pytest.raises(ValueError, match="lora.rnak"):
    run.dry_run(config)


def test_config_file_with_unknown_keys_is_refused_by_the_cli(tmp_path):
  config_file = tmp_path / "typo.py"
  config_file.write_text(
      "from dreambooth_jax.config_files import load\n"
      f"def get_config(arg=None):\n  c = load({str(ROOT / 'configs' / 'tiny.py')!r})\n"
      "  c.learning_rat = 1e-4\n  c.lora.rnak = 8\n  return c\n")
  for extra in ([], ["--dry_run"]):
    result = run_cli("train", f"--config={config_file}", f"--workdir={tmp_path / 'run'}", *extra, tmp_path=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train: error: --config={config_file}: unknown setting(s) learning_rat (did you mean "
                           "learning_rate?), lora.rnak (did you mean lora.rank?)"), last
  assert not (tmp_path / "run").exists()


def test_saved_config_of_an_older_version_takes_defaults_for_new_keys(tmp_path):
  saved = json.loads(config_files.load(ROOT / "configs" / "tiny.py", "lora").to_json_best_effort())
  del saved["snr_weighting"], saved["lora"]["text_mlp"]  # settings "added since" the run was written
  saved["eval_prompts"] = ["a photo of sks dog"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = run_state.read_run_config(tmp_path)
  assert config.snr_weighting == "min_snr" and config.lora.text_mlp is False
  assert config.lora.enabled and config.lora.rank == 4 and config.eval_prompts == ("a photo of sks dog",)
  assert config_files.unknown_keys(config) == []


def test_saved_config_with_keys_this_version_does_not_know_is_refused(tmp_path):
  saved = json.loads(config_files.defaults().to_json_best_effort())
  saved["ema_decya"] = 0.999
  saved["lora"]["rnak"] = 2
  saved["concepts"] = [{"name": "dog", "instance_data_dir": "dog/", "num_repeat": 2}]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError) as error:
    run_state.read_run_config(tmp_path)
  message = str(error.value)
  assert message.startswith(f"{tmp_path / 'config.json'}: setting(s) this version of dreambooth_jax does not know: "
                            "concepts[0].num_repeat (did you mean num_repeats?), ema_decya"), message
  assert ", lora.rnak (did you mean lora.rank?)" in message and "another version" in message


def test_resume_warns_only_about_real_changes(tmp_path, caplog):
  config = config_files.load(ROOT / "configs" / "tiny.py")
  saved = json.loads(config.to_json_best_effort())
  del saved["snr_weighting"]  # written before the key existed: its default is what that run did
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with caplog.at_level("WARNING"):
    run.write_config(config, tmp_path)
  assert "differs" not in caplog.text
  config.seed = 7
  with caplog.at_level("WARNING"):
    run.write_config(config, tmp_path)
  assert "'seed': [0, 7]" in caplog.text.replace("(", "[").replace(")", "]"), caplog.text
