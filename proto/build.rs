//! Compiles the .proto files with a vendored protoc, so building needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // A build script is a single thread, so setting the variable here is sound.
        std::env::set_var("PROTOC", protoc);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["shardserve/v1/inference.proto", "shardserve/v1/admin.proto", "shardserve/v1/worker.proto", "shardserve/v1/relay.proto"];
    tonic_prost_build::configure().file_descriptor_set_path(out.join("shardserve_descriptor.bin")).compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
