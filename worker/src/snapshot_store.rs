//! The prefix cache's disk tier on one rank: snapshot images (`crate::engine::SnapshotImage`)
//! in files, one per snapshot, named by the hash of the prompt blocks it covers (the
//! coordinator's chained block hash, which the model seeds).
//!
//! A file is `YOCOSNAP`, a format version, a JSON header (the layout it was written for, its
//! hash and its parent's, its shard layout), the states and blocks as little-endian bytes, and
//! the SHA-256 of everything before it. It is written to a temporary name and renamed, so a
//! reader sees a whole file or none; a file torn by a crash, changed on disk or written for
//! another model or layout fails its checks and is a miss (and is removed), never a wrong
//! answer. Files are not synced to disk: the tier survives a process restart (the page cache
//! keeps them), and the checksum turns what a machine crash tears into a miss.
//!
//! The directory holds a folder per layout (model fingerprint, group, rank, block, cache
//! type), so ranks, groups and models sharing one disk never read each other's files.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{ParentShape, SnapshotImage, StateImage};

pub use crate::plan::{BlockHash as Hash, SnapshotFile as FileInfo};

const MAGIC: &[u8; 8] = b"YOCOSNAP";
const VERSION: u32 = 1;
/// Bytes of a model file hashed at each end for its fingerprint.
const FINGERPRINT_SPAN: u64 = 1 << 20;
const SUFFIX: &str = "snap";

/// What a file must have been written for to be read: the model and the rank's place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// [`model_fingerprint`], hex.
    pub model: String,
    pub world: usize,
    pub tp: usize,
    pub rank: usize,
    pub block_tokens: usize,
    pub block_bytes: usize,
    pub cache_dtype: String,
}

impl Layout {
    /// The folder of this layout's files.
    fn folder(&self) -> String {
        format!(
            "{}-w{}tp{}-b{}-{}/rank{}",
            &self.model[..16],
            self.world,
            self.tp,
            self.block_tokens,
            self.cache_dtype,
            self.rank
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no snapshot file")]
    Missing,
    #[error("snapshot file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("snapshot file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    layout: Layout,
    hash: String,
    parent_hash: Option<String>,
    pos: usize,
    runs: Vec<(usize, usize)>,
    lens: Vec<usize>,
    parent: Option<ParentHeader>,
    /// Per layer: `None` for a retention state of `retention_floats`, else a window's rows.
    states: Vec<Option<usize>>,
    retention_floats: usize,
    window_width: usize,
    blocks: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct ParentHeader {
    pos: usize,
    rows: usize,
    lens: Vec<usize>,
}

/// A rank's snapshot files.
pub struct SnapshotStore {
    dir: PathBuf,
    layout: Layout,
    /// Numbers of a retention state and of a window row on this rank.
    retention_floats: usize,
    window_width: usize,
}

impl SnapshotStore {
    /// A store that only checks bytes (for the fuzz targets): its folder is never touched.
    pub fn detached(layout: Layout, retention_floats: usize, window_width: usize) -> Self {
        SnapshotStore { dir: PathBuf::new(), layout, retention_floats, window_width }
    }

    /// The store under `root` for `layout` (its folder made if need be).
    pub fn open(root: &Path, layout: Layout, retention_floats: usize, window_width: usize) -> io::Result<Self> {
        let dir = root.join(layout.folder());
        fs::create_dir_all(&dir)?;
        Ok(SnapshotStore { dir, layout, retention_floats, window_width })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(format!("{}.{SUFFIX}", hex(hash)))
    }

    /// Writes `image` as the snapshot of `hash` continuing `parent_hash`; returns the file's
    /// bytes. An existing file of that hash is replaced.
    pub fn save(&self, hash: &Hash, parent_hash: Option<&Hash>, image: &SnapshotImage) -> Result<u64, StoreError> {
        let path = self.path(hash);
        let tmp = self.dir.join(format!(".{}.{}.tmp", hex(hash), std::process::id()));
        let written = (|| -> io::Result<u64> {
            let mut out = BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
            let n = self.encode(hash, parent_hash, image, &mut out)?;
            out.flush()?;
            Ok(n)
        })();
        let written = written.and_then(|n| fs::rename(&tmp, &path).map(|()| n));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(|source| StoreError::Io { path, source })
    }

    /// The file of [`SnapshotStore::save`], written to `out`; returns its bytes.
    pub fn encode(
        &self,
        hash: &Hash,
        parent_hash: Option<&Hash>,
        image: &SnapshotImage,
        out: impl Write,
    ) -> io::Result<u64> {
        let header = Header {
            layout: self.layout.clone(),
            hash: hex(hash),
            parent_hash: parent_hash.map(hex),
            pos: image.pos,
            runs: image.runs.clone(),
            lens: image.lens.clone(),
            parent: image.parent.as_ref().map(|p| ParentHeader { pos: p.pos, rows: p.rows, lens: p.lens.clone() }),
            states: image
                .states
                .iter()
                .map(|s| match s {
                    StateImage::Retention(_) => None,
                    StateImage::Window { rows, .. } => Some(*rows),
                })
                .collect(),
            retention_floats: self.retention_floats,
            window_width: self.window_width,
            blocks: image.blocks.len(),
        };
        let json = serde_json::to_vec(&header).expect("a header serialises");
        let mut out = HashingWriter { inner: out, hasher: Sha256::new(), bytes: 0 };
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&(json.len() as u32).to_le_bytes())?;
        out.write_all(&json)?;
        for s in &image.states {
            let floats: Vec<&Vec<f32>> = match s {
                StateImage::Retention(x) => vec![x],
                StateImage::Window { keys, values, .. } => vec![keys, values],
            };
            for x in floats {
                let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
                out.write_all(&bytes)?;
            }
        }
        for b in &image.blocks {
            out.write_all(b)?;
        }
        let digest = out.hasher.finalize_reset();
        out.inner.write_all(&digest)?;
        Ok(out.bytes + digest.len() as u64)
    }

    /// Reads the snapshot of `hash`: checked whole (checksum, format, layout, hash), or an
    /// error; a file that fails its checks is removed.
    pub fn load(&self, hash: &Hash) -> Result<(FileInfo, SnapshotImage), StoreError> {
        let path = self.path(hash);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let parsed = self.parse(&bytes, hash);
        if let Err(reason) = &parsed {
            tracing::warn!(path = %path.display(), reason, "snapshot file failed its checks: removed");
            let _ = fs::remove_file(&path);
        }
        parsed.map_err(|reason| StoreError::Invalid { path, reason })
    }

    /// A file's bytes checked and read as [`SnapshotStore::load`] does (the checks that fail
    /// say why).
    pub fn parse(&self, bytes: &[u8], hash: &Hash) -> Result<(FileInfo, SnapshotImage), String> {
        let Some(body_len) = bytes.len().checked_sub(32) else { return Err("shorter than its checksum".into()) };
        let (body, digest) = bytes.split_at(body_len);
        if Sha256::digest(body).as_slice() != digest {
            return Err("checksum mismatch (torn or changed)".into());
        }
        let (header, mut rest) = self.header(body)?;
        if header.hash != hex(hash) {
            return Err(format!("holds snapshot {}, not {}", header.hash, hex(hash)));
        }
        let mut floats = |n: usize| -> Result<Vec<f32>, String> {
            let len = n.checked_mul(4).filter(|&l| l <= rest.len()).ok_or("truncated states")?;
            let (x, tail) = rest.split_at(len);
            rest = tail;
            Ok(x.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
        };
        let mut states = Vec::with_capacity(header.states.len());
        for s in &header.states {
            states.push(match *s {
                None => StateImage::Retention(floats(header.retention_floats)?),
                Some(rows) => {
                    let n = rows.checked_mul(header.window_width).ok_or("window too large")?;
                    StateImage::Window { keys: floats(n)?, values: floats(n)?, rows }
                }
            });
        }
        let block_bytes = self.layout.block_bytes;
        if header.blocks.checked_mul(block_bytes) != Some(rest.len()) {
            return Err(format!("{} bytes of blocks for {} blocks of {block_bytes}", rest.len(), header.blocks));
        }
        let blocks = rest.chunks_exact(block_bytes.max(1)).map(<[u8]>::to_vec).collect();
        let info = self.info(&header, bytes.len() as u64)?;
        let image = SnapshotImage {
            pos: header.pos,
            states,
            rows: info.rows,
            runs: header.runs,
            lens: header.lens,
            parent: header.parent.map(|p| ParentShape { pos: p.pos, rows: p.rows, lens: p.lens }),
            blocks,
        };
        Ok((info, image))
    }

    /// The header at the start of `bytes`, checked against this store's layout, and what
    /// follows it.
    fn header<'a>(&self, bytes: &'a [u8]) -> Result<(Header, &'a [u8]), String> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err("not a snapshot file".into());
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!("format version {version}, this worker reads {VERSION}"));
        }
        let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let json = bytes.get(16..16 + len).ok_or("truncated header")?;
        let header: Header = serde_json::from_slice(json).map_err(|e| format!("header: {e}"))?;
        if header.layout != self.layout {
            return Err(format!("written for {:?}, this rank is {:?}", header.layout, self.layout));
        }
        if (header.retention_floats, header.window_width) != (self.retention_floats, self.window_width) {
            return Err("written for other self-decoder state sizes".into());
        }
        Ok((header, &bytes[16 + len..]))
    }

    fn info(&self, h: &Header, bytes: u64) -> Result<FileInfo, String> {
        let rows = h.runs.iter().try_fold(0usize, |a, r| a.checked_add(r.1)).ok_or("rows overflow")?;
        Ok(FileInfo {
            hash: unhex(&h.hash).ok_or("bad hash")?,
            parent_hash: match &h.parent_hash {
                None => None,
                Some(p) => Some(unhex(p).ok_or("bad parent hash")?),
            },
            pos: h.pos,
            rows,
            bytes,
        })
    }

    /// Deletes the file of `hash`, if any.
    pub fn remove(&self, hash: &Hash) {
        match fs::remove_file(self.path(hash)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove a snapshot file"),
        }
    }

    /// Every file of this layout whose header reads, named as it says and sized as it should
    /// be (contents are checked when read). Others, and temporary files left by a crash, are
    /// removed.
    pub fn list(&self) -> io::Result<Vec<FileInfo>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            match self.list_one(&path, &name) {
                Ok(info) => found.push(info),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), reason, "not a usable snapshot file: removed");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        found.sort_by_key(|f| f.pos);
        Ok(found)
    }

    fn list_one(&self, path: &Path, name: &str) -> Result<FileInfo, String> {
        let hash = name.strip_suffix(&format!(".{SUFFIX}")).and_then(unhex).ok_or("not a snapshot file name")?;
        let mut f = fs::File::open(path).map_err(|e| e.to_string())?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        let mut head = vec![0u8; 16];
        f.read_exact(&mut head).map_err(|e| e.to_string())?;
        let len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
        if len as u64 > size {
            return Err("truncated header".into());
        }
        head.resize(16 + len, 0);
        f.read_exact(&mut head[16..]).map_err(|e| e.to_string())?;
        let (header, _) = self.header(&head)?;
        let info = self.info(&header, size)?;
        if info.hash != hash {
            return Err("named for another snapshot".into());
        }
        let floats: usize =
            header.states.iter().map(|s| s.map_or(self.retention_floats, |rows| 2 * rows * self.window_width)).sum();
        let want = 16 + len as u64 + 4 * floats as u64 + (header.blocks * self.layout.block_bytes) as u64 + 32;
        if size != want {
            return Err(format!("{size} bytes, its header says {want}"));
        }
        Ok(info)
    }
}

/// A writer that hashes what it writes.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a model directory's snapshots depend on: SHA-256 of params.json and, per weight file
/// (by name), its name, length and first and last MiB — so new weights under the same name
/// (retrained, converted) are a new model, while a copy of the same files is the same one.
pub fn model_fingerprint(dir: &Path) -> io::Result<String> {
    let mut h = Sha256::new();
    h.update(fs::read(dir.join("params.json"))?);
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for path in files {
        let mut f = fs::File::open(&path)?;
        let len = f.metadata()?.len();
        h.update(path.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; FINGERPRINT_SPAN.min(len) as usize];
        f.read_exact(&mut buf)?;
        h.update(&buf);
        // The last MiB, or what the first did not cover.
        let tail = FINGERPRINT_SPAN.min(len.saturating_sub(FINGERPRINT_SPAN));
        if tail > 0 {
            use std::io::Seek;
            f.seek(io::SeekFrom::Start(len - tail))?;
            f.read_exact(&mut buf[..tail as usize])?;
            h.update(&buf[..tail as usize]);
        }
    }
    Ok(hex(&h.finalize().into()))
}

pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}
