//! Bounded, panic-free reads of kernel-provided text files.

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;

/// Largest file we read whole; kernel text files (sysfs attributes, most of
/// /proc) are far smaller, and a bound keeps a wrong path from eating memory.
pub const MAX_TEXT: u64 = 64 << 20;

/// Read a kernel text file, naming the path in the error.
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_TEXT)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Read a one-value attribute (sysfs style) and trim the newline.
pub fn read_attr(path: impl AsRef<Path>) -> Result<String> {
    Ok(read_text(path)?.trim().to_string())
}

/// Read an attribute holding an integer.
pub fn read_i64(path: impl AsRef<Path>) -> Result<i64> {
    let path = path.as_ref();
    let s = read_attr(path)?;
    s.parse::<i64>()
        .with_context(|| format!("{} holds {:?}, not an integer", path.display(), s))
}
