//! `--device` on the command line: a bad value is a usage error naming the accepted forms, and `cuda:N` on a
//! machine without an NVIDIA driver stops with a message naming the missing library, never a panic.

use std::path::PathBuf;
use std::process::Command;

use tessera_kernels::cuda::library_status;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/tiny_llama.gguf")
}

fn tessera(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("running tessera");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "tessera panicked: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn unknown_device_is_a_usage_error() {
    let model = tiny();
    let (code, err) = tessera(&[
        "run",
        model.to_str().unwrap(),
        "-p",
        "hi",
        "--device",
        "tpu:0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown device \"tpu:0\""), "{err}");
    assert!(err.contains("cuda:N"), "{err}");
}

#[test]
fn cuda_without_a_driver_names_the_library() {
    if library_status().driver {
        eprintln!("an NVIDIA driver is present: nothing to check here");
        return;
    }
    let model = tiny();
    let (code, err) = tessera(&[
        "run",
        model.to_str().unwrap(),
        "-p",
        "hi",
        "-n",
        "2",
        "--device",
        "cuda:0",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("device cuda:0"), "{err}");
    assert!(err.contains("libcuda"), "{err}");
    assert!(err.contains("--device cpu"), "{err}");
}
