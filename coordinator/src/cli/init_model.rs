//! `yoco init-model`: a model directory with random weights of a preset's shape, or the
//! built-in (trained) default model.

use std::path::PathBuf;

use anyhow::{bail, Context};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::presets::{write_random_model, Preset, StoreDtype};

#[derive(clap::Args)]
pub struct Args {
    /// Random weights of this shape: tiny, small, or 3b (YOCO-3B's shape); or `default`: the
    /// built-in trained model (the one `serve` and `generate` use without --model), as it is.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Use sliding-window attention with this window instead of gated retention.
    #[arg(long)]
    sliding_window: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    #[arg(long)]
    rope_theta: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage type of the weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Tie the output projection to the embedding (no output_projection.weight).
    #[arg(long)]
    tied: bool,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.preset == "default" {
        if args.sliding_window.is_some() || args.vocab_size.is_some() || args.rope_theta.is_some() || args.tied {
            bail!("--preset default is the trained model as it is: no shape options");
        }
        crate::default_model::write_files(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!("wrote the built-in default model to {}", args.out.display());
        return Ok(());
    }
    let Some(preset) = Preset::parse(&args.preset) else {
        bail!("unknown preset `{}` (expected tiny, small, 3b or default)", args.preset);
    };
    let Some(dtype) = StoreDtype::parse(&args.dtype) else {
        bail!("unknown dtype `{}` (expected f32, bf16 or f16)", args.dtype);
    };
    let mut cfg = preset.config();
    if let Some(window) = args.sliding_window {
        if window == 0 {
            bail!("--sliding-window must be at least 1");
        }
        cfg.mixer = SelfMixerKind::SlidingWindow { window };
    }
    if let Some(v) = args.vocab_size {
        cfg.vocab_size = v;
    }
    if let Some(theta) = args.rope_theta {
        cfg.rope_theta = theta;
    }
    // Round-trip through the parser so that a bad override is reported like a bad params.json.
    let cfg = yoco_worker::config::ModelConfig::from_json(&cfg.to_json())?;
    write_random_model(&cfg, dtype, args.seed, args.tied, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {} ({} parameters, {:?}) to {}", args.preset, cfg.n_params(args.tied), dtype, args.out.display());
    Ok(())
}
