//! The inspection verbs: `nodes`, `segments`, `keys`, `inspect`, and `rm --prefix`. Each
//! prints a table for people by default and one JSON document with `--json` (for scripts:
//! ids as the hex strings the tables show, sizes in bytes, keys as UTF-8 with a `key_hex`
//! beside any key that is not).

mod inspect;
mod keys;
mod nodes;
pub mod progress;
mod table;

pub use inspect::inspect;
pub use keys::{keys, rm_prefix};
pub use nodes::{node_state, nodes, segment_state, segments};

/// Prints one JSON document on standard output.
fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A key for people: printable ASCII as is, other bytes escaped (`\xNN`).
fn show_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// A key for scripts: `{"key": ...}`, plus `key_hex` when the bytes are not UTF-8 (the
/// lossy string alone could not name the key again).
fn json_key(key: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert(
        "key".into(),
        String::from_utf8_lossy(key).into_owned().into(),
    );
    if std::str::from_utf8(key).is_err() {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        m.insert("key_hex".into(), hex.into());
    }
    m
}
