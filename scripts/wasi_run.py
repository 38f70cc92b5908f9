"""Runs a WASI preview1 command module under wasmtime (PyPI's `wasmtime`), as
cargo's runner for wasm32-wasip1 (scripts/wasip1-tests.sh sets it up):

    python scripts/wasi_run.py MODULE.wasm [ARG...]

The module gets MODULE and the ARGs as its argv, this process's environment,
inherited stdin/stdout/stderr and the current directory preopened as `.`.
Exits with the module's exit code (`proc_exit`, or 0 when `_start` returns);
a trap (a panic under panic=abort, say) is printed and exits 134, as the
wasmtime CLI does.
"""

import sys

import wasmtime


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: wasi_run.py MODULE.wasm [ARG...]", file=sys.stderr)
        return 2
    path = sys.argv[1]

    wasi = wasmtime.WasiConfig()
    wasi.argv = [path, *sys.argv[2:]]
    wasi.inherit_env()
    wasi.inherit_stdin()
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    wasi.preopen_dir(".", ".")

    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    store.set_wasi(wasi)
    module = wasmtime.Module.from_file(engine, path)
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    try:
        start(store)
    except wasmtime.ExitTrap as e:
        return e.code
    except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
        sys.stdout.flush()
        print(f"wasi_run: {path}: {e}", file=sys.stderr)
        return 134
    return 0


if __name__ == "__main__":
    sys.exit(main())
