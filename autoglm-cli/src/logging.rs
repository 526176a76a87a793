//! The command's log subscriber: `RUST_LOG` when set, else `--log-level`; text or one JSON object
//! per line, to stderr.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// One human-readable line per record.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// The filter: `RUST_LOG` if set, else `level` for autoglm's own records and `warn` for the
/// libraries'. A malformed directive is an error naming it.
pub fn filter(level: Option<&str>) -> Result<EnvFilter, String> {
    filter_from(std::env::var("RUST_LOG").ok().as_deref(), level)
}

fn filter_from(rust_log: Option<&str>, level: Option<&str>) -> Result<EnvFilter, String> {
    if let Some(v) = rust_log {
        if !v.trim().is_empty() {
            return EnvFilter::try_new(v).map_err(|e| format!("RUST_LOG={v:?}: {e}"));
        }
    }
    let level = level.unwrap_or("info");
    let directives = if level.contains('=') || level.contains(',') {
        level.to_string()
    } else {
        match level {
            "trace" | "debug" | "info" | "warn" | "error" | "off" => {
                format!("warn,autoglm={level},autoglm_core={level},autoglm_cli={level}")
            }
            other => {
                return Err(format!(
                    "--log-level {other:?}: expected trace, debug, info, warn, error, off or \
                     directives such as autoglm=debug"
                ))
            }
        }
    };
    EnvFilter::try_new(&directives).map_err(|e| format!("--log-level {level:?}: {e}"))
}

/// Installs the process's subscriber. A subscriber installed before (by a host) is kept.
pub fn init(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    let filter = filter(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .try_init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives() {
        let f = filter_from(None, Some("debug")).unwrap().to_string();
        assert!(
            f.contains("autoglm_core=debug") && f.contains("warn"),
            "{f}"
        );
        assert!(filter_from(None, Some("autoglm_core::engine=trace")).is_ok());
        let e = filter_from(None, Some("loud")).unwrap_err();
        assert!(e.contains("--log-level \"loud\""), "{e}");
        // RUST_LOG wins over the flag.
        let f = filter_from(Some("autoglm_core=trace"), Some("error"))
            .unwrap()
            .to_string();
        assert!(
            f.contains("autoglm_core=trace") && !f.contains("error"),
            "{f}"
        );
    }
}
