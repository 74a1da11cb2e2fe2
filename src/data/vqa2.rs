//! Reader for VQA v2 (Goyal et al. 2017) in the layout of the official
//! downloads, unzipped into one directory:
//!
//! ```text
//! ROOT/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
//! ROOT/v2_mscoco_{train2014,val2014}_annotations.json
//! ROOT/{train2014,val2014,test2015}/COCO_{subtype}_{image_id:012}.jpg
//! ```
//!
//! `test-dev2015` is a subset of the `test2015` questions; its images are
//! those of `test2015`. Test splits have no annotations and load without
//! them (for prediction).
//!
//! Questions are kept lean: ids, question text and, for annotated splits,
//! the question type, answer type, multiple-choice answer and the ten
//! human answers, all as indices into one string table per split (the
//! strings of 443,757 training questions collapse to a few hundred
//! thousand distinct ones). Answers are stored normalised with
//! [`normalize_answer`], the processing the official evaluation applies to
//! predictions (punctuation, lowercase, number words to digits, articles
//! dropped, contractions); the annotations file is streamed, never held as
//! a tree. Images are decoded on demand, resized to the model input and
//! decoded in parallel per batch.
//!
//! Answer vocabulary ([`AnswerVocab`]): normalised answers counted over
//! the given splits (the training split) and kept when seen at least
//! `min_count` times (default 9, which gives ~3,129 answers on VQA v2
//! train+val in the public bottom-up top-down code). Two counting rules:
//! [`AnswerCounting::HumanPerQuestion`] (default) counts an answer once
//! per question where at least one of the ten humans gave it;
//! [`AnswerCounting::MultipleChoice`] counts the questions whose
//! `multiple_choice_answer` it is (the public BUTD `compute_softscore.py`).
//! The empty answer (e.g. a human who typed only punctuation) is never in
//! the vocabulary. Order: descending count, then alphabetical.
//!
//! Soft targets ([`Vqa2Split::soft_targets`]): an answer that `n` of the
//! ten humans gave scores `min(1, n / 3)` ([`soft_score`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::data::DataError;
use crate::data::clevr_format::write_json_atomic;
pub use crate::data::clevr_reader::{load_image, load_images};
use crate::metrics::vqa::normalize_answer;

/// The splits of the official downloads.
pub const SPLITS: [&str; 4] = ["train2014", "val2014", "test2015", "test-dev2015"];
/// Human answers per annotated question.
pub const HUMAN_ANSWERS: usize = 10;
/// Default minimum count of an answer to enter the vocabulary.
pub const DEFAULT_MIN_COUNT: usize = 9;

/// Whether `split` has an annotations file (train2014, val2014).
pub fn has_annotations(split: &str) -> bool {
    matches!(split, "train2014" | "val2014")
}

/// The image subtype (directory and file-name part) of `split`:
/// test-dev2015 uses the test2015 images.
pub fn image_subtype(split: &str) -> &str {
    if split == "test-dev2015" {
        "test2015"
    } else {
        split
    }
}

/// `ROOT/v2_OpenEnded_mscoco_{split}_questions.json`.
pub fn question_file(root: &Path, split: &str) -> PathBuf {
    root.join(format!("v2_OpenEnded_mscoco_{split}_questions.json"))
}

/// `ROOT/v2_mscoco_{split}_annotations.json`.
pub fn annotation_file(root: &Path, split: &str) -> PathBuf {
    root.join(format!("v2_mscoco_{split}_annotations.json"))
}

/// `ROOT/{subtype}`, the image directory of `split`.
pub fn image_dir(root: &Path, split: &str) -> PathBuf {
    root.join(image_subtype(split))
}

/// `COCO_{subtype}_{image_id:012}.jpg`.
pub fn image_filename(split: &str, image_id: u64) -> String {
    format!("COCO_{}_{image_id:012}.jpg", image_subtype(split))
}

/// `ROOT/{subtype}/COCO_{subtype}_{image_id:012}.jpg`.
pub fn image_path(root: &Path, split: &str, image_id: u64) -> PathBuf {
    image_dir(root, split).join(image_filename(split, image_id))
}

/// Soft score of an answer that `n` of the ten humans gave: `min(1, n / 3)`.
///
/// The public bottom-up top-down code uses 0, 0.3, 0.6, 0.9, 1 for
/// n = 0, 1, 2, 3, 4+ instead: that is the official accuracy of the
/// answer (mean over the ten humans of min(1, matches among the other
/// nine / 3)), slightly below `min(1, n / 3)` for n = 1..3.
pub fn soft_score(n: usize) -> f32 {
    (n as f32 / 3.0).min(1.0)
}

/// An interned string of a split's string table (see [`Vqa2Split::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sym(u32);

/// The annotation of a question, as indices into the split's strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vqa2Labels {
    pub question_type: Sym,
    pub answer_type: Sym,
    /// Normalised.
    pub multiple_choice_answer: Sym,
    /// The ten human answers, normalised, in file order.
    pub answers: [Sym; HUMAN_ANSWERS],
}

/// A question as the model needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vqa2Question {
    pub question_id: u64,
    pub image_id: u64,
    pub question: String,
    /// `None` in the test splits.
    pub labels: Option<Vqa2Labels>,
}

/// One split of a VQA-v2-layout directory.
#[derive(Debug, Clone)]
pub struct Vqa2Split {
    pub root: PathBuf,
    pub split: String,
    /// In the order of the questions file.
    pub questions: Vec<Vqa2Question>,
    strings: Vec<String>,
}

#[derive(Deserialize)]
struct RawQuestion {
    question_id: u64,
    image_id: u64,
    question: String,
}

#[derive(Deserialize)]
struct QuestionsOnly {
    questions: Vec<RawQuestion>,
}

#[derive(Deserialize)]
struct RawAnswer<'a> {
    #[serde(borrow)]
    answer: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawAnnotation<'a> {
    question_id: u64,
    image_id: u64,
    #[serde(borrow)]
    question_type: Cow<'a, str>,
    #[serde(borrow)]
    answer_type: Cow<'a, str>,
    #[serde(borrow)]
    multiple_choice_answer: Cow<'a, str>,
    #[serde(borrow)]
    answers: Vec<RawAnswer<'a>>,
}

type Sink<'s, 'de> = &'s mut dyn FnMut(RawAnnotation<'de>) -> Result<(), ()>;

/// Streams the `annotations` list of an annotations file into a sink,
/// skipping the other top-level keys.
struct AnnotationsFile<'s, 'de>(Sink<'s, 'de>);

impl<'de> DeserializeSeed<'de> for AnnotationsFile<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for AnnotationsFile<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a VQA v2 annotations object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let sink = self.0;
        let mut seen = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "annotations" && !seen {
                seen = true;
                map.next_value_seed(AnnotationList(&mut *sink))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if seen {
            Ok(())
        } else {
            Err(de::Error::missing_field("annotations"))
        }
    }
}

struct AnnotationList<'s, 'de>(Sink<'s, 'de>);

impl<'de> DeserializeSeed<'de> for AnnotationList<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for AnnotationList<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of annotations")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(a) = seq.next_element::<RawAnnotation<'de>>()? {
            // The sink records what went wrong; this only stops the parse.
            (self.0)(a).map_err(|()| de::Error::custom("invalid annotation"))?;
        }
        Ok(())
    }
}

/// The string table of a split.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, Sym>,
    strings: Vec<String>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> Sym {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = Sym(self.strings.len() as u32);
        self.strings.push(s.to_string());
        self.ids.insert(s.to_string(), id);
        id
    }
}

fn json_error(path: &Path, e: serde_json::Error) -> DataError {
    DataError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        // serde_json appends the position, which the error already names.
        message: e
            .to_string()
            .trim_end_matches(&format!(" at line {} column {}", e.line(), e.column()))
            .to_string(),
    }
}

/// A content error in `path` (a one-line message).
fn invalid(path: &Path, message: String) -> DataError {
    DataError::io(
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    )
}

fn read_questions(path: &Path) -> Result<Vec<RawQuestion>, DataError> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    let parsed: QuestionsOnly = serde_json::from_slice(&bytes).map_err(|e| json_error(path, e))?;
    Ok(parsed.questions)
}

/// Reads an annotations file: question_id -> (image_id, labels).
fn read_annotations(
    path: &Path,
    strings: &mut Interner,
) -> Result<HashMap<u64, (u64, Vqa2Labels)>, DataError> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut out: HashMap<u64, (u64, Vqa2Labels)> = HashMap::new();
    // Raw answer -> normalised symbol: answers repeat a lot ("yes", "2").
    let mut normalised: HashMap<String, Sym> = HashMap::new();
    let mut failure: Option<String> = None;
    let mut sink = |a: RawAnnotation<'_>| -> Result<(), ()> {
        if a.answers.len() != HUMAN_ANSWERS {
            failure = Some(format!(
                "question_id {}: {} answers, expected {HUMAN_ANSWERS}",
                a.question_id,
                a.answers.len()
            ));
            return Err(());
        }
        let mut norm = |raw: &str| match normalised.get(raw) {
            Some(&s) => s,
            None => {
                let s = strings.intern(&normalize_answer(raw));
                normalised.insert(raw.to_string(), s);
                s
            }
        };
        let mut answers = [Sym(0); HUMAN_ANSWERS];
        for (slot, ans) in answers.iter_mut().zip(&a.answers) {
            *slot = norm(&ans.answer);
        }
        let multiple_choice_answer = norm(&a.multiple_choice_answer);
        let labels = Vqa2Labels {
            question_type: strings.intern(&a.question_type),
            answer_type: strings.intern(&a.answer_type),
            multiple_choice_answer,
            answers,
        };
        if out.insert(a.question_id, (a.image_id, labels)).is_some() {
            failure = Some(format!(
                "question_id {}: more than one annotation",
                a.question_id
            ));
            return Err(());
        }
        Ok(())
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let parsed = AnnotationsFile(&mut sink)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if let Some(message) = failure {
        return Err(invalid(path, message));
    }
    parsed.map_err(|e| json_error(path, e))?;
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

impl Vqa2Split {
    /// Opens `split` (train2014, val2014, test2015 or test-dev2015) of the
    /// VQA v2 directory `root`: checks the layout, reads the questions and,
    /// for train2014 and val2014, joins the annotations by question_id.
    /// Annotations of questions not in the questions file are ignored (a
    /// subset of the questions may be used).
    pub fn open(root: &Path, split: &str) -> Result<Self, DataError> {
        let layout = |message: String| DataError::Layout {
            root: root.to_path_buf(),
            message,
        };
        if !SPLITS.contains(&split) {
            return Err(layout(format!(
                "unknown VQA v2 split {split:?} (expected one of {})",
                SPLITS.join(", ")
            )));
        }
        let qfile = question_file(root, split);
        let afile = annotation_file(root, split);
        let images = image_dir(root, split);
        let mut expected = vec![("questions file", &qfile, qfile.is_file())];
        if has_annotations(split) {
            expected.push(("annotations file", &afile, afile.is_file()));
        }
        expected.push(("image directory", &images, images.is_dir()));
        for (what, p, present) in expected {
            if !present {
                return Err(layout(format!(
                    "missing {what} {} (expected the official VQA v2 layout, unzipped)",
                    p.display()
                )));
            }
        }
        let raw = read_questions(&qfile)?;
        let mut strings = Interner::default();
        let mut annotations = if has_annotations(split) {
            Some(read_annotations(&afile, &mut strings)?)
        } else {
            None
        };
        let mut seen = HashSet::with_capacity(raw.len());
        let mut questions = Vec::with_capacity(raw.len());
        for q in raw {
            if !seen.insert(q.question_id) {
                return Err(invalid(
                    &qfile,
                    format!("question_id {}: listed more than once", q.question_id),
                ));
            }
            let labels = match annotations.as_mut() {
                None => None,
                Some(map) => {
                    let Some((image_id, labels)) = map.remove(&q.question_id) else {
                        return Err(invalid(
                            &afile,
                            format!(
                                "question_id {}: no annotation for this question of {}",
                                q.question_id,
                                file_name(&qfile)
                            ),
                        ));
                    };
                    if image_id != q.image_id {
                        return Err(invalid(
                            &afile,
                            format!(
                                "question_id {}: image_id {image_id}, but {} says {}",
                                q.question_id,
                                file_name(&qfile),
                                q.image_id
                            ),
                        ));
                    }
                    Some(labels)
                }
            };
            questions.push(Vqa2Question {
                question_id: q.question_id,
                image_id: q.image_id,
                question: q.question,
                labels,
            });
        }
        Ok(Vqa2Split {
            root: root.to_path_buf(),
            split: split.into(),
            questions,
            strings: strings.strings,
        })
    }

    /// Number of questions.
    pub fn len(&self) -> usize {
        self.questions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.questions.is_empty()
    }

    /// Whether the questions carry annotations.
    pub fn has_annotations(&self) -> bool {
        has_annotations(&self.split)
    }

    /// Number of distinct images the questions refer to.
    pub fn num_images(&self) -> usize {
        let ids: HashSet<u64> = self.questions.iter().map(|q| q.image_id).collect();
        ids.len()
    }

    /// The string of a symbol of this split.
    pub fn resolve(&self, s: Sym) -> &str {
        &self.strings[s.0 as usize]
    }

    /// "how many", "what color is the", ... (`None` in test splits).
    pub fn question_type(&self, q: &Vqa2Question) -> Option<&str> {
        q.labels.map(|l| self.resolve(l.question_type))
    }

    /// "yes/no", "number" or "other" (`None` in test splits).
    pub fn answer_type(&self, q: &Vqa2Question) -> Option<&str> {
        q.labels.map(|l| self.resolve(l.answer_type))
    }

    /// The normalised multiple-choice answer (`None` in test splits).
    pub fn multiple_choice_answer(&self, q: &Vqa2Question) -> Option<&str> {
        q.labels.map(|l| self.resolve(l.multiple_choice_answer))
    }

    /// The ten normalised human answers (`None` in test splits).
    pub fn human_answers(&self, q: &Vqa2Question) -> Option<[&str; HUMAN_ANSWERS]> {
        q.labels.map(|l| l.answers.map(|s| self.resolve(s)))
    }

    /// The distinct normalised human answers and how many of the ten gave
    /// each, in order of first appearance (empty in test splits).
    pub fn answer_counts(&self, q: &Vqa2Question) -> Vec<(&str, usize)> {
        let Some(l) = q.labels else {
            return Vec::new();
        };
        let mut counts: Vec<(Sym, usize)> = Vec::with_capacity(HUMAN_ANSWERS);
        for s in l.answers {
            match counts.iter_mut().find(|(t, _)| *t == s) {
                Some((_, n)) => *n += 1,
                None => counts.push((s, 1)),
            }
        }
        counts
            .into_iter()
            .map(|(s, n)| (self.resolve(s), n))
            .collect()
    }

    /// Soft targets of a question over `vocab`: (answer index, score) for
    /// each vocabulary answer some human gave, score [`soft_score`] of the
    /// number of humans, sorted by index. Empty in test splits and when no
    /// human answer is in the vocabulary.
    pub fn soft_targets(&self, q: &Vqa2Question, vocab: &AnswerVocab) -> Vec<(usize, f32)> {
        let mut targets: Vec<(usize, f32)> = self
            .answer_counts(q)
            .into_iter()
            .filter_map(|(a, n)| vocab.index_of(a).map(|i| (i, soft_score(n))))
            .collect();
        targets.sort_by_key(|&(i, _)| i);
        targets
    }

    /// Path of a question's image.
    pub fn image_path(&self, q: &Vqa2Question) -> PathBuf {
        image_path(&self.root, &self.split, q.image_id)
    }

    /// Decodes the images of the questions at `indices` in parallel (each
    /// distinct image once), resized to `size` x `size`, into one
    /// [N, 3, size, size] buffer of floats in [0, 1], in the order of
    /// `indices`.
    pub fn load_batch(&self, indices: &[usize], size: u32) -> Result<Vec<f32>, DataError> {
        let mut slot: HashMap<u64, usize> = HashMap::with_capacity(indices.len());
        let mut unique: Vec<u64> = Vec::with_capacity(indices.len());
        for &i in indices {
            let id = self.questions[i].image_id;
            slot.entry(id).or_insert_with(|| {
                unique.push(id);
                unique.len() - 1
            });
        }
        let decoded: Vec<Vec<f32>> = unique
            .par_iter()
            .map(|&id| load_image(&image_path(&self.root, &self.split, id), size))
            .collect::<Result<_, _>>()?;
        let per_image = 3 * (size as usize) * (size as usize);
        let mut out = Vec::with_capacity(indices.len() * per_image);
        for &i in indices {
            out.extend_from_slice(&decoded[slot[&self.questions[i].image_id]]);
        }
        Ok(out)
    }
}

/// How answers are counted for the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerCounting {
    /// Once per question where at least one of the ten humans gave it.
    #[default]
    HumanPerQuestion,
    /// Once per question whose multiple-choice answer it is (public BUTD).
    MultipleChoice,
}

/// The answer vocabulary (classifier classes).
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerVocab {
    answers: Vec<String>,
    counts: Vec<usize>,
    min_count: usize,
    counting: AnswerCounting,
    index: HashMap<String, usize>,
}

/// The JSON form of an [`AnswerVocab`].
#[derive(Serialize, Deserialize)]
struct VocabFile {
    format: String,
    min_count: usize,
    counting: AnswerCounting,
    answers: Vec<String>,
    counts: Vec<usize>,
}

const VOCAB_FORMAT: &str = "moevqa-vqa2-answers-v1";

impl AnswerVocab {
    /// Counts the normalised answers of the annotated questions of
    /// `splits` by `counting` and keeps those seen at least `min_count`
    /// times (never the empty answer), by descending count then
    /// alphabetically.
    pub fn build(splits: &[&Vqa2Split], min_count: usize, counting: AnswerCounting) -> Self {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for split in splits {
            for q in &split.questions {
                let Some(l) = q.labels else { continue };
                match counting {
                    AnswerCounting::MultipleChoice => {
                        *counts
                            .entry(split.resolve(l.multiple_choice_answer))
                            .or_default() += 1;
                    }
                    AnswerCounting::HumanPerQuestion => {
                        let mut distinct = l.answers;
                        distinct.sort_unstable();
                        let mut prev = None;
                        for s in distinct {
                            if prev != Some(s) {
                                *counts.entry(split.resolve(s)).or_default() += 1;
                                prev = Some(s);
                            }
                        }
                    }
                }
            }
        }
        let mut kept: Vec<(&str, usize)> = counts
            .into_iter()
            .filter(|&(a, n)| n >= min_count && !a.is_empty())
            .collect();
        kept.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        Self::from_parts(
            kept.iter().map(|&(a, _)| a.to_string()).collect(),
            kept.iter().map(|&(_, n)| n).collect(),
            min_count,
            counting,
        )
    }

    fn from_parts(
        answers: Vec<String>,
        counts: Vec<usize>,
        min_count: usize,
        counting: AnswerCounting,
    ) -> Self {
        let index = answers
            .iter()
            .enumerate()
            .map(|(i, a)| (a.clone(), i))
            .collect();
        AnswerVocab {
            answers,
            counts,
            min_count,
            counting,
            index,
        }
    }

    /// Number of answers (classes).
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// The answers, by class index.
    pub fn answers(&self) -> &[String] {
        &self.answers
    }

    /// The answer of class `i`.
    pub fn answer(&self, i: usize) -> &str {
        &self.answers[i]
    }

    /// How often answer `i` was counted.
    pub fn count(&self, i: usize) -> usize {
        self.counts[i]
    }

    /// Class index of a normalised answer.
    pub fn index_of(&self, answer: &str) -> Option<usize> {
        self.index.get(answer).copied()
    }

    pub fn min_count(&self) -> usize {
        self.min_count
    }

    pub fn counting(&self) -> AnswerCounting {
        self.counting
    }

    /// Writes the vocabulary as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        write_json_atomic(
            path,
            &VocabFile {
                format: VOCAB_FORMAT.into(),
                min_count: self.min_count,
                counting: self.counting,
                answers: self.answers.clone(),
                counts: self.counts.clone(),
            },
        )
    }

    /// Reads a vocabulary written by [`AnswerVocab::save`].
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
        let f: VocabFile = serde_json::from_slice(&bytes).map_err(|e| json_error(path, e))?;
        if f.format != VOCAB_FORMAT {
            return Err(invalid(
                path,
                format!("format {:?}, expected {VOCAB_FORMAT:?}", f.format),
            ));
        }
        if f.answers.len() != f.counts.len() {
            return Err(invalid(
                path,
                format!("{} answers but {} counts", f.answers.len(), f.counts.len()),
            ));
        }
        let v = Self::from_parts(f.answers, f.counts, f.min_count, f.counting);
        if v.index.len() != v.answers.len() {
            return Err(invalid(path, "an answer is listed twice".into()));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::vqa2_gen::{Vqa2GenConfig, generate_vqa2};

    fn tmp(name: &str) -> PathBuf {
        crate::data::test_dir(&format!("vqa2-{name}"))
    }

    fn answers_json(answers: &[&str]) -> String {
        let list: Vec<String> = answers
            .iter()
            .enumerate()
            .map(|(i, a)| {
                format!(
                    r#"{{"answer": {}, "answer_confidence": "yes", "answer_id": {}}}"#,
                    serde_json::to_string(a).unwrap(),
                    i + 1
                )
            })
            .collect();
        format!("[{}]", list.join(", "))
    }

    /// A hand-written train2014 split: questions (id, image, text) and the
    /// human answers of each.
    fn write_split(dir: &Path, split: &str, items: &[(u64, u64, &str, &[&str])]) {
        fs::create_dir_all(image_dir(dir, split)).unwrap();
        let qs: Vec<String> = items
            .iter()
            .map(|(qid, img, text, _)| {
                format!(r#"{{"image_id": {img}, "question": "{text}", "question_id": {qid}}}"#)
            })
            .collect();
        fs::write(
            question_file(dir, split),
            format!(
                "{{\"info\": {{}}, \"task_type\": \"Open-Ended\", \"questions\": [\n{}\n]}}",
                qs.join(",\n")
            ),
        )
        .unwrap();
        let anns: Vec<String> = items
            .iter()
            .map(|(qid, img, _, answers)| {
                format!(
                    r#"{{"question_type": "how many", "multiple_choice_answer": "{}", "answers": {}, "image_id": {img}, "answer_type": "number", "question_id": {qid}}}"#,
                    answers[0],
                    answers_json(answers)
                )
            })
            .collect();
        fs::write(
            annotation_file(dir, split),
            format!(
                "{{\"license\": {{}}, \"annotations\": [\n{}\n], \"data_subtype\": \"{split}\"}}",
                anns.join(",\n")
            ),
        )
        .unwrap();
    }

    const HAND: [&str; 10] = [
        "2", "2", "2", "two", "Two", "3", "three.", "4", "yes", "a 4",
    ];

    /// The real VQA v2 (or any full-size set): `MOEVQA_VQA2_ROOT=DIR cargo
    /// test --release --lib data::vqa2::tests::opens_a_full_size_train_split
    /// -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs MOEVQA_VQA2_ROOT, a directory with the real VQA v2 files"]
    fn opens_a_full_size_train_split() {
        let root = std::env::var_os("MOEVQA_VQA2_ROOT").expect("MOEVQA_VQA2_ROOT names the data");
        let t = std::time::Instant::now();
        let train = Vqa2Split::open(Path::new(&root), "train2014").unwrap();
        let opened = t.elapsed();
        let vocab = AnswerVocab::build(&[&train], DEFAULT_MIN_COUNT, AnswerCounting::default());
        let targets: usize = train
            .questions
            .iter()
            .map(|q| train.soft_targets(q, &vocab).len())
            .sum();
        eprintln!(
            "{} questions, {} images, {} strings, opened in {opened:?}; {} answers in the vocabulary; {targets} targets; total {:?}",
            train.len(),
            train.num_images(),
            train.strings.len(),
            vocab.len(),
            t.elapsed()
        );
    }

    #[test]
    fn reads_a_generated_set_in_every_split() {
        let dir = tmp("gen");
        let cfg = Vqa2GenConfig {
            train_images: 8,
            val_images: 3,
            test_images: 4,
            questions_per_image: 4,
            image_size: 32,
            seed: 3,
        };
        let sum = generate_vqa2(&dir, &cfg).unwrap();
        let train = Vqa2Split::open(&dir, "train2014").unwrap();
        let val = Vqa2Split::open(&dir, "val2014").unwrap();
        let test = Vqa2Split::open(&dir, "test2015").unwrap();
        let dev = Vqa2Split::open(&dir, "test-dev2015").unwrap();
        assert_eq!(train.len(), sum.train_questions);
        assert_eq!(val.len(), sum.val_questions);
        assert_eq!(test.len(), sum.test_questions);
        assert_eq!(dev.len(), sum.test_dev_questions);
        assert_eq!(
            (train.num_images(), val.num_images(), test.num_images()),
            (8, 3, 4)
        );
        assert!(train.len() >= 8 * 3 && dev.len() < test.len());
        for q in &train.questions {
            let mc = train.multiple_choice_answer(q).unwrap();
            let counts = train.answer_counts(q);
            let (top, n) = counts.iter().max_by_key(|(_, n)| *n).unwrap();
            assert_eq!((*top, *n >= 6), (mc, true), "{q:?} {counts:?}");
            assert!(["yes/no", "number", "other"].contains(&train.answer_type(q).unwrap()));
            assert_eq!(q.question_id / 1000, q.image_id);
        }
        assert!(test.questions.iter().all(|q| q.labels.is_none()));
        assert!(
            test.soft_targets(
                &test.questions[0],
                &AnswerVocab::build(&[&train], 1, AnswerCounting::default())
            )
            .is_empty()
        );

        let vocab = AnswerVocab::build(&[&train], 2, AnswerCounting::HumanPerQuestion);
        assert!(vocab.index_of("yes").is_some() && vocab.index_of("no").is_some());
        assert!(
            vocab
                .answers()
                .iter()
                .all(|a| *a == normalize_answer(a) && !a.is_empty())
        );
        for w in 1..vocab.len() {
            let (a, b) = (
                (vocab.count(w - 1), vocab.answer(w - 1)),
                (vocab.count(w), vocab.answer(w)),
            );
            assert!(a.0 > b.0 || (a.0 == b.0 && a.1 < b.1), "{a:?} {b:?}");
        }
        let mc = AnswerVocab::build(&[&train], 1, AnswerCounting::MultipleChoice);
        assert_eq!(
            mc.answers()
                .iter()
                .map(|a| mc.count(mc.index_of(a).unwrap()))
                .sum::<usize>(),
            train.len()
        );
        // Every training question has a target whose score is 1 (>= 6 humans agree).
        let full = AnswerVocab::build(&[&train], 1, AnswerCounting::HumanPerQuestion);
        for q in &train.questions {
            let t = train.soft_targets(q, &full);
            assert!(
                t.iter().any(|&(i, s)| s == 1.0
                    && full.answer(i) == train.multiple_choice_answer(q).unwrap())
            );
        }

        let idx = [0, 1, 2, 0];
        let buf = test.load_batch(&idx, 16).unwrap();
        assert_eq!(buf.len(), 4 * 3 * 16 * 16);
        assert!(buf.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(buf[..768], buf[3 * 768..]);
        let one = load_image(&test.image_path(&test.questions[0]), 16).unwrap();
        assert_eq!(one[..], buf[..768]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn soft_scores_of_a_hand_made_annotation() {
        let dir = tmp("soft");
        write_split(
            &dir,
            "train2014",
            &[
                (1000, 1, "How many dogs?", &HAND),
                (1001, 1, "How many cats?", &["2"; 10]),
                (
                    2000,
                    2,
                    "Is it?",
                    &[
                        "yes", "yes", "Yes", "yes.", "no", "no", "2", "yes", "yes", "yes",
                    ],
                ),
            ],
        );
        let s = Vqa2Split::open(&dir, "train2014").unwrap();
        let q = &s.questions[0];
        assert_eq!(s.question_type(q), Some("how many"));
        assert_eq!(s.answer_type(q), Some("number"));
        assert_eq!(
            s.human_answers(q).unwrap(),
            ["2", "2", "2", "2", "2", "3", "3", "4", "yes", "4"]
        );
        // Per question: "2" 3 times, "yes" 2, "4" 1, "3" 1, "no" 1.
        let v = AnswerVocab::build(&[&s], 1, AnswerCounting::HumanPerQuestion);
        assert_eq!(v.answers(), ["2", "yes", "3", "4", "no"]);
        assert_eq!(
            (0..v.len()).map(|i| v.count(i)).collect::<Vec<_>>(),
            [3, 2, 1, 1, 1]
        );
        // "2" x3 + "two" x2 -> n = 5 -> 1; "3" + "three." -> 2/3; "4" + "a 4" -> 2/3; "yes" 1/3.
        let t = s.soft_targets(q, &v);
        let third = 1.0f32 / 3.0;
        assert_eq!(
            t,
            [(0, 1.0), (1, third), (2, 2.0 * third), (3, 2.0 * third)]
        );
        assert_eq!(soft_score(0), 0.0);
        assert_eq!(soft_score(4), 1.0);
        // min_count drops the rare answers; the targets follow the vocabulary.
        let v2 = AnswerVocab::build(&[&s], 2, AnswerCounting::HumanPerQuestion);
        assert_eq!(v2.answers(), ["2", "yes"]);
        assert_eq!(s.soft_targets(q, &v2), [(0, 1.0), (1, third)]);
        let mc = AnswerVocab::build(&[&s], 1, AnswerCounting::MultipleChoice);
        assert_eq!(mc.answers(), ["2", "yes"]);
        assert_eq!((mc.count(0), mc.count(1)), (2, 1));
        // Save and load.
        let path = dir.join("answers.json");
        v.save(&path).unwrap();
        assert_eq!(AnswerVocab::load(&path).unwrap(), v);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn test_split_loads_without_annotations() {
        let dir = tmp("test");
        fs::create_dir_all(image_dir(&dir, "test2015")).unwrap();
        fs::write(
            question_file(&dir, "test2015"),
            r#"{"info": {}, "data_subtype": "test2015", "questions": [{"image_id": 7, "question": "What?", "question_id": 7000}]}"#,
        )
        .unwrap();
        let s = Vqa2Split::open(&dir, "test2015").unwrap();
        assert_eq!(s.len(), 1);
        let q = &s.questions[0];
        assert_eq!(
            (q.question_id, q.image_id, q.question.as_str()),
            (7000, 7, "What?")
        );
        assert_eq!(s.human_answers(q), None);
        assert!(s.answer_counts(q).is_empty());
        assert!(
            s.image_path(q)
                .ends_with("test2015/COCO_test2015_000000000007.jpg")
        );
        assert_eq!(
            image_path(&dir, "test-dev2015", 7),
            dir.join("test2015").join("COCO_test2015_000000000007.jpg")
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_position() {
        let dir = tmp("err");
        let err = Vqa2Split::open(&dir, "train2014").unwrap_err();
        assert!(matches!(err, DataError::Layout { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("v2_OpenEnded_mscoco_train2014_questions.json"),
            "{msg}"
        );
        let msg = Vqa2Split::open(&dir, "train").unwrap_err().to_string();
        assert!(msg.contains("unknown VQA v2 split"), "{msg}");

        // A question without annotation.
        write_split(&dir, "train2014", &[(1000, 1, "How many?", &HAND)]);
        let q = question_file(&dir, "train2014");
        let text = fs::read_to_string(&q).unwrap();
        fs::write(
            &q,
            text.replace(
                "]}",
                r#", {"image_id": 1, "question": "Q?", "question_id": 1001}]}"#,
            ),
        )
        .unwrap();
        let msg = Vqa2Split::open(&dir, "train2014").unwrap_err().to_string();
        assert!(
            msg.contains("v2_mscoco_train2014_annotations.json")
                && msg.contains("question_id 1001"),
            "{msg}"
        );

        // Malformed JSON: file, line and column.
        fs::write(&q, "{\"questions\": [\n  {\"image_id\": 1,,}]}").unwrap();
        let msg = Vqa2Split::open(&dir, "train2014").unwrap_err().to_string();
        assert!(
            msg.contains("v2_OpenEnded_mscoco_train2014_questions.json: line 2, column 18"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
        write_split(&dir, "train2014", &[(1000, 1, "How many?", &HAND)]);
        let a = annotation_file(&dir, "train2014");
        let text = fs::read_to_string(&a).unwrap();
        fs::write(&a, text.replace("\"answer_type\"", "\"answer_type\" 3")).unwrap();
        let msg = Vqa2Split::open(&dir, "train2014").unwrap_err().to_string();
        assert!(
            msg.contains("v2_mscoco_train2014_annotations.json: line 2, column"),
            "{msg}"
        );

        // Nine answers.
        write_split(
            &dir,
            "train2014",
            &[
                (1000, 1, "How many?", &HAND),
                (2000, 2, "How many?", &HAND[..9]),
            ],
        );
        let msg = Vqa2Split::open(&dir, "train2014").unwrap_err().to_string();
        assert!(
            msg.contains("v2_mscoco_train2014_annotations.json")
                && msg.contains("question_id 2000: 9 answers, expected 10"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);

        // Missing and corrupt JPEGs.
        write_split(
            &dir,
            "train2014",
            &[(1000, 1, "How many?", &HAND), (2000, 2, "How many?", &HAND)],
        );
        let s = Vqa2Split::open(&dir, "train2014").unwrap();
        let msg = s.load_batch(&[0, 1], 8).unwrap_err().to_string();
        assert!(msg.contains("COCO_train2014_00000000000"), "{msg}");
        fs::write(
            s.image_path(&s.questions[0]),
            b"\xff\xd8\xff\xe0 not a jpeg",
        )
        .unwrap();
        let msg = load_image(&s.image_path(&s.questions[0]), 8)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("COCO_train2014_000000000001.jpg"), "{msg}");
        let msg = load_image(&s.image_path(&s.questions[1]), 8)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("COCO_train2014_000000000002.jpg"), "{msg}");

        // A vocabulary file with a wrong format.
        let v = dir.join("answers.json");
        fs::write(&v, r#"{"format": "x", "min_count": 1, "counting": "multiple_choice", "answers": [], "counts": []}"#).unwrap();
        let msg = AnswerVocab::load(&v).unwrap_err().to_string();
        assert!(
            msg.contains("answers.json") && msg.contains("format"),
            "{msg}"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
