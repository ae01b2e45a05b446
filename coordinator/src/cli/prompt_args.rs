//! The prompt flags `yoco generate` and `yoco client generate` share.

use std::path::PathBuf;

use anyhow::{bail, Context};
use yoco_proto::v1::generate_request::Prompt;
use yoco_proto::v1::TokenIds;

#[derive(clap::Args)]
pub struct PromptArgs {
    #[arg(long, group = "input")]
    prompt: Option<String>,
    #[arg(long, group = "input")]
    prompt_file: Option<PathBuf>,
    /// Comma-separated token ids.
    #[arg(long, group = "input", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
}

impl PromptArgs {
    /// The prompt as text (from the flag or the file) or as token ids.
    pub fn read(&self) -> anyhow::Result<Prompt> {
        Ok(match (&self.prompt, &self.prompt_file, &self.prompt_ids) {
            (Some(text), _, _) => Prompt::Text(text.clone()),
            (_, Some(path), _) => {
                Prompt::Text(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
            }
            (_, _, Some(ids)) => Prompt::TokenIds(TokenIds { ids: ids.clone() }),
            _ => bail!("give the prompt with --prompt, --prompt-file or --prompt-ids"),
        })
    }
}
