//! GPT-2's byte ↔ unicode table (`bytes_to_unicode` in OpenAI's `encoder.py`), which byte-level BPE vocabularies
//! (Llama 3, SmolLM2, GPT-2) are written in: printable Latin-1 bytes stand for themselves, the other 68 bytes are
//! shifted to U+0100..U+0143 so that every token is a printable string (a space is `Ġ`, a newline `Ċ`).

/// Decoding table indexed by code point (every mapped code point is below 0x144).
struct Table {
    to_byte: [Option<u8>; 0x144],
}

const fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

const TABLE: Table = {
    let mut to_byte = [None; 0x144];
    let mut shifted = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if printable(b as u8) {
            to_byte[b] = Some(b as u8);
        } else {
            to_byte[256 + shifted] = Some(b as u8);
            shifted += 1;
        }
        b += 1;
    }
    Table { to_byte }
};

/// The byte a byte-level character stands for, or `None` for characters outside the table.
pub fn char_to_byte(c: char) -> Option<u8> {
    TABLE.to_byte.get(c as usize).copied().flatten()
}

/// The bytes a byte-level token text decodes to. Characters outside the table (never produced by a well-formed
/// vocabulary) are kept as their own UTF-8 bytes, as Hugging Face's ByteLevel decoder does.
pub fn decode_token(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_a_bijection_onto_bytes() {
        let mut seen = [false; 256];
        for c in 0..0x144u32 {
            if let Some(b) = char_to_byte(char::from_u32(c).unwrap()) {
                assert!(!seen[b as usize], "byte {b} mapped twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(char_to_byte('Ġ'), Some(b' '));
        assert_eq!(char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(char_to_byte('A'), Some(b'A'));
        assert_eq!(decode_token("ĠParis"), b" Paris");
        // "é" is two bytes, C3 A9, written as "Ã©".
        assert_eq!(decode_token("Ã©"), "é".as_bytes());
    }
}
