//! Incremental detokenization for streaming: token bytes in, text deltas out.
//!
//! Two things are held back between tokens: the bytes of a UTF-8 character split across
//! tokens (byte-level BPE splits emoji and CJK characters), and text that could be the
//! beginning of a stop string, until the next tokens either complete the stop string
//! (then it and everything after it are dropped) or rule it out.

use super::gguf_vocab::GgufTokenizer;

/// What the engine needs to know about a vocabulary to turn tokens into text.
pub trait Vocab: Send + Sync {
    fn vocab_size(&self) -> usize;
    /// The raw bytes of a token (a control token's literal text); `None` if out of range.
    fn token_bytes(&self, id: u32) -> Option<&[u8]>;
    /// Control tokens (`<|im_start|>`, ...) produce no output text.
    fn is_special(&self, id: u32) -> bool;
    /// Ids that end generation unless the request sets `ignore_eos`.
    fn eos_token_ids(&self) -> &[u32];

    /// The bytes a generated token adds to the output text.
    fn output_bytes(&self, id: u32) -> &[u8] {
        if self.is_special(id) {
            &[]
        } else {
            self.token_bytes(id).unwrap_or(&[])
        }
    }
}

impl Vocab for GgufTokenizer {
    fn vocab_size(&self) -> usize {
        GgufTokenizer::vocab_size(self)
    }
    fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        GgufTokenizer::token_bytes(self, id)
    }
    fn is_special(&self, id: u32) -> bool {
        GgufTokenizer::is_special(self, id)
    }
    fn eos_token_ids(&self) -> &[u32] {
        GgufTokenizer::eos_token_ids(self)
    }
}

/// The result of feeding one token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DetokDelta {
    /// Text that is now final.
    pub text: String,
    /// Which stop string matched (index into the stop list); the sequence is over.
    pub stopped_by: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    /// The leading bytes of a character whose remaining bytes have not arrived yet.
    partial_char: Vec<u8>,
    /// Decoded text not emitted yet because it might start a stop string.
    held_text: String,
    stops: Vec<String>,
    stopped: bool,
}

impl Detokenizer {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Whether a stop string matched; later input is ignored.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds one token's output bytes; returns the text that became final.
    pub fn push(&mut self, bytes: &[u8]) -> DetokDelta {
        if self.stopped {
            return DetokDelta::default();
        }
        self.partial_char.extend_from_slice(bytes);
        let consumed = decode_utf8_prefix(&self.partial_char, &mut self.held_text);
        self.partial_char.drain(..consumed);

        if let Some((at, which)) = self.earliest_stop() {
            self.held_text.truncate(at);
            self.stopped = true;
            self.partial_char.clear();
            return DetokDelta {
                text: std::mem::take(&mut self.held_text),
                stopped_by: Some(which),
            };
        }
        let hold = self.stop_prefix_suffix_len();
        let emit_len = self.held_text.len() - hold;
        let rest = self.held_text.split_off(emit_len);
        DetokDelta {
            text: std::mem::replace(&mut self.held_text, rest),
            stopped_by: None,
        }
    }

    /// Ends the sequence (EOS, length): everything held back is final. An incomplete
    /// character becomes U+FFFD, which can complete a stop string (one ending in U+FFFD after
    /// held-back text): the text is then cut before it, as in [`push`](Self::push).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        if !self.partial_char.is_empty() {
            self.held_text.push_str(&String::from_utf8_lossy(&self.partial_char));
            self.partial_char.clear();
        }
        if let Some((at, _)) = self.earliest_stop() {
            self.held_text.truncate(at);
            self.stopped = true;
        }
        std::mem::take(&mut self.held_text)
    }

    /// The leftmost match of any stop string in the held text (ties: the earlier stop).
    fn earliest_stop(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held_text.find(s.as_str()).map(|at| (at, i)))
            .min()
    }

    /// The longest suffix of the held text that is a proper prefix of some stop string.
    fn stop_prefix_suffix_len(&self) -> usize {
        let held = self.held_text.as_str();
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len().min(held.len() + 1))
                    .rev()
                    .find(|&k| stop.is_char_boundary(k) && held.ends_with(&stop[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

/// Appends the longest decodable prefix of `bytes` to `out` and returns how many bytes it
/// used. Invalid bytes become U+FFFD; an incomplete character at the end is left over.
fn decode_utf8_prefix(bytes: &[u8], out: &mut String) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(s) => {
                out.push_str(s);
                return bytes.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // SAFETY-free: `valid_up_to` bytes are valid UTF-8 by definition.
                out.push_str(std::str::from_utf8(&bytes[at..at + valid]).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        at += valid + bad;
                    }
                    None => return at + valid,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, Option<usize>, String) {
        let mut d = Detokenizer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        let mut stopped = None;
        for p in pieces {
            let out = d.push(p);
            deltas.push(out.text);
            if out.stopped_by.is_some() {
                stopped = out.stopped_by;
                break;
            }
        }
        let tail = d.finish();
        (deltas, stopped, tail)
    }

    #[test]
    fn split_characters_are_held_until_complete() {
        let euro = "€".as_bytes(); // 3 bytes
        let (deltas, _, tail) = run(&[], &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]);
        assert_eq!(deltas, vec!["a", "", "", "€", "b"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn stop_strings_across_tokens_are_cut() {
        let (deltas, stopped, tail) = run(&["END"], &[b"hello E", b"N", b"D and more"]);
        assert_eq!(deltas.concat(), "hello ");
        assert_eq!(stopped, Some(0));
        assert_eq!(tail, "");
        // A false start is released once ruled out.
        let (deltas, stopped, tail) = run(&["END"], &[b"EN", b"x", b"E"]);
        assert_eq!(deltas, vec!["", "ENx", ""]);
        assert_eq!(stopped, None);
        assert_eq!(tail, "E");
    }

    /// Found by the detokenizer fuzz target: the U+FFFD that `finish` makes of an unfinished
    /// character was emitted without the stop check, letting a stop string through.
    #[test]
    fn a_stop_string_completed_at_finish_is_cut() {
        for stop in ["\u{FFFD}", "x\u{FFFD}"] {
            let mut d = Detokenizer::new(vec![stop.to_string()]);
            assert_eq!(d.push(b"ax").text, if stop.starts_with('x') { "a" } else { "ax" });
            assert_eq!(d.push(&[0xe2, 0x82]).text, "");
            assert_eq!(d.finish(), "", "stop {stop:?}");
            assert!(d.is_stopped());
        }
        // Without a stop string the unfinished character is still a replacement character.
        let mut d = Detokenizer::new(vec!["y".into()]);
        assert_eq!(d.push(&[b'a', 0xe2]).text, "a");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert!(!d.is_stopped());
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (deltas, _, tail) = run(&[], &[b"a\xff", b"b", &[0xe2, 0x82]]);
        assert_eq!(deltas, vec!["a\u{FFFD}", "b", ""]);
        assert_eq!(tail, "\u{FFFD}");
    }
}
