//! Compiles the `.proto` files with protox, a pure-Rust protobuf compiler, so
//! building caskade needs no system `protoc` and downloads nothing.

use std::error::Error;

const PROTOS: [&str; 4] = [
    "proto/caskade/v1/kv.proto",
    "proto/caskade/v1/admin.proto",
    "proto/caskade/v1/replication.proto",
    "proto/caskade/v1/raft.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".caskade.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
