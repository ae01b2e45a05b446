//! NCCL as deployments ship it. cudarc 0.19 opens NCCL by the names `libnccl.so` and
//! `libnccl.so.{13,12,11,10,9,1}`, but NCCL's pip wheel (`nvidia-nccl-cu12`) and NVIDIA's Debian
//! packages install `libnccl.so.2`; the bare `libnccl.so` comes only with the development
//! package. So `--transport nccl` would fail on exactly the machines it is for.
//!
//! [`make_loadable`] fixes that before anything else runs: where `libnccl.so` does not open but
//! `libnccl.so.2` does, it links `libnccl.so` to that file in a folder of its own, puts the
//! folder first on `LD_LIBRARY_PATH` and starts the process again (the dynamic loader reads
//! `LD_LIBRARY_PATH` once, at start-up, so setting it for the running process would not do).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// Set in the started-again process: the folder that holds the link.
const LINKED_ENV: &str = "YOCO_NCCL_LINK_DIR";

/// Whether the loader finds `name` (opened and closed again).
fn opens(name: &str) -> bool {
    let Ok(c) = CString::new(name) else { return false };
    // SAFETY: dlopen with a valid C string; the handle is closed at once.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

/// The file the loader opens for `name`, found through one of its symbols.
fn loaded_path(name: &str, symbol: &str) -> Option<PathBuf> {
    let (c, sym) = (CString::new(name).ok()?, CString::new(symbol).ok()?);
    // SAFETY: dlopen/dlsym/dladdr with valid C strings; `dli_fname` is read while the library
    // is still open, then the handle is closed.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let addr = libc::dlsym(handle, sym.as_ptr());
        let mut info: libc::Dl_info = std::mem::zeroed();
        let path = if !addr.is_null() && libc::dladdr(addr, &mut info) != 0 && !info.dli_fname.is_null() {
            Some(PathBuf::from(CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()))
        } else {
            None
        };
        libc::dlclose(handle);
        path.and_then(|p| std::fs::canonicalize(p).ok())
    }
}

/// A folder under `base` holding `libnccl.so`, a link to `target`.
pub fn link_dir(base: &Path, target: &Path) -> std::io::Result<PathBuf> {
    // SAFETY: getuid cannot fail.
    let dir = base.join(format!("yoco-nccl-{}", unsafe { libc::getuid() }));
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("libnccl.so");
    // A stale link from another installation is replaced.
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink(target, &link)?;
    Ok(dir)
}

/// Makes NCCL loadable by the names cudarc tries, starting the process again if it must (see
/// the module's documentation). Call first thing in `main`, before any thread starts. Returns
/// the folder of the link in the started-again process (to log), and `None` where NCCL is
/// loadable already or absent.
pub fn make_loadable() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(LINKED_ENV) {
        return Some(dir.into());
    }
    if opens("libnccl.so") || !opens("libnccl.so.2") {
        return None;
    }
    let target = loaded_path("libnccl.so.2", "ncclGetVersion")?;
    let dir = match link_dir(&std::env::temp_dir(), &target) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("yoco: NCCL is {} but cannot be linked as libnccl.so: {e}", target.display());
            return None;
        }
    };
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) if !old.is_empty() => {
            let mut p = dir.clone().into_os_string();
            p.push(":");
            p.push(old);
            p
        }
        _ => dir.clone().into_os_string(),
    };
    let exe = std::env::current_exe().ok()?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(LINKED_ENV, &dir)
        .exec();
    // exec returns only on failure; go on without NCCL rather than not at all.
    eprintln!("yoco: starting again with {} on LD_LIBRARY_PATH failed: {err}", dir.display());
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The link goes to the file asked for, and a later link replaces an earlier one.
    #[test]
    fn the_link_names_the_shipped_library() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a.so.2"), tmp.path().join("b.so.2"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let dir = link_dir(tmp.path(), &a).unwrap();
        assert_eq!(std::fs::read(dir.join("libnccl.so")).unwrap(), b"a");
        assert_eq!(link_dir(tmp.path(), &b).unwrap(), dir);
        assert_eq!(std::fs::read_link(dir.join("libnccl.so")).unwrap(), b);
    }

    /// Libraries that every Linux machine has open by name and are found through a symbol;
    /// one that does not exist does neither.
    #[test]
    fn libraries_are_found_by_name() {
        assert!(opens("libc.so.6"));
        let libc = loaded_path("libc.so.6", "malloc").expect("libc's path");
        assert!(libc.is_absolute() && libc.exists(), "{}", libc.display());
        assert!(!opens("libyoco-does-not-exist.so.2"));
        assert!(loaded_path("libyoco-does-not-exist.so.2", "x").is_none());
    }
}
