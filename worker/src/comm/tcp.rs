//! The TCP transport: a full mesh of connections between the ranks of a group. Frames carry a
//! magic number, a per-link sequence number (so that ranks out of step are detected, not
//! silently mixed up) and a bounded length.

use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Collective, CommError};

const MAGIC: u32 = 0x594F_434F; // "YOCO"
/// Largest frame a peer may announce (bounds what a corrupt or hostile peer makes us allocate).
const MAX_FRAME_BYTES: u64 = 8 << 30;
/// A frame's payload is read this much at a time.
const READ_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long any single collective waits for a peer.
    pub timeout: Duration,
    /// How long to keep trying to reach peers while the group forms.
    pub connect_timeout: Duration,
    /// Set by someone else to give up forming the group (a newer LoadModel, or the coordinator
    /// cancelled this one); checked between attempts.
    pub cancel: Option<Arc<AtomicBool>>,
    /// This attempt to form the group: the hellos of every rank carry it, and a connection
    /// with another (a stale attempt's) is dropped.
    pub formation: u32,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(60),
            cancel: None,
            formation: 0,
        }
    }
}

impl TcpOptions {
    fn check_cancelled(&self) -> Result<(), CommError> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Acquire) => Err(CommError::Setup("forming the group was cancelled".into())),
            _ => Ok(()),
        }
    }
}

/// The sending half of a link to one peer.
struct Tx {
    writer: BufWriter<TcpStream>,
    sent: u64,
}

/// The receiving half of a link to one peer.
struct Rx {
    reader: BufReader<TcpStream>,
    received: u64,
}

pub struct TcpCollective {
    rank: usize,
    tx: Vec<Option<Tx>>,
    rx: Vec<Option<Rx>>,
    timeout: Duration,
}

impl TcpCollective {
    /// Forms the group: rank r accepts connections from higher ranks on `listener` and connects
    /// to every lower rank at `addrs[j]`. Returns once all links are up.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        opts: &TcpOptions,
    ) -> Result<Self, CommError> {
        let world = addrs.len();
        if rank >= world {
            return Err(CommError::Setup(format!("rank {rank} outside a group of {world}")));
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            let mut stream = loop {
                opts.check_cancelled()?;
                match TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(peer, %addr, error = %e, "waiting for peer");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(CommError::Setup(format!("cannot reach rank {peer} at {addr}: {e}"))),
                }
            };
            stream.write_all(&hello(rank, world, opts.formation)).map_err(|e| io_err(peer, e))?;
            streams[peer] = Some(stream);
        }
        listener.set_nonblocking(true).map_err(|e| CommError::Setup(e.to_string()))?;
        while streams.iter().skip(rank + 1).any(Option::is_none) {
            opts.check_cancelled()?;
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| CommError::Setup(e.to_string()))?;
                    // A connection that sends no hello holds up the group only briefly.
                    stream
                        .set_read_timeout(Some(opts.connect_timeout.min(Duration::from_secs(5))))
                        .map_err(|e| CommError::Setup(e.to_string()))?;
                    let mut buf = [0u8; 16];
                    if let Err(e) = stream.read_exact(&mut buf) {
                        tracing::warn!(error = %e, "dropped a collective connection that sent no hello");
                        continue;
                    }
                    let peer = match parse_hello(&buf, world, opts.formation) {
                        Ok(peer) => peer,
                        // A stale attempt's rank, or not a rank at all: not a reason to fail.
                        Err(e) => {
                            tracing::warn!(error = %e, "dropped a collective connection");
                            continue;
                        }
                    };
                    if peer <= rank || streams[peer].is_some() {
                        return Err(CommError::Setup(format!("unexpected connection from rank {peer}")));
                    }
                    streams[peer] = Some(stream);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(CommError::Setup(format!("waiting for higher ranks: {e}"))),
            }
        }
        let mut tx = Vec::with_capacity(world);
        let mut rx = Vec::with_capacity(world);
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(s) = stream else {
                tx.push(None);
                rx.push(None);
                continue;
            };
            s.set_nodelay(true).map_err(|e| io_err(peer, e))?;
            s.set_read_timeout(Some(opts.timeout)).map_err(|e| io_err(peer, e))?;
            s.set_write_timeout(Some(opts.timeout)).map_err(|e| io_err(peer, e))?;
            let reader = BufReader::with_capacity(1 << 20, s.try_clone().map_err(|e| io_err(peer, e))?);
            rx.push(Some(Rx { reader, received: 0 }));
            tx.push(Some(Tx { writer: BufWriter::with_capacity(1 << 20, s), sent: 0 }));
        }
        Ok(TcpCollective { rank, tx, rx, timeout: opts.timeout })
    }
}

pub(crate) fn hello(rank: usize, world: usize, formation: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    b[8..12].copy_from_slice(&(world as u32).to_le_bytes());
    b[12..16].copy_from_slice(&formation.to_le_bytes());
    b
}

/// The rank a peer's hello names; an error unless it is a rank of this group (same world) and
/// of this attempt to form it.
pub(crate) fn parse_hello(b: &[u8; 16], world: usize, formation: u32) -> Result<usize, CommError> {
    let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != MAGIC || word(8) as usize != world || word(4) as usize >= world {
        return Err(CommError::Setup("a connection that is not a rank of this group".into()));
    }
    if word(12) != formation {
        return Err(CommError::Setup(format!(
            "a connection from rank {} of another attempt to form the group ({} instead of {formation})",
            word(4),
            word(12)
        )));
    }
    Ok(word(4) as usize)
}

fn io_err(peer: usize, e: std::io::Error) -> CommError {
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => CommError::PeerLost { peer },
        _ => CommError::Io { peer, reason: e.to_string() },
    }
}

fn timeout_or(peer: usize, e: std::io::Error, timeout: Duration) -> CommError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CommError::Timeout { peer, seconds: timeout.as_secs_f64() },
        _ => io_err(peer, e),
    }
}

fn write_frame(link: &mut Tx, peer: usize, data: &[f32], timeout: Duration) -> Result<(), CommError> {
    write_frame_to(&mut link.writer, link.sent, data).map_err(|e| timeout_or(peer, e, timeout))?;
    link.sent += 1;
    Ok(())
}

/// Writes frame number `seq` carrying `data` to `w`, and flushes it.
pub(crate) fn write_frame_to(w: &mut impl Write, seq: u64, data: &[f32]) -> std::io::Result<()> {
    let mut header = [0u8; 20];
    header[..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..12].copy_from_slice(&seq.to_le_bytes());
    header[12..20].copy_from_slice(&((data.len() * 4) as u64).to_le_bytes());
    w.write_all(&header)?;
    for chunk in data.chunks(16 * 1024) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    w.flush()
}

fn read_frame(link: &mut Rx, peer: usize, timeout: Duration) -> Result<Vec<f32>, CommError> {
    let data = read_frame_from(&mut link.reader, link.received, peer, timeout)?;
    link.received += 1;
    Ok(data)
}

/// Reads one frame from `r`, which must be frame number `expected_seq` of the link to `peer`
/// (`timeout` only words the error of a read that timed out).
pub(crate) fn read_frame_from(
    r: &mut impl Read,
    expected_seq: u64,
    peer: usize,
    timeout: Duration,
) -> Result<Vec<f32>, CommError> {
    let mut header = [0u8; 20];
    r.read_exact(&mut header).map_err(|e| timeout_or(peer, e, timeout))?;
    let magic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    let bad = |reason: String| CommError::Protocol { peer, reason };
    if magic != MAGIC {
        return Err(bad(format!("bad frame magic {magic:#x}")));
    }
    if seq != expected_seq {
        return Err(bad(format!("frame {seq} arrived where frame {expected_seq} was expected (ranks out of step)")));
    }
    if len % 4 != 0 || len > MAX_FRAME_BYTES {
        return Err(bad(format!("bad frame length {len}")));
    }
    // The announced length is only a bound: memory grows with the bytes that arrive, so that a
    // header announcing gigabytes followed by nothing costs one chunk, not the announced size.
    let (len, n) = (len as usize, len as usize / 4);
    let mut buf = vec![0u8; len.min(READ_CHUNK_BYTES)];
    let mut out: Vec<f32> = Vec::new();
    while out.len() < n {
        let take = (4 * (n - out.len())).min(buf.len());
        r.read_exact(&mut buf[..take]).map_err(|e| timeout_or(peer, e, timeout))?;
        if out.capacity() - out.len() < take / 4 {
            // Doubling (amortised O(1) per number) but never past the announced length.
            out.reserve_exact(out.capacity().max(take / 4).min(n - out.len()));
        }
        out.extend(buf[..take].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))));
    }
    Ok(out)
}

/// Frames up to this size are written without a sender thread: far below the buffering of a
/// connection (the receiver's socket buffer alone is 128 KiB by default on Linux), so every
/// rank's writes complete before any rank reads.
const INLINE_FRAME_BYTES: usize = 32 << 10;

fn no_peer(peer: usize) -> CommError {
    CommError::Protocol { peer, reason: "no such peer".into() }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.tx.len()
    }

    fn send(&mut self, to: usize, data: &[f32]) -> Result<(), CommError> {
        let tx = self.tx.get_mut(to).and_then(Option::as_mut).ok_or(no_peer(to))?;
        write_frame(tx, to, data, self.timeout)
    }

    fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
        let rx = self.rx.get_mut(from).and_then(Option::as_mut).ok_or(no_peer(from))?;
        read_frame(rx, from, self.timeout)
    }

    fn all_gather(&mut self, data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        let all: Vec<usize> = (0..self.world()).collect();
        self.all_gather_among(&all, data)
    }

    fn all_gather_among(&mut self, members: &[usize], data: &[f32]) -> Result<Vec<Vec<f32>>, CommError> {
        super::check_members(members, self.rank, self.world())?;
        let timeout = self.timeout;
        let (txs, rxs) = (&mut self.tx, &mut self.rx);
        if data.len() * 4 <= INLINE_FRAME_BYTES {
            // Small frames fit in the peers' socket buffers: written here, without the cost of
            // a thread per peer, before anything is read.
            for &peer in members {
                if let Some(tx) = txs[peer].as_mut() {
                    write_frame(tx, peer, data, timeout)?;
                }
            }
            return members
                .iter()
                .map(|&peer| match &mut rxs[peer] {
                    None => Ok(data.to_vec()),
                    Some(rx) => read_frame(rx, peer, timeout),
                })
                .collect();
        }
        // Writes go out on their own threads while this one reads, so that two ranks sending
        // large payloads to each other cannot both block on full socket buffers.
        std::thread::scope(|scope| {
            let senders: Vec<_> = txs
                .iter_mut()
                .enumerate()
                .filter(|(peer, _)| members.contains(peer))
                .filter_map(|(peer, tx)| tx.as_mut().map(|tx| (peer, tx)))
                .map(|(peer, tx)| scope.spawn(move || write_frame(tx, peer, data, timeout)))
                .collect();
            let mut out = Vec::with_capacity(members.len());
            let mut result = Ok(());
            for &peer in members {
                match &mut rxs[peer] {
                    None => out.push(data.to_vec()),
                    Some(rx) if result.is_ok() => match read_frame(rx, peer, timeout) {
                        Ok(v) => out.push(v),
                        Err(e) => result = Err(e),
                    },
                    Some(_) => {}
                }
            }
            for h in senders {
                let sent = h.join().unwrap_or_else(|_| Err(CommError::Setup("sender thread panicked".into())));
                if result.is_ok() {
                    result = sent;
                }
            }
            result.map(|()| out)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Forms a group of `world` ranks on loopback, each on its own thread running `f`.
    pub(crate) fn group<T: Send>(world: usize, timeout: Duration, f: impl Fn(TcpCollective) -> T + Sync) -> Vec<T> {
        let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let opts = TcpOptions { timeout, connect_timeout: Duration::from_secs(10), cancel: None, formation: 0 };
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let (addrs, opts, f) = (&addrs, &opts, &f);
                    s.spawn(move || f(TcpCollective::connect(rank, addrs, l, opts).unwrap()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_on_four_ranks() {
        let results = group(4, Duration::from_secs(10), |mut c| {
            let r = c.rank();
            // Uneven and large payloads (several MB each way at once).
            let mine: Vec<f32> = (0..(r * 300_000 + 3)).map(|i| (i + r) as f32).collect();
            let all = c.all_gather(&mine).unwrap();
            for (j, part) in all.iter().enumerate() {
                assert_eq!(part.len(), j * 300_000 + 3);
                assert_eq!(part[2], (2 + j) as f32);
            }
            let mut sum = vec![r as f32; 5];
            c.all_reduce_sum(&mut sum).unwrap();
            assert_eq!(sum, vec![6.0; 5]);
            let mut b = if r == 2 { vec![9.0, 8.0] } else { vec![] };
            c.broadcast(2, &mut b).unwrap();
            assert_eq!(b, vec![9.0, 8.0]);
            if r == 0 {
                c.send(3, &[1.5]).unwrap();
            }
            if r == 3 {
                assert_eq!(c.recv(0).unwrap(), vec![1.5]);
            }
            c.barrier().unwrap();
            r
        });
        assert_eq!(results, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_frame_header_announcing_gigabytes_allocates_only_what_arrives() {
        let read = |wire: &[u8], seq| read_frame_from(&mut std::io::Cursor::new(wire), seq, 1, Duration::from_secs(1));
        // A header announcing the largest frame allowed (8 GiB), then 4000 bytes and the end.
        let mut wire = Vec::new();
        write_frame_to(&mut wire, 0, &[1.0; 1000]).unwrap();
        wire[12..20].copy_from_slice(&MAX_FRAME_BYTES.to_le_bytes());
        let (result, largest) = crate::test_alloc::largest_allocation(|| read(&wire, 0));
        assert_eq!(result, Err(CommError::PeerLost { peer: 1 }));
        assert!(largest <= READ_CHUNK_BYTES, "a 20-byte header made the reader allocate {largest} bytes");
        // One byte more than allowed is refused before reading anything.
        wire[12..20].copy_from_slice(&(MAX_FRAME_BYTES + 4).to_le_bytes());
        assert!(matches!(read(&wire, 0), Err(CommError::Protocol { peer: 1, .. })));
        // Frames of several chunks (and empty ones) still arrive whole, in sequence.
        let data: Vec<f32> = (0..(3 * READ_CHUNK_BYTES / 4 + 5)).map(|i| i as f32).collect();
        let mut wire = Vec::new();
        write_frame_to(&mut wire, 0, &data).unwrap();
        write_frame_to(&mut wire, 1, &[]).unwrap();
        let mut r = std::io::Cursor::new(wire.as_slice());
        let (got, largest) = crate::test_alloc::largest_allocation(|| read_frame_from(&mut r, 0, 1, Duration::ZERO));
        assert_eq!(got.unwrap(), data);
        assert!(largest <= 4 * data.len(), "{largest} bytes for a {}-byte frame", 4 * data.len());
        assert_eq!(read_frame_from(&mut r, 1, 1, Duration::ZERO), Ok(vec![]));
        assert_eq!(read_frame_from(&mut r, 2, 1, Duration::ZERO), Err(CommError::PeerLost { peer: 1 }));
    }

    /// Connections from a stale attempt to form the group, or naming a rank outside it, are
    /// dropped (not taken in, not a panic), and the group of this attempt still forms.
    #[test]
    fn stale_and_foreign_hellos_are_dropped() {
        let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let opts = TcpOptions {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            cancel: None,
            formation: 5,
        };
        for stray in [hello(1, 2, 4), hello(7, 2, 5), [0xAB; 16]] {
            let mut s = TcpStream::connect(addrs[0]).unwrap();
            s.write_all(&stray).unwrap();
            std::mem::forget(s); // held open, as a stale rank would
        }
        let mut listeners = listeners.into_iter();
        let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
        std::thread::scope(|scope| {
            let (addrs, opts) = (&addrs, &opts);
            let r1 = scope.spawn(move || TcpCollective::connect(1, addrs, l1, opts).map(|mut c| c.all_gather(&[1.0])));
            let mut c0 = TcpCollective::connect(0, addrs, l0, opts).unwrap();
            assert_eq!(c0.all_gather(&[0.0]).unwrap(), vec![vec![0.0], vec![1.0]]);
            assert!(r1.join().unwrap().unwrap().is_ok());
        });
        assert!(parse_hello(&hello(1, 2, 4), 2, 5).is_err());
        assert!(parse_hello(&hello(2, 2, 5), 2, 5).is_err());
        assert_eq!(parse_hello(&hello(1, 2, 5), 2, 5).unwrap(), 1);
    }

    #[test]
    fn a_lost_or_stalled_peer_is_an_error_not_a_hang() {
        let started = Instant::now();
        let results = group(3, Duration::from_millis(500), |mut c| match c.rank() {
            0 => {
                drop(c); // rank 0 dies
                None
            }
            1 => Some(c.all_gather(&[1.0])),
            _ => {
                std::thread::sleep(Duration::from_millis(1500)); // rank 2 stalls
                Some(c.all_gather(&[2.0]))
            }
        });
        assert!(matches!(results[1], Some(Err(CommError::PeerLost { peer: 0 }))), "{:?}", results[1]);
        assert!(results[2].as_ref().unwrap().is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
