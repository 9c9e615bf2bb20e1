"""The allocator setup runs where it applies (glibc) and is skipped cleanly where it does not."""

import ctypes
import json
import subprocess
import sys

from mubench_probe import allocator


def _in_fresh_process(env: dict[str, str]) -> dict:
    """`allocator.describe()` in a new interpreter. The module is loaded from its file alone (it
    imports only the standard library): importing the package would cost ~1 s of pandas and zarr."""
    code = (
        "import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('allocator', sys.argv[1]); "
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); print(json.dumps(mod.describe()))"
    )
    argv = [sys.executable, "-c", code, allocator.__file__]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True, timeout=60)
    return json.loads(out.stdout)


def test_glibc_thresholds_are_raised(monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    state = _in_fresh_process(env)
    if allocator.glibc() is None:  # pragma: no cover - macOS / musl
        assert state["allocator"] == "unchanged" and "not glibc" in state["why"]
        return
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    assert state["allocator"] == f"glibc {libc.gnu_get_libc_version().decode()}"
    assert state["mallopt"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
    assert _in_fresh_process({**env, allocator.ENV: "system"}) == {
        "allocator": "unchanged",
        "why": f"{allocator.ENV}=system",
    }


def test_no_glibc_means_no_change(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(allocator, "glibc", lambda: None)
        m.delenv(allocator.ENV, raising=False)
        allocator.tune(again=True)
        assert allocator.describe() == {"allocator": "unchanged", "why": "not glibc (no mallopt)"}
    allocator.tune(again=True)  # the next caller sees the real settings again


def test_provenance_records_the_allocator(tiny_store):
    from mubench_probe.store import EmbeddingStore

    (run,) = EmbeddingStore(tiny_store).runs()
    assert run.provenance["allocator"] == allocator.describe()
