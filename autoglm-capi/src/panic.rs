//! The panic boundary around every entry point, and the thread-local error message.
//!
//! Each `extern "C"` function runs its body through [`boundary`] (or one of its variants), which
//! catches a Rust panic with `catch_unwind` and turns it into `AUTOGLM_STATUS_INTERNAL` with the
//! panic message, so nothing ever unwinds into C (rustls-ffi's `ffi_panic_boundary`). The cost is
//! one `catch_unwind` per call, which is a few instructions on the non-panicking path.
//!
//! The message of the last failed call lives in a thread-local `CString`. A status-returning call
//! clears it on entry and sets it on failure, so `autoglm_last_error()` hands out a pointer that
//! stays valid until the next status-returning call on the same thread.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::status::{autoglm_status, CapiError};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs `f` for the C function `func`: clears the error message, catches panics, and on failure
/// records `"{func}: {message}"` and returns the error's status.
pub(crate) fn boundary(
    func: &'static str,
    f: impl FnOnce() -> Result<(), CapiError>,
) -> autoglm_status {
    set_last_error(None);
    let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_error(&*p)));
    match result {
        Ok(()) => autoglm_status::Ok,
        Err(e) => {
            set_last_error(Some(format!("{func}: {}", e.msg)));
            e.status
        }
    }
}

/// For functions that return nothing (the `_free` functions): the error message is left alone
/// unless `f` panics, in which case the panic is recorded there.
pub(crate) fn boundary_void(func: &'static str, f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        set_last_error(Some(format!("{func}: {}", panic_error(&*p).msg)));
    }
}

/// For functions that return a value and cannot fail (`_default()` initialisers): `fallback` if
/// `f` panics, which is recorded as for [`boundary_void`].
pub(crate) fn boundary_value<T>(func: &'static str, fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        set_last_error(Some(format!("{func}: {}", panic_error(&*p).msg)));
        fallback
    })
}

fn panic_error(payload: &(dyn Any + Send)) -> CapiError {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    CapiError::new(
        autoglm_status::Internal,
        format!("internal error (a Rust panic, caught at the C boundary): {what}"),
    )
}

fn set_last_error(msg: Option<String>) {
    let msg = msg.map_or_else(CString::default, |m| {
        // The message may quote user input with a NUL in it; never truncate silently.
        CString::new(m.replace('\0', "\\0")).unwrap_or_default()
    });
    // `try_with` fails only while the thread is being torn down; nothing can read it then.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = msg);
}

/// The message of the last failed call on this thread, or `""` when the last status-returning call
/// on this thread succeeded (or none was made). Never NULL.
///
/// Ownership: borrowed from the library; do not free it. It stays valid until the next call on
/// this thread of a function that returns `autoglm_status` (copy it to keep it). Functions that
/// return no status (`_free`, `_default`, `autoglm_status_str`, `autoglm_version`,
/// `autoglm_last_error` itself) do not change it.
///
/// Thread safety: each thread has its own message.
#[no_mangle]
pub extern "C" fn autoglm_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last_error() -> String {
        // SAFETY: autoglm_last_error returns a NUL-terminated string valid until the next
        // status-returning call on this thread; it is copied at once.
        unsafe { CStr::from_ptr(autoglm_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_internal_with_its_message() {
        let status = boundary("autoglm_test", || panic!("boom {}", 42));
        assert_eq!(status, autoglm_status::Internal);
        let msg = last_error();
        assert!(msg.starts_with("autoglm_test: internal error"), "{msg}");
        assert!(msg.contains("boom 42"), "{msg}");

        assert_eq!(boundary_value("autoglm_test", 7, || panic!("static")), 7);
        assert!(last_error().contains("static"));
    }

    #[test]
    fn success_clears_and_failure_sets_the_message() {
        let status = boundary("autoglm_test", || {
            Err(CapiError::invalid_argument("`x` is NULL\0!"))
        });
        assert_eq!(status, autoglm_status::InvalidArgument);
        assert_eq!(last_error(), "autoglm_test: `x` is NULL\\0!");
        boundary_void("autoglm_test_free", || {});
        assert_eq!(last_error(), "autoglm_test: `x` is NULL\\0!");
        assert_eq!(boundary("autoglm_test", || Ok(())), autoglm_status::Ok);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn messages_are_per_thread() {
        boundary("autoglm_test", || Err(CapiError::invalid_argument("main")));
        std::thread::spawn(|| assert_eq!(last_error(), ""))
            .join()
            .unwrap();
        assert!(last_error().ends_with("main"));
    }
}
