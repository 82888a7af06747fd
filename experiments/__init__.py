"""Runnable studies: ``python -m experiments.<name> ...``.

Each command restarts itself once with glibc's huge-page tunable for XLA's step buffers
(``cnnjax.huge_pages``; ``CNNJAX_HUGE_PAGES=0`` turns that off) before it imports JAX.
"""
from cnnjax import huge_pages

huge_pages.restart_with_huge_pages("experiments")
