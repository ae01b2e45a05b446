//! The built-in default model: a small YOCO trained by `tools/train/` on English text from
//! Debian packages and on passkey retrieval (see `coordinator/assets/default-model/` and
//! `tools/train/README.md`). Its files are compiled into the binary, written once to the user's
//! cache directory and memory-mapped from there afterwards.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

const FILES: [(&str, &[u8]); 4] = [
    ("params.json", include_bytes!("../assets/default-model/params.json")),
    ("model.safetensors", include_bytes!("../assets/default-model/model.safetensors")),
    ("tokenizer.json", include_bytes!("../assets/default-model/tokenizer.json")),
    ("training.json", include_bytes!("../assets/default-model/training.json")),
];

/// Where models live: `$YOCO_HOME/models`, else under `$XDG_CACHE_HOME/yoco` or `~/.cache/yoco`.
fn cache_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("YOCO_HOME") {
        return PathBuf::from(home);
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("yoco");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/yoco"),
        None => std::env::temp_dir().join("yoco"),
    }
}

/// The default model's directory name: named by the hash of its files, so a binary with other
/// weights never reads an older copy.
pub fn dir_name() -> String {
    let mut h = Sha256::new();
    for (name, bytes) in FILES {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let digest = h.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("yoco-tiny-text-{hex}")
}

fn complete(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64))
}

/// Writes the default model's files into `dir` (created if missing).
pub fn write_files(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in FILES {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

/// The model directory to use: the one given, or the default model (written if missing).
pub fn resolve(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = model {
        return Ok(dir);
    }
    let dir = cache_dir().join("models").join(dir_name());
    if complete(&dir) {
        return Ok(dir);
    }
    tracing::info!(path = %dir.display(), "writing the built-in default model");
    // Written beside the final place and renamed, so a concurrent or interrupted writer never
    // leaves a half-written model where readers look.
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    write_files(&tmp).with_context(|| format!("writing the default model to {}", tmp.display()))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if complete(&dir) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e).with_context(|| format!("moving the default model to {}", dir.display()))
        }
    }
}
