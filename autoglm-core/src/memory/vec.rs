//! [`HostVec`]: a growable vector in a pool buffer.

use std::fmt;
use std::ops::{Deref, DerefMut};

use bytemuck::Pod;

use super::{PinnedBuf, PinnedPool};
use crate::error::Result;

/// A `Vec`-like vector of plain-old-data values in host memory: in a [`PinnedBuf`] when made by
/// [`HostVec::with_capacity_in`], on the heap otherwise (`new`, `From<Vec<T>>`, `collect`,
/// `clone`).
///
/// Pushing within the capacity never allocates. Growing past it moves the values to a larger
/// buffer from the same pool, or to the heap when the pool refuses (over its limit, or dropped).
/// Derefs to `[T]`.
pub struct HostVec<T: Pod> {
    inner: Inner<T>,
}

enum Inner<T> {
    Heap(Vec<T>),
    /// `buf.len()` is a whole size class; `len` values of it are in use.
    Pinned {
        buf: PinnedBuf,
        len: usize,
    },
}

impl<T: Pod> HostVec<T> {
    const SIZE: usize = {
        assert!(
            std::mem::size_of::<T>() > 0,
            "zero-sized values need no buffer"
        );
        std::mem::size_of::<T>()
    };

    /// An empty vector on the heap (allocates nothing until pushed to).
    pub fn new() -> Self {
        HostVec {
            inner: Inner::Heap(Vec::new()),
        }
    }

    /// An empty vector in a buffer from `pool` with room for at least `capacity` values (the
    /// buffer's whole size class is used).
    pub fn with_capacity_in(pool: &PinnedPool, capacity: usize) -> Result<Self> {
        let bytes = capacity.saturating_mul(Self::SIZE);
        let class = pool.class_size(bytes).unwrap_or(bytes);
        Ok(HostVec {
            inner: Inner::Pinned {
                buf: pool.take(class)?,
                len: 0,
            },
        })
    }

    /// Values in the vector.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Heap(v) => v.len(),
            Inner::Pinned { len, .. } => *len,
        }
    }

    /// Whether the vector is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values the vector holds without growing.
    pub fn capacity(&self) -> usize {
        match &self.inner {
            Inner::Heap(v) => v.capacity(),
            Inner::Pinned { buf, .. } => buf.len() / Self::SIZE,
        }
    }

    /// Whether the values live in a pinned pool buffer.
    pub fn is_pinned(&self) -> bool {
        matches!(self.inner, Inner::Pinned { .. })
    }

    /// Removes every value, keeping the capacity.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps the first `len` values.
    pub fn truncate(&mut self, new_len: usize) {
        match &mut self.inner {
            Inner::Heap(v) => v.truncate(new_len),
            Inner::Pinned { len, .. } => *len = new_len.min(*len),
        }
    }

    /// Appends a value.
    pub fn push(&mut self, value: T) {
        self.extend_from_slice(std::slice::from_ref(&value));
    }

    /// Appends values.
    pub fn extend_from_slice(&mut self, values: &[T]) {
        self.reserve(values.len());
        match &mut self.inner {
            Inner::Heap(v) => v.extend_from_slice(values),
            Inner::Pinned { buf, len } => {
                let end = *len + values.len();
                buf.as_mut_slice_of::<T>()[*len..end].copy_from_slice(values);
                *len = end;
            }
        }
    }

    /// Truncates or pads with `value` to `new_len` values.
    pub fn resize(&mut self, new_len: usize, value: T) {
        let old = self.len();
        if new_len <= old {
            return self.truncate(new_len);
        }
        self.reserve(new_len - old);
        match &mut self.inner {
            Inner::Heap(v) => v.resize(new_len, value),
            Inner::Pinned { buf, len } => {
                buf.as_mut_slice_of::<T>()[old..new_len].fill(value);
                *len = new_len;
            }
        }
    }

    /// Makes room for `additional` more values.
    pub fn reserve(&mut self, additional: usize) {
        let need = self.len() + additional;
        let grown = match &mut self.inner {
            Inner::Heap(v) => return v.reserve(additional),
            Inner::Pinned { buf, .. } if need <= buf.len() / Self::SIZE => return,
            Inner::Pinned { buf, len } => {
                let values = &buf.as_slice_of::<T>()[..*len];
                let want = need.max(2 * *len).saturating_mul(Self::SIZE);
                match buf.take_from_same_pool(want) {
                    Ok(mut bigger) => {
                        bigger.as_mut_slice_of::<T>()[..values.len()].copy_from_slice(values);
                        Inner::Pinned {
                            len: values.len(),
                            buf: bigger,
                        }
                    }
                    Err(_) => {
                        let mut v = Vec::with_capacity(need);
                        v.extend_from_slice(values);
                        Inner::Heap(v)
                    }
                }
            }
        };
        self.inner = grown;
    }

    /// The values.
    pub fn as_slice(&self) -> &[T] {
        match &self.inner {
            Inner::Heap(v) => v,
            Inner::Pinned { buf, len } => &buf.as_slice_of::<T>()[..*len],
        }
    }

    /// The values, writable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        match &mut self.inner {
            Inner::Heap(v) => v,
            Inner::Pinned { buf, len } => &mut buf.as_mut_slice_of::<T>()[..*len],
        }
    }
}

impl<T: Pod> Deref for HostVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Pod> DerefMut for HostVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

impl<T: Pod> AsRef<[T]> for HostVec<T> {
    fn as_ref(&self) -> &[T] {
        self
    }
}

impl<'a, T: Pod> IntoIterator for &'a HostVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Pod> Default for HostVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Pod> Clone for HostVec<T> {
    /// A copy on the heap.
    fn clone(&self) -> Self {
        self.as_slice().to_vec().into()
    }
}

impl<T: Pod + PartialEq> PartialEq for HostVec<T> {
    /// Same values, wherever they are stored.
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for HostVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl<T: Pod> From<Vec<T>> for HostVec<T> {
    fn from(v: Vec<T>) -> Self {
        HostVec {
            inner: Inner::Heap(v),
        }
    }
}

impl<T: Pod> FromIterator<T> for HostVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<T>>().into()
    }
}

impl<T: Pod> Extend<T> for HostVec<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for v in iter {
            self.push(v);
        }
    }
}
