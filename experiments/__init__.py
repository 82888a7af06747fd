"""Runnable studies: ``python -m experiments.<name> ...``; ``experiments.entry`` is their one
entry (flags, errors, process settings, distributed start). Importing it changes nothing."""
