//! A global KV cache in bf16 or f16: the same engine (kernels compute in f32, rows are rounded
//! when written), so it agrees with the f32 cache up to the rounding of K and V, and every
//! parallel path (chunked prefill, two context-parallel ranks, decode) agrees with the
//! single-rank run of the same cache type to f32 tolerance.

mod common;

use common::{assert_parallel_paths_agree, prefill_then_decode, random_model, rel_err, small_config, tokens};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, EngineOptions};
use yoco_worker::kernels::kv_block::CacheDtype;

const VOCAB: usize = 300;

fn opts(dtype: CacheDtype) -> EngineOptions {
    EngineOptions { block_tokens: 16, cache_budget_bytes: 64 << 20, cache_dtype: dtype, ..EngineOptions::default() }
}

#[test]
fn half_caches_match_f32_to_their_rounding_and_themselves_across_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tokens(150, VOCAB, 3);
    let extra = tokens(6, VOCAB, 4);
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let model = random_model(&small_config(mixer), 23, false, &tmp.path().join(format!("{mixer:?}")));
        let f32_run =
            prefill_then_decode(&mut Engine::new(model.clone(), &opts(CacheDtype::F32)), &prompt, 150, &extra);
        // Rounding K and V to 8 (bf16) or 11 (f16) significant bits moves the logits by about
        // that much relative to their scale; measured: bf16 3.2e-3-3.6e-3, f16 3.2e-4-3.6e-4.
        for (dtype, bound) in [(CacheDtype::Bf16, 1e-2), (CacheDtype::F16, 1e-3)] {
            let whole = prefill_then_decode(&mut Engine::new(model.clone(), &opts(dtype)), &prompt, 150, &extra);
            let err = rel_err(&whole, &f32_run);
            eprintln!("{mixer:?}: {dtype} cache vs f32: largest relative logit error {err:.2e}");
            assert!(err < bound && err > 0.0, "{mixer:?} {dtype} vs f32: rel err {err:e} (bound {bound:e})");
            assert_parallel_paths_agree(&model, &opts(dtype), &prompt, &extra, &whole, &format!("{mixer:?} {dtype}"));
        }
    }
}

#[test]
fn a_half_cache_holds_twice_the_positions_in_the_same_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::GatedRetention), 5, false, tmp.path());
    let budget = 40 * 16 * model.cfg.cache_numbers_per_token() * 4; // 40 f32 blocks of 16 tokens
    let capacity = |dtype| {
        let e = Engine::new(
            model.clone(),
            &EngineOptions {
                block_tokens: 16,
                cache_budget_bytes: budget,
                cache_dtype: dtype,
                ..EngineOptions::default()
            },
        );
        (e.pool().capacity_tokens(), e.pool().block_bytes())
    };
    let (f32_tokens, f32_block) = capacity(CacheDtype::F32);
    assert_eq!(f32_tokens, 40 * 16);
    for dtype in [CacheDtype::Bf16, CacheDtype::F16] {
        let (tokens, block) = capacity(dtype);
        assert_eq!((tokens, block * 2), (2 * f32_tokens, f32_block), "{dtype}");
    }
}
