//! The `autoglm` binary as a user runs it: vLLM's command lines, the environment and `--config`,
//! pointed errors, addresses in use, Hugging Face cache ids, generation_config.json defaults and
//! the log formats. Real processes, real sockets on loopback, the bundled fixtures.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_autoglm"));
    c.env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTOGLM_") {
            c.env_remove(k);
        }
    }
    c
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("autoglm-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run autoglm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running `autoglm serve`; killed when dropped.
struct Served {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Served {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Served {
        let mut c = bin();
        c.arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
            .args(["--shutdown-drain-delay", "0", "--no-pin"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("start autoglm serve");
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Served {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The first line containing `needle` (within 120 s), or a panic with the log.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("no line with {needle:?}; stderr:\n{}", self.log.join("\n"));
    }

    /// The port of the "listening on http://127.0.0.1:PORT" line.
    fn port(&mut self) -> u16 {
        let line = self.expect("listening on http://127.0.0.1:");
        let tail = line.split("listening on http://127.0.0.1:").nth(1).unwrap();
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    }

    /// SIGTERM, then the exit status (within 30 s).
    fn stop(mut self) -> i32 {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// One HTTP/1.1 request on a fresh connection, with `extra` header lines (each ending in
/// `\r\n`); (status, head, body as sent, chunks not joined).
fn raw_http(port: u16, method: &str, path: &str, extra: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text[9..12].parse().unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    (status, head.to_string(), rest.to_string())
}

/// [`raw_http`] with a JSON body and answer; (status, JSON body).
fn http_with(
    port: u16,
    method: &str,
    path: &str,
    extra: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, head, rest) = raw_http(port, method, path, extra, &body);
    let json = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // One chunk is all a small JSON answer takes.
        let (_, chunk) = rest.split_once("\r\n").unwrap();
        serde_json::from_str(
            chunk
                .rsplit_once("\r\n0\r\n")
                .map_or(chunk, |(c, _)| c)
                .trim(),
        )
        .unwrap()
    } else {
        serde_json::from_str(&rest).unwrap_or(Value::Null)
    };
    (status, json)
}

/// [`http_with`] without extra headers.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    http_with(port, method, path, "", body)
}

/// A JSON list of token ids.
fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn greedy_case() -> (Vec<u64>, Vec<u64>) {
    let text = std::fs::read_to_string(fixture("glm4-tiny/expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let c = &v["cases"][0];
    (ids(&c["prompt_token_ids"]), ids(&c["greedy_token_ids"]))
}

/// Open-AutoGLM's recommended vLLM command line, with `autoglm serve` for
/// `python3 -m vllm.entrypoints.openai.api_server`, serves the Glm4v fixture.
#[test]
fn open_autoglms_vllm_command_line_serves() {
    let model = fixture("glm4v-tiny");
    let mut s = Served::start(
        &[
            "--served-model-name",
            "autoglm-phone-9b",
            "--allowed-local-media-path",
            "/",
            "--mm-encoder-tp-mode",
            "data",
            "--mm_processor_cache_type",
            "shm",
            "--mm_processor_kwargs",
            "{\"max_pixels\":5000000}",
            "--max-model-len",
            "2048",
            "--chat-template-content-format",
            "string",
            "--limit-mm-per-prompt",
            "{\"image\":10}",
            "--model",
            model.to_str().unwrap(),
            "--trust-remote-code",
        ],
        &[],
    );
    let port = s.port();
    let (status, models) = http(port, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    assert_eq!(models["data"][0]["id"], "autoglm-phone-9b");
    assert_eq!(s.stop(), 0);
}

/// `vllm serve MODEL` puts the model first; flags come from the environment and a TOML file too,
/// the command line winning over both and the environment over the file.
#[test]
fn positional_model_environment_and_config_file() {
    let (prompt, greedy) = greedy_case();
    let dir = tmp("config");
    let cfg = dir.join("serve.toml");
    std::fs::write(
        &cfg,
        "served_model_name = \"from-file\"\nmax-num-seqs = 4\napi-key = [\"sk-file\"]\n",
    )
    .unwrap();
    let model = fixture("glm4-tiny");
    let mut s = Served::start(
        &[
            model.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--api-key",
            "sk-cli",
            "--metrics-public",
        ],
        &[("AUTOGLM_SERVED_MODEL_NAME", "from-env")],
    );
    let port = s.port();
    // The command line's key replaced the file's: without a key the API is refused, but
    // /metrics is public.
    let (status, _) = http(port, "GET", "/v1/models", None);
    assert_eq!(status, 401);
    let (status, _, metrics) = raw_http(port, "GET", "/metrics", "", "");
    assert!(status == 200 && metrics.contains("autoglm_"), "{metrics}");
    let body = serde_json::json!({"model": "from-env", "prompt": prompt, "max_tokens": greedy.len(),
        "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let auth = "authorization: Bearer sk-cli\r\n";
    let (status, json) = http_with(port, "POST", "/v1/completions", auth, Some(&body));
    assert_eq!(status, 200, "{json}");
    let got = ids(&json["choices"][0]["token_ids"]);
    assert_eq!(got, greedy);
    assert_eq!(s.stop(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A port another socket listens on fails at once, before any model loads, and the first keeps
/// its port; so does a Unix socket a live server accepts on.
#[test]
fn a_taken_port_or_socket_fails_before_loading() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let t0 = Instant::now();
    let out = run(bin().args(["serve", "--device", "cpu", "--port", &port]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("another process listens there"),
        "{e}"
    );
    assert!(!e.contains("loaded"), "it loaded a model first: {e}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(busy.local_addr().is_ok());

    let dir = tmp("uds");
    let sock = dir.join("autoglm.sock");
    let mut first = Served::start(&["--uds", sock.to_str().unwrap()], &[]);
    first.port();
    let out = run(bin().args([
        "serve",
        "--device",
        "cpu",
        "--no-tcp",
        "--uds",
        sock.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("a live server accepts on this socket"),
        "{}",
        stderr(&out)
    );
    assert!(
        sock.exists(),
        "the second server removed the first one's socket"
    );
    assert_eq!(first.stop(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// vLLM flags that mean something autoglm does not build, and common mistakes, are pointed errors.
#[test]
fn pointed_errors() {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--tensor-parallel-size".into(), "2".into()],
            "tensor parallelism is not built",
        ),
        (vec!["--dtype".into(), "float32".into()], "only `auto`"),
        (
            vec!["--generation-config".into(), "/no/such".into()],
            "generation_config",
        ),
        (
            vec!["--chat-template".into(), "nope.jinja".into()],
            "neither a file nor a Jinja template",
        ),
        (
            vec!["--log-level".into(), "loud".into()],
            "--log-level \"loud\"",
        ),
    ];
    for (args, want) in cases {
        let out = run(bin().arg("serve").args(&args));
        let e = stderr(&out);
        assert!(
            matches!(out.status.code(), Some(1) | Some(2)),
            "{args:?}: {e}"
        );
        assert!(e.contains(want), "{args:?}: want {want:?} in {e}");
    }
    // A GGUF file, a config.json instead of its directory, a ChatGLMModel checkpoint.
    let dir = tmp("mistakes");
    let gguf = dir.join("glm-4-9b-chat.Q4_K_M.gguf");
    std::fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
    let chatglm = dir.join("chatglm");
    std::fs::create_dir_all(&chatglm).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture("glm4-tiny").join(f), chatglm.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("glm4-tiny/config.json")).unwrap())
            .unwrap();
    cfg["architectures"] = serde_json::json!(["ChatGLMModel"]);
    std::fs::write(chatglm.join("config.json"), cfg.to_string()).unwrap();
    let config_json = fixture("glm4-tiny/config.json");
    for (model, want) in [
        (gguf.as_path(), "GGUF"),
        (
            config_json.as_path(),
            "is a file, not a checkpoint directory",
        ),
        (chatglm.as_path(), "-hf"),
        (
            Path::new("zai-org/no-such-model"),
            "hf download zai-org/no-such-model",
        ),
    ] {
        let out = run(bin()
            .args([
                "generate",
                "--device",
                "cpu",
                "--prompt-ids",
                "1",
                "--model",
            ])
            .arg(model)
            .env("HF_HUB_CACHE", &dir));
        assert_eq!(out.status.code(), Some(1), "{model:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{model:?}: want {want:?} in {}",
            stderr(&out)
        );
    }
    // Unknown flags are clap's usage errors, naming the flag.
    let out = run(bin().args(["serve", "--bogus-flag"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--bogus-flag"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Hugging Face id resolves from the local cache layout without any network.
#[test]
fn hugging_face_ids_come_from_the_local_cache() {
    let (prompt, greedy) = greedy_case();
    let cache = tmp("hfcache");
    let snap = cache.join("models--zai-org--glm4-tiny/snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("glm4-tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    std::fs::create_dir_all(cache.join("models--zai-org--glm4-tiny/refs")).unwrap();
    std::fs::write(
        cache.join("models--zai-org--glm4-tiny/refs/main"),
        "0123abcd",
    )
    .unwrap();
    let prompt_ids: Vec<String> = prompt.iter().map(u64::to_string).collect();
    let out = run(bin()
        .args([
            "generate",
            "--device",
            "cpu",
            "--model",
            "zai-org/glm4-tiny",
            "--json",
        ])
        .args(["--prompt-ids", &prompt_ids.join(","), "--ignore-eos"])
        .args(["--max-tokens", &greedy.len().to_string()])
        .env("HF_HOME", cache.parent().unwrap())
        .env("HF_HUB_CACHE", &cache));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = ids(&v["token_ids"]);
    assert_eq!(got, greedy);
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Negative numbers are values, and an `AUTOGLM_*` variable sets a flag.
#[test]
fn negative_values_and_environment_flags_in_generate() {
    let out = run(bin()
        .args([
            "generate",
            "--device",
            "cpu",
            "--prompt-ids",
            "277",
            "--json",
        ])
        .args(["--presence-penalty", "-0.5", "--ignore-eos"])
        .env("AUTOGLM_MAX_TOKENS", "3"));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 3, "{v}");
}

/// Requests that leave sampling fields unset take generation_config.json's values
/// (`--generation-config auto` or a directory); `vllm` ignores the file.
#[test]
fn generation_config_defaults_apply_to_unset_fields() {
    let dir = tmp("genconfig");
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"temperature": 0.0, "max_new_tokens": 3}"#,
    )
    .unwrap();
    let (prompt, greedy) = greedy_case();
    let body = serde_json::json!({"model": "glm4-tiny", "prompt": prompt, "ignore_eos": true, "return_token_ids": true});
    let mut s = Served::start(&["--generation-config", dir.to_str().unwrap()], &[]);
    let port = s.port();
    // Twice: temperature 0 from the file makes them equal and greedy.
    for _ in 0..2 {
        let (status, v) = http(port, "POST", "/v1/completions", Some(&body));
        assert_eq!(status, 200, "{v}");
        let got = ids(&v["choices"][0]["token_ids"]);
        assert_eq!(got, greedy[..3], "{v}");
    }
    assert_eq!(s.stop(), 0);
    let mut s = Served::start(&["--generation-config", "vllm"], &[]);
    let port = s.port();
    let (status, v) = http(port, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200, "{v}");
    // The completions default of 16 tokens, not the file's 3.
    assert_eq!(v["usage"]["completion_tokens"], 16, "{v}");
    assert_eq!(s.stop(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--log-format json` writes one JSON object per line.
#[test]
fn json_logs_are_one_object_per_line() {
    let out = run(bin()
        .args([
            "generate",
            "--device",
            "cpu",
            "--prompt-ids",
            "277",
            "--max-tokens",
            "2",
        ])
        .args(["--log-format", "json", "--log-level", "debug"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    let records: Vec<Value> = e
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("{err}: {l}")))
        .collect();
    assert!(
        records.iter().any(|r| r["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("loaded"))),
        "{e}"
    );
    assert!(
        records
            .iter()
            .all(|r| r["level"].is_string() && r["target"].is_string()),
        "{e}"
    );
}
