//! The one place events are encoded for the wire and the journal: bincode 2.0.1 (serde), behind a version byte,
//! so the format can change here and only here.

use vigil_model::Event;

/// Version of the encoding of events (journal and wire), the first byte of every encoded event. Contract v2 added
/// event variants at the end of `Event` (a liquidation fill is a variant of its own for that reason), which leaves
/// every earlier event's bytes unchanged: still version 1.
pub const CODEC_VERSION: u8 = 1;
/// Version of the encoding of checkpoint values (accounts, the market, triggers, the producers table). Version 2:
/// contract v2's state (an account's margin model; the clock, `risk` parameters, instruments' underlying and
/// expiry in the market). Version 3: `max_liquidation_fee` in the market, a trigger's `uncovered`. Version 4: the
/// node's value holds the insurance fund beside the producers table; liquidation fills are stored.
pub const VALUE_VERSION: u8 = 4;
/// Largest encoded event accepted on decode, in bytes (events are small; this bounds a hostile length).
pub const EVENT_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty payload")]
    Empty,
    #[error("unknown codec version {0} (this build reads version {CODEC_VERSION})")]
    Version(u8),
    #[error(
        "checkpoint value format version {0}, this build reads version {VALUE_VERSION} (written by another build: \
         replay its journal into a new data directory, or run the build that wrote it)"
    )]
    ValueVersion(u8),
    #[error("payload of {0} bytes exceeds {EVENT_BYTES_MAX}")]
    TooLarge(usize),
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the event")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<EVENT_BYTES_MAX>()
}

/// Encodes any serde value (a checkpoint delta, say): the value version byte, then bincode (no size limit). Written
/// in place at the end of `out`; on an error `out` is as it was.
pub fn encode_value<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    encode_versioned(VALUE_VERSION, value, bincode::config::standard(), out)
}

/// Room a caller may reserve for one event's record: a trade's fits (a price's is about 20 bytes), so
/// [`encode_event`] writes it without growing the buffer.
pub const RECORD_RESERVE: usize = 64;

/// `version`, then `value` in bincode with `config`, appended to `out`; on an error `out` is truncated back.
fn encode_versioned<T: serde::Serialize>(
    version: u8,
    value: &T,
    config: impl bincode::config::Config,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let start = out.len();
    out.push(version);
    bincode::serde::encode_into_std_write(value, &mut *out, config).map(drop).map_err(|e| {
        out.truncate(start);
        CodecError::Malformed(e.to_string())
    })
}

/// Decodes a value written by [`encode_value`].
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != VALUE_VERSION {
        return Err(CodecError::ValueVersion(version));
    }
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// First byte of a journal record that holds input rejected before it became an event (an unreadable line sent
/// over HTTP): it takes its offset like any event, and replay skips it (no shard ever saw it).
pub const REJECTED_INPUT: u8 = 0xFE;

/// The journal record of rejected input: the marker byte, then the rejection's text (for `inspect` and forensics).
pub fn encode_rejected_input(reason: &str, message: &str, out: &mut Vec<u8>) {
    out.push(REJECTED_INPUT);
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b": ");
    // Bound the record: the message quotes input, which can be up to a megabyte.
    let mut end = message.len().min(1024);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// First byte of a journal record that carries a producer's stamp before its payload: the first record of a batch
/// sent with a producer id and sequence number (idempotent producers, docs/wire.md). Layout:
/// `0xFD | producer_len: u8 | producer (UTF-8) | sequence: u64 LE | count: u32 LE | payload`, where `payload` is
/// the record's own (an event, or rejected input) and `count` the number of records in the batch.
pub const STAMPED: u8 = 0xFD;

/// A producer's stamp on the first record of its batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub producer: &'a str,
    pub sequence: u64,
    /// Records in the batch, this one included.
    pub count: u32,
}

/// Writes a stamp; the record's own payload follows it in `out`. `producer` is at most 255 bytes (the node
/// refuses longer ids before this).
pub fn encode_stamp(stamp: &Stamp<'_>, out: &mut Vec<u8>) {
    debug_assert!(stamp.producer.len() <= u8::MAX as usize, "invariant: producer ids are checked before stamping");
    out.push(STAMPED);
    out.push(stamp.producer.len().min(u8::MAX as usize) as u8);
    out.extend_from_slice(&stamp.producer.as_bytes()[..stamp.producer.len().min(u8::MAX as usize)]);
    out.extend_from_slice(&stamp.sequence.to_le_bytes());
    out.extend_from_slice(&stamp.count.to_le_bytes());
}

/// Splits a journal payload into its stamp (if any) and the record's own payload.
pub fn split_stamp(payload: &[u8]) -> Result<(Option<Stamp<'_>>, &[u8]), CodecError> {
    if payload.first() != Some(&STAMPED) {
        return Ok((None, payload));
    }
    let malformed = || CodecError::Malformed("truncated producer stamp".into());
    let len = *payload.get(1).ok_or_else(malformed)? as usize;
    let producer = payload.get(2..2 + len).ok_or_else(malformed)?;
    let producer =
        std::str::from_utf8(producer).map_err(|_| CodecError::Malformed("producer id is not UTF-8".into()))?;
    let rest = &payload[2 + len..];
    let sequence = u64::from_le_bytes(rest.get(..8).ok_or_else(malformed)?.try_into().map_err(|_| malformed())?);
    let count = u32::from_le_bytes(rest.get(8..12).ok_or_else(malformed)?.try_into().map_err(|_| malformed())?);
    let inner = &rest[12..];
    if inner.is_empty() {
        return Err(CodecError::Empty);
    }
    Ok((Some(Stamp { producer, sequence, count }), inner))
}

/// Most bytes a hostile payload may make the decoder claim (string and sequence lengths are checked against it
/// before anything is allocated): the largest wire frame.
pub const UNTRUSTED_BYTES_MAX: usize = 16 << 20;

/// Decodes a value from an untrusted source (a network frame): as [`decode_value`], but a length prefix can
/// never make it allocate more than [`UNTRUSTED_BYTES_MAX`] (found by fuzzing: a 60 GB string claim in a
/// 40-byte frame aborted the process).
pub fn decode_untrusted<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != CODEC_VERSION {
        return Err(CodecError::Version(version));
    }
    let config = bincode::config::standard().with_limit::<UNTRUSTED_BYTES_MAX>();
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(body, config).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// Encodes one event: version byte, then bincode. Written in place at the end of `out` (no buffer of its own); on
/// an error `out` is as it was.
pub fn encode_event(event: &Event, out: &mut Vec<u8>) -> Result<(), CodecError> {
    encode_versioned(CODEC_VERSION, event, config(), out)
}

/// Decodes one event written by [`encode_event`], refusing anything else.
pub fn decode_event(bytes: &[u8]) -> Result<Event, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != CODEC_VERSION {
        return Err(CodecError::Version(version));
    }
    if body.len() > EVENT_BYTES_MAX {
        return Err(CodecError::TooLarge(body.len()));
    }
    let (event, used): (Event, usize) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_model::parse_line;
    use vigil_testkit::{StreamConfig, generate};

    #[test]
    fn every_generated_event_round_trips() {
        // Proves encode → decode is the identity on every kind of event the generator makes.
        let mut n = 0;
        for seed in 0..20 {
            for line in
                generate(&StreamConfig { seed, events: 300, accounts: 5, bad_percent: 0, ..StreamConfig::default() })
            {
                let Ok(event) = parse_line(&line) else { continue };
                let mut buf = Vec::new();
                encode_event(&event, &mut buf).unwrap();
                assert_eq!(decode_event(&buf).unwrap(), event);
                n += 1;
            }
        }
        assert!(n > 5000);
    }

    #[test]
    fn bad_payloads_are_refused_not_panicked_on() {
        // Proves wrong versions, truncation, trailing bytes and garbage are errors.
        let event = parse_line(r#"{"type":"deposit","account":"a","asset":"USDC","amount":"1"}"#).unwrap();
        let mut buf = Vec::new();
        encode_event(&event, &mut buf).unwrap();
        assert_eq!(decode_event(&[]), Err(CodecError::Empty));
        let mut v2 = buf.clone();
        v2[0] = 2;
        assert_eq!(decode_event(&v2), Err(CodecError::Version(2)));
        assert!(matches!(decode_event(&buf[..buf.len() - 1]), Err(CodecError::Malformed(_))));
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(decode_event(&long), Err(CodecError::Trailing(1)));
        for len in 0..64 {
            let garbage: Vec<u8> = (0..len).map(|i| (i * 37 + 1) as u8).collect();
            let _ = decode_event(&garbage);
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn golden_bytes_of_the_journal_formats() {
        // Proves the on-disk bytes do not change silently: a journal record of an event, of rejected input, and
        // of a stamped event, byte for byte (reordering a field of Event, or the record header, fails this).
        let event = parse_line(r#"{"type":"deposit","account":"a","asset":"USDC","amount":"1.5"}"#).unwrap();
        let mut payload = Vec::new();
        encode_event(&event, &mut payload).unwrap();
        let mut record = Vec::new();
        crate::journal::encode_record(7, &payload, &mut record);
        assert_eq!(hex(&record), GOLDEN_EVENT_RECORD);
        let mut rejected = Vec::new();
        encode_rejected_input("invalid_event", "bad", &mut rejected);
        assert_eq!(hex(&rejected), GOLDEN_REJECTED);
        let mut stamped = Vec::new();
        encode_stamp(&Stamp { producer: "gw", sequence: 3, count: 2 }, &mut stamped);
        stamped.extend_from_slice(&payload);
        assert_eq!(hex(&stamped), GOLDEN_STAMPED);
        let (stamp, inner) = split_stamp(&stamped).unwrap();
        assert_eq!(stamp, Some(Stamp { producer: "gw", sequence: 3, count: 2 }));
        assert_eq!(decode_event(inner).unwrap(), event);
        // What is decoded re-encodes to the same bytes.
        let mut again = Vec::new();
        encode_event(&decode_event(&payload).unwrap(), &mut again).unwrap();
        assert_eq!(again, payload);
    }

    #[test]
    fn a_value_that_fails_to_encode_leaves_the_buffer_as_it_was() {
        // Proves the in-place encoding (`encode_versioned`, which events share) takes back what it wrote when it
        // fails part way: the caller's earlier bytes stay, nothing after them (a publisher appends records to one
        // buffer). Bincode does not fail on any type
        // of ours (it does not apply its size limit when encoding), so the value fails on purpose after one field.
        struct FailsAfterOneField;
        impl serde::Serialize for FailsAfterOneField {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::{Error, SerializeTuple};
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element(&u64::MAX)?;
                Err(S::Error::custom("refused on purpose"))
            }
        }
        let mut out = b"earlier".to_vec();
        assert!(encode_value(&FailsAfterOneField, &mut out).is_err());
        assert_eq!(out, b"earlier");
    }

    const GOLDEN_EVENT_RECORD: &str = "0e0000009fe215e40700000000000000010701610455534443fc00a3e111";
    const GOLDEN_REJECTED: &str = "fe696e76616c69645f6576656e743a20626164";
    const GOLDEN_STAMPED: &str = "fd026777030000000000000002000000010701610455534443fc00a3e111";
}
