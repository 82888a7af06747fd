"""Defaults every config starts from: the schema in ``cnnjax.config``."""
from cnnjax.config import default_config as get_config  # noqa: F401
