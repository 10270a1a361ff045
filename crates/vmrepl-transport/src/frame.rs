//! Wire framing of the peer protocol, over any `AsyncRead + AsyncWrite`
//! (normally a [`crate::tls::TlsStream`]).
//!
//! A connection starts with a preamble sent by both sides at once:
//!
//! ```text
//! "VMREPL\0" (7 bytes) | min version u32 BE | max version u32 BE
//! ```
//!
//! Each side then picks the highest version both ranges contain (the same
//! answer on both sides), or fails naming both ranges. After it come frames:
//!
//! ```text
//! kind u8 | length u32 BE | payload (length bytes)
//! ```
//!
//! with kind 1 = Control (a JSON document) and kind 2 = Data (binary). Both
//! kinds carry at most [`MAX_PAYLOAD`] bytes; a larger length is refused
//! before anything is allocated.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first bytes on every vmrepl connection.
pub const MAGIC: &[u8; 7] = b"VMREPL\0";
/// Length of the preamble: magic and two u32.
pub const PREAMBLE_LEN: usize = MAGIC.len() + 8;
/// How long one frame (or the preamble) may take to arrive or to be sent before the
/// connection counts as dead. Every wait on a peer has this deadline unless a caller sets
/// another with [`Framed::set_timeout`] (for an answer that needs long work on the other side).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest payload of one frame (16 MiB).
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Frame header length: kind and length.
pub const HEADER_LEN: usize = 5;

/// The protocol versions this build speaks.
pub const SUPPORTED: VersionRange = VersionRange { min: 1, max: 1 };

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionRange {
    pub min: u32,
    pub max: u32,
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {}–{}", self.min, self.max)
        }
    }
}

impl VersionRange {
    /// The highest version in both ranges, or an error naming both.
    pub fn negotiate(self, theirs: VersionRange) -> Result<u32, FrameError> {
        let lo = self.min.max(theirs.min);
        let hi = self.max.min(theirs.max);
        if self.min > self.max || theirs.min > theirs.max || lo > hi {
            return Err(FrameError::NoCommonVersion { ours: self, theirs });
        }
        Ok(hi)
    }
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON control message.
    Control = 1,
    /// Binary data.
    Data = 2,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Control),
            2 => Some(FrameKind::Data),
            _ => None,
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameKind::Control => "control",
            FrameKind::Data => "data",
        })
    }
}

/// One received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The JSON text of a control message; see [`Frame::parse_control`].
    Control(Vec<u8>),
    Data(Vec<u8>),
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Control(_) => FrameKind::Control,
            Frame::Data(_) => FrameKind::Data,
        }
    }

    /// Decodes a control frame's JSON as `T`.
    pub fn parse_control<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        match self {
            Frame::Control(json) => {
                serde_json::from_slice(json).map_err(|e| FrameError::BadControl {
                    type_name: std::any::type_name::<T>(),
                    detail: e.to_string(),
                })
            }
            Frame::Data(d) => Err(FrameError::UnexpectedKind {
                expected: FrameKind::Control,
                got: FrameKind::Data,
                len: d.len(),
            }),
        }
    }
}

/// Errors of the preamble and the framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error(
        "the connection ended in the middle of {what}: got {got} of {expected} bytes; the peer \
         crashed or the network dropped the connection"
    )]
    Truncated {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error(
        "the peer did not send the vmrepl preamble (got {got:02x?} instead of \"VMREPL\\0\"); it \
         is not a vmrepl host, or something in between (a proxy, TLS inspection) interferes"
    )]
    BadMagic { got: Vec<u8> },
    #[error(
        "no common protocol version: this host speaks {ours}, the peer speaks {theirs}; upgrade \
         the older host"
    )]
    NoCommonVersion {
        ours: VersionRange,
        theirs: VersionRange,
    },
    #[error("a {kind} frame of {len} bytes exceeds the limit of {max} bytes (16 MiB); {hint}")]
    TooLarge {
        kind: FrameKind,
        len: u64,
        max: u32,
        hint: &'static str,
    },
    #[error(
        "the peer sent a frame of unknown kind {byte:#04x}; it speaks another protocol \
         version or the stream is corrupt"
    )]
    UnknownKind { byte: u8 },
    #[error("expected a {expected} frame but got a {got} frame of {len} bytes")]
    UnexpectedKind {
        expected: FrameKind,
        got: FrameKind,
        len: usize,
    },
    #[error(
        "the peer did not finish {what} within {secs} s; it stalled or lost power, or the \
         network dropped the connection"
    )]
    TimedOut { what: &'static str, secs: u64 },
    #[error("a control message could not be encoded as JSON: {0}")]
    Encode(serde_json::Error),
    #[error("a control message is not a valid {type_name}: {detail}")]
    BadControl {
        type_name: &'static str,
        detail: String,
    },
}

impl FrameError {
    /// Whether the peer closed the connection cleanly between frames.
    pub fn is_closed(&self) -> bool {
        matches!(self, FrameError::Closed)
    }

    /// The peer went away without TLS's close_notify (it dropped the connection when done):
    /// between requests, that is an ordinary end, not an error worth a warning.
    pub fn is_closed_abruptly(&self) -> bool {
        matches!(self, FrameError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof)
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(n < len)` means end of stream after `n`.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Encodes our preamble.
pub fn encode_preamble(range: VersionRange) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..7].copy_from_slice(MAGIC);
    out[7..11].copy_from_slice(&range.min.to_be_bytes());
    out[11..15].copy_from_slice(&range.max.to_be_bytes());
    out
}

/// Reads the peer's preamble.
pub async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> Result<VersionRange, FrameError> {
    let mut buf = [0u8; PREAMBLE_LEN];
    let got = read_full(r, &mut buf).await?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    let magic_seen = got.min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err(FrameError::BadMagic {
            got: buf[..magic_seen].to_vec(),
        });
    }
    if got < PREAMBLE_LEN {
        return Err(FrameError::Truncated {
            what: "the preamble",
            expected: PREAMBLE_LEN,
            got,
        });
    }
    let min = u32::from_be_bytes([buf[7], buf[8], buf[9], buf[10]]);
    let max = u32::from_be_bytes([buf[11], buf[12], buf[13], buf[14]]);
    Ok(VersionRange { min, max })
}

/// A framed connection after a successful version negotiation.
#[derive(Debug)]
pub struct Framed<S> {
    inner: S,
    version: u32,
    peer_range: VersionRange,
    timeout: Duration,
}

/// Runs `f` with the deadline `t`; past it, [`FrameError::TimedOut`] naming `what`.
async fn within<T>(
    t: Duration,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    tokio::time::timeout(t, f)
        .await
        .unwrap_or(Err(FrameError::TimedOut {
            what,
            secs: t.as_secs(),
        }))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Sends our preamble, reads the peer's and picks the highest common
    /// version. Both sides call this.
    pub async fn negotiate(mut inner: S, ours: VersionRange) -> Result<Framed<S>, FrameError> {
        let theirs = within(DEFAULT_IO_TIMEOUT, "the protocol preamble", async {
            inner.write_all(&encode_preamble(ours)).await?;
            inner.flush().await?;
            read_preamble(&mut inner).await
        })
        .await?;
        let version = ours.negotiate(theirs)?;
        Ok(Framed {
            inner,
            version,
            peer_range: theirs,
            timeout: DEFAULT_IO_TIMEOUT,
        })
    }

    /// The deadline of every later frame read or write (default [`DEFAULT_IO_TIMEOUT`]).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// The current deadline of a frame read or write.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The range the peer announced.
    pub fn peer_range(&self) -> VersionRange {
        self.peer_range
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Sends `msg` as a JSON control frame.
    pub async fn write_control<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let json = serde_json::to_vec(msg).map_err(FrameError::Encode)?;
        within(
            self.timeout,
            "sending a control frame",
            write_frame(&mut self.inner, FrameKind::Control, &json),
        )
        .await
    }

    /// Sends a data frame.
    pub async fn write_data(&mut self, data: &[u8]) -> Result<(), FrameError> {
        within(
            self.timeout,
            "sending a data frame",
            write_frame(&mut self.inner, FrameKind::Data, data),
        )
        .await
    }

    /// Receives the next frame. A clean close between frames is
    /// [`FrameError::Closed`].
    pub async fn read_frame(&mut self) -> Result<Frame, FrameError> {
        within(self.timeout, "the next frame", read_frame(&mut self.inner)).await
    }

    /// Receives the next frame, which must be a control frame holding a `T`.
    pub async fn read_control<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        self.read_frame().await?.parse_control()
    }
}

/// Writes one frame and flushes. Refuses payloads over [`MAX_PAYLOAD`].
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(FrameError::TooLarge {
            kind,
            len: payload.len() as u64,
            max: MAX_PAYLOAD,
            hint: "split the data into smaller frames",
        })?;
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&header).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame. Refuses lengths over [`MAX_PAYLOAD`] before allocating.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header).await?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            what: "a frame header",
            expected: HEADER_LEN,
            got,
        });
    }
    let kind =
        FrameKind::from_byte(header[0]).ok_or(FrameError::UnknownKind { byte: header[0] })?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            kind,
            len: u64::from(len),
            max: MAX_PAYLOAD,
            hint: "the peer is broken or not speaking this protocol",
        });
    }
    let len = len as usize;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload).await?;
    if got < len {
        return Err(FrameError::Truncated {
            what: "a frame payload",
            expected: len,
            got,
        });
    }
    Ok(match kind {
        FrameKind::Control => Frame::Control(payload),
        FrameKind::Data => Frame::Data(payload),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Hello {
        host: String,
        n: u32,
    }

    #[test]
    fn a_peer_gone_without_close_notify_is_told_from_other_errors() {
        let eof = FrameError::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert!(eof.is_closed_abruptly() && !eof.is_closed());
        let reset = FrameError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!reset.is_closed_abruptly());
        assert!(FrameError::Closed.is_closed() && !FrameError::Closed.is_closed_abruptly());
    }

    #[tokio::test]
    async fn negotiate_and_round_trip() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ours = VersionRange { min: 1, max: 3 };
        let theirs = VersionRange { min: 2, max: 5 };
        let (fa, fb) = tokio::join!(Framed::negotiate(a, ours), Framed::negotiate(b, theirs));
        let (mut fa, mut fb) = (fa.unwrap(), fb.unwrap());
        assert_eq!(fa.version(), 3);
        assert_eq!(fb.version(), 3);
        assert_eq!(fb.peer_range(), ours);

        let hello = Hello {
            host: "hv1.example.org".into(),
            n: 7,
        };
        fa.write_control(&hello).await.unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let writer = async {
            fa.write_data(&data).await.unwrap();
            fa.write_data(&[]).await.unwrap();
            fa
        };
        let reader = async {
            let got: Hello = fb.read_control().await.unwrap();
            let f = fb.read_frame().await.unwrap();
            let e = fb.read_frame().await.unwrap();
            (got, f, e, fb)
        };
        let (fa, (got, f, e, mut fb)) = tokio::join!(writer, reader);
        assert_eq!(got, hello);
        assert_eq!(f, Frame::Data(data.clone()));
        assert_eq!(e, Frame::Data(Vec::new()));
        drop(fa);
        assert!(fb.read_frame().await.unwrap_err().is_closed());
    }

    #[tokio::test]
    async fn version_negotiation_failure_names_both_ranges() {
        let (a, b) = tokio::io::duplex(1024);
        let (fa, fb) = tokio::join!(
            Framed::negotiate(a, VersionRange { min: 1, max: 2 }),
            Framed::negotiate(b, VersionRange { min: 3, max: 4 })
        );
        let msg = fa.unwrap_err().to_string();
        assert!(
            msg.contains("versions 1–2") && msg.contains("versions 3–4"),
            "{msg}"
        );
        assert!(msg.contains("this host speaks versions 1–2"), "{msg}");
        let msg = fb.unwrap_err().to_string();
        assert!(msg.contains("this host speaks versions 3–4"), "{msg}");
        assert!(VersionRange { min: 2, max: 1 }
            .negotiate(VersionRange { min: 1, max: 2 })
            .is_err());
    }

    #[tokio::test]
    async fn bad_magic_refused() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\n";
        let err = read_preamble(&mut input).await.unwrap_err();
        assert!(matches!(err, FrameError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("not a vmrepl host"));
        let mut short: &[u8] = b"VMREPL\0\0\0";
        let err = read_preamble(&mut short).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated { got: 9, .. }), "{err}");
    }

    #[tokio::test]
    async fn oversized_frames_refused_both_ways() {
        // Reading: a header announcing 16 MiB + 1 is refused without reading on.
        let mut hdr = vec![FrameKind::Data as u8];
        hdr.extend_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        let mut input: &[u8] = &hdr;
        let err = read_frame(&mut input).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, .. } if len == u64::from(MAX_PAYLOAD) + 1),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("16777217 bytes exceeds the limit of 16777216"));
        // Writing: refused before anything is sent.
        let mut out = Vec::new();
        let big = vec![0u8; MAX_PAYLOAD as usize + 1];
        let err = write_frame(&mut out, FrameKind::Control, &big)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(out.is_empty());
        // Exactly the limit is fine.
        let ok = vec![1u8; MAX_PAYLOAD as usize];
        write_frame(&mut out, FrameKind::Data, &ok).await.unwrap();
        let mut input: &[u8] = &out;
        assert_eq!(read_frame(&mut input).await.unwrap(), Frame::Data(ok));
    }

    #[tokio::test]
    async fn truncated_frames_are_errors() {
        let mut out = Vec::new();
        write_frame(&mut out, FrameKind::Data, b"0123456789")
            .await
            .unwrap();
        // cut inside the payload
        let mut input: &[u8] = &out[..HEADER_LEN + 4];
        let err = read_frame(&mut input).await.unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Truncated {
                    expected: 10,
                    got: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("got 4 of 10 bytes"));
        // cut inside the header
        let mut input: &[u8] = &out[..3];
        let err = read_frame(&mut input).await.unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Truncated {
                    what: "a frame header",
                    ..
                }
            ),
            "{err}"
        );
        // unknown kind
        let mut input: &[u8] = &[9, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut input).await.unwrap_err(),
            FrameError::UnknownKind { byte: 9 }
        ));
    }

    #[tokio::test]
    async fn control_type_errors() {
        let f = Frame::Data(vec![1, 2]);
        assert!(matches!(
            f.parse_control::<Hello>(),
            Err(FrameError::UnexpectedKind { .. })
        ));
        let f = Frame::Control(b"{\"host\":1}".to_vec());
        let err = f.parse_control::<Hello>().unwrap_err().to_string();
        assert!(err.contains("Hello"), "{err}");
    }
}
