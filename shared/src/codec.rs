//! Frames: a u32 big-endian body length, then a MessagePack body (rmp-serde, structs as
//! maps with field names, byte strings as `bin`).
//!
//! The length is checked against the maximum before a single body byte is read or a
//! buffer is allocated, so a peer that announces 4 GiB costs nothing.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use zeroize::Zeroize;

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("frame could not be encoded: {0}")]
    Encode(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one message body (without the length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    rmp_serde::to_vec_named(msg).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes one message body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    decode_bounded(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// The deepest nesting of arrays and maps a MessagePack value may have here. The
/// protocol's messages nest about ten deep. rmp-serde's own limit (1,024) let a 1 KiB
/// frame of nested arrays under a field the decoder skips recurse 1,024 calls deep, past
/// the 2 MiB stack of a tokio worker in a debug build; a stack overflow aborts the whole
/// daemon, it cannot be caught like a panic.
pub const MAX_DEPTH: usize = 64;

/// Decodes MessagePack with nesting bounded by [`MAX_DEPTH`]: everything kms decodes
/// (frames, and the daemon's store records and journal) goes through here.
pub fn decode_bounded<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

/// Encodes a message with its length prefix, ready to write.
pub fn encode_frame<T: Serialize>(msg: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut out = WipingWriter(Vec::with_capacity(1024));
    out.0.extend_from_slice(&[0u8; 4]);
    rmp_serde::encode::write_named(&mut out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    // Refused frames are wiped with `out`.
    let len = out.0.len() - 4;
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len: u32::MAX, max })?;
    if len32 > max {
        return Err(FrameError::TooLarge { len: len32, max });
    }
    out.0[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(std::mem::take(&mut out.0))
}

/// The buffer a frame is encoded into. A frame may hold a plaintext or a data key, and a
/// `Vec` that grows frees its old buffer, a copy of the frame's beginning, unwiped; this
/// one wipes the old buffer when it grows. Dropped (on an encoding error), it wipes all.
struct WipingWriter(Vec<u8>);

impl std::io::Write for WipingWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let need = self.0.len() + bytes.len();
        if need > self.0.capacity() {
            let mut larger = Vec::with_capacity(need.max(2 * self.0.capacity()));
            larger.extend_from_slice(&self.0);
            // Zeroizing a Vec wipes its whole capacity.
            std::mem::replace(&mut self.0, larger).zeroize();
        }
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for WipingWriter {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A buffered reader whose buffer is wiped when it is dropped. Frames pass through a
/// socket's read buffer whole — requests with plaintexts, replies with data keys — and
/// tokio's `BufReader` frees its buffer as it is. Like it, reads at least as large as
/// the buffer bypass it.
pub struct WipingBufReader<R> {
    inner: R,
    buf: Box<[u8]>,
    /// The unread bytes are `buf[pos..filled]`.
    pos: usize,
    filled: usize,
}

impl<R> WipingBufReader<R> {
    pub fn with_capacity(capacity: usize, inner: R) -> WipingBufReader<R> {
        WipingBufReader {
            inner,
            buf: vec![0u8; capacity].into_boxed_slice(),
            pos: 0,
            filled: 0,
        }
    }
}

impl<R> Drop for WipingBufReader<R> {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for WipingBufReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.pos == me.filled {
            if out.remaining() >= me.buf.len() {
                return Pin::new(&mut me.inner).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut me.buf);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut fill))?;
            me.filled = fill.filled().len();
            me.pos = 0;
        }
        let n = out.remaining().min(me.filled - me.pos);
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Reads one frame body. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // A reply cut short (a plaintext, maybe) is wiped.
    let mut body = zeroize::Zeroizing::new(vec![0u8; len as usize]);
    match r.read_exact(&mut body).await {
        Ok(_) => Ok(Some(std::mem::take(&mut *body))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Writes one message as a frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    max: u32,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg, max)?;
    w.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{ClientFrame, Request};

    /// A frame written is the frame read, and a clean EOF between frames is `None`.
    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let msg = ClientFrame {
            id: 7,
            request: Request::Encrypt {
                key: "k1".into(),
                plaintext: vec![0, 1, 2, 255].into(),
                context: Some(b"ctx".to_vec()),
            },
        };
        let frame = encode_frame(&msg, 1024).unwrap();
        let mut rd = &frame[..];
        let body = read_frame(&mut rd, 1024).await.unwrap().unwrap();
        let back: ClientFrame = decode(&body).unwrap();
        assert_eq!(back, msg);
        assert!(read_frame(&mut rd, 1024).await.unwrap().is_none());
    }

    /// A request whose unknown field holds arrays nested 1,023 deep (a 1 KiB frame) is
    /// refused as undecodable on a thread with a tokio worker's 2 MiB stack; with
    /// rmp-serde's own depth limit it overflowed that stack in a debug build, which
    /// aborts the process. Nesting up to the limit still decodes.
    #[test]
    fn deep_nesting_is_refused_within_a_workers_stack() {
        fn frame(depth: usize) -> Vec<u8> {
            let mut b = vec![0x83, 0xa2, b'i', b'd', 0x01, 0xa3, b'z', b'z', b'z'];
            b.extend(std::iter::repeat_n(0x91, depth));
            b.push(0xc0);
            b.extend_from_slice(b"\xa7request\xa6status");
            b
        }
        let decoded = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                (
                    decode::<ClientFrame>(&frame(1023)).map(|f| f.id),
                    decode::<ClientFrame>(&frame(MAX_DEPTH - 2)).map(|f| f.id),
                )
            })
            .unwrap()
            .join()
            .unwrap();
        match decoded.0 {
            Err(FrameError::Decode(e)) => assert!(e.contains("depth"), "{e}"),
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert_eq!(decoded.1.unwrap(), 1);
    }

    /// An announced length over the maximum is refused before the body is read.
    #[tokio::test]
    async fn oversized_length_refused_without_reading() {
        let bytes = u32::MAX.to_be_bytes();
        let mut rd = &bytes[..];
        match read_frame(&mut rd, 1024).await {
            Err(FrameError::TooLarge { len, max }) => assert_eq!((len, max), (u32::MAX, 1024)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    /// A stream that ends inside the prefix or the body is `Truncated`.
    #[tokio::test]
    async fn truncated_frames() {
        let mut rd = &[0u8, 0][..];
        assert!(matches!(
            read_frame(&mut rd, 1024).await,
            Err(FrameError::Truncated)
        ));
        let mut rd = &[0u8, 0, 0, 10, 1, 2][..];
        assert!(matches!(
            read_frame(&mut rd, 1024).await,
            Err(FrameError::Truncated)
        ));
    }

    /// Frames smaller and larger than the reader's buffer, and one cut across two of its
    /// fills, read back whole through `WipingBufReader`, then a clean end.
    #[tokio::test]
    async fn wiping_reader_reads_what_was_written() {
        let bodies: Vec<Vec<u8>> = [3usize, 60, 64, 65, 200, 7]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 7 + j) as u8).collect())
            .collect();
        let mut stream = Vec::new();
        for b in &bodies {
            stream.extend_from_slice(&(b.len() as u32).to_be_bytes());
            stream.extend_from_slice(b);
        }
        let mut rd = WipingBufReader::with_capacity(64, &stream[..]);
        for b in &bodies {
            assert_eq!(&read_frame(&mut rd, 1024).await.unwrap().unwrap(), b);
        }
        assert!(read_frame(&mut rd, 1024).await.unwrap().is_none());
    }

    /// Byte strings go on the wire as MessagePack `bin`, not as arrays of integers.
    #[test]
    fn bytes_are_binary() {
        let body = encode(&Request::Encrypt {
            key: "k".into(),
            plaintext: vec![1, 2, 3].into(),
            context: None,
        })
        .unwrap();
        // bin8 marker 0xc4, length 3, then the bytes.
        assert!(body.windows(5).any(|w| w == [0xc4, 3, 1, 2, 3]));
    }
}
