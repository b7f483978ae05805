//! The tokenizer of a sentence-transformers (BERT-family) folder, from its
//! `tokenizer.json`, with padding off and truncation at the model's max sequence length.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

pub struct EncoderTokenizer {
    inner: Tokenizer,
    max_len: usize,
    cls_id: Option<u32>,
    sep_id: Option<u32>,
}

impl EncoderTokenizer {
    /// `max_len` counts the special tokens ([CLS] … [SEP]).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| Error::model_load(path, e))?;
        // The bundled tokenizer.json pads and truncates at 128; sentence-transformers
        // truncates at max_seq_length (256 for MiniLM) and never pads a single input.
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::model_load(path, e))?;
        let cls_id = inner.token_to_id("[CLS]");
        let sep_id = inner.token_to_id("[SEP]");
        Ok(Self { inner, max_len, cls_id, sep_id })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, with special tokens, truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, true).map_err(|e| Error::invalid("input", format!("cannot tokenize input: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Wraps caller-supplied token ids with [CLS]/[SEP] (as the tokenizer would) and
    /// truncates to the max length, keeping the final [SEP]. Ids that already start with
    /// [CLS] and end with [SEP] are taken as a complete sequence.
    pub fn wrap_ids(&self, ids: &[u32]) -> Vec<u32> {
        let already_wrapped = ids.len() >= 2 && ids.first().copied() == self.cls_id && ids.last().copied() == self.sep_id;
        let ids = if already_wrapped && self.cls_id.is_some() { &ids[1..ids.len() - 1] } else { ids };
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.extend(self.cls_id);
        let room = self.max_len.saturating_sub(out.len() + usize::from(self.sep_id.is_some()));
        out.extend(ids.iter().take(room));
        out.extend(self.sep_id);
        out
    }
}
