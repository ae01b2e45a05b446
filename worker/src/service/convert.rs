//! Between the wire types of `yoco.worker.v1` and the executor's plan and results. Everything a
//! peer sends is validated here, at the edge.

use yoco_proto::worker::v1 as pb;

use crate::plan::{
    BlockHash, DecodeWork, Plan, PrefillWork, PromptLogprob, Sampled, SeqResult, SeqSpec, SnapshotFile, SnapshotFiles,
    SnapshotFilesReport, SnapshotLoad, SnapshotSave,
};
use crate::sampling::SamplingParams;

pub fn sampling_to_pb(s: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        temperature: s.temperature,
        top_k: s.top_k as u32,
        top_p: s.top_p,
        min_p: s.min_p,
        seed: s.seed,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
    }
}

fn sampling_from_pb(s: Option<&pb::Sampling>) -> Result<SamplingParams, String> {
    let s = s.ok_or("a new sequence needs its sampling settings")?;
    let params = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        seed: s.seed,
        // 0 on the wire is unset (off), not an invalid penalty.
        repetition_penalty: if s.repetition_penalty == 0.0 { 1.0 } else { s.repetition_penalty },
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
    };
    params.validate().map_err(|e| e.to_string())?;
    Ok(params)
}

pub fn plan_to_pb(step_id: u64, plan: &Plan) -> pb::StepRequest {
    pb::StepRequest {
        step_id,
        add: plan
            .add
            .iter()
            .map(|s| pb::SequenceSpec {
                seq_id: s.seq,
                sampling: Some(sampling_to_pb(&s.sampling)),
                top_logprobs: s.top_logprobs as u32,
                prompt_logprobs: s.prompt_logprobs,
                request_id: s.request_id.clone(),
                resume_snapshot: s.resume_from,
                resumed_tokens: s.resumed_tokens.clone(),
            })
            .collect(),
        prefill: plan
            .prefill
            .iter()
            .map(|p| pb::PrefillItem {
                seq_id: p.seq,
                tokens: p.tokens.clone(),
                chunk_starts: p.chunk_starts.iter().map(|&s| s as u32).collect(),
                sample: p.sample,
                next_token: p.next_token,
                snapshot: p.snapshot,
            })
            .collect(),
        decode: plan.decode.iter().map(|d| pb::DecodeItem { seq_id: d.seq, token: d.token }).collect(),
        free: plan.free.clone(),
        drop_snapshots: plan.drop_snapshots.clone(),
    }
}

/// Most alternatives a request may ask for per token.
pub const MAX_TOP_LOGPROBS: u32 = 100;

pub fn plan_from_pb(req: &pb::StepRequest) -> Result<Plan, String> {
    let add = req
        .add
        .iter()
        .map(|s| {
            if s.top_logprobs > MAX_TOP_LOGPROBS {
                return Err(format!("top_logprobs {} exceeds {MAX_TOP_LOGPROBS}", s.top_logprobs));
            }
            if s.request_id.len() > 256 {
                return Err(format!("request_id of {} bytes exceeds 256", s.request_id.len()));
            }
            Ok(SeqSpec {
                seq: s.seq_id,
                sampling: sampling_from_pb(s.sampling.as_ref())?,
                top_logprobs: s.top_logprobs as usize,
                prompt_logprobs: s.prompt_logprobs,
                request_id: s.request_id.clone(),
                resume_from: s.resume_snapshot,
                resumed_tokens: s.resumed_tokens.clone(),
            })
        })
        .collect::<Result<_, String>>()?;
    let prefill = req
        .prefill
        .iter()
        .map(|p| PrefillWork {
            seq: p.seq_id,
            tokens: p.tokens.clone(),
            chunk_starts: p.chunk_starts.iter().map(|&s| s as usize).collect(),
            sample: p.sample,
            next_token: p.next_token,
            snapshot: p.snapshot,
        })
        .collect();
    let decode = req.decode.iter().map(|d| DecodeWork { seq: d.seq_id, token: d.token }).collect();
    Ok(Plan { add, prefill, decode, free: req.free.clone(), drop_snapshots: req.drop_snapshots.clone() })
}

pub fn result_to_pb(r: &SeqResult) -> pb::SequenceResult {
    pb::SequenceResult {
        seq_id: r.seq,
        token: r.sampled.as_ref().map(|s| s.token),
        logprob: r.sampled.as_ref().map_or(0.0, |s| s.logprob),
        top_logprobs: r.sampled.as_ref().map(|s| token_logprobs(&s.top_logprobs)).unwrap_or_default(),
        prompt_logprobs: r.prompt_logprobs.iter().map(|p| p.logprob).collect(),
        shard_tokens: r.shard_tokens as u64,
        prompt_top_logprobs: r
            .prompt_logprobs
            .iter()
            .filter(|p| !p.top_logprobs.is_empty())
            .map(|p| pb::TopTokens { tokens: token_logprobs(&p.top_logprobs) })
            .collect(),
    }
}

pub fn result_from_pb(r: &pb::SequenceResult) -> SeqResult {
    SeqResult {
        seq: r.seq_id,
        sampled: r.token.map(|token| Sampled {
            token,
            logprob: r.logprob,
            top_logprobs: r.top_logprobs.iter().map(|t| (t.token, t.logprob)).collect(),
        }),
        // A peer that sent fewer alternatives than log-probabilities (or none: none were
        // asked) leaves the rest empty.
        prompt_logprobs: r
            .prompt_logprobs
            .iter()
            .enumerate()
            .map(|(i, &logprob)| PromptLogprob {
                logprob,
                top_logprobs: r
                    .prompt_top_logprobs
                    .get(i)
                    .map(|t| t.tokens.iter().map(|t| (t.token, t.logprob)).collect())
                    .unwrap_or_default(),
            })
            .collect(),
        shard_tokens: r.shard_tokens as usize,
    }
}

fn hash_from_pb(what: &str, b: &[u8]) -> Result<BlockHash, String> {
    b.try_into().map_err(|_| format!("{what}: {} bytes, a block hash is 32", b.len()))
}

pub fn snapshot_files_to_pb(f: &SnapshotFiles) -> pb::SnapshotFilesRequest {
    pb::SnapshotFilesRequest {
        remove: f.remove.iter().map(|h| h.to_vec()).collect(),
        save: f
            .save
            .iter()
            .map(|s| pb::SnapshotSave {
                snapshot: s.snap,
                hash: s.hash.to_vec(),
                parent: s.parent.map(|p| p.0),
                parent_hash: s.parent.map(|p| p.1.to_vec()).unwrap_or_default(),
            })
            .collect(),
        load: f
            .load
            .iter()
            .map(|l| pb::SnapshotLoad { snapshot: l.snap, hash: l.hash.to_vec(), parent: l.parent })
            .collect(),
        list: f.list,
        drop: f.drop.clone(),
    }
}

pub fn snapshot_files_from_pb(r: &pb::SnapshotFilesRequest) -> Result<SnapshotFiles, String> {
    let save = r
        .save
        .iter()
        .map(|s| {
            let parent = match s.parent {
                Some(p) => Some((p, hash_from_pb("parent_hash", &s.parent_hash)?)),
                None if s.parent_hash.is_empty() => None,
                None => return Err("parent_hash without a parent".to_string()),
            };
            Ok(SnapshotSave { snap: s.snapshot, hash: hash_from_pb("hash", &s.hash)?, parent })
        })
        .collect::<Result<_, String>>()?;
    let load = r
        .load
        .iter()
        .map(|l| Ok(SnapshotLoad { snap: l.snapshot, hash: hash_from_pb("hash", &l.hash)?, parent: l.parent }))
        .collect::<Result<_, String>>()?;
    let remove = r.remove.iter().map(|h| hash_from_pb("remove", h)).collect::<Result<_, String>>()?;
    Ok(SnapshotFiles { remove, save, drop: r.drop.clone(), load, list: r.list })
}

pub fn snapshot_report_to_pb(r: &SnapshotFilesReport) -> pb::SnapshotFilesResponse {
    pb::SnapshotFilesResponse {
        saved: r.saved.iter().map(|s| s.0).collect(),
        saved_bytes: r.saved.iter().map(|s| s.1).collect(),
        loaded: r.loaded.clone(),
        failed: r.failed.iter().map(|(id, why)| pb::SnapshotFailure { snapshot: *id, reason: why.clone() }).collect(),
        listed: r
            .listed
            .iter()
            .map(|f| pb::SnapshotFile {
                hash: f.hash.to_vec(),
                parent_hash: f.parent_hash.map(|h| h.to_vec()).unwrap_or_default(),
                pos: f.pos as u64,
                rows: f.rows as u64,
                bytes: f.bytes,
            })
            .collect(),
    }
}

/// A rank's report, checked (the coordinator reads it).
pub fn snapshot_report_from_pb(r: &pb::SnapshotFilesResponse) -> Result<SnapshotFilesReport, String> {
    if r.saved.len() != r.saved_bytes.len() {
        return Err("saved and saved_bytes differ in length".into());
    }
    let listed = r
        .listed
        .iter()
        .map(|f| {
            Ok(SnapshotFile {
                hash: hash_from_pb("listed hash", &f.hash)?,
                parent_hash: match f.parent_hash.is_empty() {
                    true => None,
                    false => Some(hash_from_pb("listed parent_hash", &f.parent_hash)?),
                },
                pos: f.pos as usize,
                rows: f.rows as usize,
                bytes: f.bytes,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(SnapshotFilesReport {
        saved: r.saved.iter().copied().zip(r.saved_bytes.iter().copied()).collect(),
        loaded: r.loaded.clone(),
        failed: r.failed.iter().map(|f| (f.snapshot, f.reason.clone())).collect(),
        listed,
    })
}

fn token_logprobs(top: &[(u32, f32)]) -> Vec<pb::TokenLogprob> {
    top.iter().map(|&(token, logprob)| pb::TokenLogprob { token, logprob }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_trip_and_bad_sampling_is_refused() {
        let plan = Plan {
            add: vec![SeqSpec {
                seq: 3,
                sampling: SamplingParams {
                    temperature: 0.5,
                    top_k: 4,
                    top_p: 0.9,
                    min_p: 0.0,
                    seed: 7,
                    repetition_penalty: 1.3,
                    presence_penalty: -0.5,
                    frequency_penalty: 0.25,
                },
                top_logprobs: 2,
                prompt_logprobs: true,
                request_id: "req-3".into(),
                resume_from: Some(11),
                resumed_tokens: vec![5, 6],
            }],
            prefill: vec![PrefillWork {
                seq: 3,
                tokens: vec![1, 2, 3],
                chunk_starts: vec![0, 2],
                sample: true,
                next_token: None,
                snapshot: Some(12),
            }],
            decode: vec![DecodeWork { seq: 9, token: 5 }],
            free: vec![4],
            drop_snapshots: vec![10],
        };
        let pb = plan_to_pb(1, &plan);
        let back = plan_from_pb(&pb).unwrap();
        assert_eq!(format!("{back:?}"), format!("{plan:?}"));
        let mut bad = pb.clone();
        bad.add[0].sampling.as_mut().unwrap().temperature = -1.0;
        assert!(plan_from_pb(&bad).unwrap_err().contains("temperature"));
        let bad_penalty = |f: fn(&mut pb::Sampling)| {
            let mut bad = pb.clone();
            f(bad.add[0].sampling.as_mut().unwrap());
            plan_from_pb(&bad).unwrap_err()
        };
        assert!(bad_penalty(|s| s.temperature = 1000.0).contains("temperature"));
        assert!(bad_penalty(|s| s.repetition_penalty = -1.0).contains("repetition_penalty"));
        assert!(bad_penalty(|s| s.repetition_penalty = 11.0).contains("repetition_penalty"));
        assert!(bad_penalty(|s| s.presence_penalty = 2.5).contains("presence_penalty"));
        assert!(bad_penalty(|s| s.frequency_penalty = f32::NAN).contains("frequency_penalty"));
        // Unset on the wire: no repetition penalty (1), and the defaults round-trip.
        let mut unset = pb.clone();
        unset.add[0].sampling.as_mut().unwrap().repetition_penalty = 0.0;
        assert_eq!(plan_from_pb(&unset).unwrap().add[0].sampling.repetition_penalty, 1.0);
        let defaults = SamplingParams::default();
        let mut wire = sampling_to_pb(&defaults);
        assert_eq!(sampling_from_pb(Some(&wire)), Ok(defaults.clone()));
        wire.repetition_penalty = 0.0;
        assert_eq!(sampling_from_pb(Some(&wire)), Ok(defaults));
        bad.add[0].sampling = None;
        assert!(plan_from_pb(&bad).is_err());
        let mut bad = pb;
        bad.add[0].top_logprobs = 1000;
        assert!(plan_from_pb(&bad).unwrap_err().contains("top_logprobs"));
    }

    #[test]
    fn snapshot_files_round_trip_and_bad_hashes_are_refused() {
        let h = |b: u8| [b; 32];
        let files = SnapshotFiles {
            remove: vec![h(1)],
            save: vec![
                SnapshotSave { snap: 3, hash: h(2), parent: Some((2, h(3))) },
                SnapshotSave { snap: 4, hash: h(4), parent: None },
            ],
            drop: vec![2],
            load: vec![SnapshotLoad { snap: 5, hash: h(5), parent: Some(3) }],
            list: true,
        };
        let wire = snapshot_files_to_pb(&files);
        assert_eq!(snapshot_files_from_pb(&wire), Ok(files));
        let mut bad = wire.clone();
        bad.save[0].hash.pop();
        assert!(snapshot_files_from_pb(&bad).unwrap_err().contains("32"));
        let mut bad = wire;
        bad.save[1].parent_hash = vec![0; 32];
        assert!(snapshot_files_from_pb(&bad).is_err(), "a parent hash without a parent");
        let report = SnapshotFilesReport {
            saved: vec![(3, 100)],
            loaded: vec![5],
            failed: vec![(4, "disk full".into())],
            listed: vec![SnapshotFile { hash: h(2), parent_hash: None, pos: 512, rows: 256, bytes: 9 }],
        };
        let wire = snapshot_report_to_pb(&report);
        assert_eq!(snapshot_report_from_pb(&wire), Ok(report));
        let mut bad = wire;
        bad.saved_bytes.clear();
        assert!(snapshot_report_from_pb(&bad).is_err());
    }

    #[test]
    fn results_round_trip_with_prompt_alternatives() {
        let lp = |logprob, top: &[(u32, f32)]| PromptLogprob { logprob, top_logprobs: top.to_vec() };
        let r = SeqResult {
            seq: 4,
            sampled: Some(Sampled { token: 7, logprob: -0.5, top_logprobs: vec![(7, -0.5), (2, -1.5)] }),
            prompt_logprobs: vec![lp(-1.0, &[(3, -0.25), (9, -2.0)]), lp(-3.0, &[(1, -0.5), (3, -3.0)])],
            shard_tokens: 12,
        };
        assert_eq!(result_from_pb(&result_to_pb(&r)), r);
        let plain = SeqResult { prompt_logprobs: vec![lp(-1.0, &[]), lp(-2.0, &[])], ..r };
        let wire = result_to_pb(&plain);
        assert!(wire.prompt_top_logprobs.is_empty());
        assert_eq!(result_from_pb(&wire), plain);
    }
}
