//! Response bodies and exact-size serialization.
//!
//! A body is either one buffer or a stream of buffers (SSE events). Every buffer is built once:
//! [`json_bytes`] measures the serialized size first (serde into a byte counter, no allocation),
//! allocates exactly that, serializes into it and hands the `Vec` to `Bytes` without copying
//! (`Bytes::from(Vec)` with `len == capacity` takes the allocation as is; a spare capacity would
//! cost a second allocation for the shared header). hyper then writes the `Bytes` with a vectored
//! write next to its chunk header, so an SSE event is one allocation and no copy after it is built.

use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Frame, SizeHint};
use serde::Serialize;

/// A response body: one buffer, or a stream of buffers.
pub enum Body {
    /// A complete body (taken on the first poll).
    Full(Option<Bytes>),
    /// Buffers as they are produced; ends when the stream does.
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Full(b) => write!(f, "Body::Full({} bytes)", b.as_ref().map_or(0, |b| b.len())),
            Body::Stream(_) => f.write_str("Body::Stream"),
        }
    }
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Body::Full(None)
    }

    /// A streamed body.
    pub fn stream(s: impl Stream<Item = Bytes> + Send + 'static) -> Self {
        Body::Stream(Box::pin(s))
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::Full(Some(b))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(s) => s
                .as_mut()
                .poll_next(cx)
                .map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// Counts bytes instead of storing them.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `prefix`, the JSON of `value`, `suffix`, in one allocation of exactly their size.
pub(crate) fn json_bytes<T: Serialize + ?Sized>(prefix: &[u8], value: &T, suffix: &[u8]) -> Bytes {
    let mut counter = Counter(0);
    // Serializing our own response types cannot fail (no maps with non-string keys).
    let _ = serde_json::to_writer(&mut counter, value);
    let len = prefix.len() + counter.0 + suffix.len();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(prefix);
    let _ = serde_json::to_writer(&mut buf, value);
    buf.extend_from_slice(suffix);
    debug_assert_eq!(buf.len(), buf.capacity());
    Bytes::from(buf)
}

/// One server-sent event carrying `value` as JSON: `data: {...}\n\n`.
pub(crate) fn sse_event<T: Serialize + ?Sized>(value: &T) -> Bytes {
    json_bytes(b"data: ", value, b"\n\n")
}

/// Appends one server-sent event carrying `value` as JSON: `data: {...}\n\n`.
pub(crate) fn push_sse_event<T: Serialize + ?Sized>(out: &mut BytesMut, value: &T) {
    out.put_slice(b"data: ");
    // Serializing our own response types cannot fail (no maps with non-string keys).
    let _ = serde_json::to_writer(out.writer(), value);
    out.put_slice(b"\n\n");
}

/// Length of `s` as a JSON string literal, quotes included (escaping as serde_json does).
pub(crate) fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Appends `s` as a JSON string literal (the bytes [`json_str_len`] counted).
pub(crate) fn push_json_str(out: &mut impl BufMut, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put_u8(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.put_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.put_slice(b"\\u00");
            out.put_u8(HEX[(b >> 4) as usize]);
            out.put_u8(HEX[(b & 0xf) as usize]);
        } else {
            out.put_slice(esc);
        }
        start = i + 1;
    }
    out.put_slice(&bytes[start..]);
    out.put_u8(b'"');
}

/// Decimal digits of `n`.
pub(crate) fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Appends `n` in decimal (what `write!(buf, "{n}")` gives, without the formatting machinery).
pub(crate) fn push_decimal(buf: &mut impl BufMut, mut n: usize) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&tmp[i..]);
}

/// The last event of every stream.
pub(crate) const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// A JSON response.
pub(crate) fn json_response<T: Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Response<Body> {
    let mut r = Response::new(Body::from(json_bytes(b"", value, b"")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A plain-text response.
pub(crate) fn text_response(
    status: StatusCode,
    content_type: &'static str,
    text: String,
) -> Response<Body> {
    let mut r = Response::new(Body::from(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// An SSE response around a stream of events.
pub(crate) fn sse_response(events: impl Stream<Item = Bytes> + Send + 'static) -> Response<Body> {
    let mut r = Response::new(Body::stream(events));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_match_serde() {
        for s in [
            "",
            "plain",
            "q\"b\\s",
            "\n\r\t\u{8}\u{c}\u{1}\u{1f}",
            "多字节 \u{1F600}",
            "a\u{7f}b</",
        ] {
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
            assert_eq!(json_str_len(s), out.len());
        }
        for n in [0, 9, 10, 99, 100, 12345, usize::MAX] {
            assert_eq!(digits(n), n.to_string().len());
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn sse_event_is_exact_and_framed() {
        let b = sse_event(&serde_json::json!({"text": "a\"b\u{1F600}"}));
        assert_eq!(
            &b[..],
            "data: {\"text\":\"a\\\"b\u{1F600}\"}\n\n".as_bytes()
        );
    }
}
