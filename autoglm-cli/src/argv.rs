//! The command line before clap sees it, and what clap is told besides the derive: vLLM's
//! `--flag_name` spelling, the values of `--config FILE` (TOML), and an `AUTOGLM_*` environment
//! variable for every flag. Precedence, highest first: the command line, the environment, the
//! file, the defaults.

use std::collections::HashSet;
use std::ffi::OsString;

use clap::Command;

/// The environment variable of a flag: `AUTOGLM_` and its id upper-cased (`--max-num-seqs`:
/// `AUTOGLM_MAX_NUM_SEQS`).
pub fn env_name(id: &str) -> String {
    format!("AUTOGLM_{}", id.replace('-', "_").to_ascii_uppercase())
}

/// Gives every flag of `cmd` and its subcommands an `AUTOGLM_*` variable, and lets values that
/// look like negative numbers be values (`--presence-penalty -0.5`).
pub fn configure(cmd: Command) -> Command {
    let cmd = cmd.args_override_self(true).mut_args(|a| {
        if a.get_long().is_none() || matches!(a.get_id().as_str(), "help" | "version") {
            return a;
        }
        let takes_value = a.get_action().takes_values();
        let name = env_name(a.get_id().as_str());
        let a = a.env(name);
        if takes_value {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    });
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    names
        .into_iter()
        .fold(cmd, |cmd, name| cmd.mut_subcommand(name, configure))
}

/// `argv` with vLLM's underscore spellings (`--max_model_len`) turned into flag names, and the
/// values of `--config FILE` (or `$AUTOGLM_CONFIG`) inserted after the subcommand, except those
/// the command line or the environment sets.
pub fn prepare(argv: Vec<OsString>, cmd: &Command) -> Result<Vec<OsString>, String> {
    let mut args: Vec<OsString> = Vec::with_capacity(argv.len());
    let mut after_dashes = false;
    for a in argv {
        match a.to_str() {
            Some("--") => {
                after_dashes = true;
                args.push(a);
            }
            Some(s) if !after_dashes && s.starts_with("--") && s.contains('_') => {
                let (flag, value) = match s.split_once('=') {
                    Some((f, v)) => (f, Some(v)),
                    None => (s, None),
                };
                let mut out = flag.replace('_', "-");
                if let Some(v) = value {
                    out.push('=');
                    out.push_str(v);
                }
                args.push(out.into());
            }
            _ => args.push(a),
        }
    }
    let mut config = std::env::var_os("AUTOGLM_CONFIG").map(|v| v.to_string_lossy().into_owned());
    let mut given = HashSet::new();
    for (i, a) in args.iter().enumerate() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if let Some(flag) = s.strip_prefix("--") {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            if name == "config" {
                config =
                    value.or_else(|| args.get(i + 1).and_then(|v| v.to_str()).map(str::to_string));
            }
            given.insert(name.to_string());
        }
    }
    let Some(path) = config else {
        return Ok(args);
    };
    // The file's flags go right after the subcommand they belong to.
    let Some((at, sub)) = args.iter().enumerate().skip(1).find_map(|(i, a)| {
        let name = a.to_str()?;
        cmd.find_subcommand(name).map(|s| (i, s))
    }) else {
        return Err(format!(
            "--config {path}: give a command (serve, generate) before it"
        ));
    };
    let known: HashSet<String> = sub
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .chain(
            cmd.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string)),
        )
        .collect();
    let from_file = config_args(&path, &known, &given)?;
    let rest = args.split_off(at + 1);
    args.extend(from_file.into_iter().map(OsString::from));
    args.extend(rest);
    Ok(args)
}

/// A TOML table of flag values as command-line arguments: keys are flag names (`port = 8000`,
/// `api-key = ["a", "b"]`, `reuse-port = true`, `limit-mm-per-prompt = { image = 10 }`). Keys the
/// command line (`given`) or the environment sets are left out; a key that is no flag is an error
/// naming the file and the key.
fn config_args(
    path: &str,
    known: &HashSet<String>,
    given: &HashSet<String>,
) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {path}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        if name == "config" || !known.contains(&name) {
            return Err(format!(
                "{path}: `{key}` is not a flag of this command (see --help)"
            ));
        }
        if given.contains(&name) || std::env::var_os(env_name(&name)).is_some() {
            continue;
        }
        let flag = format!("--{name}");
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                // `limit-mm-per-prompt = { image = 10 }`: the JSON the flag takes.
                toml::Value::Table(t) => serde_json::to_string(t).map_err(|e| e.to_string()),
                _ => Err(format!(
                    "{path}: `{key}` must be a string, a number, a table or a list of them"
                )),
            }
        };
        match &value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for v in items {
                    out.push(flag.clone());
                    out.push(scalar(v)?);
                }
            }
            v => {
                out.push(format!("{flag}={}", scalar(v)?));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        configure(
            Command::new("autoglm").subcommand(
                Command::new("serve")
                    .arg(Arg::new("port").long("port"))
                    .arg(Arg::new("max_model_len").long("max-model-len"))
                    .arg(
                        Arg::new("api_key")
                            .long("api-key")
                            .action(ArgAction::Append),
                    )
                    .arg(
                        Arg::new("reuse_port")
                            .long("reuse-port")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(Arg::new("config").long("config")),
            ),
        )
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn underscores_become_dashes_in_flag_names_only() {
        let argv = [
            "autoglm",
            "serve",
            "--max_model_len",
            "25480",
            "--port=8_0",
            "x_y",
        ]
        .map(OsString::from)
        .to_vec();
        let out = strings(prepare(argv, &cmd()).unwrap());
        assert_eq!(
            out,
            [
                "autoglm",
                "serve",
                "--max-model-len",
                "25480",
                "--port=8_0",
                "x_y"
            ]
        );
    }

    #[test]
    fn config_values_go_after_the_command_and_yield_to_the_command_line() {
        let dir = std::env::temp_dir().join(format!("autoglm-cli-argv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("serve.toml");
        std::fs::write(
            &file,
            "port = 9000\nmax_model_len = 512\napi-key = [\"a\", \"b\"]\nreuse-port = true\n",
        )
        .unwrap();
        let argv: Vec<OsString> = vec![
            "autoglm".into(),
            "serve".into(),
            "--config".into(),
            file.clone().into(),
            "--port".into(),
            "1234".into(),
        ];
        let out = strings(prepare(argv, &cmd()).unwrap());
        assert_eq!(&out[..2], ["autoglm", "serve"]);
        assert!(!out.contains(&"--port=9000".to_string()), "{out:?}");
        assert!(out.contains(&"--max-model-len=512".to_string()), "{out:?}");
        assert!(out.contains(&"--reuse-port".to_string()), "{out:?}");
        assert_eq!(out.iter().filter(|a| *a == "--api-key").count(), 2);
        let m = cmd().try_get_matches_from(&out).unwrap();
        let (_, s) = m.subcommand().unwrap();
        assert_eq!(s.get_one::<String>("port").unwrap(), "1234");

        std::fs::write(&file, "prot = 1\n").unwrap();
        let argv: Vec<OsString> = vec![
            "autoglm".into(),
            "serve".into(),
            format!("--config={}", file.display()).into(),
        ];
        let e = prepare(argv, &cmd()).unwrap_err();
        assert!(e.contains("`prot` is not a flag"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn negative_numbers_are_values() {
        let m = cmd()
            .try_get_matches_from(["autoglm", "serve", "--port", "-5"])
            .unwrap();
        let (_, s) = m.subcommand().unwrap();
        assert_eq!(s.get_one::<String>("port").unwrap(), "-5");
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let c = cmd();
        let serve = c.find_subcommand("serve").unwrap();
        let port = serve
            .get_arguments()
            .find(|a| a.get_id() == "port")
            .unwrap();
        assert_eq!(port.get_env().unwrap(), "AUTOGLM_PORT");
    }
}
