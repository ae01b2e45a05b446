//! The prefix cache's disk tier on the workers: snapshots written to files, dropped, read back
//! and resumed from must give exactly (bit for bit) what resuming from the originals gave —
//! on one rank, a context-parallel pair whose shards end inside blocks, a tensor-parallel pair,
//! the emulated GPU backend, both mixers, f32 and bf16 caches — and a file that is torn,
//! changed, misnamed or written for another layout is a miss that is removed, never a wrong
//! answer.

mod common;
mod emulator;

use std::path::Path;
use std::sync::Arc;

use common::*;
use yoco_worker::backend::Backend;
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, EngineOptions};
use yoco_worker::executor::Executor;
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::model::{Model, TpShard};
use yoco_worker::plan::{
    BlockHash, DecodeWork, Plan, PrefillWork, SeqResult, SeqSpec, SnapshotFiles, SnapshotLoad, SnapshotSave,
};
use yoco_worker::snapshot_store::SnapshotStore;

const H10: BlockHash = [10; 32];
const H11: BlockHash = [11; 32];

fn opts(dtype: CacheDtype) -> EngineOptions {
    EngineOptions { block_tokens: 16, cache_budget_bytes: 8 << 20, cache_dtype: dtype, ..EngineOptions::default() }
}

fn prefill(seq: u64, tokens: &[u32], sample: bool, snapshot: Option<u64>) -> Plan {
    Plan {
        prefill: vec![PrefillWork { seq, tokens: tokens.to_vec(), sample, snapshot, ..PrefillWork::default() }],
        ..Plan::default()
    }
}

/// A sequence resumed from `snap`: the prompt's rest, then three greedy tokens (with the top 5
/// log-probabilities of each: most of the logits).
fn resume<B: Backend>(x: &mut Executor<B>, seq: u64, snap: u64, rest: &[u32]) -> Vec<SeqResult> {
    let spec = SeqSpec { seq, top_logprobs: 5, resume_from: Some(snap), ..SeqSpec::default() };
    x.execute(&Plan { add: vec![spec], ..Plan::default() }).unwrap();
    let mut out = x.execute(&prefill(seq, rest, true, None)).unwrap();
    for _ in 0..3 {
        let token = out.last().unwrap().sampled.as_ref().unwrap().token;
        out.extend(x.execute(&Plan { decode: vec![DecodeWork { seq, token }], ..Plan::default() }).unwrap());
    }
    x.free(&[seq]);
    // Compared across sequences: the id is not part of the answer.
    out.into_iter().map(|r| SeqResult { seq: 0, ..r }).collect()
}

/// One rank's run: snapshots at 32 and 70 (whose shards end inside blocks), resumed from; then
/// written, dropped, read back as new snapshots and resumed from again. Returns both runs'
/// results and the store.
fn round_trip<B: Backend>(
    x: &mut Executor<B>,
    store: &SnapshotStore,
    prompt: &[u32],
) -> (Vec<SeqResult>, Vec<SeqResult>) {
    x.execute(&Plan { add: vec![SeqSpec { seq: 1, ..SeqSpec::default() }], ..Plan::default() }).unwrap();
    x.execute(&prefill(1, &prompt[..32], false, Some(10))).unwrap();
    x.execute(&prefill(1, &prompt[32..70], false, Some(11))).unwrap();
    x.free(&[1]);
    let want = resume(x, 2, 11, &prompt[70..]);
    let save = SnapshotFiles {
        save: vec![
            SnapshotSave { snap: 11, hash: H11, parent: Some((10, H10)) },
            SnapshotSave { snap: 10, hash: H10, parent: None },
        ],
        ..SnapshotFiles::default()
    };
    let report = x.snapshot_files(Some(store), &save);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.saved.iter().map(|s| s.0).collect::<Vec<_>>(), [11, 10]);
    x.execute(&Plan { drop_snapshots: vec![10, 11], ..Plan::default() }).unwrap();
    assert_eq!(x.engine().pool().used_blocks(), 0, "everything dropped");
    let load = SnapshotFiles {
        load: vec![
            SnapshotLoad { snap: 20, hash: H10, parent: None },
            SnapshotLoad { snap: 21, hash: H11, parent: Some(20) },
        ],
        list: true,
        ..SnapshotFiles::default()
    };
    let report = x.snapshot_files(Some(store), &load);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.loaded, [20, 21]);
    let listed: Vec<(BlockHash, Option<BlockHash>, usize)> =
        report.listed.iter().map(|f| (f.hash, f.parent_hash, f.pos)).collect();
    assert_eq!(listed, [(H10, None, 32), (H11, Some(H10), 70)]);
    let got = resume(x, 3, 21, &prompt[70..]);
    x.execute(&Plan { drop_snapshots: vec![20, 21], ..Plan::default() }).unwrap();
    assert_eq!(x.engine().pool().used_blocks(), 0, "a restored chain shares and frees its blocks");
    (want, got)
}

fn store_of<B: Backend>(x: &Executor<B>, root: &Path) -> SnapshotStore {
    x.open_store(root, "ab".repeat(32)).unwrap()
}

fn check(what: &str, runs: &[(Vec<SeqResult>, Vec<SeqResult>)]) {
    for (rank, (want, got)) in runs.iter().enumerate() {
        assert_eq!(got, want, "{what} rank {rank}: restored from disk differs from the original snapshot");
        let tokens = |r: &[SeqResult]| r.iter().map(|r| r.sampled.clone()).collect::<Vec<_>>();
        assert_eq!(tokens(got), tokens(&runs[0].1), "{what}: ranks disagree");
    }
}

fn models(mixer: SelfMixerKind, dir: &Path) -> Arc<Model> {
    random_model(&small_config(mixer), 7, false, dir)
}

#[test]
fn snapshots_restored_from_disk_resume_exactly_on_one_rank_and_in_groups() {
    let mixers = [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }];
    for mixer in mixers {
        let tmp = tempfile::tempdir().unwrap();
        let model = models(mixer, &tmp.path().join("m"));
        let prompt = tokens(77, 300, 3);
        for dtype in [CacheDtype::F32, CacheDtype::Bf16] {
            let what = format!("{mixer:?} {dtype:?}");
            let root = tempfile::tempdir().unwrap();
            let mut x = Executor::new(Engine::new(model.clone(), &opts(dtype)));
            let store = store_of(&x, root.path());
            check(&format!("{what}, one rank"), &[round_trip(&mut x, &store, &prompt)]);
            // Context-parallel pair: every rank writes and reads its own shard.
            let runs = tcp_group(2, &|_, comm| {
                let mut x = Executor::new(Engine::with_group(model.clone(), &opts(dtype), comm).unwrap());
                let store = store_of(&x, root.path());
                round_trip(&mut x, &store, &prompt)
            });
            check(&format!("{what}, cp 2"), &runs);
        }
        // Tensor-parallel pair: each rank its KV heads and state heads.
        let parts: Vec<Arc<Model>> = (0..2)
            .map(|rank| {
                let shard = TpShard { rank, size: 2 };
                Arc::new(Model::load_sharded(&tmp.path().join("m"), Default::default(), shard).unwrap())
            })
            .collect();
        let root = tempfile::tempdir().unwrap();
        let runs = tcp_group(2, &|rank, comm| {
            let engine = Engine::on_backend(
                yoco_worker::backend::cpu::CpuBackend::default(),
                &parts[rank],
                &opts(CacheDtype::F32),
                comm,
            );
            let mut x = Executor::new(engine.unwrap());
            let store = store_of(&x, root.path());
            round_trip(&mut x, &store, &prompt)
        });
        check(&format!("{mixer:?}, tp 2"), &runs);
    }
}

#[test]
fn snapshots_restored_from_disk_resume_exactly_on_the_emulated_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tokens(77, 300, 4);
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let model = models(mixer, &tmp.path().join(format!("{mixer:?}")));
        for dtype in [CacheDtype::F32, CacheDtype::F16] {
            let gpu = yoco_worker::cuda::ops::Gpu::new(emulator::EmuRuntime);
            let engine = Engine::on_backend(gpu, &model, &opts(dtype), Box::new(yoco_worker::comm::SingleRank));
            let mut x = Executor::new(engine.unwrap());
            let root = tempfile::tempdir().unwrap();
            let store = store_of(&x, root.path());
            check(&format!("{mixer:?} {dtype:?}, emulated GPU"), &[round_trip(&mut x, &store, &prompt)]);
        }
    }
}

/// Files that fail their checks are misses and are removed; a file is read only for its own
/// layout and hash, on top of the parent it was written on.
#[test]
fn bad_files_are_misses_and_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = models(SelfMixerKind::GatedRetention, &tmp.path().join("m"));
    let prompt = tokens(77, 300, 5);
    let root = tempfile::tempdir().unwrap();
    let mut x = Executor::new(Engine::new(model.clone(), &opts(CacheDtype::F32)));
    let store = store_of(&x, root.path());
    round_trip(&mut x, &store, &prompt);
    let path = |h: &BlockHash| store.dir().join(format!("{}.snap", yoco_worker::snapshot_store::hex(h)));
    let load = |x: &mut Executor, snap, hash, parent| {
        let req = SnapshotFiles { load: vec![SnapshotLoad { snap, hash, parent }], ..SnapshotFiles::default() };
        x.snapshot_files(Some(&store), &req)
    };
    // The wrong parent, or none, is refused before anything changes, and the file stays.
    let r = load(&mut x, 30, H11, None);
    assert!(r.failed[0].1.contains("parent"), "{:?}", r.failed);
    assert!(load(&mut x, 30, H10, None).failed.is_empty());
    let r = load(&mut x, 31, H10, Some(30));
    assert!(r.failed[0].1.contains("parent"), "{:?}", r.failed);
    assert!(path(&H11).exists() && path(&H10).exists());
    assert_eq!(x.engine().snapshot_usage().0, 1, "only 30 was made");
    // One flipped byte: a miss, and the file is gone.
    let mut bytes = std::fs::read(path(&H11)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(path(&H11), &bytes).unwrap();
    let r = load(&mut x, 31, H11, Some(30));
    assert!(r.failed[0].1.contains("checksum"), "{:?}", r.failed);
    assert!(!path(&H11).exists());
    assert!(load(&mut x, 31, H11, Some(30)).failed[0].1.contains("no snapshot file"));
    // Torn (a crash mid-write) and misnamed files; stale temporary files.
    let good = std::fs::read(path(&H10)).unwrap();
    std::fs::write(path(&H11), &good[..good.len() - 100]).unwrap();
    let misnamed = [12u8; 32];
    std::fs::write(path(&misnamed), &good).unwrap();
    std::fs::write(store.dir().join(".x.1.tmp"), b"partial").unwrap();
    let listed = x.snapshot_files(Some(&store), &SnapshotFiles { list: true, ..SnapshotFiles::default() }).listed;
    assert_eq!(listed.iter().map(|f| f.hash).collect::<Vec<_>>(), [H10]);
    assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1, "the rest removed");
    let r = load(&mut x, 40, misnamed, None);
    assert!(r.failed[0].1.contains("no snapshot file"));
    // Another layout (cache type, or another model) has its own folder and never sees these;
    // a file copied into its folder is refused for its header.
    let other = Executor::new(Engine::new(model.clone(), &opts(CacheDtype::Bf16)));
    let other_store = store_of(&other, root.path());
    assert_ne!(other_store.dir(), store.dir());
    assert!(other_store.list().unwrap().is_empty());
    std::fs::copy(path(&H10), other_store.dir().join(path(&H10).file_name().unwrap())).unwrap();
    assert!(other_store.list().unwrap().is_empty(), "refused and removed");
    let other_model = other.open_store(root.path(), "cd".repeat(32)).unwrap();
    assert_ne!(other_model.dir(), store.dir());
    // Without a disk tier every save and load fails, and says why.
    let r = x.snapshot_files(
        None,
        &SnapshotFiles { load: vec![SnapshotLoad { snap: 50, hash: H10, parent: None }], ..SnapshotFiles::default() },
    );
    assert!(r.failed[0].1.contains("no prefix-cache disk directory"));
}

/// Reading a snapshot needs its blocks from the pool: with too few free, it fails whole.
#[test]
fn a_restore_that_does_not_fit_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = models(SelfMixerKind::GatedRetention, &tmp.path().join("m"));
    let prompt = tokens(77, 300, 6);
    let root = tempfile::tempdir().unwrap();
    let mut x = Executor::new(Engine::new(model.clone(), &opts(CacheDtype::F32)));
    let store = store_of(&x, root.path());
    round_trip(&mut x, &store, &prompt);
    // A pool of 3 blocks: snapshot 10 (32 tokens) needs 2, so 11 (up to 70) cannot follow.
    let block = x.engine().pool().block_bytes();
    let small = EngineOptions { cache_budget_bytes: 3 * block, ..opts(CacheDtype::F32) };
    let mut y = Executor::new(Engine::new(model, &small));
    let req = SnapshotFiles {
        load: vec![
            SnapshotLoad { snap: 1, hash: H10, parent: None },
            SnapshotLoad { snap: 2, hash: H11, parent: Some(1) },
        ],
        ..SnapshotFiles::default()
    };
    let r = y.snapshot_files(Some(&store), &req);
    assert_eq!(r.loaded, [1]);
    assert!(r.failed[0].1.contains("budget"), "{:?}", r.failed);
    assert_eq!(y.engine().pool().used_blocks(), 2);
    assert!(store.list().unwrap().len() == 2, "a file that fits nowhere is still good");
}
