//! Tokenizers: a wrapper over the `tokenizers` crate for sentence-transformers folders,
//! and (for GGUF models) a tokenizer built from GGUF metadata.

pub mod bert;
pub mod chat_template;
pub mod detok;
pub mod gguf_vocab;
