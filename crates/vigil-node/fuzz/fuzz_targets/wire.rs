//! The TCP ingest's frame decoder, batch decoder and event validation, then the engine.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_node::fuzzing::wire_stream(data));
