//! The one place events are encoded for the wire and the journal: bincode 2.0.1 (serde), behind a version byte,
//! so the format can change here and only here.

use vigil_model::Event;

/// Version of the encoding, the first byte of every encoded payload.
pub const CODEC_VERSION: u8 = 1;
/// Largest encoded event accepted on decode, in bytes (events are small; this bounds a hostile length).
pub const EVENT_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty payload")]
    Empty,
    #[error("unknown codec version {0} (this build reads version {CODEC_VERSION})")]
    Version(u8),
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

/// Encodes any serde value (a checkpoint delta, say) the same way: version byte, then bincode (no size limit).
pub fn encode_value<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(CODEC_VERSION);
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Decodes a value written by [`encode_value`].
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != CODEC_VERSION {
        return Err(CodecError::Version(version));
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

/// Encodes one event: version byte, then bincode.
pub fn encode_event(event: &Event, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(CODEC_VERSION);
    let bytes = bincode::serde::encode_to_vec(event, config()).map_err(|e| CodecError::Malformed(e.to_string()))?;
    out.extend_from_slice(&bytes);
    Ok(())
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
            for line in generate(&StreamConfig { seed, events: 300, accounts: 5, bad_percent: 0 }) {
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
}
