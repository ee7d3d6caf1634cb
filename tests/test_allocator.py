"""``backdoorlab.allocator``: glibc's thresholds are set on import unless the user opts out."""
from __future__ import annotations

import subprocess
import sys

import pytest

from backdoorlab import allocator


def test_unknown_choice_is_refused_naming_the_valid_ones(monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_MALLOC", "fast")
    with pytest.raises(ValueError, match="BACKDOORLAB_MALLOC must be one of reuse, system, got 'fast'"):
        allocator.keep_freed_memory()


def test_system_keeps_the_c_library_defaults(monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_MALLOC", "system")
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_thresholds_are_set_on_glibc(monkeypatch):
    monkeypatch.delenv("BACKDOORLAB_MALLOC", raising=False)
    import ctypes

    if not hasattr(ctypes.CDLL("libc.so.6"), "gnu_get_libc_version"):
        pytest.skip("not glibc")
    assert allocator.keep_freed_memory() is True


def test_a_bad_choice_stops_the_import_with_the_message():
    code = "import backdoorlab"
    done = subprocess.run([sys.executable, "-c", code], env={"BACKDOORLAB_MALLOC": "jemalloc", "PATH": ""},
                          capture_output=True, text=True)
    assert done.returncode != 0 and "BACKDOORLAB_MALLOC must be one of reuse, system" in done.stderr
