//! The committed `include/autoglm.h` must be what cbindgen generates from the current source.

use std::path::Path;

#[test]
fn committed_header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed on autoglm-capi/src")
        .write(&mut generated);
    let path = dir.join("include/autoglm.h");
    if std::env::var_os("AUTOGLM_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/autoglm.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    if committed != generated {
        let committed = String::from_utf8_lossy(&committed);
        let generated = String::from_utf8_lossy(&generated);
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "autoglm-capi/include/autoglm.h is stale (first difference at line {}).\n\
             Regenerate it with:\n    AUTOGLM_BLESS=1 cargo test -p autoglm-capi --test header\n\
             and commit the result.",
            first + 1
        );
    }
}
