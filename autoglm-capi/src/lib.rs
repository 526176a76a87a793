//! C ABI for autoglm (see its own issue).
