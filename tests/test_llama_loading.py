"""How inference-local loads llama.cpp next to the other native libraries of a service."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# std::ostream::_M_insert<long>, which llama_model::print_info calls on every model load.
OSTREAM_INSERT = "_ZNSo9_M_insertIlEERSoT_"


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_libstdcxx_is_global_before_llama_loads_even_after_grpc() -> None:
    # A service imports grpcio (which loads libstdc++ privately) before it loads a model. With a
    # CUDA build, libllama then bound std::ostream members to copies inside libggml-cuda and
    # crashed in its first model load; the global libstdc++ is what every later library binds
    # to first. The symbol's owner is read back with dladdr.
    out = run_python(
        f"""
        import ctypes
        import grpc
        import inference_local.llama_api

        class DlInfo(ctypes.Structure):
            _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                        ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

        main = ctypes.CDLL(None)
        address = ctypes.cast(getattr(main, {OSTREAM_INSERT!r}), ctypes.c_void_p)
        info = DlInfo()
        assert main.dladdr(address, ctypes.byref(info))
        print(info.fname.decode())
        """
    )
    assert "libstdc++.so" in out.strip().rsplit("/", 1)[-1]


def test_model_loads_in_a_process_that_imported_grpc_first(model_path: Path) -> None:
    # The order of `slm serve inference-local`: the gRPC server's modules, then the model.
    out = run_python(
        f"""
        import grpc
        from pathlib import Path
        from inference_local.llama_api import Model

        model = Model(Path({str(model_path)!r}))
        print(model.n_vocab, model.metadata().architecture)
        model.close()
        """
    )
    assert out.split() == ["262144", "gemma3"]
