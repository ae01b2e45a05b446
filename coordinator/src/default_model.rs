//! The built-in default model: the `tiny` preset with seed 0, written once to the user's cache
//! directory and memory-mapped from there afterwards.

use std::path::PathBuf;

use anyhow::Context;
use yoco_worker::presets::{write_random_model, Preset, StoreDtype};

/// Where the default model lives: `$YOCO_HOME/models/tiny-seed0`, else under
/// `$XDG_CACHE_HOME/yoco` or `~/.cache/yoco`.
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

/// The model directory to use: the one given, or the default model (created if missing).
pub fn resolve(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = model {
        return Ok(dir);
    }
    let dir = cache_dir().join("models/tiny-seed0");
    if dir.join("params.json").exists() && dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    tracing::info!(path = %dir.display(), "writing the built-in default model (tiny preset, random weights, seed 0)");
    // Written beside the final place and renamed, so a concurrent or interrupted writer never
    // leaves a half-written model where readers look.
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    write_random_model(&Preset::Tiny.config(), StoreDtype::F32, 0, false, &tmp)
        .with_context(|| format!("writing the default model to {}", tmp.display()))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("moving the default model to {}", dir.display())),
    }
}
