//! Compiles the CSI specification's `proto/csi/v1/csi.proto` with protox (pure Rust: no `protoc`)
//! and generates the tonic servers (and clients, for the tests) from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["csi/v1/csi.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
