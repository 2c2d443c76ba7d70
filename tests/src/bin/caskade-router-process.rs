//! `caskade-router` built inside this package, so that the process tests can
//! start it by path (`CARGO_BIN_EXE_caskade-router-process`).

fn main() -> std::process::ExitCode {
    caskade_router::main()
}
