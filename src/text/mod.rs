//! Question tokeniser and vocabularies (words and answers), saved with a run.
//!
//! Tokens are the lowercased words of the question with the punctuation
//! `? ! . , ; :` removed; words unseen in training map to `<unk>`.

pub mod glove;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Index of the padding token in a word vocabulary.
pub const PAD: usize = 0;
/// Index of the unknown-word token in a word vocabulary.
pub const UNK: usize = 1;
const SPECIALS: [&str; 2] = ["<pad>", "<unk>"];

/// Lowercased words of a question, punctuation removed.
pub fn tokenize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| c.is_whitespace() || matches!(c, '?' | '!' | '.' | ',' | ';' | ':'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// A token <-> index table. Word vocabularies start with `<pad>` and `<unk>`;
/// answer vocabularies have no specials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocab {
    tokens: Vec<String>,
    #[serde(skip)]
    index: HashMap<String, usize>,
    specials: bool,
}

impl Vocab {
    fn from_tokens(tokens: Vec<String>, specials: bool) -> Self {
        let index = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        Vocab {
            tokens,
            index,
            specials,
        }
    }

    /// Word vocabulary of the tokens seen at least `min_count` times, sorted
    /// alphabetically after `<pad>` and `<unk>` (stable across runs).
    pub fn words<'a>(questions: impl IntoIterator<Item = &'a str>, min_count: usize) -> Self {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for q in questions {
            for t in tokenize(q) {
                *counts.entry(t).or_default() += 1;
            }
        }
        let tokens = SPECIALS
            .iter()
            .map(|s| s.to_string())
            .chain(
                counts
                    .into_iter()
                    .filter(|(_, c)| *c >= min_count)
                    .map(|(t, _)| t),
            )
            .collect();
        Self::from_tokens(tokens, true)
    }

    /// Answer vocabulary: every distinct answer, sorted.
    pub fn answers<'a>(answers: impl IntoIterator<Item = &'a str>) -> Self {
        let set: std::collections::BTreeSet<&str> = answers.into_iter().collect();
        Self::from_tokens(set.into_iter().map(str::to_string).collect(), false)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Index of a token, if known.
    pub fn get(&self, token: &str) -> Option<usize> {
        self.index.get(token).copied()
    }

    /// The token at an index.
    pub fn token(&self, index: usize) -> Option<&str> {
        self.tokens.get(index).map(String::as_str)
    }

    /// Indices of a question's tokens, unknown words as [`UNK`]. Also returns
    /// how many tokens were known.
    pub fn encode(&self, text: &str) -> (Vec<usize>, usize) {
        let mut known = 0;
        let ids = tokenize(text)
            .iter()
            .map(|t| match self.get(t) {
                Some(i) => {
                    known += 1;
                    i
                }
                None => UNK,
            })
            .collect();
        (ids, known)
    }

    /// Rebuilds the lookup table after deserialising.
    pub fn reindex(self) -> Self {
        Self::from_tokens(self.tokens, self.specials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_lowercases_and_drops_punctuation() {
        assert_eq!(
            tokenize("Is the RED object, on the left?"),
            ["is", "the", "red", "object", "on", "the", "left"]
        );
        assert!(tokenize(" ?! ").is_empty());
    }

    #[test]
    fn word_vocab_is_sorted_with_specials_and_unknowns() {
        let v = Vocab::words(["What color is it?", "what shape is it"], 1);
        assert_eq!(v.token(PAD), Some("<pad>"));
        assert_eq!(v.token(UNK), Some("<unk>"));
        assert_eq!(v.len(), 2 + 5);
        assert_eq!(v.token(2), Some("color"));
        let (ids, known) = v.encode("What size is it?");
        assert_eq!(known, 3);
        assert_eq!(ids[1], UNK);
        assert_eq!(ids[0], v.get("what").unwrap());
        let rare = Vocab::words(["a b b", "b c"], 2);
        assert_eq!(rare.len(), 3);
    }

    #[test]
    fn vocab_round_trips_through_json() {
        let v = Vocab::answers(["yes", "no", "yes", "3"]);
        assert_eq!(v.len(), 3);
        assert_eq!(v.token(0), Some("3"));
        let json = serde_json::to_string(&v).unwrap();
        let back: Vocab = serde_json::from_str::<Vocab>(&json).unwrap().reindex();
        assert_eq!(back, v);
        assert_eq!(back.get("no"), Some(1));
    }
}
