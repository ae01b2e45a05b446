//! Chat templates: a model directory's `tokenizer_config.json` may carry a Jinja `chat_template`
//! (as Hugging Face models do); `/v1/chat/completions` renders the messages with it
//! (minijinja) into the prompt text.

use std::path::Path;

use anyhow::Context;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// `bos_token` and friends are either a string or `{"content": "..."}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template in `dir/tokenizer_config.json`, if there is one.
    pub fn for_model_dir(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let cfg: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // A string, or a list of named templates of which "default" is the chat one.
        let source = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .with_context(|| format!("{}: no `default` chat template in the list", path.display()))?,
            _ => return Ok(None),
        };
        Self::new(source, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))
            .with_context(|| format!("{}: chat_template", path.display()))
            .map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The prompt for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| format!("the chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
        {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect()
    }

    #[test]
    fn renders_chatml_with_a_generation_prompt() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new()).unwrap();
        let out = t.render(&msgs(&[("system", "Be brief."), ("user", "Hi")])).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn reads_tokenizer_config_and_reports_template_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::for_model_dir(dir.path()).unwrap().is_none());
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "chat_template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.role }}] {{ m.content }} {% endfor %}",
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::for_model_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&msgs(&[("user", "a")])).unwrap(), "<s>[user] a ");
        assert!(t.render(&msgs(&[("tool", "x")])).unwrap_err().contains("no tools"));
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "{% for %}"}"#).unwrap();
        assert!(ChatTemplate::for_model_dir(dir.path()).is_err());
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"model_max_length": 10}"#).unwrap();
        assert!(ChatTemplate::for_model_dir(dir.path()).unwrap().is_none());
    }
}
