//! ABI evolution through `struct_size`: a caller compiled against an older, smaller layout
//! keeps working (the fields it lacks take their defaults), and a size of zero or below the
//! first published layout is `AUTOGLM_STATUS_INVALID_ARGUMENT` naming `struct_size`.

mod common;

use std::ffi::c_char;
use std::ptr::null_mut;

use autoglm::*;
use common::*;

/// `autoglm_engine_options` as the first C API had it (7e4a811: up to `seed`, before the
/// multimodal strings were appended), with the size field every layout now begins with.
#[repr(C)]
#[derive(Clone, Copy)]
struct OldEngineOptions {
    struct_size: usize,
    device: *const c_char,
    block_size: u32,
    num_blocks: u32,
    kv_cache_mb: u64,
    enable_prefix_caching: bool,
    max_num_seqs: u32,
    max_num_batched_tokens: u32,
    max_model_len: u32,
    num_threads: u32,
    engine_core: i32,
    compute_cores: *const u32,
    num_compute_cores: usize,
    seed: u64,
}

#[test]
fn initialisers_set_the_size_of_the_layout() {
    assert_eq!(
        autoglm_engine_options_default().struct_size,
        size_of::<autoglm_engine_options>()
    );
    assert_eq!(
        autoglm_sampling_params_default().struct_size,
        size_of::<autoglm_sampling_params>()
    );
    assert!(size_of::<OldEngineOptions>() < size_of::<autoglm_engine_options>());
}

#[test]
fn an_older_smaller_layout_still_works() {
    let now = autoglm_engine_options_default();
    let old = OldEngineOptions {
        struct_size: size_of::<OldEngineOptions>(),
        device: c"cpu".as_ptr(),
        block_size: now.block_size,
        num_blocks: now.num_blocks,
        kv_cache_mb: 16,
        enable_prefix_caching: now.enable_prefix_caching,
        max_num_seqs: now.max_num_seqs,
        max_num_batched_tokens: now.max_num_batched_tokens,
        max_model_len: now.max_model_len,
        num_threads: 1,
        engine_core: now.engine_core,
        compute_cores: now.compute_cores,
        num_compute_cores: 0,
        seed: 7,
    };
    // Exactly the old size on the heap, so that reading past it would be a read out of bounds
    // (which Miri or valgrind would report) rather than of a neighbour on the stack.
    let boxed = Box::new(old);
    let dir = cstr(fixture("glm4-tiny").to_str().unwrap());
    let mut e = null_mut();
    // SAFETY: the options point to `struct_size` readable bytes laid out as the header's prefix.
    let s = unsafe {
        autoglm_engine_new(
            dir.as_ptr(),
            (&*boxed as *const OldEngineOptions).cast(),
            &mut e,
        )
    };
    assert_eq!(s, autoglm_status::Ok, "{}", last_error());
    let engine = Engine(e);
    let case = &expected("glm4-tiny")["cases"][0];
    let (prompt, want) = (
        ids(&case["prompt_token_ids"]),
        ids(&case["greedy_token_ids"]),
    );
    let (got, _) = generate(&engine, &prompt, &greedy(want.len() as u32));
    assert_eq!(got, want);
}

#[test]
fn a_size_of_zero_or_below_the_first_layout_is_refused() {
    let dir = cstr(fixture("glm4-tiny").to_str().unwrap());
    for size in [0, 1, size_of::<usize>(), size_of::<OldEngineOptions>() - 8] {
        let mut o = autoglm_engine_options_default();
        o.struct_size = size;
        let mut e = std::ptr::dangling_mut::<autoglm_engine>();
        // SAFETY: valid pointers; the options are whole.
        let s = unsafe { autoglm_engine_new(dir.as_ptr(), &o, &mut e) };
        assert_err(
            s,
            autoglm_status::InvalidArgument,
            &["`options->struct_size`", "autoglm_engine_options_default()"],
        );
        assert!(e.is_null());
    }
    let engine = Engine::new("glm4-tiny");
    let mut p = greedy(2);
    p.struct_size = 0;
    let mut text = null_mut();
    // SAFETY: valid pointers.
    let s = unsafe {
        autoglm_engine_generate(
            engine.0,
            [277u32].as_ptr(),
            1,
            &p,
            &mut text,
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &[
            "`params->struct_size` is 0",
            "autoglm_sampling_params_default()",
        ],
    );
    assert!(text.is_null());
}

#[test]
fn a_larger_size_from_a_newer_caller_reads_the_known_fields() {
    #[repr(C)]
    struct Newer {
        known: autoglm_sampling_params,
        appended: u64,
    }
    let engine = Engine::new("glm4-tiny");
    let mut p = Newer {
        known: greedy(3),
        appended: u64::MAX,
    };
    p.known.struct_size = size_of::<Newer>();
    let (got, _) = generate(&engine, &[277], &p.known);
    assert_eq!(got.len(), 3);
}
