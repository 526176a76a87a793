//! Python bindings for autoglm (see its own issue).
