"""DreamBooth fine-tuning (the CLI; the run itself is dreambooth_jax/training/run.py).

  python -m dreambooth_jax.train --config=configs/dog.py [--config.learning_rate=2e-6] [--workdir=runs/dog]
  python -m dreambooth_jax.train --config=configs/dog.py --dry_run      # memory plan, nothing trained

Re-running the same command resumes from the latest checkpoint in WORKDIR/checkpoints.
"""

import logging as std_logging
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from dreambooth_jax import cli, config_files, distributed
from dreambooth_jax.training import plan as plan_lib, run


def quiet_library_logs():
  """Orbax logs every save/restore step at INFO; keep its warnings, drop the rest from the console."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/"))


@cli.main("train")
def main(argv):
  del argv
  quiet_library_logs()
  config = flags.FLAGS.config
  config_files.check_known(config, f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}")
  if flags.FLAGS.dry_run:
    distributed.initialize()
    step = run.dry_run(config)
    if not step.memory.fits():
      plan_lib.check_fits(step.memory, config)  # raises with the levers to pull
    return
  workdir = flags.FLAGS.workdir or f"runs/{pathlib.Path(config_flags.get_config_filename(flags.FLAGS['config'])).stem}"
  run.train(config, pathlib.Path(workdir))


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config name>).")
  flags.DEFINE_bool("dry_run", False, "Compile the step on an abstract model, print per-device memory, and exit "
                    "(non-zero when it cannot fit the device).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
