//! A `tokenize` request body, through the server's own parsing, validation, chat template,
//! tokenizer and image preprocessing, up to where it would be admitted. Any outcome but a panic
//! (or a hang, or unbounded memory: libFuzzer's limits) is fine; an error must be the JSON a client
//! would read.
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| {
    let engine = autoglm_fuzz::glm4v_engine();
    if let Err(e) = autoglm_core::server::fuzz::tokenize(engine, body) {
        let v: serde_json::Value = serde_json::from_str(&e).expect("the error body is JSON");
        assert!(v["error"]["message"].is_string(), "{e}");
    }
});
