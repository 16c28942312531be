//! What the unit tests of several modules share.

#![allow(clippy::unwrap_used)]

use std::path::Path;

/// Makes a FIFO at `path` (mode 0600): what tests put where kmsd expects a regular file.
pub(crate) fn make_fifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}
