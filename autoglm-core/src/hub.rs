//! Finding a checkpoint: a directory, or a Hugging Face model id (`zai-org/AutoGLM-Phone-9B`)
//! looked up in the local Hugging Face cache (`models--ORG--NAME/snapshots/REV`), never
//! downloaded. What is not a checkpoint directory (a GGUF file, `config.json` itself, an empty
//! folder) gets an error that says what to pass instead.

use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The checkpoint directory `spec` names: `spec` itself when it is a directory holding
/// `config.json`, else the snapshot of the Hugging Face model id `spec` in the local cache (the
/// revision `refs/main` points to). An error says what `spec` is instead and what would work.
pub fn resolve_model_dir(spec: &Path) -> Result<PathBuf> {
    resolve_model_dir_at(spec, None)
}

/// [`resolve_model_dir`] with a revision (a branch, tag or commit hash) for a model id.
pub fn resolve_model_dir_at(spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    if spec.is_dir() {
        return check_dir(spec);
    }
    if spec.exists() {
        return Err(not_a_directory(spec));
    }
    match spec.to_str().filter(|s| is_repo_id(s)) {
        Some(id) => from_cache(id, revision, &hub_cache_dir()),
        None => Err(Error::io(
            spec,
            std::io::Error::new(ErrorKind::NotFound, "model directory not found"),
        )),
    }
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`,
/// `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`, as `huggingface_hub` looks.
pub fn hub_cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return p;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// `ORG/NAME` with the characters the hub allows.
fn is_repo_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part.len() <= 96
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// The snapshot of `id` at `revision` (default `main`) under `cache`.
fn from_cache(id: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let how = format!(
        "autoglm never downloads: fetch it with `hf download {id}` (or `huggingface-cli download \
         {id}`) where there is a network, into this cache or a directory you pass"
    );
    if !repo.is_dir() {
        return Err(Error::io(
            id,
            std::io::Error::new(
                ErrorKind::NotFound,
                format!(
                    "not a directory, and not in the Hugging Face cache ({} does not exist; the \
                     cache is $HF_HUB_CACHE, or $HF_HOME/hub); {how}",
                    repo.display()
                ),
            ),
        ));
    }
    let rev = revision.unwrap_or("main");
    let commit = match std::fs::read_to_string(repo.join("refs").join(rev)) {
        Ok(hash) => hash.trim().to_string(),
        // A commit hash names its snapshot directly.
        Err(_) => rev.to_string(),
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        let have: Vec<String> = std::fs::read_dir(repo.join("snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(Error::io(
            &snapshot,
            std::io::Error::new(
                ErrorKind::NotFound,
                format!(
                    "{id}: revision {rev:?} is not in the cache (snapshots there: {have:?}); {how}"
                ),
            ),
        ));
    }
    if !snapshot.join("config.json").is_file() {
        return Err(Error::io(
            snapshot.join("config.json"),
            std::io::Error::new(
                ErrorKind::NotFound,
                format!("{id}: the cached snapshot has no config.json (an interrupted download?); {how}"),
            ),
        ));
    }
    Ok(snapshot)
}

/// A directory: a checkpoint when it holds `config.json`; a hub cache folder `models--ORG--NAME`
/// resolves to its `main` snapshot; anything else is an error that says what it holds.
fn check_dir(dir: &Path) -> Result<PathBuf> {
    if dir.join("config.json").is_file() {
        return Ok(dir.to_owned());
    }
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if let Some(id) = name.strip_prefix("models--") {
        if let (Some(parent), Some((org, model))) = (dir.parent(), id.split_once("--")) {
            return from_cache(&format!("{org}/{model}"), None, parent);
        }
    }
    let gguf = std::fs::read_dir(dir).ok().and_then(|d| {
        d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        })
    });
    if let Some(f) = gguf {
        return Err(gguf_error(&f));
    }
    Err(Error::io(
        dir.join("config.json"),
        std::io::Error::new(
            ErrorKind::NotFound,
            "not a Hugging Face checkpoint directory (it needs config.json, the tokenizer files \
             and *.safetensors)",
        ),
    ))
}

/// What a file given as the model is, and what to pass instead.
fn not_a_directory(file: &Path) -> Error {
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if is_gguf {
        return gguf_error(file);
    }
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let hint = match file.file_name().and_then(|n| n.to_str()) {
        Some(n) if n.ends_with(".json") || n.ends_with(".safetensors") => {
            format!("pass the directory that holds it: {}", parent.display())
        }
        _ => "pass the checkpoint's directory (the one holding config.json)".to_string(),
    };
    Error::Checkpoint {
        path: file.to_owned(),
        msg: format!("is a file, not a checkpoint directory; {hint}"),
    }
}

fn gguf_error(file: &Path) -> Error {
    Error::Checkpoint {
        path: file.to_owned(),
        msg: "is a GGUF file (llama.cpp's format); autoglm loads Hugging Face checkpoints: a \
              directory with config.json, the tokenizer files and *.safetensors (for GLM-4, the \
              `-hf` repositories such as zai-org/glm-4-9b-chat-hf)"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("autoglm-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(is_repo_id("zai-org/AutoGLM-Phone-9B"));
        assert!(is_repo_id("THUDM/glm-4-9b-chat-hf"));
        for s in [
            "model",
            "./a/b",
            "/abs/path",
            "a/b/c",
            "../x",
            "a/",
            "/b",
            "a b/c",
        ] {
            assert!(!is_repo_id(s), "{s}");
        }
    }

    #[test]
    fn a_cached_model_resolves_to_its_main_snapshot_or_a_named_revision() {
        let cache = tmp("cache");
        let repo = cache.join("models--zai-org--AutoGLM-Phone-9B");
        for rev in ["abc123", "def456"] {
            let snap = repo.join("snapshots").join(rev);
            std::fs::create_dir_all(&snap).unwrap();
            std::fs::write(snap.join("config.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(repo.join("refs/v2"), "def456").unwrap();
        let id = "zai-org/AutoGLM-Phone-9B";
        let main = from_cache(id, None, &cache).unwrap();
        assert!(main.ends_with("snapshots/abc123"), "{main:?}");
        assert!(from_cache(id, Some("v2"), &cache)
            .unwrap()
            .ends_with("snapshots/def456"));
        assert!(from_cache(id, Some("def456"), &cache)
            .unwrap()
            .ends_with("snapshots/def456"));
        // The cache folder itself, as a directory, resolves too.
        assert_eq!(check_dir(&repo).unwrap(), main);
        let e = from_cache(id, Some("nope"), &cache)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("revision \"nope\"") && e.contains("abc123"),
            "{e}"
        );
        let e = from_cache("zai-org/other", None, &cache)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("zai-org/other: ") && e.contains("hf download zai-org/other"),
            "{e}"
        );
        assert!(e.contains("models--zai-org--other"), "{e}");
        // A snapshot without config.json is an interrupted download.
        std::fs::remove_file(repo.join("snapshots/abc123/config.json")).unwrap();
        let e = from_cache(id, None, &cache).unwrap_err().to_string();
        assert!(e.contains("interrupted download"), "{e}");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn files_and_empty_directories_get_pointed_errors() {
        let d = tmp("files");
        let gguf = d.join("glm-4-9b.Q4_K_M.gguf");
        std::fs::write(&gguf, b"GGUF\x03\0\0\0rest").unwrap();
        let e = resolve_model_dir(&gguf).unwrap_err().to_string();
        assert!(e.contains("GGUF") && e.contains("-hf"), "{e}");
        // A folder of GGUF files says the same.
        let e = resolve_model_dir(&d).unwrap_err().to_string();
        assert!(e.contains("GGUF"), "{e}");
        std::fs::remove_file(&gguf).unwrap();
        let e = resolve_model_dir(&d).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("not a Hugging Face checkpoint"),
            "{e}"
        );
        let cfg = d.join("config.json");
        std::fs::write(&cfg, "{}").unwrap();
        let e = resolve_model_dir(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("is a file") && e.contains(&d.display().to_string()),
            "{e}"
        );
        assert_eq!(resolve_model_dir(&d).unwrap(), d);
        let e = resolve_model_dir(Path::new("no/such/dir/here"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
