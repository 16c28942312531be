//! Plaintexts and data keys on their way through kmsctl: read, decoded, printed, and
//! wiped from every buffer they passed through.
//!
//! kmsd and the client library wipe their copies; so does kmsctl, short-lived as it is (a
//! core dump, swap, or a process that reads its memory while it runs would find them
//! otherwise). That rules out the standard library's buffers, which are freed or kept
//! without being wiped: `Vec` growth (`read_to_end` reallocates and frees the old block),
//! `BufReader`'s buffer and the process-wide `Stdin`/`Stdout` buffers. So input is read
//! straight from the descriptor into a [`SecretBuf`], and secret output written straight
//! to a duplicate of standard output.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use zeroize::Zeroizing;

/// Bytes read from the input at a time.
const READ_CHUNK: usize = 64 * 1024;

/// A byte buffer that wipes whatever it held, also the blocks it outgrew.
#[derive(Default)]
pub struct SecretBuf(Zeroizing<Vec<u8>>);

impl SecretBuf {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Makes room for `more` bytes; a new block is filled by copying, then the old one
    /// is wiped as it is dropped (a `Vec` would free it as it was).
    fn reserve(&mut self, more: usize) {
        let needed = self.0.len().saturating_add(more);
        if needed <= self.0.capacity() {
            return;
        }
        let mut grown = Vec::with_capacity(needed.max(self.0.capacity().saturating_mul(2)));
        grown.extend_from_slice(&self.0);
        self.0 = Zeroizing::new(grown);
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.0.extend_from_slice(bytes);
    }

    pub fn push_str(&mut self, text: &str) {
        self.extend_from_slice(text.as_bytes());
    }

    /// Forgets the first `n` bytes, wiping the bytes moved down or left behind.
    fn consume(&mut self, n: usize) {
        let len = self.0.len();
        self.0.copy_within(n.min(len).., 0);
        let kept = len - n.min(len);
        zeroize::Zeroize::zeroize(&mut self.0[kept..]);
        self.0.truncate(kept);
    }

    pub fn clear(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0[..]);
        self.0.clear();
    }

    /// Reads once from `source` (at most a chunk) onto the end, through `scratch`;
    /// returns how many bytes came (0 at the end of the input).
    fn fill_from(&mut self, source: &mut impl Read, scratch: &mut Scratch) -> io::Result<usize> {
        let n = loop {
            match source.read(&mut scratch.0[..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.extend_from_slice(&scratch.0[..n]);
        Ok(n)
    }
}

/// Where reads land before they are appended: one chunk, reused, wiped when dropped.
/// (Reading straight into a buffer's spare room would need it zeroed before each read,
/// a chunk's worth of writes for every read of a byte from a terminal.)
pub struct Scratch(Zeroizing<Vec<u8>>);

impl Default for Scratch {
    fn default() -> Self {
        Scratch(Zeroizing::new(vec![0; READ_CHUNK]))
    }
}

/// For serialisers writing into a secret buffer.
impl Write for SecretBuf {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The input, unbuffered: a file as opened, or a duplicate of standard input's
/// descriptor (reading through `io::stdin()` would leave the last 8 KiB in its buffer).
pub fn unbuffered_stdin() -> io::Result<File> {
    Ok(File::from(io::stdin().as_fd().try_clone_to_owned()?))
}

/// Everything `source` holds, if that is at most `limit` bytes; `None` as soon as more
/// came (the rest is not read: an endless input is refused, not held in memory).
pub fn read_all(source: &mut impl Read, limit: usize) -> io::Result<Option<SecretBuf>> {
    let (mut buf, mut scratch) = (SecretBuf::default(), Scratch::default());
    while buf.fill_from(source, &mut scratch)? > 0 {
        if buf.len() > limit {
            return Ok(None);
        }
    }
    Ok(Some(buf))
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A line, in the buffer given.
    Line,
    /// A line longer than the reader's limit, skipped (up to and with its `\n`).
    TooLong,
    /// The input is exhausted.
    End,
}

/// Splits an input into lines without a buffer that outlives them unwiped, and without
/// holding more than `max_line` bytes of one line (an input with no line break, such as
/// `/dev/zero`, is skipped as one line too long, not gathered).
pub struct LineReader<R> {
    source: R,
    max_line: usize,
    /// Bytes read and not yet returned start at `start`.
    pending: SecretBuf,
    start: usize,
    ended: bool,
    scratch: Scratch,
}

impl<R: Read> LineReader<R> {
    pub fn new(source: R, max_line: usize) -> Self {
        LineReader {
            source,
            max_line,
            pending: SecretBuf::default(),
            start: 0,
            ended: false,
            scratch: Scratch::default(),
        }
    }

    /// The next line, with its `\n` if it had one, into `line` (emptied first).
    pub fn next_line(&mut self, line: &mut SecretBuf) -> io::Result<Next> {
        line.clear();
        let mut searched = self.start;
        let mut skipping = false;
        loop {
            let pending = self.pending.as_slice();
            if let Some(at) = pending[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + at + 1;
                let next = if skipping || end - self.start > self.max_line {
                    Next::TooLong
                } else {
                    line.extend_from_slice(&pending[self.start..end]);
                    Next::Line
                };
                self.start = end;
                return Ok(next);
            }
            if pending.len() - self.start > self.max_line {
                // Too long already: what came of it is dropped, the rest skipped.
                skipping = true;
                self.start = pending.len();
            }
            // Lines already returned are dropped (and wiped) once per read, not per line.
            if self.start > 0 {
                self.pending.consume(self.start);
                self.start = 0;
            }
            searched = self.pending.len();
            if self.ended
                || self
                    .pending
                    .fill_from(&mut self.source, &mut self.scratch)?
                    == 0
            {
                self.ended = true;
                if skipping {
                    self.pending.clear();
                    return Ok(Next::TooLong);
                }
                if self.pending.len() == 0 {
                    return Ok(Next::End);
                }
                line.extend_from_slice(self.pending.as_slice());
                self.pending.clear();
                return Ok(if line.len() > self.max_line {
                    line.clear();
                    Next::TooLong
                } else {
                    Next::Line
                });
            }
        }
    }
}

/// Writes secret bytes to standard output without passing through its buffer: what was
/// printed before is flushed first, so the order holds.
pub fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    let stdout = io::stdout();
    let mut locked = stdout.lock();
    locked.flush()?;
    let mut direct = File::from(locked.as_fd().try_clone_to_owned()?);
    direct.write_all(bytes)
}

/// `value` as one JSON line on standard output, built in a wiped buffer.
pub fn json_line(value: &impl serde::Serialize) -> io::Result<()> {
    let mut line = SecretBuf::default();
    serde_json::to_writer(&mut line, value)?;
    line.push_str("\n");
    write_stdout(line.as_slice())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reader that hands out at most `step` bytes a call, as a pipe does.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// The whole input comes back byte for byte, across many reads and growths.
    #[test]
    fn reads_everything() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut source = Trickle {
            data: &data,
            step: 7_777,
        };
        let all = read_all(&mut source, data.len()).unwrap().unwrap();
        assert_eq!(all.as_slice(), &data[..]);
        assert_eq!(read_all(&mut io::empty(), 0).unwrap().unwrap().len(), 0);
    }

    /// Lines split as `read_until(b'\n')` would: each with its newline, the last without
    /// one if the input does not end in one, empty lines kept, none after the end.
    #[test]
    fn splits_lines_like_read_until() {
        for (input, step) in [
            (&b"a\n\nbc\nd"[..], 1),
            (b"a\n\nbc\nd\n", 3),
            (b"", 5),
            (b"\n", 1),
            (b"one line without end", 4),
        ] {
            let mut expected = Vec::new();
            let mut rest = input;
            while !rest.is_empty() {
                let end = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |i| i + 1);
                expected.push(rest[..end].to_vec());
                rest = &rest[end..];
            }
            let mut lines = LineReader::new(Trickle { data: input, step }, 100);
            let mut line = SecretBuf::default();
            let mut got = Vec::new();
            while lines.next_line(&mut line).unwrap() == Next::Line {
                got.push(line.as_slice().to_vec());
            }
            assert_eq!(got, expected, "{input:?} by {step}");
            assert_eq!(lines.next_line(&mut line).unwrap(), Next::End);
        }
    }

    /// A line over the limit is skipped as one, whatever the reads' sizes, and the lines
    /// after it come through; an endless line ends as one line too long.
    #[test]
    fn a_line_over_the_limit_is_skipped() {
        let long = "x".repeat(200_000);
        let input = format!("ok\n{long}\nafter\n{long}");
        for step in [1, 7, 65_536, usize::MAX] {
            let mut lines = LineReader::new(
                Trickle {
                    data: input.as_bytes(),
                    step,
                },
                1000,
            );
            let mut line = SecretBuf::default();
            let mut got = Vec::new();
            loop {
                match lines.next_line(&mut line).unwrap() {
                    Next::Line => got.push(String::from_utf8(line.as_slice().to_vec()).unwrap()),
                    Next::TooLong => got.push("<too long>".into()),
                    Next::End => break,
                }
            }
            assert_eq!(
                got,
                ["ok\n", "<too long>", "after\n", "<too long>"],
                "by {step}"
            );
        }
        let mut endless = LineReader::new(io::repeat(b'a').take(10_000_000), 1 << 20);
        let mut line = SecretBuf::default();
        assert_eq!(endless.next_line(&mut line).unwrap(), Next::TooLong);
        assert_eq!(endless.next_line(&mut line).unwrap(), Next::End);
    }

    /// One byte over the limit is refused, and an endless input stops being read.
    #[test]
    fn an_input_over_the_limit_is_refused_early() {
        let data = vec![7u8; 1001];
        assert!(read_all(&mut &data[..], 1000).unwrap().is_none());
        assert!(read_all(&mut &data[..1000], 1000).unwrap().is_some());
        assert!(read_all(&mut io::repeat(0), 1 << 20).unwrap().is_none());
    }

    /// Growing and consuming keep the contents; what is dropped is the buffer's concern.
    #[test]
    fn grows_and_consumes_in_order() {
        let mut buf = SecretBuf::default();
        for i in 0..1000u32 {
            buf.extend_from_slice(&i.to_le_bytes());
        }
        buf.consume(4 * 998);
        assert_eq!(
            buf.as_slice(),
            [998u32.to_le_bytes(), 999u32.to_le_bytes()].concat()
        );
        buf.consume(100);
        assert_eq!(buf.len(), 0);
    }
}
