//! Recognizes checkpoint formats Tessera refuses to read, so the user learns what to convert them with
//! instead of seeing "not a GGUF file".
//!
//! PyTorch `.pth`/`.bin`/`.pt` checkpoints are Python pickles, either bare (legacy `torch.save`: pickle
//! protocol opcode `0x80` then the protocol number 2–5 at byte 0) or inside a ZIP (`torch.save` since 1.6 and
//! TorchScript: `archive/data.pkl`, stored first). Unpickling runs arbitrary code from the file, so Tessera
//! never does it: it only looks at the first bytes. See <https://docs.python.org/3/library/pickle.html>
//! (opcode `PROTO`) and PyTorch's `torch/serialization.py` (`_save`, zip layout).

use std::path::Path;

use crate::error::Error;

/// How many leading bytes callers should pass to [`detect_refused_format`].
pub const HEAD_LEN: usize = 64 * 1024;

const CONVERT: &str = "convert it to GGUF with llama.cpp (`python convert_hf_to_gguf.py MODEL_DIR --outtype bf16`, \
    from the Hugging Face folder with config.json), or to safetensors with transformers \
    (`AutoModelForCausalLM.from_pretrained(MODEL_DIR).save_pretrained(OUT_DIR, safe_serialization=True)`)";

/// `Some(Error::Unsupported)` explaining what to do when `head` (the file's first bytes, ideally
/// [`HEAD_LEN`] of them) is a format Tessera refuses: PyTorch pickles (bare or zipped), legacy GGML/GGJT,
/// compressed or archived files, NumPy, HDF5. `None` for anything else, including GGUF, safetensors and
/// llamafile/ZIP archives holding a `.gguf`.
pub fn detect_refused_format(path: &Path, head: &[u8]) -> Option<Error> {
    let msg = refusal(path, head)?;
    Some(Error::Unsupported {
        path: path.to_owned(),
        msg,
    })
}

fn refusal(path: &Path, head: &[u8]) -> Option<String> {
    // PROTO then a real opcode (printable ASCII or 0x80..=0x98). The check on the third byte keeps a
    // safetensors file whose u64 header length is 0x0480 (bytes 80 04 00 ...) from looking like a pickle.
    if let [0x80, proto @ 2..=5, b' '..=b'~' | 0x80..=0x98, ..] = head {
        return Some(format!(
            "this is a Python pickle (protocol {proto}), a PyTorch checkpoint (.pth/.bin/.pt); Tessera never \
             unpickles, because loading a pickle runs code from the file. {CONVERT}"
        ));
    }
    if let Some(name) = zip_pickle_entry(head) {
        return Some(format!(
            "this is a PyTorch zip checkpoint (torch.save; it holds the pickle `{name}`); Tessera never unpickles, \
             because loading a pickle runs code from the file. {CONVERT}"
        ));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "pth" | "pt" | "ckpt" | "pkl" | "pickle")
        && !head.starts_with(b"GGUF")
    {
        return Some(format!(
            "a .{ext} file is a PyTorch/pickle checkpoint, which Tessera never unpickles. {CONVERT}"
        ));
    }
    let legacy = [
        (b"lmgg", "GGML"),
        (b"fmgg", "GGMF"),
        (b"tjgg", "GGJT"),
        (b"algg", "GGLA"),
    ];
    if let Some((_, name)) = legacy.iter().find(|(m, _)| head.starts_with(*m)) {
        return Some(format!(
            "this is a legacy llama.cpp {name} file (before GGUF, 2023); convert it with llama.cpp's \
             `python convert_llama_ggml_to_gguf.py --input FILE --output OUT.gguf`, or better re-convert the \
             original model: {CONVERT}"
        ));
    }
    let compressed = [
        (&b"\x1f\x8b"[..], "gzip", "gunzip"),
        (b"\xfd7zXZ\0", "xz", "unxz"),
        (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
        (b"BZh", "bzip2", "bunzip2"),
        (b"7z\xbc\xaf\x27\x1c", "7-Zip", "7z x"),
    ];
    if let Some((_, kind, tool)) = compressed.iter().find(|(m, _, _)| head.starts_with(m)) {
        return Some(format!(
            "this file is {kind}-compressed; decompress it first (`{tool}`) and pass the result"
        ));
    }
    if head.get(257..262) == Some(b"ustar") {
        return Some(
            "this is a tar archive; extract it first and pass the .gguf or safetensors files"
                .into(),
        );
    }
    if head.starts_with(b"\x93NUMPY") {
        return Some(format!(
            "this is a NumPy array file, not a model checkpoint. {CONVERT}"
        ));
    }
    if head.starts_with(b"\x89HDF\r\n\x1a\n") {
        return Some(format!(
            "this is an HDF5 (Keras/TensorFlow) file, which Tessera does not read. {CONVERT}"
        ));
    }
    None
}

/// Name of a `data.pkl` entry among the ZIP local file headers found in `head`, if any. Looks at each
/// `PK\3\4` signature's file name (offset 30, length at offset 26), so it does not depend on entry order.
fn zip_pickle_entry(head: &[u8]) -> Option<String> {
    if !head.starts_with(b"PK\x03\x04") {
        return None;
    }
    let mut at = 0;
    while let Some(found) = find(&head[at..], b"PK\x03\x04") {
        let lfh = at + found;
        at = lfh + 4;
        let Some(&[lo, hi]) = head.get(lfh + 26..lfh + 28) else {
            break;
        };
        let name_len = usize::from(u16::from_le_bytes([lo, hi]));
        let Some(name) = head.get(lfh + 30..lfh + 30 + name_len) else {
            continue;
        };
        if name == b"data.pkl" || name.ends_with(b"/data.pkl") {
            return Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(name: &str, head: &[u8]) -> Option<String> {
        detect_refused_format(Path::new(name), head).map(|e| {
            assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
            e.to_string()
        })
    }

    #[test]
    fn pickles_are_refused_with_conversion_advice() {
        let msg = refused("pytorch_model.bin", b"\x80\x02}q\x00(X\x05").unwrap();
        assert!(
            msg.contains("pytorch_model.bin") && msg.contains("protocol 2"),
            "{msg}"
        );
        assert!(
            msg.contains("convert_hf_to_gguf.py") && msg.contains("safe_serialization=True"),
            "{msg}"
        );
        assert!(
            refused("x.bin", b"\x80\x05\x95")
                .unwrap()
                .contains("protocol 5")
        );
        assert!(refused("x.bin", b"\x80\x06").is_none());
        let safetensors = [&0x480u64.to_le_bytes()[..], b"{\"w\":{}}"].concat();
        assert!(refused("model.safetensors", &safetensors).is_none());
        assert!(refused("consolidated.00.pth", b"anything").is_some());
    }

    #[test]
    fn torch_zip_is_refused_but_other_zips_are_not() {
        let lfh = |name: &str| {
            let mut v = b"PK\x03\x04".to_vec();
            v.extend_from_slice(&[0; 22]);
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes());
            v.extend_from_slice(name.as_bytes());
            v.extend_from_slice(b"payload");
            v
        };
        let mut torch = lfh("archive/.format_version");
        torch.extend(lfh("archive/data.pkl"));
        let msg = refused("model.bin", &torch).unwrap();
        assert!(msg.contains("archive/data.pkl"), "{msg}");
        assert!(refused("model.zip", &lfh("model.gguf")).is_none());
        // A truncated header never panics.
        for n in 0..torch.len() {
            let _ = refused("x", &torch[..n]);
        }
    }

    #[test]
    fn other_formats() {
        assert!(
            refused("m.bin", b"tjgg\x03\0\0\0")
                .unwrap()
                .contains("GGJT")
        );
        assert!(
            refused("m.gguf.gz", b"\x1f\x8b\x08")
                .unwrap()
                .contains("gunzip")
        );
        assert!(refused("m.gguf", b"GGUF\x03\0\0\0").is_none());
        assert!(refused("model.safetensors", b"\x10\0\0\0\0\0\0\0{\"a\":1}").is_none());
        assert!(refused("empty", b"").is_none());
    }
}
