//! A fingerprint of a train split: its question count and a CRC-32 over
//! every field the trainers read, question by question in file order.
//!
//! A run saves it (`RUN/data.json`) so that a resume can tell the data it
//! was trained on from other data with the same vocabularies (a
//! Sort-of-CLEVR generated with another seed has the same words and
//! answers). File order counts because the epoch's shuffle indexes the
//! questions: the same questions reordered are not the same run. The
//! images are not hashed (a resume would have to read them all); their
//! file names are.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::data::clevr_reader::ClevrSplit;
use crate::data::vqa2::Vqa2Split;

/// Question count and CRC-32 of a split's questions (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub questions: usize,
    pub crc32: u32,
}

impl fmt::Display for DataFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} questions, crc32 {:08x}", self.questions, self.crc32)
    }
}

/// Feeds fields unambiguously: each string length-prefixed, each absent
/// value marked, so that no two different questions hash the same bytes.
struct Feed(crc32fast::Hasher);

impl Feed {
    fn u64(&mut self, v: u64) {
        self.0.update(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.update(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&str>) {
        self.0.update(&[s.is_some() as u8]);
        if let Some(s) = s {
            self.str(s);
        }
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        self.0.update(&[v.is_some() as u8]);
        if let Some(v) = v {
            self.u64(v);
        }
    }
}

impl ClevrSplit {
    /// The split's fingerprint: every field of every question, in order.
    pub fn fingerprint(&self) -> DataFingerprint {
        let mut h = Feed(crc32fast::Hasher::new());
        for q in &self.questions {
            h.opt_u64(q.question_index.map(|i| i as u64));
            h.u64(q.image_index as u64);
            h.str(&q.image_filename);
            h.str(&q.question);
            h.opt_str(q.answer.as_deref());
            h.opt_u64(q.question_family_index.map(|i| i as u64));
            h.opt_str(q.question_type.as_deref());
        }
        DataFingerprint {
            questions: self.questions.len(),
            crc32: h.0.finalize(),
        }
    }
}

impl Vqa2Split {
    /// The split's fingerprint: ids, question and annotation of every
    /// question, in order (the interned strings resolved, so it does not
    /// depend on the interning order).
    pub fn fingerprint(&self) -> DataFingerprint {
        let mut h = Feed(crc32fast::Hasher::new());
        for q in &self.questions {
            h.u64(q.question_id);
            h.u64(q.image_id);
            h.str(&q.question);
            h.0.update(&[q.labels.is_some() as u8]);
            if let Some(l) = &q.labels {
                for s in [l.question_type, l.answer_type, l.multiple_choice_answer] {
                    h.str(self.resolve(s));
                }
                for &a in &l.answers {
                    h.str(self.resolve(a));
                }
            }
        }
        DataFingerprint {
            questions: self.questions.len(),
            crc32: h.0.finalize(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::clevr_reader::ClevrQuestion;

    fn question(text: &str, answer: Option<&str>) -> ClevrQuestion {
        ClevrQuestion {
            question_index: Some(0),
            image_index: 0,
            image_filename: "a.png".into(),
            question: text.into(),
            answer: answer.map(str::to_string),
            question_family_index: None,
            question_type: Some("exist".into()),
        }
    }

    fn split(questions: Vec<ClevrQuestion>) -> ClevrSplit {
        ClevrSplit {
            split: "train".into(),
            image_dir: "images/train".into(),
            questions,
        }
    }

    #[test]
    fn each_field_and_the_order_change_the_fingerprint() {
        let a = question("is there a cube", Some("yes"));
        let b = question("is there a ball", Some("no"));
        let base = split(vec![a.clone(), b.clone()]).fingerprint();
        assert_eq!(base, split(vec![a.clone(), b.clone()]).fingerprint());
        assert_eq!(base.questions, 2);
        let mut variants = vec![
            split(vec![b.clone(), a.clone()]),
            split(vec![a.clone()]),
            // A boundary moved between two strings must not hash the same.
            split(vec![question("is there a cubey", Some("es")), b.clone()]),
            split(vec![question("is there a cube", None), b.clone()]),
        ];
        for edit in [
            |q: &mut ClevrQuestion| q.image_index = 1,
            |q: &mut ClevrQuestion| q.image_filename = "b.png".into(),
            |q: &mut ClevrQuestion| q.question_index = None,
            |q: &mut ClevrQuestion| q.question_family_index = Some(3),
            |q: &mut ClevrQuestion| q.question_type = Some("count".into()),
        ] {
            let mut q = a.clone();
            edit(&mut q);
            variants.push(split(vec![q, b.clone()]));
        }
        let mut seen = vec![base.crc32];
        for v in variants {
            let f = v.fingerprint();
            assert!(!seen.contains(&f.crc32), "{f} repeats a fingerprint");
            seen.push(f.crc32);
        }
    }
}
