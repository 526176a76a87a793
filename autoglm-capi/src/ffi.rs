//! Every conversion between C pointers and Rust values happens here (rustls-ffi's `ffi.rs`).
//!
//! Arguments come in as raw pointers; the functions below check them (NULL, alignment, UTF-8)
//! and hand out references whose lifetime the calling entry point chooses, which is never longer
//! than the call. Errors name the C parameter. Results that C owns (strings, id arrays) are
//! allocated with `malloc`, so that the matching `_free` needs no length and a C caller never
//! frees Rust-allocator memory by mistake; handles are `Box`es.

use std::ffi::{c_char, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::status::{autoglm_status, CapiError};

fn null(name: &str) -> CapiError {
    CapiError::invalid_argument(format!("`{name}` is NULL"))
}

fn misaligned(name: &str) -> CapiError {
    CapiError::invalid_argument(format!("`{name}` is not aligned for its type"))
}

/// A required NUL-terminated UTF-8 string.
///
/// # Safety
///
/// `p` is NULL or points to a NUL-terminated string that stays unchanged for `'a`.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, CapiError> {
    if p.is_null() {
        return Err(null(name));
    }
    // SAFETY: non-NULL, and NUL-terminated and live for 'a by this function's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| {
        CapiError::invalid_argument(format!(
            "`{name}` is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}

/// An optional NUL-terminated UTF-8 string: NULL is `None`.
///
/// # Safety
///
/// As [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(
    p: *const c_char,
    name: &str,
) -> Result<Option<&'a str>, CapiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { str_arg(p, name) }.map(Some)
}

/// A pointer/length array; NULL is accepted only with length 0.
///
/// # Safety
///
/// `p` is NULL or points to `len` initialised `T`s that stay unchanged for `'a`.
pub(crate) unsafe fn slice_arg<'a, T>(
    p: *const T,
    len: usize,
    name: &str,
) -> Result<&'a [T], CapiError> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(CapiError::invalid_argument(format!(
            "`{name}` is NULL but its length is {len}"
        )));
    }
    if !p.is_aligned() {
        return Err(misaligned(name));
    }
    if len
        .checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(CapiError::invalid_argument(format!(
            "`{name}` has an impossible length {len}"
        )));
    }
    // SAFETY: non-NULL, aligned, `len` elements readable and unchanged for 'a by contract; the
    // byte size fits in isize (checked above).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A required pointer to one value (a handle or a struct).
///
/// # Safety
///
/// `p` is NULL or points to a valid `T` that is not mutated for `'a`.
pub(crate) unsafe fn ref_arg<'a, T>(p: *const T, name: &str) -> Result<&'a T, CapiError> {
    if p.is_null() {
        return Err(null(name));
    }
    if !p.is_aligned() {
        return Err(misaligned(name));
    }
    // SAFETY: non-NULL, aligned, valid and unaliased by writers for 'a by contract.
    Ok(unsafe { &*p })
}

/// An options struct C fills, whose first field is `size_t struct_size`: the size of the layout
/// the caller was compiled against, set by the struct's `_default()` initialiser. Fields are only
/// ever appended, so a caller built against an older header passes a smaller size and the
/// library reads only the fields that size covers; the rest keep their defaults. A size larger
/// than the library's (a newer caller) is read up to the fields this library knows.
pub(crate) trait SizedStruct: Copy {
    /// The initialiser C calls, named in errors.
    const INIT: &'static str;
    /// The values of the fields a caller's size does not cover.
    fn defaults() -> Self;
    /// Where each field ends (offset plus size), in declaration order.
    fn field_ends() -> Vec<usize>;
    /// The smallest size accepted: the end of the last field of the first published layout.
    fn min_size() -> usize;
}

/// The size of field `f` of a `T` (for [`SizedStruct::field_ends`]).
pub(crate) fn field_size<T, F>(_f: impl Fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// An optional pointer to a [`SizedStruct`], read as far as its `struct_size` says: NULL is
/// `None`; a size of zero or below [`SizedStruct::min_size`] is `AUTOGLM_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `p` is NULL or points to at least `struct_size` readable bytes that begin with that
/// `size_t`, laid out as the first `struct_size` bytes of a `T`, unchanged during the call.
pub(crate) unsafe fn opt_sized_arg<T: SizedStruct>(
    p: *const T,
    name: &str,
) -> Result<Option<T>, CapiError> {
    if p.is_null() {
        return Ok(None);
    }
    if !p.is_aligned() {
        return Err(misaligned(name));
    }
    // SAFETY: non-NULL and aligned; by contract its first field is a `size_t`.
    let size = unsafe { p.cast::<usize>().read() };
    let min = T::min_size();
    if size < min {
        return Err(CapiError::invalid_argument(format!(
            "`{name}->struct_size` is {size} (at least {min}): initialise it with {}",
            T::INIT
        )));
    }
    let covered = if size >= std::mem::size_of::<T>() {
        std::mem::size_of::<T>()
    } else {
        T::field_ends()
            .into_iter()
            .take_while(|&end| end <= size)
            .last()
            .unwrap_or(0)
    };
    let mut v = T::defaults();
    // SAFETY: the caller's `size` bytes are readable by contract and `covered <= size`; the
    // destination is a whole `T` and `covered <= size_of::<T>()`. The bytes copied are whole
    // fields of the same `repr(C)` layout, each valid for its type by contract.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut v as *mut T).cast::<u8>(), covered);
    }
    Ok(Some(v))
}

/// A required pointer to a value this call may mutate (a non-thread-safe handle).
///
/// # Safety
///
/// `p` is NULL or points to a valid `T` that nothing else reads or writes for `'a`.
pub(crate) unsafe fn mut_arg<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, CapiError> {
    if p.is_null() {
        return Err(null(name));
    }
    if !p.is_aligned() {
        return Err(misaligned(name));
    }
    // SAFETY: non-NULL, aligned, valid and exclusively ours for 'a by contract.
    Ok(unsafe { &mut *p })
}

/// An output parameter: a place the call writes one `T` to, without reading or dropping what
/// was there (it may be uninitialised).
pub(crate) struct Out<'a, T> {
    ptr: NonNull<T>,
    _call: PhantomData<&'a mut T>,
}

impl<T> Out<'_, T> {
    /// Stores `v`, forgetting whatever the place held.
    pub(crate) fn write(&mut self, v: T) {
        // SAFETY: `ptr` is non-NULL, aligned and writable for the call ('a), as checked and
        // promised when this `Out` was made by `out_arg`.
        unsafe { self.ptr.as_ptr().write(v) }
    }
}

/// A required output parameter.
///
/// # Safety
///
/// `p` is NULL or points to memory writable as a `T` for `'a` (it need not be initialised).
pub(crate) unsafe fn out_arg<'a, T>(p: *mut T, name: &str) -> Result<Out<'a, T>, CapiError> {
    let ptr = NonNull::new(p).ok_or_else(|| null(name))?;
    if !p.is_aligned() {
        return Err(misaligned(name));
    }
    Ok(Out {
        ptr,
        _call: PhantomData,
    })
}

/// An optional output parameter: NULL is `None`.
///
/// # Safety
///
/// As [`out_arg`].
pub(crate) unsafe fn opt_out_arg<'a, T>(
    p: *mut T,
    name: &str,
) -> Result<Option<Out<'a, T>>, CapiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { out_arg(p, name) }.map(Some)
}

/// Moves `v` to the heap and gives C the pointer; [`free_handle`] takes it back.
pub(crate) fn into_handle<T>(v: T) -> *mut T {
    Box::into_raw(Box::new(v))
}

/// Drops a handle made by [`into_handle`]; NULL is a no-op.
///
/// # Safety
///
/// `p` is NULL or came from `into_handle::<T>` and has not been freed, and no other call uses it.
pub(crate) unsafe fn free_handle<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: `p` came from Box::into_raw and is freed once, by contract.
        drop(unsafe { Box::from_raw(p) });
    }
}

fn out_of_memory(bytes: usize) -> CapiError {
    CapiError::new(
        autoglm_status::Internal,
        format!("out of memory allocating {bytes} bytes"),
    )
}

/// A `malloc`ed copy of `s` (never NULL, even when empty), released by [`malloc_free`].
pub(crate) fn malloc_slice<T: Copy>(s: &[T]) -> Result<*mut T, CapiError> {
    let bytes = size_of_val(s);
    // SAFETY: malloc with a non-zero size; the result is checked for NULL before use.
    let p = unsafe { libc::malloc(bytes.max(1)) }.cast::<T>();
    if p.is_null() {
        return Err(out_of_memory(bytes));
    }
    // SAFETY: `p` is a fresh allocation of `bytes` bytes, aligned for any C type (so for T, a
    // plain integer here), and cannot overlap `s`.
    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len()) };
    Ok(p)
}

/// A `malloc`ed NUL-terminated copy of `s`, released by [`malloc_free`]. A NUL inside `s` is
/// copied as is, so `strlen` stops there; callers that can see one say so.
pub(crate) fn malloc_str(s: &str) -> Result<*mut c_char, CapiError> {
    let bytes = s.len() + 1;
    // SAFETY: malloc with a non-zero size; the result is checked for NULL before use.
    let p = unsafe { libc::malloc(bytes) }.cast::<u8>();
    if p.is_null() {
        return Err(out_of_memory(bytes));
    }
    // SAFETY: `p` holds `s.len() + 1` bytes and does not overlap `s`; the last byte gets the NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
        p.add(s.len()).write(0);
    }
    Ok(p.cast())
}

/// Frees what [`malloc_slice`] or [`malloc_str`] returned; NULL is a no-op.
///
/// # Safety
///
/// `p` is NULL or an allocation from those functions that has not been freed.
pub(crate) unsafe fn malloc_free<T>(p: *mut T) {
    // SAFETY: `p` is NULL or came from libc::malloc and is freed once, by contract.
    unsafe { libc::free(p.cast()) }
}

/// A pointer C may read `s.len()` elements from while `s` lives; NULL when `s` is empty.
pub(crate) fn slice_ptr<T>(s: &[T]) -> *const T {
    if s.is_empty() {
        std::ptr::null()
    } else {
        s.as_ptr()
    }
}
