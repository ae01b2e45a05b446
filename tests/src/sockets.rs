//! The TCP sockets of a running process tree, read from outside it (Linux): each connected
//! socket is duplicated into this process with `pidfd_getfd` and asked for its options, so a
//! test sees what the server really set on the connections it accepted or opened.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};

/// A connected TCP socket of some process and whether it has TCP_NODELAY.
#[derive(Debug)]
pub struct TcpConn {
    pub pid: u32,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub nodelay: bool,
}

/// `pid` and its descendants.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", out[i])).into_iter().flatten().flatten();
        for task in tasks {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        i += 1;
    }
    out
}

/// Every connected TCP socket of `pid` (listening ones and other kinds left out).
///
/// # Panics
/// When the process cannot be inspected (`pidfd_getfd` needs the right to ptrace it; a test
/// that cannot look must not pass).
pub fn tcp_connections(pid: u32) -> Vec<TcpConn> {
    // SAFETY: plain syscalls on integers; every returned descriptor is owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut out = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for entry in fds.flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(target) = entry.file_name().to_str().and_then(|n| n.parse::<libc::c_int>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        use std::os::fd::AsRawFd;
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // Closed between the listing and now.
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "pidfd_getfd({pid}, {target}): {e}");
            continue;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if let Some(c) = tcp_conn(pid, &fd) {
            out.push(c);
        }
    }
    out
}

fn int_opt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> Option<libc::c_int> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for the call.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn tcp_conn(pid: u32, fd: &OwnedFd) -> Option<TcpConn> {
    if int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP
        || int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0
    {
        return None;
    }
    // A duplicate of the descriptor as a std stream, only to read the addresses; forgotten, not
    // dropped, so that the OwnedFd closes it once.
    use std::os::fd::AsRawFd;
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd.as_raw_fd()) });
    let (local, peer) = (stream.local_addr().ok()?, stream.peer_addr().ok()?);
    let nodelay = int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY)? != 0;
    Some(TcpConn { pid, local, peer, nodelay })
}
