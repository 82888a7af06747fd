"""One exception type for bad user input, reported as a single line by the experiments."""


class UserError(Exception):
  """Bad input from the user (config, data, weights, checkpoint).

  The message is one line naming the bad value and what was expected; the experiment
  entry points print it without a traceback and exit with status 2.
  """
