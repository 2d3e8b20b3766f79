//! Generates the gRPC code for the client API (`tessera.v1`) and the worker API (`tessera.worker.v1`), with
//! file descriptor sets for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use the vendored protoc unless the builder chose one; set here only, never globally (other build
    // scripts, such as raft's, reject newer protoc versions).
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for (proto, descriptor) in [
        ("tessera/v1/tessera.proto", "tessera_v1_descriptor.bin"),
        (
            "tessera/worker/v1/worker.proto",
            "tessera_worker_v1_descriptor.bin",
        ),
    ] {
        println!("cargo:rerun-if-changed={proto}");
        tonic_prost_build::configure()
            .file_descriptor_set_path(out.join(descriptor))
            .bytes(".tessera.worker.v1")
            .compile_protos(&[proto], &["."])?;
    }
    Ok(())
}
