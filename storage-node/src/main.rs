//! `caskade-node`: runs one storage node from a configuration file.

fn main() -> std::process::ExitCode {
    caskade_node::main()
}
