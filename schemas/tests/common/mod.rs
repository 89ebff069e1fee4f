//! Reads the test vectors out of `PROTOCOL.md`.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::Path;

/// One ```` ```hex name=… ```` block: its name, bytes and the description line after it.
pub struct Vector {
    pub name: String,
    pub bytes: Vec<u8>,
    pub description: String,
}

/// The whole of `PROTOCOL.md`.
pub fn protocol_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("PROTOCOL.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every hex vector in `PROTOCOL.md`, in order.
pub fn vectors() -> Vec<Vector> {
    let text = protocol_md();
    let mut lines = text.lines();
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("```hex name=") else {
            continue;
        };
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            let line = line.trim();
            if line == "```" {
                break;
            }
            for pair in line.split_whitespace() {
                let byte = u8::from_str_radix(pair, 16)
                    .unwrap_or_else(|e| panic!("vector {name}: bad hex {pair:?}: {e}"));
                bytes.push(byte);
            }
        }
        let description = lines.next().unwrap_or_default().to_owned();
        out.push(Vector {
            name: name.trim().to_owned(),
            bytes,
            description,
        });
    }
    out
}
