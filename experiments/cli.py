"""What the commands that are not a training run share: absl flag parsing and a
``UserError`` reported as one ``error:`` line with exit status 2."""
import sys
from collections.abc import Callable

from absl import app, flags, logging

from cnnjax.errors import UserError


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a bad or missing flag ends with one ``error:`` line (status 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[], None], flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
  """``app.run`` of ``main()`` (which reads the flags): extra arguments and ``UserError``
  end with one ``error:`` line and exit status 2."""
  def _main(argv: list[str]) -> None:
    try:
      if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; expected only --flags")
      logging.set_verbosity(logging.WARNING)
      main()
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(_main, flags_parser=flags_parser)
