//! The fuzz targets' bodies (`crates/vigil-node/fuzz`), here so the saved corpus replays as an ordinary test in
//! CI (`tests/fuzz_corpus.rs`) through exactly the code the fuzzer ran.
//!
//! Each target feeds arbitrary bytes through an input path of the node and then applies whatever it accepted to
//! an engine, checking the promise made to hostile input: no panic, and a rejected event changes nothing.

use vigil_engine::{Config, Engine};
use vigil_model::{Event, Offset, validate};
use vigil_store::codec::{decode_event, encode_event};

use crate::http::{check_fill, check_fill_full, check_fills, check_fills_full, parse_events, to_items, token_matches};
use crate::intake::Item;
use crate::wire::{WIRE_AUTH, WIRE_CHECKS, decode_batch, decode_checks};

/// Applies events to a fresh engine; a rejected event must leave the account it names as it was. Returns the engine.
fn apply_all(events: impl IntoIterator<Item = Event>) -> Engine {
    let mut engine = Engine::new(&Config::default());
    let mut triggers = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        let before = event.account().map(|a| engine.account_view(a));
        let result = engine.apply(Offset(i as u64 + 1), &event, &mut triggers);
        if result.is_err()
            && let (Some(account), Some(before)) = (event.account(), before)
        {
            assert_eq!(engine.account_view(account), before, "a rejected event changed its account");
        }
        // What is applied must journal and come back the same (recovery replays it).
        let mut record = Vec::new();
        if encode_event(&event, &mut record).is_ok() {
            assert_eq!(decode_event(&record).ok().as_ref(), Some(&event), "journal round trip");
        }
    }
    engine
}

/// The TCP ingest: a byte stream of frames, each checked as a connection does (length bounds, auth, version,
/// batch decoding, validation of every event); accepted events are then applied, and the fills of check frames
/// that hold to a trade's rules are checked against the result, which must change nothing.
pub fn wire_stream(data: &[u8]) {
    const MAX: usize = 1 << 16;
    let mut rest = data;
    let mut accepted = Vec::new();
    let mut checks = Vec::new();
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        if len == 0 || len > MAX || len > rest.len() {
            break; // the connection answers with an error frame and closes
        }
        let (body, tail) = rest.split_at(len);
        rest = tail;
        if body[0] == WIRE_AUTH {
            let _ = token_matches("token", std::str::from_utf8(&body[1..]).unwrap_or(""));
            continue;
        }
        if body[0] == WIRE_CHECKS {
            match decode_checks(body) {
                Ok((_, fills)) => {
                    checks.extend(fills.into_iter().filter(|f| validate(&Event::Trade(f.clone())).is_ok()))
                }
                Err(_) => break,
            }
            continue;
        }
        match decode_batch(body) {
            Ok(batch) => accepted.extend(batch.events.into_iter().filter(|e| validate(e).is_ok())),
            Err(_) => break,
        }
    }
    let engine = apply_all(accepted);
    for fill in checks {
        let before = engine.account_view(&fill.account);
        let _ = engine.check(&fill.account, &fill);
        assert_eq!(engine.account_view(&fill.account), before, "a check changed its account");
    }
}

/// The HTTP paths that read JSON: an events body (array or lines), a check body and a body of many checks; accepted
/// events are applied.
/// Each line also goes through both readings of the event parser, which must agree.
pub fn json_body(data: &[u8]) {
    // The event parser's fast path (flat lines read in place) and serde_json's reading agree on every line.
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            assert_eq!(
                vigil_model::parse_line(line),
                vigil_model::parse_line_full(line),
                "the two readings of {line:?}"
            );
        }
    }
    // Check bodies: read in place where flat, or the full way; both give the same answer.
    assert_eq!(check_fill("fuzz", data), check_fill_full("fuzz", data), "the two readings of a check body");
    let (fast, full) = (check_fills(data, 1_000), check_fills_full(data, 1_000));
    assert_eq!(fast.as_ref().map_err(|e| e.0), full.as_ref().map_err(|e| e.0), "the two readings of a body of checks");
    let Ok(parsed) = parse_events(data) else { return };
    for p in parsed.iter().flatten() {
        assert_eq!(validate(p), Ok(()), "the parser and validate agree");
    }
    let items = to_items(parsed);
    let _ = apply_all(items.into_iter().filter_map(|(item, _)| match item {
        Item::Event(e) => Some(e),
        Item::Invalid(_) => None,
    }));
}
