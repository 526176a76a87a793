//! Error paths of engine creation and requests: NULLs, invalid UTF-8, bad options and sampling
//! parameters each give the documented status and a message naming the parameter or field.

mod common;

use std::ffi::c_char;
use std::ptr::{null, null_mut};

use autoglm::*;
use common::*;

#[test]
fn engine_new_reports_bad_arguments_and_options() {
    let dir = cstr(fixture("glm4-tiny").to_str().unwrap());
    let mut e = std::ptr::dangling_mut::<autoglm_engine>();
    // SAFETY: every pointer is NULL or valid; the failing calls create nothing.
    unsafe {
        let s = autoglm_engine_new(null(), null(), &mut e);
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["autoglm_engine_new", "`model_dir` is NULL"],
        );
        assert!(e.is_null(), "out_engine is cleared on failure");
        let s = autoglm_engine_new(dir.as_ptr(), null(), null_mut());
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["`out_engine` is NULL"],
        );
        let bad = b"/tmp/\xff\xfe\0";
        let s = autoglm_engine_new(bad.as_ptr().cast(), null(), &mut e);
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["`model_dir`", "UTF-8", "offset 5"],
        );
        let s = autoglm_engine_new(c"/nonexistent/model".as_ptr(), null(), &mut e);
        assert_err(s, autoglm_status::ModelLoad, &["/nonexistent/model"]);
        // A directory without weights.
        let tmp = std::env::temp_dir();
        let s = autoglm_engine_new(cstr(tmp.to_str().unwrap()).as_ptr(), null(), &mut e);
        assert_err(s, autoglm_status::ModelLoad, &[]);

        let with = |f: &dyn Fn(&mut autoglm_engine_options)| {
            let mut o = autoglm_engine_options_default();
            o.kv_cache_mb = 16;
            f(&mut o);
            let mut e = null_mut();
            let s = autoglm_engine_new(dir.as_ptr(), &o, &mut e);
            autoglm_engine_free(e);
            s
        };
        let s = with(&|o| o.block_size = 0);
        assert_err(s, autoglm_status::InvalidConfig, &["cache.block_size"]);
        let s = with(&|o| o.device = c"tpu".as_ptr());
        assert_err(s, autoglm_status::InvalidConfig, &["device", "tpu"]);
        let s = with(&|o| o.device = c"c\xffu".as_ptr());
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["`options->device`", "UTF-8"],
        );
        let s = with(&|o| o.num_compute_cores = 2);
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["`options->compute_cores` is NULL"],
        );
        let s = with(&|o| o.engine_core = -5);
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["options->engine_core", "-5"],
        );
        let s = with(&|o| o.kv_cache_mb = u64::MAX);
        assert_err(s, autoglm_status::InvalidArgument, &["kv_cache_mb"]);
        let s = with(&|o| o.max_model_len = 1 << 30);
        assert_err(s, autoglm_status::InvalidConfig, &["max_model_len"]);
        let s = with(&|o| o.device = c"cuda:0".as_ptr());
        assert!(
            s == autoglm_status::CudaUnavailable || s == autoglm_status::Ok,
            "{s:?}: {}",
            last_error()
        );
    }
}

#[test]
fn requests_report_bad_arguments_and_params() {
    let e = Engine::new("glm4-tiny");
    let prompt = [277u32];
    let run = |engine: *const autoglm_engine,
               prompt: *const u32,
               len: usize,
               p: &autoglm_sampling_params| {
        let mut text = null_mut();
        // SAFETY: every pointer is NULL or valid.
        let s = unsafe {
            autoglm_engine_generate(
                engine,
                prompt,
                len,
                p,
                &mut text,
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        assert_eq!(s == autoglm_status::Ok, !text.is_null());
        // SAFETY: NULL or ours to free.
        unsafe { autoglm_string_free(text) };
        s
    };
    let ok = greedy(2);
    let s = run(null(), prompt.as_ptr(), 1, &ok);
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &["autoglm_engine_generate", "`engine` is NULL"],
    );
    let s = run(e.0, null(), 3, &ok);
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &["`prompt_token_ids` is NULL", "3"],
    );
    let s = run(e.0, prompt.as_ptr(), 0, &ok);
    assert_err(s, autoglm_status::InvalidRequest, &["prompt is empty"]);
    let s = run(e.0, [100_000u32].as_ptr(), 1, &ok);
    assert_err(s, autoglm_status::InvalidRequest, &["100000", "vocabulary"]);
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params { top_p: 2.0, ..ok },
    );
    assert_err(s, autoglm_status::InvalidRequest, &["top_p", "2"]);
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params {
            max_tokens: 0,
            ..ok
        },
    );
    assert_err(s, autoglm_status::InvalidRequest, &["max_tokens"]);
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params {
            temperature: f32::NAN,
            ..ok
        },
    );
    assert_err(s, autoglm_status::InvalidRequest, &["temperature"]);
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params {
            has_logprobs: true,
            logprobs: 50,
            ..ok
        },
    );
    assert_err(s, autoglm_status::InvalidRequest, &["logprobs", "50"]);
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params { n: 2, ..ok },
    );
    assert_err(s, autoglm_status::InvalidRequest, &["params->n = 2"]);
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params {
            stop_token_ids_len: 2,
            ..ok
        },
    );
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &["`params->stop_token_ids` is NULL"],
    );
    let stops = [c"ok".as_ptr(), null()];
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params {
            stop: stops.as_ptr(),
            stop_len: 2,
            ..ok
        },
    );
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &["`params->stop[1]` is NULL"],
    );
    let stops: [*const c_char; 1] = [c"\xc3(".as_ptr()];
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params {
            stop: stops.as_ptr(),
            stop_len: 1,
            ..ok
        },
    );
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &["`params->stop[0]`", "UTF-8"],
    );
    let stops = [c"".as_ptr()];
    let s = run(
        e.0,
        prompt.as_ptr(),
        1,
        &autoglm_sampling_params {
            stop: stops.as_ptr(),
            stop_len: 1,
            ..ok
        },
    );
    assert_err(s, autoglm_status::InvalidRequest, &["stop"]);
    // NULL params are the defaults; success clears the message.
    assert_eq!(run(e.0, prompt.as_ptr(), 1, &ok), autoglm_status::Ok);
    assert_eq!(last_error(), "");

    // SAFETY: every pointer is NULL or valid.
    unsafe {
        let mut ids_out = null_mut();
        let s = autoglm_engine_generate(
            e.0,
            prompt.as_ptr(),
            1,
            null(),
            null_mut(),
            &mut ids_out,
            null_mut(),
            null_mut(),
            null_mut(),
        );
        assert_err(s, autoglm_status::InvalidArgument, &["out_token_ids_len"]);
        let s = autoglm_engine_generate_stream(e.0, prompt.as_ptr(), 1, &ok, None, null_mut());
        assert_err(s, autoglm_status::InvalidArgument, &["`callback` is NULL"]);
        let s = autoglm_request_next(null_mut(), &mut null());
        assert_err(s, autoglm_status::InvalidArgument, &["`request` is NULL"]);
        let s = autoglm_request_cancel(null_mut());
        assert_err(s, autoglm_status::InvalidArgument, &["`request` is NULL"]);
        let mut len = 7;
        let s = autoglm_engine_max_model_len(null(), &mut len);
        assert_err(s, autoglm_status::InvalidArgument, &["`engine` is NULL"]);
        assert_eq!(len, 0);
        // Every _free accepts NULL.
        autoglm_engine_free(null_mut());
        autoglm_tokenizer_free(null_mut());
        autoglm_request_free(null_mut());
        autoglm_string_free(null_mut());
        autoglm_token_ids_free(null_mut());
    }
}
