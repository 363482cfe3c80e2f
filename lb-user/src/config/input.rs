//! Reading a configuration file, within bounds.
//!
//! `lb check -c` and reloads read whatever path they are given: `/dev/zero` was read until
//! memory ran out (4 GB). At most [`MAX_FILE_BYTES`] (and one more, to tell a file that is
//! exactly that long from a longer one) are read, and devices are refused before any byte is.
use super::{ConfigError, ConfigErrors};
use std::{fs::File, io::Read, os::unix::fs::FileTypeExt, path::Path};

/// The largest configuration file: real ones are a few kilobytes, one with thousands of
/// servers a few hundred. Far above any of them, and still checked in seconds (16 MiB of
/// 340,000 servers: 3 s and 540 MB in a debug build).
pub(crate) const MAX_FILE_BYTES: u64 = 16 << 20;

/// The file's name as errors show it, and its text.
pub(crate) fn read(path: &Path) -> Result<(String, String), ConfigErrors> {
    let file = path.display().to_string();
    match read_text(path) {
        Ok(source) => Ok((file, source)),
        Err((at, message)) => Err(ConfigErrors(vec![match at {
            Some((line, column)) => ConfigError::at(&file, line, column, message),
            None => ConfigError::whole(&file, message),
        }])),
    }
}

/// The text, or what is wrong (with its position when it has one).
fn read_text(path: &Path) -> Result<String, (Option<(usize, usize)>, String)> {
    let cannot = |e: std::io::Error| (None, format!("cannot read: {e}"));
    let f = File::open(path).map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    let kind = meta.file_type();
    // A pipe is read like a file (`lb check -c <(generate)`); a device may never end
    // (`/dev/zero`) or wait for a person (a terminal), and is never a configuration.
    let what = if kind.is_file() || kind.is_fifo() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else {
        Some("a socket")
    };
    if let Some(what) = what {
        return Err((None, format!("{what}, not a configuration file")));
    }
    let too_large = || {
        (
            None,
            format!(
                "larger than {} MiB, the most a configuration file may hold",
                MAX_FILE_BYTES >> 20
            ),
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    // The size may be 0 (a pipe, some /proc files) or grow while it is read: `take` bounds it.
    let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    // A byte-order mark, which some editors write first, is not text: serde_yaml would take
    // it for the start of a second document.
    if bytes.starts_with("\u{feff}".as_bytes()) {
        bytes.drain(..3);
    }
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let bad = e.utf8_error().valid_up_to();
        let before = std::str::from_utf8(&bytes[..bad]).expect("valid up to here");
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let at = (
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
        );
        (Some(at), format!("not UTF-8 text (byte 0x{:02x})", bytes[bad]))
    })
}
