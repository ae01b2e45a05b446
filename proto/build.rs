//! Generates the gRPC code from the `.proto` files with a vendored `protoc`, so that building
//! needs nothing beyond the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("yoco_descriptor.bin"))
        .compile_protos(&["yoco/worker/v1/worker.proto", "yoco/v1/generation.proto"], &["."])?;
    println!("cargo:rerun-if-changed=yoco");
    Ok(())
}
