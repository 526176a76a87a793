//! The `autoglm` command: `autoglm serve` (the OpenAI-compatible server) and `autoglm generate`.
//!
//! One clap definition serves the `autoglm` binary (`cargo install --path autoglm-cli`) and
//! Python's `autoglm` console script (`pip install autoglm`), which calls [`run`] through the
//! extension module, so the two never drift. Flag names are vLLM's where they mean the same
//! (`--served-model-name`, `--max-model-len`, `--max-num-seqs`, `--gpu-memory-utilization`, ...);
//! every flag can also come from an `AUTOGLM_*` environment variable or a TOML `--config` file.
//!
//! ```text
//! autoglm serve zai-org/AutoGLM-Phone-9B --served-model-name autoglm-phone-9b --port 8000
//! autoglm serve --model glm4=/models/glm-4-9b-chat-hf --api-key sk-local --config serve.toml
//! autoglm generate --model tests/fixtures/glm4-tiny --chat "Hello" --max-tokens 16
//! ```

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod args;
pub mod argv;
mod generate;
pub mod logging;
mod serve;

pub use generate::GenerateArgs;
pub use logging::LogFormat;
pub use serve::ServeArgs;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "autoglm",
    about = "autoglm: inference for GLM-family models",
    version,
    args_override_self = true,
    propagate_version = true
)]
pub struct Cli {
    /// Log level of autoglm's records (trace, debug, info, warn, error, off) or filter directives
    /// (`autoglm_core::engine=debug`); RUST_LOG, when set, wins.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Log records as text lines or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve models over an OpenAI-compatible HTTP API until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Generate from one prompt (or a file of them) and print the result.
    Generate(Box<GenerateArgs>),
}

/// The clap command with the environment variables and parsing settings every flag gets.
pub fn command() -> clap::Command {
    argv::configure(Cli::command())
}

/// Parses `args` (the program name first) as the `autoglm` command; `Err` carries clap's own
/// error (help, version, bad usage) or a configuration error.
pub fn parse<I, T>(args: I) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let cmd = command();
    let args = argv::prepare(args.into_iter().map(Into::into).collect(), &cmd)
        .map_err(ParseError::Config)?;
    let matches = cmd.try_get_matches_from(args).map_err(ParseError::Clap)?;
    Cli::from_arg_matches(&matches).map_err(ParseError::Clap)
}

/// Why a command line did not parse.
#[derive(Debug)]
pub enum ParseError {
    /// Help, version or bad usage, as clap prints it.
    Clap(clap::Error),
    /// A `--config` file that cannot be used.
    Config(String),
}

/// Runs the `autoglm` command on `args` (the program name first) and returns its exit status: 0
/// after success (or a graceful stop), 1 for an error (a model that does not load, an address in
/// use, a bad option value), 2 for bad usage.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let cli = match parse(args) {
        Ok(c) => c,
        Err(ParseError::Clap(e)) => {
            let _ = e.print();
            return e.exit_code();
        }
        Err(ParseError::Config(e)) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if let Err(e) = logging::init(cli.log_level.as_deref(), cli.log_format) {
        eprintln!("error: {e}");
        return 2;
    }
    let result = match cli.command {
        Command::Serve(a) => serve::run(*a),
        Command::Generate(a) => generate::run(*a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
