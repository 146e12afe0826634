//! The HTTP events body parser (JSON array or JSON Lines) and the check body, then the engine.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_node::fuzzing::json_body(data));
