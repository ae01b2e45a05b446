//! Text ↔ token ids: tiktoken `cl100k_base` (YOCO-3B's tokenizer) by default, or the model
//! directory's `tokenizer.json` when it has one. Ids the tokenizer does not know (YOCO pads the
//! vocabulary to 100288) decode to a visible placeholder instead of failing.

use std::path::Path;

use tiktoken_rs::CoreBPE;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("cannot tokenize: {0}")]
    Encode(String),
}

pub enum Tokenizer {
    Tiktoken(&'static CoreBPE),
    HuggingFace(Box<tokenizers::Tokenizer>),
}

/// cl100k's `<|endoftext|>`.
const CL100K_EOS: u32 = 100257;

impl Tokenizer {
    /// The model directory's `tokenizer.json` if present, else cl100k_base.
    pub fn for_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if path.exists() {
            let tok = tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| TokenizerError::Load { path: path.display().to_string(), reason: e.to_string() })?;
            Ok(Tokenizer::HuggingFace(Box::new(tok)))
        } else {
            Ok(Self::cl100k())
        }
    }

    pub fn cl100k() -> Self {
        Tokenizer::Tiktoken(tiktoken_rs::cl100k_base_singleton())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Tiktoken(_) => "tiktoken:cl100k_base",
            Tokenizer::HuggingFace(_) => "tokenizer.json",
        }
    }

    /// Ids the tokenizer can produce or decode (special tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Tiktoken(_) => 100277,
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// The end-of-text token, which ends generation unless told otherwise.
    pub fn eos_token(&self) -> Option<u32> {
        match self {
            Tokenizer::Tiktoken(_) => Some(CL100K_EOS),
            Tokenizer::HuggingFace(t) => {
                ["</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>"].iter().find_map(|s| t.token_to_id(s))
            }
        }
    }

    /// Encodes text as ordinary text: special-token markup in user text is not interpreted
    /// (pass ids to send special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Tiktoken(bpe) => Ok(bpe.encode_ordinary(text)),
            Tokenizer::HuggingFace(t) => {
                t.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| TokenizerError::Encode(e.to_string()))
            }
        }
    }

    /// Encodes text in which special-token markup (`<|endoftext|>`, a chat template's
    /// `<|im_start|>`) is parsed as those tokens: for text the server itself produced, such as a
    /// rendered chat template, never for user text on its own.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Tiktoken(bpe) => Ok(bpe.encode_with_special_tokens(text)),
            Tokenizer::HuggingFace(_) => self.encode(text),
        }
    }

    /// The bytes of one token; `None` for ids the tokenizer does not know.
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match self {
            Tokenizer::Tiktoken(bpe) => bpe.decode_bytes(&[id]).ok(),
            Tokenizer::HuggingFace(t) => {
                t.id_to_token(id)?;
                t.decode(&[id], false).ok().map(String::into_bytes)
            }
        }
    }

    /// Decodes ids to text. Unknown ids become `<|unk:ID|>`; bytes that are not valid UTF-8 on
    /// their own become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Tiktoken(_) => {
                let mut bytes = Vec::new();
                for &id in ids {
                    match self.token_bytes(id) {
                        Some(b) => bytes.extend(b),
                        None => bytes.extend(placeholder(id).into_bytes()),
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::HuggingFace(t) => {
                // Runs of known ids decode together so that multi-token characters join up.
                let mut out = String::new();
                let mut run: Vec<u32> = Vec::new();
                let flush = |run: &mut Vec<u32>, out: &mut String| {
                    if !run.is_empty() {
                        out.push_str(&t.decode(run, false).unwrap_or_default());
                        run.clear();
                    }
                };
                for &id in ids {
                    if t.id_to_token(id).is_some() {
                        run.push(id);
                    } else {
                        flush(&mut run, &mut out);
                        out.push_str(&placeholder(id));
                    }
                }
                flush(&mut run, &mut out);
                out
            }
        }
    }
}

fn placeholder(id: u32) -> String {
    format!("<|unk:{id}|>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cl100k_round_trip_and_padding_ids() {
        let tok = Tokenizer::cl100k();
        let text = "Hello, world! Grüße — 你好 🦀";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids), text);
        assert_eq!(tok.encode("hello world").unwrap(), vec![15339, 1917]);
        // 100261 is unused in cl100k, 100287 is YOCO's padding: placeholders, not panics.
        assert_eq!(tok.decode(&[15339, 100261, 100287]), "hello<|unk:100261|><|unk:100287|>");
        assert_eq!(tok.decode(&[CL100K_EOS]), "<|endoftext|>");
        // Special-token markup in text is text, unless asked.
        assert!(tok.encode("<|endoftext|>").unwrap().len() > 1);
        assert_eq!(tok.encode_with_special("hello<|endoftext|>").unwrap(), vec![15339, CL100K_EOS]);
    }

    #[test]
    fn hugging_face_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"hello":0,"world":1,"[UNK]":2},
            "unk_token":"[UNK]"}}"#;
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let tok = Tokenizer::for_model_dir(dir.path()).unwrap();
        assert_eq!(tok.name(), "tokenizer.json");
        assert_eq!(tok.encode("hello world").unwrap(), vec![0, 1]);
        assert_eq!(tok.vocab_size(), 3);
        assert!(tok.decode(&[0, 7]).ends_with("<|unk:7|>"));
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        assert!(Tokenizer::for_model_dir(dir.path()).is_err());
    }
}
