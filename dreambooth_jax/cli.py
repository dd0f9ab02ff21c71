"""Expected user mistakes end a CLI in one line on stderr and a non-zero status; real bugs keep their traceback.

"Expected" = an error type of this project (every one names what to change), or a ValueError / OSError
(FileNotFoundError, ...) raised by this package's own checks, i.e. whose innermost frame is in dreambooth_jax/.
The same types raised inside a library (jax, orbax, PIL) are bugs or unexpected states: they propagate.
"""

import functools
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent
CHECK_ERRORS = (ValueError, OSError)


def project_errors() -> tuple:
  """Our error types that do not subclass ValueError (imported late: this module stays import-light)."""
  from dreambooth_jax.training import checkpoint, metrics  # noqa: PLC0415
  return (checkpoint.CheckpointError, metrics.NonFiniteLoss)


def raised_here(error: BaseException) -> bool:
  tb, last = error.__traceback__, None
  while tb is not None:
    last, tb = tb, tb.tb_next
  return last is not None and pathlib.Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def with_context(error: BaseException, context: str) -> BaseException:
  """Our own check's error with `context: ` in front (which flag or key to change); anything else as it is."""
  if not raised_here(error):
    return error
  kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
  return kind(f"{context}: {error}")


def one_line(error: BaseException) -> str:
  """Multi-line messages (lists of bad files) joined, so the error stays one line."""
  return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(prog: str):
  """Decorator for an absl main: expected errors -> `prog: error: message`, exit status 1."""
  def wrap(fn):
    @functools.wraps(fn)
    def wrapped(argv):
      try:
        return fn(argv)
      except (*CHECK_ERRORS, *project_errors()) as e:
        if not (isinstance(e, project_errors()) or raised_here(e)):
          raise
        sys.exit(f"{prog}: error: {one_line(e)}")
    return wrapped
  return wrap
