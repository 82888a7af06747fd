"""cnnjax.huge_pages: python -m commands restart once with glibc's huge-page tunable."""
import os
import pathlib
import subprocess
import sys

import pytest

from cnnjax import huge_pages

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_tunable_is_added_to_the_users_own_and_never_overrides_them():
  assert huge_pages.tunables_with_huge_pages({}) == "glibc.malloc.hugetlb=1"
  assert (huge_pages.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert huge_pages.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert huge_pages.tunables_with_huge_pages({"CNNJAX_HUGE_PAGES": "0"}) is None


def _run_module(tmp_path, **env):
  (tmp_path / "probe_module.py").write_text(
      "import os, sys\n"
      "from cnnjax import huge_pages\n"
      "huge_pages.restart_with_huge_pages('probe_module')\n"
      "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  environ.update(env, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
  done = subprocess.run([sys.executable, "-m", "probe_module", "--flag=1", "x y"],
                        capture_output=True, text=True, env=environ, cwd=tmp_path, check=True)
  return done.stdout.strip()


def test_a_python_m_command_restarts_once_with_its_arguments(tmp_path):
  if (sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
      or not huge_pages._kernel_has_huge_pages()):
    pytest.skip("needs Linux with glibc and transparent huge pages")
  assert _run_module(tmp_path) == "glibc.malloc.hugetlb=1 ['--flag=1', 'x y']"
  assert (_run_module(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 ['--flag=1', 'x y']")
  assert _run_module(tmp_path, CNNJAX_HUGE_PAGES="0") == "None ['--flag=1', 'x y']"


def test_imports_do_not_restart(monkeypatch):
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted"))
  # Not a python -m command of the package (pytest, a notebook): no restart.
  huge_pages.restart_with_huge_pages("experiments")
