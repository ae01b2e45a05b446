//! The soak's report: the table of requests, errors, latencies, throughput and memory over time,
//! and the checks made on those figures.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use super::*;

/// What a run measured and what it found wrong.
pub struct Report {
    pub text: String,
    pub failures: Vec<String>,
    /// The run's folder, when it was kept.
    pub kept: Option<PathBuf>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The table, then the verdict: every failure (the first 50), and where the logs are kept.
    pub fn render(&self) -> String {
        let mut out = self.text.clone();
        if self.passed() {
            out.push_str("PASS\n");
        } else {
            let _ = writeln!(out, "FAIL: {} problems", self.failures.len());
            for f in self.failures.iter().take(50) {
                let _ = writeln!(out, "  - {f}");
            }
        }
        if let Some(dir) = &self.kept {
            let _ = writeln!(out, "logs kept in {}", dir.display());
        }
        out
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn ms(s: f64) -> String {
    if s.is_nan() {
        "-".into()
    } else if s >= 10.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn summarize(
    cfg: &Config,
    recs: &[Rec],
    routed: &HashMap<String, String>,
    timeline: &Timeline,
    samples: &[Sample],
    load_end: f64,
    setup: f64,
    names: &[String],
    failures: &mut Vec<String>,
    out: &mut String,
) {
    let w = |out: &mut String, s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    w(
        out,
        format!(
            "== yoco soak: {} s of load, {} clients, groups g0 g1 x {WORLD} ranks (tiny model, vocab {VOCAB}), \
             cache {} MiB per rank, lease TTL {LEASE_TTL} s; cluster up in {setup:.1} s ==",
            cfg.seconds, cfg.clients, cfg.cache_mib
        ),
    );
    // The kill window: from the kill to a little after g0 served again (requests routed just
    // before the re-form was seen may still meet the old group's refusal).
    let kill = timeline.kill.unwrap_or(f64::INFINITY);
    let window_end = timeline.reform.unwrap_or(f64::INFINITY) + 5.0;
    let mut errors: BTreeMap<(String, String, String, bool), usize> = BTreeMap::new();
    let mut examples: BTreeMap<(String, String, String, bool), String> = BTreeMap::new();
    let (mut ok, mut cancelled, mut expected, mut unexpected, mut hung) = (0, 0, 0, 0, 0);
    // Per group: ok, cancelled, failed; and ok among requests sent after the kill.
    let mut by_group: BTreeMap<String, [usize; 4]> = BTreeMap::new();
    for r in recs {
        let group = routed.get(&r.id).cloned().unwrap_or_else(|| "-".into());
        let g = by_group.entry(group.clone()).or_default();
        match &r.end {
            End::Ok => {
                ok += 1;
                g[0] += 1;
                if r.started >= kill {
                    g[3] += 1;
                }
            }
            End::Cancelled => {
                cancelled += 1;
                g[1] += 1;
            }
            End::Failed { code, message } => {
                g[2] += 1;
                let kind = expected_kind(*code, message);
                let in_window = r.ended >= kill - 1.0 && r.started <= window_end;
                let fine = kind.is_some() && group == "g0" && in_window;
                let kind = kind.unwrap_or("unexpected message").to_string();
                let key = (format!("{code:?}"), kind, group.clone(), fine);
                if fine {
                    expected += 1;
                } else {
                    unexpected += 1;
                    failures.push(format!(
                        "{}: unexpected error on group {group} (sent t={:.1}s, ended t={:.1}s, kill window \
                         {kill:.1}-{window_end:.1}s): {code:?}: {message}",
                        r.id, r.started, r.ended
                    ));
                }
                examples.entry(key.clone()).or_insert_with(|| message.clone());
                *errors.entry(key).or_default() += 1;
            }
            End::Hung => {
                hung += 1;
                g[2] += 1;
                failures.push(format!(
                    "{}: hung: still open {:.0} s after it was sent (t={:.1}s, group {group}, {}-token prompt)",
                    r.id,
                    r.ended - r.started,
                    r.started,
                    r.prompt_len
                ));
                *errors.entry(("-".into(), "hung past its deadline".into(), group.clone(), false)).or_default() += 1;
            }
            End::Broken(why) => {
                unexpected += 1;
                g[2] += 1;
                failures.push(format!("{}: {why} (group {group})", r.id));
                *errors.entry(("-".into(), "broken stream".into(), group.clone(), false)).or_default() += 1;
                examples.entry(("-".into(), "broken stream".into(), group.clone(), false)).or_insert(why.clone());
            }
        }
    }
    w(
        out,
        format!(
            "requests   sent {}  completed {ok}  cancelled by the client {cancelled}  failed as expected {expected}  \
             unexpected {unexpected}  hung {hung}",
            recs.len()
        ),
    );
    for (g, c) in &by_group {
        w(
            out,
            format!(
                "  group {g:<3} completed {:>6}  cancelled {:>5}  failed {:>4}  completed after the kill (sent t>={kill:.1}s) {:>6}",
                c[0], c[1], c[2], c[3]
            ),
        );
    }
    for g in GROUPS {
        let after = by_group.get(g).map_or(0, |c| c[3]);
        if after == 0 {
            failures.push(format!("no request sent after the kill completed on {g}"));
        }
    }
    w(out, "prompts    class              sent   done  cancel  fail  TTFT p50   TTFT p99   max prompt".into());
    for class in Class::ALL {
        let of: Vec<&Rec> = recs.iter().filter(|r| r.class == class).collect();
        if of.is_empty() {
            continue;
        }
        let ttft = sorted(of.iter().filter_map(|r| r.ttft).collect());
        let count = |f: fn(&End) -> bool| of.iter().filter(|r| f(&r.end)).count();
        w(
            out,
            format!(
                "           {:<16} {:>6} {:>6} {:>7} {:>5}  {:>9}  {:>9}  {:>9}",
                class.name(),
                of.len(),
                count(|e| matches!(e, End::Ok)),
                count(|e| matches!(e, End::Cancelled)),
                count(|e| !matches!(e, End::Ok | End::Cancelled)),
                ms(percentile(&ttft, 0.5)),
                ms(percentile(&ttft, 0.99)),
                of.iter().map(|r| r.prompt_len).max().unwrap_or(0)
            ),
        );
    }
    let ttft = sorted(recs.iter().filter_map(|r| r.ttft).collect());
    let itl = sorted(recs.iter().flat_map(|r| r.itl.iter().copied()).collect());
    w(
        out,
        format!(
            "latency    TTFT p50 {}  p99 {}  (n={})   inter-token p50 {}  p99 {}  (n={})",
            ms(percentile(&ttft, 0.5)),
            ms(percentile(&ttft, 0.99)),
            ttft.len(),
            ms(percentile(&itl, 0.5)),
            ms(percentile(&itl, 0.99)),
            itl.len()
        ),
    );
    let tokens: usize = recs.iter().map(|r| r.tokens).sum();
    let prompt: usize = recs.iter().filter(|r| matches!(r.end, End::Ok)).map(|r| r.prompt_len).sum();
    let cached: u64 = recs.iter().map(|r| r.cached).sum();
    w(
        out,
        format!(
            "throughput {tokens} tokens generated in {load_end:.1} s = {:.1} tokens/s; completed requests' prompts \
             {prompt} tokens ({:.0} tokens/s), {cached} of them from the prefix cache ({:.1}%)",
            tokens as f64 / load_end,
            prompt as f64 / load_end,
            100.0 * cached as f64 / prompt.max(1) as f64
        ),
    );
    let t = |x: Option<f64>| x.map_or("never".into(), |x| format!("t={x:.1}s"));
    w(
        out,
        format!(
            "chaos      g0 rank 1 killed {}, g0 out of service {}, rank restarted {}, g0 serving again {}",
            t(timeline.kill),
            t(timeline.g0_out),
            t(timeline.restart),
            t(timeline.reform)
        ),
    );
    if errors.is_empty() {
        w(out, "errors     none".into());
    } else {
        w(out, "errors     count  code         kind                                   group  expected  example".into());
        for (key, n) in &errors {
            let (code, kind, group, fine) = key;
            let example = examples.get(key).map(|m| m.chars().take(160).collect::<String>()).unwrap_or_default();
            w(
                out,
                format!(
                    "           {n:>5}  {code:<12} {kind:<38} {group:<6} {:<8}  {example}",
                    if *fine { "yes" } else { "NO" }
                ),
            );
        }
    }

    // Resident memory over time, at most ~20 rows.
    let header: String = names.iter().map(|n| format!("{n:>8}")).collect();
    w(out, format!("RSS (MiB)      t   coord{header}"));
    let stride = samples.len().div_ceil(20).max(1);
    for (i, s) in samples.iter().enumerate() {
        if i % stride == 0 || i + 1 == samples.len() {
            let cols: String = s.rss.iter().skip(1).map(|k| format!("{:>8}", mib(*k))).collect();
            w(out, format!("          {:>6.1} {:>7}{cols}", s.t, mib(s.rss[0])));
        }
    }
    let coord: Vec<(f64, u64)> = samples.iter().filter_map(|s| s.rss[0].map(|k| (s.t, k))).collect();
    let third = cfg.seconds as f64 / 3.0;
    if let (Some(&(tb, base)), Some(&(te, end))) = (coord.iter().rfind(|(t, _)| *t <= third), coord.last()) {
        let peak = coord.iter().map(|c| c.1).max().unwrap_or(0);
        let (base, end, peak) = (base as f64 / 1024.0, end as f64 / 1024.0, peak as f64 / 1024.0);
        let bound = base * (1.0 + RSS_GROWTH_FRACTION) + RSS_GROWTH_MIB;
        w(
            out,
            format!(
                "coordinator RSS {base:.1} MiB at t={tb:.1}s (end of the first third) -> {end:.1} MiB at t={te:.1}s \
                 (after the load and the flush): {:+.1} MiB ({:+.1}%), peak {peak:.1} MiB; bound {bound:.1} MiB",
                end - base,
                100.0 * (end - base) / base
            ),
        );
        if end > bound {
            failures.push(format!("coordinator RSS grew from {base:.1} MiB to {end:.1} MiB (bound {bound:.1} MiB)"));
        }
    } else {
        failures.push("no coordinator RSS samples".into());
    }
}
