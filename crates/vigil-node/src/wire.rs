//! The binary ingest protocol (docs/wire.md): length-prefixed frames over TCP.
//!
//! Request frame: `len: u32 LE` (bytes that follow) | `version: u8` (= 1) | bincode of `Vec<Event>` (serde,
//! standard config). Response frame: `len: u32 LE` | `kind: u8` | body. Kind 1, ack: `first: u64 LE`,
//! `last: u64 LE`, the offset range of the batch, sent only once it is durable. Kind 2, error: UTF-8 message;
//! the server closes the connection after it, and nothing of the offending frame was appended.
//!
//! When the node has a token, the first frame must be an auth frame: `len` | `0x10` | the token's UTF-8 bytes,
//! answered by kind 3 (empty body) or an error frame (and the connection closed).
//!
//! Pre-trade checks (docs/wire.md, "Checks"): `len` | `0x20` | `min_offset: u64 LE` | bincode of `Vec<Fill>`,
//! answered in order by kind 5: bincode of `Vec<CheckAnswer>`, one per fill, in the frame's order. Frames may be
//! pipelined.
//!
//! Idempotent producers use version 2: `len` | `2` | `producer_len: u8` | producer id (UTF-8) | `sequence: u64 LE` |
//! bincode of `Vec<Event>`. A resend of the producer's last journaled batch is answered by kind 4 (same body as an
//! ack: the original offsets) and appends nothing; a gap or regression gets an error frame.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use serde::{Deserialize, Serialize};
use vigil_model::{Amount, Event, Fill, Offset};

/// Protocol version byte of a plain batch.
pub const WIRE_VERSION: u8 = 1;
/// Version byte of a batch stamped with a producer id and sequence number.
pub const WIRE_VERSION_PRODUCER: u8 = 2;
/// Largest request frame, in bytes.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Most events in one batch.
pub const BATCH_EVENTS_MAX: usize = 65_536;

/// First byte of an auth frame.
pub const WIRE_AUTH: u8 = 0x10;

pub const KIND_ACK: u8 = 1;
pub const KIND_ERROR: u8 = 2;
pub const KIND_AUTH_OK: u8 = 3;
/// An ack of a resent batch the node had already journaled: its original offsets; nothing was appended.
pub const KIND_ACK_DUPLICATE: u8 = 4;
/// The answers to a check frame.
pub const KIND_CHECKS: u8 = 5;

/// First byte of a check frame.
pub const WIRE_CHECKS: u8 = 0x20;
/// Most checks in one frame.
pub const CHECKS_MAX: usize = 65_536;

/// The answer to one pre-trade check of a check frame: what `POST /v1/accounts/{id}/check` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckAnswer {
    /// The unit's figures as they would be after the fill; `reason` (a contract reason) when it is not allowed.
    Answered {
        allowed: bool,
        reason: Option<String>,
        equity: Amount,
        initial_margin: Amount,
        maintenance_margin: Amount,
        available: Amount,
    },
    /// Not checkable: the code HTTP answers with (`unknown_symbol`, `invalid_number`, `offset_not_sequenced`,
    /// `timeout`…) and its message.
    Refused { code: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unsupported wire version {0} (this node speaks {WIRE_VERSION} and {WIRE_VERSION_PRODUCER})")]
    Version(u8),
    #[error("malformed producer header: {0}")]
    Producer(String),
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

/// Encodes a batch stamped with a producer id and sequence number (version 2; length prefix included).
pub fn encode_producer_batch(producer: &str, sequence: u64, events: &[Event]) -> Vec<u8> {
    let mut body = Vec::new();
    // A Vec of events always encodes: the codec's only failure is on decode.
    let _ = vigil_store::codec::encode_value(&events, &mut body);
    let id = &producer.as_bytes()[..producer.len().min(u8::MAX as usize)];
    let mut frame = Vec::with_capacity(4 + 10 + id.len() + body.len());
    frame.extend_from_slice(&((1 + 1 + id.len() + 8 + body.len() - 1) as u32).to_le_bytes());
    frame.push(WIRE_VERSION_PRODUCER);
    frame.push(id.len() as u8);
    frame.extend_from_slice(id);
    frame.extend_from_slice(&sequence.to_le_bytes());
    frame.extend_from_slice(&body[1..]);
    frame
}

/// A decoded request: the events, and the producer's `(id, sequence)` for a version 2 frame.
#[derive(Debug, PartialEq)]
pub struct Batch {
    pub producer: Option<(String, u64)>,
    pub events: Vec<Event>,
}

/// Decodes a bincode body framed without the codec's version byte (a frame carries its own version or kind),
/// with the codec's bounds on untrusted input.
fn decode_unversioned<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, vigil_store::codec::CodecError> {
    let mut with_codec_version = Vec::with_capacity(1 + bytes.len());
    with_codec_version.push(vigil_store::codec::CODEC_VERSION);
    with_codec_version.extend_from_slice(bytes);
    vigil_store::codec::decode_untrusted(&with_codec_version)
}

/// Decodes a request frame's body (after the length prefix).
pub fn decode_batch(body: &[u8]) -> Result<Batch, WireError> {
    let (&version, rest) = body.split_first().ok_or(WireError::Empty)?;
    let (producer, encoded) = match version {
        WIRE_VERSION => (None, rest),
        WIRE_VERSION_PRODUCER => {
            let (&len, rest) = rest.split_first().ok_or_else(|| WireError::Producer("no id length".into()))?;
            let len = len as usize;
            let id = rest.get(..len).ok_or_else(|| WireError::Producer("truncated id".into()))?;
            let id = std::str::from_utf8(id).map_err(|_| WireError::Producer("the id is not UTF-8".into()))?;
            let sequence = rest
                .get(len..len + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .ok_or_else(|| WireError::Producer("truncated sequence number".into()))?;
            (Some((id.to_owned(), u64::from_le_bytes(sequence))), &rest[len + 8..])
        }
        other => return Err(WireError::Version(other)),
    };
    let events: Vec<Event> = decode_unversioned(encoded).map_err(|e| WireError::Malformed(e.to_string()))?;
    if events.is_empty() {
        return Err(WireError::EmptyBatch);
    }
    if events.len() > BATCH_EVENTS_MAX {
        return Err(WireError::TooManyEvents(events.len()));
    }
    Ok(Batch { producer, events })
}

/// Encodes a check frame (length prefix included): the fills to check once `min_offset` is applied.
pub fn encode_checks(min_offset: Offset, fills: &[Fill]) -> Vec<u8> {
    let mut body = Vec::new();
    // A Vec of fills always encodes: the codec's only failure is on decode.
    let _ = vigil_store::codec::encode_value(&fills, &mut body);
    let mut frame = Vec::with_capacity(4 + 9 + body.len());
    frame.extend_from_slice(&((1 + 8 + body.len() - 1) as u32).to_le_bytes());
    frame.push(WIRE_CHECKS);
    frame.extend_from_slice(&min_offset.0.to_le_bytes());
    frame.extend_from_slice(&body[1..]);
    frame
}

/// Decodes a check frame's body (after the length prefix): `min_offset` and the fills.
pub fn decode_checks(body: &[u8]) -> Result<(Offset, Vec<Fill>), WireError> {
    let (&kind, rest) = body.split_first().ok_or(WireError::Empty)?;
    if kind != WIRE_CHECKS {
        return Err(WireError::Version(kind));
    }
    let min = rest
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(|| WireError::Malformed("truncated min_offset".into()))?;
    let fills: Vec<Fill> = decode_unversioned(&rest[8..]).map_err(|e| WireError::Malformed(e.to_string()))?;
    if fills.is_empty() {
        return Err(WireError::EmptyBatch);
    }
    if fills.len() > CHECKS_MAX {
        return Err(WireError::TooManyEvents(fills.len()));
    }
    Ok((Offset(u64::from_le_bytes(min)), fills))
}

/// The answers to a check frame, in its order.
pub fn checks_frame(answers: &[CheckAnswer]) -> Vec<u8> {
    let mut body = Vec::new();
    let _ = vigil_store::codec::encode_value(&answers, &mut body);
    body[0] = KIND_CHECKS;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// An ack frame.
pub fn ack_frame(first: Offset, last: Offset) -> Vec<u8> {
    offsets_frame(KIND_ACK, first, last)
}

/// The ack of a resent batch already journaled (its original offsets).
pub fn duplicate_ack_frame(first: Offset, last: Offset) -> Vec<u8> {
    offsets_frame(KIND_ACK_DUPLICATE, first, last)
}

fn offsets_frame(kind: u8, first: Offset, last: Offset) -> Vec<u8> {
    let mut f = Vec::with_capacity(21);
    f.extend_from_slice(&17u32.to_le_bytes());
    f.push(kind);
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

    /// A second handle on the same connection (one thread sends frames while another reads the answers).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { stream: self.stream.try_clone()? })
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
        self.read_response().map(|(first, last, _)| (first, last))
    }

    /// Sends a batch as `producer`'s batch number `sequence` and waits for its durable offset range; the flag is
    /// set when the node had journaled it already (a resend: nothing was appended, the offsets are the original).
    pub fn send_as(&mut self, producer: &str, sequence: u64, events: &[Event]) -> io::Result<(Offset, Offset, bool)> {
        self.stream.write_all(&encode_producer_batch(producer, sequence, events))?;
        self.read_response()
    }

    /// Sends a check frame and waits for its answers (one per fill, in order).
    pub fn check(&mut self, min_offset: Offset, fills: &[Fill]) -> io::Result<Vec<CheckAnswer>> {
        self.send_checks(min_offset, fills)?;
        self.read_checks()
    }

    /// Sends a check frame without waiting: answers come in the order frames were sent ([`Client::read_checks`]).
    pub fn send_checks(&mut self, min_offset: Offset, fills: &[Fill]) -> io::Result<()> {
        self.stream.write_all(&encode_checks(min_offset, fills))
    }

    /// Reads the answers to the oldest check frame not yet answered.
    pub fn read_checks(&mut self) -> io::Result<Vec<CheckAnswer>> {
        let body = self.read_body()?;
        match (body[0], &body[1..]) {
            (KIND_CHECKS, rest) => {
                decode_unversioned(rest).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
            }
            (KIND_ERROR, msg) => Err(io::Error::other(String::from_utf8_lossy(msg).into_owned())),
            (kind, _) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected response kind {kind}"))),
        }
    }

    fn read_body(&mut self) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > FRAME_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad response length {len}")));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok(body)
    }

    /// Sends raw bytes (for tests of malformed frames) and reads one response.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<(Offset, Offset)> {
        self.stream.write_all(bytes)?;
        self.read_response().map(|(first, last, _)| (first, last))
    }

    fn read_response(&mut self) -> io::Result<(Offset, Offset, bool)> {
        let body = self.read_body()?;
        match (body[0], &body[1..]) {
            (kind @ (KIND_ACK | KIND_ACK_DUPLICATE), rest) if rest.len() == 16 => {
                let mut a = [0u8; 8];
                let mut b = [0u8; 8];
                a.copy_from_slice(&rest[..8]);
                b.copy_from_slice(&rest[8..]);
                Ok((Offset(u64::from_le_bytes(a)), Offset(u64::from_le_bytes(b)), kind == KIND_ACK_DUPLICATE))
            }
            (KIND_AUTH_OK, []) => Ok((Offset(0), Offset(0), false)),
            (KIND_ERROR, msg) => Err(io::Error::other(String::from_utf8_lossy(msg).into_owned())),
            (kind, _) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown response kind {kind}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn golden_bytes_of_every_frame_kind() {
        // Proves the wire bytes do not change silently: each request and response frame kind, byte for byte,
        // and that the batches decode back to what was encoded.
        let event =
            vigil_model::parse_line(r#"{"type":"deposit","account":"a","asset":"USDC","amount":"1.5"}"#).unwrap();
        let v1 = encode_batch(std::slice::from_ref(&event));
        assert_eq!(hex(&v1), GOLDEN_V1);
        assert_eq!(decode_batch(&v1[4..]).unwrap(), Batch { producer: None, events: vec![event.clone()] });
        let v2 = encode_producer_batch("gw", 3, std::slice::from_ref(&event));
        assert_eq!(hex(&v2), GOLDEN_V2);
        let decoded = decode_batch(&v2[4..]).unwrap();
        assert_eq!(decoded, Batch { producer: Some(("gw".into(), 3)), events: vec![event] });
        assert_eq!(hex(&auth_frame("t0k")), "040000001074306b");
        assert_eq!(hex(&ack_frame(Offset(1), Offset(258))), "110000000101000000000000000201000000000000");
        assert_eq!(hex(&duplicate_ack_frame(Offset(1), Offset(2))), "110000000401000000000000000200000000000000");
        assert_eq!(hex(&auth_ok_frame()), "0100000003");
        assert_eq!(hex(&error_frame("no")), "03000000026e6f");
        let vigil_model::Event::Trade(fill) = vigil_model::parse_line(
            r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#,
        )
        .unwrap() else {
            panic!("a trade")
        };
        let checks = encode_checks(Offset(7), std::slice::from_ref(&fill));
        assert_eq!(hex(&checks), GOLDEN_CHECKS);
        assert_eq!(decode_checks(&checks[4..]).unwrap(), (Offset(7), vec![fill]));
        let answers = [
            CheckAnswer::Answered {
                allowed: false,
                reason: Some("insufficient_margin".into()),
                equity: Amount(100_000_000),
                initial_margin: Amount(200_000_000),
                maintenance_margin: Amount(100_000_000),
                available: Amount(-100_000_000),
            },
            CheckAnswer::Refused { code: "unknown_symbol".into(), message: "no".into() },
        ];
        assert_eq!(hex(&checks_frame(&answers)), GOLDEN_CHECK_ANSWERS);
    }

    const GOLDEN_CHECKS: &str = "210000002007000000000000000101610345544800fc00c2eb0bfd0070c9b28b0000000000";
    const GOLDEN_CHECK_ANSWERS: &str = "40000000050200000113696e73756666696369656e745f6d617267696efc00c2eb0bfc0084d717fc00c2eb0bfcffc1eb0b010e756e6b6e6f776e5f73796d626f6c026e6f";
    const GOLDEN_V1: &str = "0f00000001010701610455534443fc00a3e111";
    const GOLDEN_V2: &str = "1a000000020267770300000000000000010701610455534443fc00a3e111";
}
