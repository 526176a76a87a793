//! The tokenizer entry points: encode/decode and chat template against the fixture, and their
//! error paths.

mod common;

use std::ffi::{CStr, CString};
use std::ptr::{null, null_mut};

use autoglm::*;
use common::*;

#[test]
fn tokenizer_round_trips_and_renders_the_chat_template() {
    let exp = expected("glm4-tiny");
    let dir = cstr(fixture("glm4-tiny").to_str().unwrap());
    let mut tok = null_mut();
    // SAFETY: valid pointers throughout; every returned buffer is freed once.
    unsafe {
        assert_eq!(
            autoglm_tokenizer_new(dir.as_ptr(), &mut tok),
            autoglm_status::Ok
        );
        for case in exp["tokenizer"].as_array().unwrap() {
            let text = cstr(case["text"].as_str().unwrap());
            let (mut out, mut len) = (null_mut(), 0);
            assert_eq!(
                autoglm_tokenizer_encode(tok, text.as_ptr(), false, &mut out, &mut len),
                autoglm_status::Ok
            );
            let got = std::slice::from_raw_parts(out, len).to_vec();
            assert_eq!(got, ids(&case["token_ids"]));
            let (mut s, mut slen) = (null_mut(), 0);
            assert_eq!(
                autoglm_tokenizer_decode(tok, out, len, false, &mut s, &mut slen),
                autoglm_status::Ok
            );
            let decoded = std::slice::from_raw_parts(s.cast::<u8>(), slen);
            assert_eq!(decoded, case["decoded"].as_str().unwrap().as_bytes());
            autoglm_string_free(s);
            autoglm_token_ids_free(out);
        }
        let chat = &exp["chat"][0];
        let msgs: Vec<(CString, CString)> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    cstr(m["role"].as_str().unwrap()),
                    cstr(m["content"].as_str().unwrap()),
                )
            })
            .collect();
        let c_msgs: Vec<autoglm_chat_message> = msgs
            .iter()
            .map(|(r, c)| autoglm_chat_message {
                role: r.as_ptr(),
                content: c.as_ptr(),
            })
            .collect();
        let mut s = null_mut();
        assert_eq!(
            autoglm_tokenizer_apply_chat_template(tok, c_msgs.as_ptr(), c_msgs.len(), true, &mut s),
            autoglm_status::Ok,
            "{}",
            last_error()
        );
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), chat["rendered"]);
        autoglm_string_free(s);
        let json = cstr(&chat["messages"].to_string());
        assert_eq!(
            autoglm_tokenizer_apply_chat_template_json(tok, json.as_ptr(), null(), true, &mut s),
            autoglm_status::Ok
        );
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), chat["rendered"]);
        autoglm_string_free(s);
        autoglm_tokenizer_free(tok);
    }
    // The engine's tokenizer is the same one and outlives the engine.
    let e = Engine::new("glm4-tiny");
    let mut tok = null_mut();
    let mut size = 0;
    // SAFETY: valid pointers.
    unsafe {
        assert_eq!(autoglm_engine_tokenizer(e.0, &mut tok), autoglm_status::Ok);
        drop(e);
        assert_eq!(
            autoglm_tokenizer_vocab_size(tok, &mut size),
            autoglm_status::Ok
        );
        autoglm_tokenizer_free(tok);
    }
    assert_eq!(size, 600);
}

#[test]
fn tokenizer_reports_bad_arguments() {
    let dir = cstr(fixture("glm4-tiny").to_str().unwrap());
    let mut tok = null_mut();
    // SAFETY: every pointer is NULL or valid.
    unsafe {
        let s = autoglm_tokenizer_new(c"/nonexistent".as_ptr(), &mut tok);
        assert_err(s, autoglm_status::ModelLoad, &["tokenizer.json"]);
        assert_eq!(
            autoglm_tokenizer_new(dir.as_ptr(), &mut tok),
            autoglm_status::Ok
        );
        let (mut ids_out, mut len) = (null_mut(), 0);
        let s = autoglm_tokenizer_encode(tok, c"a\xffb".as_ptr(), false, &mut ids_out, &mut len);
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["autoglm_tokenizer_encode", "`text`", "UTF-8", "offset 1"],
        );
        assert!(ids_out.is_null());
        let s = autoglm_tokenizer_encode(tok, null(), false, &mut ids_out, &mut len);
        assert_err(s, autoglm_status::InvalidArgument, &["`text` is NULL"]);
        let s = autoglm_tokenizer_encode(null(), c"x".as_ptr(), false, &mut ids_out, &mut len);
        assert_err(s, autoglm_status::InvalidArgument, &["`tokenizer` is NULL"]);
        let mut text = null_mut();
        let s = autoglm_tokenizer_decode(tok, null(), 4, true, &mut text, null_mut());
        assert_err(s, autoglm_status::InvalidArgument, &["`ids` is NULL"]);
        let s = autoglm_tokenizer_apply_chat_template_json(
            tok,
            c"[{".as_ptr(),
            null(),
            true,
            &mut text,
        );
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["`messages_json` is not valid JSON"],
        );
        let s = autoglm_tokenizer_apply_chat_template_json(
            tok,
            c"{}".as_ptr(),
            null(),
            true,
            &mut text,
        );
        assert_err(s, autoglm_status::Template, &["array"]);
        let m = [autoglm_chat_message {
            role: c"user".as_ptr(),
            content: null(),
        }];
        let s = autoglm_tokenizer_apply_chat_template(tok, m.as_ptr(), 1, true, &mut text);
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["`messages[0].content` is NULL"],
        );
        assert!(text.is_null());
        autoglm_tokenizer_free(tok);
    }
}
