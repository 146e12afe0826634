//! The binary ingest protocol (docs/wire.md): length-prefixed frames over TCP.
//!
//! Request frame: `len: u32 LE` (bytes that follow) | `version: u8` (= 1) | bincode of `Vec<Event>` (serde,
//! standard config). Response frame: `len: u32 LE` | `kind: u8` | body. Kind 1, ack: `first: u64 LE`,
//! `last: u64 LE`, the offset range of the batch, sent only once it is durable. Kind 2, error: UTF-8 message;
//! the server closes the connection after it, and nothing of the offending frame was appended.
//!
//! When the node has a token, the first frame must be an auth frame: `len` | `0x10` | the token's UTF-8 bytes,
//! answered by kind 3 (empty body) or an error frame (and the connection closed).

use std::io::{self, Read, Write};
use std::net::TcpStream;

use vigil_model::{Event, Offset};

/// Protocol version byte.
pub const WIRE_VERSION: u8 = 1;
/// Largest request frame, in bytes.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Most events in one batch.
pub const BATCH_EVENTS_MAX: usize = 65_536;

/// First byte of an auth frame.
pub const WIRE_AUTH: u8 = 0x10;

pub const KIND_ACK: u8 = 1;
pub const KIND_ERROR: u8 = 2;
pub const KIND_AUTH_OK: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unsupported wire version {0} (this node speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("malformed batch: {0}")]
    Malformed(String),
    #[error("batch of {0} events exceeds {BATCH_EVENTS_MAX}")]
    TooManyEvents(usize),
    #[error("empty batch")]
    EmptyBatch,
}

/// Encodes a batch as a request frame (length prefix included).
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let mut body = Vec::new();
    // A Vec of events always encodes: the codec's only failure is on decode.
    let _ = vigil_store::codec::encode_value(&events, &mut body);
    body[0] = WIRE_VERSION;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decodes a request frame's body (after the length prefix).
pub fn decode_batch(body: &[u8]) -> Result<Vec<Event>, WireError> {
    let (&version, _) = body.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let mut with_codec_version = body.to_vec();
    with_codec_version[0] = vigil_store::codec::CODEC_VERSION;
    let events: Vec<Event> =
        vigil_store::codec::decode_untrusted(&with_codec_version).map_err(|e| WireError::Malformed(e.to_string()))?;
    if events.is_empty() {
        return Err(WireError::EmptyBatch);
    }
    if events.len() > BATCH_EVENTS_MAX {
        return Err(WireError::TooManyEvents(events.len()));
    }
    Ok(events)
}

/// An ack frame.
pub fn ack_frame(first: Offset, last: Offset) -> Vec<u8> {
    let mut f = Vec::with_capacity(21);
    f.extend_from_slice(&17u32.to_le_bytes());
    f.push(KIND_ACK);
    f.extend_from_slice(&first.0.to_le_bytes());
    f.extend_from_slice(&last.0.to_le_bytes());
    f
}

/// An auth frame (request).
pub fn auth_frame(token: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + token.len());
    f.extend_from_slice(&(token.len() as u32 + 1).to_le_bytes());
    f.push(WIRE_AUTH);
    f.extend_from_slice(token.as_bytes());
    f
}

/// The answer to a good auth frame.
pub fn auth_ok_frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(5);
    f.extend_from_slice(&1u32.to_le_bytes());
    f.push(KIND_AUTH_OK);
    f
}

/// An error frame.
pub fn error_frame(message: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + message.len());
    f.extend_from_slice(&(message.len() as u32 + 1).to_le_bytes());
    f.push(KIND_ERROR);
    f.extend_from_slice(message.as_bytes());
    f
}

/// A blocking client: one connection, one batch at a time.
pub struct Client {
    stream: TcpStream,
}

impl Client {
    pub fn connect(addr: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Self { stream })
    }

    /// Connects and presents `token` (when given) before anything else.
    pub fn connect_with(addr: &str, token: Option<&str>) -> io::Result<Self> {
        let mut c = Self::connect(addr)?;
        if let Some(t) = token {
            c.stream.write_all(&auth_frame(t))?;
            c.read_response()?;
        }
        Ok(c)
    }

    /// Sends a batch and waits for its durable offset range.
    pub fn send(&mut self, events: &[Event]) -> io::Result<(Offset, Offset)> {
        self.stream.write_all(&encode_batch(events))?;
        self.read_response()
    }

    /// Sends raw bytes (for tests of malformed frames) and reads one response.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<(Offset, Offset)> {
        self.stream.write_all(bytes)?;
        self.read_response()
    }

    fn read_response(&mut self) -> io::Result<(Offset, Offset)> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > 1 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad response length {len}")));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        match (body[0], &body[1..]) {
            (KIND_ACK, rest) if rest.len() == 16 => {
                let mut a = [0u8; 8];
                let mut b = [0u8; 8];
                a.copy_from_slice(&rest[..8]);
                b.copy_from_slice(&rest[8..]);
                Ok((Offset(u64::from_le_bytes(a)), Offset(u64::from_le_bytes(b))))
            }
            (KIND_AUTH_OK, []) => Ok((Offset(0), Offset(0))),
            (KIND_ERROR, msg) => Err(io::Error::other(String::from_utf8_lossy(msg).into_owned())),
            (kind, _) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown response kind {kind}"))),
        }
    }
}
