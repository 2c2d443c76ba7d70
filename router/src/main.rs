//! `caskade-router`: runs one router from a configuration file.

fn main() -> std::process::ExitCode {
    caskade_router::main()
}
