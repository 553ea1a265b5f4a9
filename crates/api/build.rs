//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed) and generates the tonic
//! client and server code from it, plus the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["strata/v1/strata.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("strata_descriptor.bin"), fds.encode_to_vec())?;
    // Messages serialize to JSON (the CLI's `--output json`); 64-bit numbers stay numbers.
    tonic_prost_build::configure()
        .type_attribute(".strata.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    // etcd's KV service: the client only.
    let etcd = protox::compile(["etcd/kv.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
