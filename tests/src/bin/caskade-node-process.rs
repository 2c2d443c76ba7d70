//! `caskade-node` built inside this package, so that the crash tests can
//! start it by path (`CARGO_BIN_EXE_caskade-node-process`).

fn main() -> std::process::ExitCode {
    caskade_node::main()
}
