//! A CPU engine runs each step on a thread pool of its own (`Engine::step`): the step's spans
//! are made on that pool's threads, under the caller's subscriber and inside the caller's span.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use yoco_worker::engine::{Logits, StepItem};

/// A new span: its name, its parent's name, and the thread it was made on.
type Made = (String, Option<String>, String);

/// Every new span.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Made>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = ctx.span(id).and_then(|s| s.parent()).map(|p| p.name().to_string());
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.0.lock().unwrap().push((attrs.metadata().name().to_string(), parent, thread));
    }
}

#[test]
fn a_step_runs_on_the_engines_threads_inside_the_callers_span() {
    let model = load("gret");
    let mut engine = engine(&model, 16);
    engine.add_sequence(1).unwrap();
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    tracing::subscriber::with_default(subscriber, || {
        let _request = tracing::info_span!("request").entered();
        engine.step(&[StepItem::prefill(1, &[1, 2, 3], Logits::Last)]).unwrap();
        engine.step(&[StepItem::decode(1, &[4])]).unwrap();
    });
    let spans = spans.0.lock().unwrap();
    let steps: Vec<_> = spans.iter().filter(|(name, ..)| name == "step").collect();
    assert_eq!(steps.len(), 2, "one span per step, under the caller's subscriber: {spans:?}");
    for (_, parent, thread) in steps {
        assert_eq!(parent.as_deref(), Some("request"), "the caller's span is the step's parent");
        assert!(thread.starts_with("yoco-engine-"), "the step ran on {thread:?}, not the engine's threads");
    }
}
