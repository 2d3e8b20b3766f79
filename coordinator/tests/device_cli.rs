//! `--device` and `--numerics` on the command line: a bad value is a usage error naming the accepted forms,
//! `cuda:N` on a machine without an NVIDIA driver stops with a message naming the missing library, never a
//! panic, and `--numerics llama-cpp-avx2` runs a model end to end.

use std::path::PathBuf;
use std::process::Command;

use tessera_kernels::cuda::library_status;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/tiny_llama.gguf")
}

/// Exit code, stdout and stderr of `tessera ARGS`.
fn tessera_out(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("running tessera");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "tessera panicked: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// `tessera run TINY -p hi EXTRA…`: exit code, stdout and stderr.
fn run_tiny(extra: &[&str]) -> (i32, String, String) {
    let model = tiny();
    let mut args = vec!["run", model.to_str().unwrap(), "-p", "hi"];
    args.extend_from_slice(extra);
    tessera_out(&args)
}

#[test]
fn unknown_numerics_is_a_usage_error() {
    let (code, _, err) = run_tiny(&["--numerics", "exact"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown numerics 'exact' (expected fast or llama-cpp-avx2)"),
        "{err}"
    );
}

#[test]
fn llama_cpp_numerics_run_end_to_end() {
    let (code, out, err) = run_tiny(&[
        "-n",
        "4",
        "--ctx",
        "64",
        "--temp",
        "0",
        "--threads",
        "2",
        "--cache-type",
        "f32",
        "--numerics",
        "llama-cpp-avx2",
    ]);
    let avx2 = tessera_kernels::cpu::Kernels::for_isa(tessera_kernels::cpu::Isa::Avx2).is_some();
    if avx2 {
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("hi") && out.len() > 2, "{out:?}");
    } else {
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("need a CPU with AVX2"), "{err}");
    }
}

#[test]
fn unknown_device_is_a_usage_error() {
    let (code, _, err) = run_tiny(&["--device", "tpu:0"]);
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
    let (code, _, err) = run_tiny(&["-n", "2", "--device", "cuda:0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("device cuda:0"), "{err}");
    assert!(err.contains("libcuda"), "{err}");
    assert!(err.contains("--device cpu"), "{err}");
}
