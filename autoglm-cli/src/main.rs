//! The `autoglm` binary: see the library's documentation, or `autoglm --help`.

fn main() -> std::process::ExitCode {
    let status = autoglm_cli::run(std::env::args_os());
    std::process::ExitCode::from(u8::try_from(status).unwrap_or(1))
}
