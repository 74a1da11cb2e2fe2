//! A small synthetic dataset in the VQA v2 layout (see [`crate::data::vqa2`]),
//! so that the VQA pipeline (reader, answer vocabulary, soft targets,
//! official metric, results file) runs end to end without the 25 GB of
//! COCO images.
//!
//! Images: `image_size` x `image_size` JPEGs (quality 90, the image
//! crate's encoder) named like COCO's, on a light gray background, with 1
//! to 6 non-overlapping flat shapes (circle, square, triangle, each
//! inscribed in a bounding circle of radius `image_size / 11` to
//! `image_size / 7`) in 7 well-separated colours (red, green, blue, yellow,
//! purple, orange, gray). Image ids run from 1 across the splits
//! (train2014, then val2014, then test2015), so they are unique as COCO's
//! are; question ids are `image_id * 1000 + i` as in VQA v2.
//!
//! Questions, each answerable from the image (question_type, answer_type):
//!
//! | question_type       | answer_type | example                          |
//! |---------------------|-------------|----------------------------------|
//! | `is there a`        | yes/no      | Is there a red circle?           |
//! | `are there any`     | yes/no      | Are there any triangles?         |
//! | `is the`            | yes/no      | Is the square blue?              |
//! | `how many`          | number      | How many green objects are there?|
//! | `what color is the` | other       | What color is the triangle?      |
//! | `what shape is the` | other       | What shape is the purple object? |
//!
//! "the X" questions are asked only when exactly one object is an X; yes/no
//! answers are drawn 50/50 before the question is built. Each image gets up
//! to `questions_per_image` distinct questions (a slot stays empty after a
//! bounded number of failed attempts, rare).
//!
//! Annotations (train2014, val2014) have ten human answers with realistic
//! disagreement: 6 to 10 humans give the true answer, most in its
//! canonical form, some as "Red", "red.", "yes!", "two", "Two", "zero",
//! "a circle" or "the circle" (all normalise to the canonical answer under
//! the official processing); the others give a synonym that normalises to
//! a different answer ("grey", "round", "yeah", "nope", ...) or a wrong
//! answer (the other yes/no, a count off by one, another colour or shape).
//! `multiple_choice_answer` is the canonical true answer, which is always
//! the most common normalised answer. `answer_confidence` is "yes" for most
//! true answers, "maybe" or "no" for the others.
//!
//! test-dev2015 holds the questions of the first half (rounded up) of the
//! test2015 images, as the real test-dev is a subset of test-standard.
//!
//! Deterministic for a seed (ChaCha8, one stream per split; images are
//! rendered and encoded in parallel from the sequentially drawn scenes):
//! the same configuration writes byte-identical files.

use std::fs;
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::data::DataError;
use crate::data::clevr_format::{create_dir, write_json_atomic};
use crate::data::vqa2::{HUMAN_ANSWERS, annotation_file, image_dir, image_path, question_file};

/// The colours and the RGB values they are drawn with.
pub const COLORS: [(&str, [u8; 3]); 7] = [
    ("red", [205, 35, 35]),
    ("green", [30, 150, 45]),
    ("blue", [40, 75, 215]),
    ("yellow", [245, 220, 40]),
    ("purple", [135, 40, 185]),
    ("orange", [245, 140, 20]),
    ("gray", [110, 110, 110]),
];
/// The shapes.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// Background colour (light gray).
pub const BACKGROUND: [u8; 3] = [225, 225, 225];
/// Question types and their answer types.
pub const QUESTION_TYPES: [(&str, &str); 6] = [
    ("is there a", "yes/no"),
    ("are there any", "yes/no"),
    ("is the", "yes/no"),
    ("how many", "number"),
    ("what color is the", "other"),
    ("what shape is the", "other"),
];
/// Smallest and largest allowed image side.
pub const MIN_IMAGE_SIZE: u32 = 32;
pub const MAX_IMAGE_SIZE: u32 = 1024;
/// Most objects per image.
pub const MAX_OBJECTS: usize = 6;
/// Most questions per image (question ids are image_id * 1000 + i).
pub const MAX_QUESTIONS_PER_IMAGE: usize = 1000;
/// JPEG quality.
pub const JPEG_QUALITY: u8 = 90;
/// Free pixels required between two bounding circles.
const MARGIN: i32 = 2;
/// Placement attempts per object before it is left out.
const PLACE_TRIES: usize = 100;
/// Attempts per question slot before it is left empty.
const QUESTION_TRIES: usize = 30;

/// What to generate.
#[derive(Debug, Clone, Serialize)]
pub struct Vqa2GenConfig {
    pub train_images: usize,
    pub val_images: usize,
    pub test_images: usize,
    pub questions_per_image: usize,
    /// Image side in pixels, in [`MIN_IMAGE_SIZE`]..=[`MAX_IMAGE_SIZE`].
    pub image_size: u32,
    pub seed: u64,
}

impl Default for Vqa2GenConfig {
    fn default() -> Self {
        Vqa2GenConfig {
            train_images: 2000,
            val_images: 500,
            test_images: 500,
            questions_per_image: 5,
            image_size: 64,
            seed: 1,
        }
    }
}

/// Counts of what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vqa2GenerateSummary {
    pub train_images: usize,
    pub val_images: usize,
    pub test_images: usize,
    pub train_questions: usize,
    pub val_questions: usize,
    pub test_questions: usize,
    pub test_dev_questions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Object {
    color: usize,
    shape: usize,
    x: i32,
    y: i32,
    r: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    YesNo(bool),
    Number(usize),
    Color(usize),
    Shape(usize),
}

impl Answer {
    fn canonical(self) -> String {
        match self {
            Answer::YesNo(b) => if b { "yes" } else { "no" }.into(),
            Answer::Number(n) => n.to_string(),
            Answer::Color(c) => COLORS[c].0.into(),
            Answer::Shape(s) => SHAPES[s].into(),
        }
    }
}

struct Qa {
    text: String,
    /// Index into [`QUESTION_TYPES`].
    kind: usize,
    answer: Answer,
}

fn plural(shape: usize) -> String {
    format!("{}s", SHAPES[shape])
}

/// Places 1..=6 non-overlapping objects fully inside the image.
fn place_objects(rng: &mut ChaCha8Rng, size: u32) -> Vec<Object> {
    let wanted = rng.random_range(1..=MAX_OBJECTS);
    let s = size as i32;
    let (r_lo, r_hi) = ((s / 11).max(2), (s / 7).max(3));
    let mut objects: Vec<Object> = Vec::with_capacity(wanted);
    for _ in 0..wanted {
        for _ in 0..PLACE_TRIES {
            let r = rng.random_range(r_lo..=r_hi);
            let x = rng.random_range(r..=s - 1 - r);
            let y = rng.random_range(r..=s - 1 - r);
            let free = objects.iter().all(|o| {
                let gap = o.r + r + MARGIN;
                (o.x - x).pow(2) + (o.y - y).pow(2) >= gap * gap
            });
            if free {
                objects.push(Object {
                    color: rng.random_range(0..COLORS.len()),
                    shape: rng.random_range(0..SHAPES.len()),
                    x,
                    y,
                    r,
                });
                break;
            }
        }
    }
    objects
}

/// Whether offset (dx, dy) from the centre lies inside `shape` inscribed in
/// a circle of radius `r`.
fn inside(shape: usize, dx: f32, dy: f32, r: f32) -> bool {
    match SHAPES[shape] {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => {
            let h = r * std::f32::consts::FRAC_1_SQRT_2;
            dx.abs() <= h && dy.abs() <= h
        }
        // Equilateral, pointing up, vertices on the circle.
        _ => 3f32.sqrt() * dx.abs() - r <= dy && dy <= r / 2.0,
    }
}

fn render(objects: &[Object], size: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(size, size, Rgb(BACKGROUND));
    let last = size as i32 - 1;
    for o in objects {
        let rgb = Rgb(COLORS[o.color].1);
        for y in (o.y - o.r).max(0)..=(o.y + o.r).min(last) {
            for x in (o.x - o.r).max(0)..=(o.x + o.r).min(last) {
                if inside(o.shape, (x - o.x) as f32, (y - o.y) as f32, o.r as f32) {
                    img.put_pixel(x as u32, y as u32, rgb);
                }
            }
        }
    }
    img
}

fn encode_jpeg(img: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut buf = Vec::new();
    JpegEncoder::new_with_quality(&mut buf, JPEG_QUALITY).encode_image(img)?;
    Ok(buf)
}

fn count(objects: &[Object], f: impl Fn(&Object) -> bool) -> usize {
    objects.iter().filter(|o| f(o)).count()
}

/// An object that is the only one of its shape (`by_shape`) or colour.
fn unique_object(rng: &mut ChaCha8Rng, objects: &[Object], by_shape: bool) -> Option<Object> {
    let key = |o: &Object| if by_shape { o.shape } else { o.color };
    let unique: Vec<Object> = objects
        .iter()
        .filter(|o| count(objects, |p| key(p) == key(o)) == 1)
        .copied()
        .collect();
    (!unique.is_empty()).then(|| unique[rng.random_range(0..unique.len())])
}

/// A question of type `kind` about `objects`, or `None` when the scene
/// does not allow it.
fn question(rng: &mut ChaCha8Rng, objects: &[Object], kind: usize) -> Option<Qa> {
    let pick = |rng: &mut ChaCha8Rng| objects[rng.random_range(0..objects.len())];
    let (text, answer) = match QUESTION_TYPES[kind].0 {
        "is there a" => {
            let yes = rng.random_bool(0.5);
            let (c, s) = if yes {
                let o = pick(rng);
                (o.color, o.shape)
            } else {
                let (c, s) = (
                    rng.random_range(0..COLORS.len()),
                    rng.random_range(0..SHAPES.len()),
                );
                if count(objects, |o| o.color == c && o.shape == s) > 0 {
                    return None;
                }
                (c, s)
            };
            (
                format!("Is there a {} {}?", COLORS[c].0, SHAPES[s]),
                Answer::YesNo(yes),
            )
        }
        "are there any" => {
            let yes = rng.random_bool(0.5);
            let by_shape = rng.random_bool(0.5);
            let value = if yes {
                let o = pick(rng);
                if by_shape { o.shape } else { o.color }
            } else {
                rng.random_range(0..if by_shape { SHAPES.len() } else { COLORS.len() })
            };
            let n = count(objects, |o| {
                (if by_shape { o.shape } else { o.color }) == value
            });
            if (n > 0) != yes {
                return None;
            }
            let what = if by_shape {
                plural(value)
            } else {
                format!("{} objects", COLORS[value].0)
            };
            (format!("Are there any {what}?"), Answer::YesNo(yes))
        }
        "is the" => {
            let o = unique_object(rng, objects, true)?;
            let yes = rng.random_bool(0.5);
            let c = if yes {
                o.color
            } else {
                (o.color + rng.random_range(1..COLORS.len())) % COLORS.len()
            };
            (
                format!("Is the {} {}?", SHAPES[o.shape], COLORS[c].0),
                Answer::YesNo(yes),
            )
        }
        "how many" => {
            // Mostly about attributes present in the image, so that zero
            // does not dominate.
            let from_scene = rng.random_bool(0.75);
            match rng.random_range(0..3) {
                0 => (
                    [
                        "How many objects are there?",
                        "How many shapes are in the picture?",
                    ][rng.random_range(0..2)]
                    .to_string(),
                    Answer::Number(objects.len()),
                ),
                1 => {
                    let s = if from_scene {
                        pick(rng).shape
                    } else {
                        rng.random_range(0..SHAPES.len())
                    };
                    (
                        format!("How many {} are there?", plural(s)),
                        Answer::Number(count(objects, |o| o.shape == s)),
                    )
                }
                _ => {
                    let c = if from_scene {
                        pick(rng).color
                    } else {
                        rng.random_range(0..COLORS.len())
                    };
                    (
                        format!("How many {} objects are there?", COLORS[c].0),
                        Answer::Number(count(objects, |o| o.color == c)),
                    )
                }
            }
        }
        "what color is the" => {
            let o = unique_object(rng, objects, true)?;
            (
                format!("What color is the {}?", SHAPES[o.shape]),
                Answer::Color(o.color),
            )
        }
        _ => {
            let o = unique_object(rng, objects, false)?;
            (
                format!("What shape is the {} object?", COLORS[o.color].0),
                Answer::Shape(o.shape),
            )
        }
    };
    Some(Qa { text, kind, answer })
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn number_word(n: usize, rng: &mut ChaCha8Rng) -> String {
    const WORDS: [&str; 11] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    match n {
        0 if rng.random_bool(0.5) => "none".into(),
        0..=10 => WORDS[n].into(),
        _ => n.to_string(),
    }
}

/// The true answer as one human might type it; normalises to the canonical form.
fn surface(rng: &mut ChaCha8Rng, a: Answer) -> String {
    let c = a.canonical();
    match rng.random_range(0..10) {
        0..=4 => c,
        5 => capitalise(&c),
        6 => format!("{c}."),
        7 => match a {
            Answer::Number(n) => number_word(n, rng),
            Answer::Shape(_) => format!("a {c}"),
            Answer::YesNo(_) => format!("{c}!"),
            Answer::Color(_) => c.to_uppercase(),
        },
        8 => match a {
            Answer::Number(n) => capitalise(&number_word(n, rng)),
            Answer::Shape(_) => format!("the {c}"),
            _ => capitalise(&c),
        },
        _ => format!(" {c} "),
    }
}

/// A different answer meaning the same thing (normalising differently), if any.
fn synonym(rng: &mut ChaCha8Rng, a: Answer) -> Option<String> {
    let options: &[&str] = match a {
        Answer::YesNo(true) => &["yeah", "yep"],
        Answer::YesNo(false) => &["nope"],
        Answer::Number(_) => &[],
        Answer::Color(c) => match COLORS[c].0 {
            "red" => &["dark red"],
            "green" => &["dark green"],
            "blue" => &["navy", "dark blue"],
            "yellow" => &["gold"],
            "purple" => &["violet"],
            "orange" => &["dark orange"],
            _ => &["grey", "silver"],
        },
        Answer::Shape(s) => match SHAPES[s] {
            "circle" => &["round", "ball"],
            "square" => &["rectangle", "box"],
            _ => &["pyramid"],
        },
    };
    (!options.is_empty()).then(|| options[rng.random_range(0..options.len())].to_string())
}

/// A wrong answer of the same kind.
fn wrong(rng: &mut ChaCha8Rng, a: Answer) -> Answer {
    match a {
        Answer::YesNo(b) => Answer::YesNo(!b),
        Answer::Number(0) => Answer::Number(1),
        Answer::Number(n) => Answer::Number(if rng.random_bool(0.5) { n - 1 } else { n + 1 }),
        Answer::Color(c) => Answer::Color((c + rng.random_range(1..COLORS.len())) % COLORS.len()),
        Answer::Shape(s) => Answer::Shape((s + rng.random_range(1..SHAPES.len())) % SHAPES.len()),
    }
}

#[derive(Serialize)]
struct AnswerOut {
    answer: String,
    answer_confidence: &'static str,
    answer_id: usize,
}

/// Ten human answers to a question whose true answer is `a`.
fn human_answers(rng: &mut ChaCha8Rng, a: Answer) -> Vec<AnswerOut> {
    const AGREEING: [usize; 8] = [10, 10, 9, 9, 8, 8, 7, 6];
    let agreeing = AGREEING[rng.random_range(0..AGREEING.len())];
    let mut answers: Vec<(String, &'static str)> = Vec::with_capacity(HUMAN_ANSWERS);
    for i in 0..HUMAN_ANSWERS {
        answers.push(if i < agreeing {
            let conf = if rng.random_bool(0.85) {
                "yes"
            } else {
                "maybe"
            };
            (surface(rng, a), conf)
        } else if let Some(s) = synonym(rng, a).filter(|_| rng.random_bool(0.5)) {
            (s, if rng.random_bool(0.5) { "yes" } else { "maybe" })
        } else {
            let w = wrong(rng, a);
            (
                surface(rng, w),
                if rng.random_bool(0.5) { "no" } else { "maybe" },
            )
        });
    }
    for i in (1..answers.len()).rev() {
        let j = rng.random_range(0..=i);
        answers.swap(i, j);
    }
    answers
        .into_iter()
        .enumerate()
        .map(|(i, (answer, answer_confidence))| AnswerOut {
            answer,
            answer_confidence,
            answer_id: i + 1,
        })
        .collect()
}

#[derive(Serialize)]
struct Info {
    description: &'static str,
    url: &'static str,
    version: &'static str,
    generator: &'static str,
    seed: u64,
    image_size: u32,
}

#[derive(Serialize)]
struct License {
    name: &'static str,
    url: &'static str,
}

const LICENSE: License = License {
    name: "Creative Commons Attribution 4.0 International License",
    url: "http://creativecommons.org/licenses/by/4.0/",
};

#[derive(Serialize)]
struct QuestionOut {
    image_id: u64,
    question: String,
    question_id: u64,
}

#[derive(Serialize)]
struct QuestionsFile<'a> {
    info: &'a Info,
    task_type: &'static str,
    data_type: &'static str,
    license: &'a License,
    data_subtype: &'a str,
    questions: &'a [QuestionOut],
}

#[derive(Serialize)]
struct AnnotationOut {
    question_type: &'static str,
    multiple_choice_answer: String,
    answers: Vec<AnswerOut>,
    image_id: u64,
    answer_type: &'static str,
    question_id: u64,
}

#[derive(Serialize)]
struct AnnotationsFile<'a> {
    info: &'a Info,
    license: &'a License,
    data_subtype: &'a str,
    annotations: &'a [AnnotationOut],
}

fn write_questions(
    out: &Path,
    split: &str,
    info: &Info,
    questions: &[QuestionOut],
) -> Result<(), DataError> {
    write_json_atomic(
        &question_file(out, split),
        &QuestionsFile {
            info,
            task_type: "Open-Ended",
            data_type: "mscoco",
            license: &LICENSE,
            data_subtype: split,
            questions,
        },
    )
}

fn invalid_config(out: &Path, message: String) -> DataError {
    DataError::io(
        out,
        std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    )
}

/// Writes a synthetic VQA v2 dataset under `out` in the official layout
/// (train2014, val2014, test2015 and test-dev2015). Deterministic for a
/// configuration.
pub fn generate_vqa2(out: &Path, cfg: &Vqa2GenConfig) -> Result<Vqa2GenerateSummary, DataError> {
    if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&cfg.image_size) {
        return Err(invalid_config(
            out,
            format!(
                "image size {} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}",
                cfg.image_size
            ),
        ));
    }
    if cfg.questions_per_image > MAX_QUESTIONS_PER_IMAGE {
        return Err(invalid_config(
            out,
            format!(
                "{} questions per image, at most {MAX_QUESTIONS_PER_IMAGE}",
                cfg.questions_per_image
            ),
        ));
    }
    create_dir(out)?;
    let info = Info {
        description: "Synthetic VQA v2 layout: coloured 2D shapes (moevqa vqa2_gen)",
        url: "http://visualqa.org",
        version: "2.0",
        generator: "moevqa",
        seed: cfg.seed,
        image_size: cfg.image_size,
    };
    let mut summary = Vqa2GenerateSummary {
        train_images: cfg.train_images,
        val_images: cfg.val_images,
        test_images: cfg.test_images,
        train_questions: 0,
        val_questions: 0,
        test_questions: 0,
        test_dev_questions: 0,
    };
    let mut next_image_id = 1u64;
    for (split_id, (split, n)) in [
        ("train2014", cfg.train_images),
        ("val2014", cfg.val_images),
        ("test2015", cfg.test_images),
    ]
    .into_iter()
    .enumerate()
    {
        let annotated = split != "test2015";
        create_dir(&image_dir(out, split))?;
        let mut rng = ChaCha8Rng::seed_from_u64(
            cfg.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(0x5651_A2E0 + split_id as u64),
        );
        let mut scenes: Vec<(u64, Vec<Object>)> = Vec::with_capacity(n);
        let mut questions: Vec<QuestionOut> = Vec::with_capacity(n * cfg.questions_per_image);
        let mut annotations: Vec<AnnotationOut> = Vec::new();
        // Questions of the first half of the test images form test-dev.
        let mut dev_questions = 0;
        for index in 0..n {
            let image_id = next_image_id;
            next_image_id += 1;
            let objects = place_objects(&mut rng, cfg.image_size);
            let mut texts: Vec<String> = Vec::with_capacity(cfg.questions_per_image);
            for _ in 0..cfg.questions_per_image {
                let qa = (0..QUESTION_TRIES).find_map(|_| {
                    let kind = rng.random_range(0..QUESTION_TYPES.len());
                    question(&mut rng, &objects, kind).filter(|q| !texts.contains(&q.text))
                });
                let Some(qa) = qa else { continue };
                let question_id = image_id * 1000 + texts.len() as u64;
                texts.push(qa.text.clone());
                if annotated {
                    annotations.push(AnnotationOut {
                        question_type: QUESTION_TYPES[qa.kind].0,
                        multiple_choice_answer: qa.answer.canonical(),
                        answers: human_answers(&mut rng, qa.answer),
                        image_id,
                        answer_type: QUESTION_TYPES[qa.kind].1,
                        question_id,
                    });
                }
                questions.push(QuestionOut {
                    image_id,
                    question: qa.text,
                    question_id,
                });
            }
            if index < n.div_ceil(2) {
                dev_questions = questions.len();
            }
            scenes.push((image_id, objects));
        }
        scenes.par_iter().try_for_each(|(image_id, objects)| {
            let path = image_path(out, split, *image_id);
            let bytes = encode_jpeg(&render(objects, cfg.image_size))
                .map_err(|e| DataError::image(&path, e))?;
            fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))
        })?;
        write_questions(out, split, &info, &questions)?;
        if annotated {
            write_json_atomic(
                &annotation_file(out, split),
                &AnnotationsFile {
                    info: &info,
                    license: &LICENSE,
                    data_subtype: split,
                    annotations: &annotations,
                },
            )?;
        }
        match split {
            "train2014" => summary.train_questions = questions.len(),
            "val2014" => summary.val_questions = questions.len(),
            _ => {
                summary.test_questions = questions.len();
                summary.test_dev_questions = dev_questions;
                write_questions(out, "test-dev2015", &info, &questions[..dev_questions])?;
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::vqa::normalize_answer;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        crate::data::test_dir(&format!("vqa2gen-{name}"))
    }

    fn cfg(seed: u64) -> Vqa2GenConfig {
        Vqa2GenConfig {
            train_images: 10,
            val_images: 4,
            test_images: 3,
            questions_per_image: 5,
            image_size: 48,
            seed,
        }
    }

    /// Every file under `dir` (relative path -> bytes).
    fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(
                        p.strip_prefix(dir).unwrap().to_path_buf(),
                        fs::read(&p).unwrap(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (a, b, c) = (tmp("a"), tmp("b"), tmp("c"));
        let sa = generate_vqa2(&a, &cfg(5)).unwrap();
        let sb = generate_vqa2(&b, &cfg(5)).unwrap();
        generate_vqa2(&c, &cfg(6)).unwrap();
        assert_eq!(sa, sb);
        let (fa, fb, fc) = (files(&a), files(&b), files(&c));
        // 17 images, 4 question files, 2 annotation files.
        assert_eq!(fa.len(), 17 + 4 + 2);
        assert!(fa.contains_key(Path::new("train2014/COCO_train2014_000000000001.jpg")));
        assert!(fa.contains_key(Path::new("val2014/COCO_val2014_000000000011.jpg")));
        assert!(fa.contains_key(Path::new("test2015/COCO_test2015_000000000017.jpg")));
        assert!(fa.contains_key(Path::new("v2_OpenEnded_mscoco_test-dev2015_questions.json")));
        assert!(fa == fb);
        assert_eq!(fa.keys().collect::<Vec<_>>(), fc.keys().collect::<Vec<_>>());
        assert!(fa != fc);
        for d in [a, b, c] {
            fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn annotations_look_like_vqa_v2() {
        let dir = tmp("ann");
        let cfg = Vqa2GenConfig {
            train_images: 60,
            ..cfg(2)
        };
        let sum = generate_vqa2(&dir, &cfg).unwrap();
        let read = |p: PathBuf| -> serde_json::Value {
            serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
        };
        let qs = read(question_file(&dir, "train2014"));
        let anns = read(annotation_file(&dir, "train2014"));
        assert_eq!(qs["data_subtype"], "train2014");
        let (qs, anns) = (
            qs["questions"].as_array().unwrap(),
            anns["annotations"].as_array().unwrap(),
        );
        assert_eq!(
            (qs.len(), anns.len()),
            (sum.train_questions, sum.train_questions)
        );
        assert!(sum.train_questions >= 60 * 4, "{sum:?}");
        let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
        let mut yes = 0;
        let mut disagreements = 0;
        for (q, a) in qs.iter().zip(anns) {
            assert_eq!(q["question_id"], a["question_id"]);
            let (qid, img) = (
                q["question_id"].as_u64().unwrap(),
                q["image_id"].as_u64().unwrap(),
            );
            assert_eq!(qid / 1000, img);
            assert!((1..=60).contains(&img));
            let qt = a["question_type"].as_str().unwrap();
            let at = a["answer_type"].as_str().unwrap();
            assert!(QUESTION_TYPES.contains(&(qt, at)), "{qt} {at}");
            assert!(
                q["question"]
                    .as_str()
                    .unwrap()
                    .to_lowercase()
                    .starts_with(qt)
            );
            *by_type.entry(qt).or_default() += 1;
            let answers = a["answers"].as_array().unwrap();
            assert_eq!(answers.len(), 10);
            let mc = a["multiple_choice_answer"].as_str().unwrap();
            assert_eq!(mc, normalize_answer(mc));
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for (i, h) in answers.iter().enumerate() {
                assert_eq!(h["answer_id"], i + 1);
                assert!(["yes", "maybe", "no"].contains(&h["answer_confidence"].as_str().unwrap()));
                *counts
                    .entry(normalize_answer(h["answer"].as_str().unwrap()))
                    .or_default() += 1;
            }
            assert!(counts[mc] >= 6, "{a}");
            disagreements += usize::from(counts.len() > 1);
            yes += usize::from(mc == "yes");
            if at == "yes/no" {
                assert!(mc == "yes" || mc == "no");
            } else if at == "number" {
                assert!(mc.parse::<usize>().unwrap() <= MAX_OBJECTS);
            }
        }
        assert_eq!(by_type.len(), QUESTION_TYPES.len(), "{by_type:?}");
        let yes_no: usize = QUESTION_TYPES
            .iter()
            .filter(|(_, at)| *at == "yes/no")
            .map(|(qt, _)| by_type[qt])
            .sum();
        assert!(
            (yes as f64 / yes_no as f64 - 0.5).abs() < 0.15,
            "{yes}/{yes_no}"
        );
        assert!(
            disagreements > qs.len() / 4 && disagreements < qs.len(),
            "{disagreements}"
        );
        let dev = read(question_file(&dir, "test-dev2015"));
        assert_eq!(
            dev["questions"].as_array().unwrap().len(),
            sum.test_dev_questions
        );
        assert!(!annotation_file(&dir, "test2015").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn answers_are_true_to_the_image_and_survive_jpeg() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..40 {
            let objects = place_objects(&mut rng, 32);
            assert!((1..=MAX_OBJECTS).contains(&objects.len()));
            let img = image::load_from_memory(&encode_jpeg(&render(&objects, 32)).unwrap())
                .unwrap()
                .to_rgb8();
            for o in &objects {
                // The centre pixel is nearest to the object's colour.
                let px = img.get_pixel(o.x as u32, o.y as u32).0;
                let dist = |c: [u8; 3]| -> i32 {
                    (0..3).map(|i| (px[i] as i32 - c[i] as i32).pow(2)).sum()
                };
                let nearest = (0..COLORS.len())
                    .min_by_key(|&c| dist(COLORS[c].1))
                    .unwrap();
                assert_eq!(nearest, o.color);
                assert!(dist(COLORS[o.color].1) < dist(BACKGROUND));
            }
            for kind in 0..QUESTION_TYPES.len() {
                let Some(qa) = question(&mut rng, &objects, kind) else {
                    continue;
                };
                let words: Vec<&str> = qa.text.trim_end_matches('?').split(' ').collect();
                let color = |w: &str| COLORS.iter().position(|c| c.0 == w);
                let shape = |w: &str| SHAPES.iter().position(|s| *s == w || format!("{s}s") == w);
                let with = |c: Option<usize>, s: Option<usize>| {
                    count(&objects, |o| {
                        c.is_none_or(|c| o.color == c) && s.is_none_or(|s| o.shape == s)
                    })
                };
                let c = words.iter().find_map(|w| color(w));
                let s = words.iter().find_map(|w| shape(w));
                let expected = match qa.answer {
                    Answer::YesNo(_) if words[0] == "Is" && words[1] == "the" => {
                        assert_eq!(with(None, s), 1);
                        Answer::YesNo(with(c, s) == 1)
                    }
                    Answer::YesNo(_) => Answer::YesNo(with(c, s) > 0),
                    Answer::Number(_) => Answer::Number(with(c, s)),
                    Answer::Color(_) => {
                        assert_eq!(with(None, s), 1);
                        Answer::Color(objects.iter().find(|o| Some(o.shape) == s).unwrap().color)
                    }
                    Answer::Shape(_) => {
                        assert_eq!(with(c, None), 1);
                        Answer::Shape(objects.iter().find(|o| Some(o.color) == c).unwrap().shape)
                    }
                };
                assert_eq!(qa.answer, expected, "{}", qa.text);
            }
        }
    }

    #[test]
    fn human_answer_forms_normalise_as_intended() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let all: Vec<Answer> = [Answer::YesNo(true), Answer::YesNo(false)]
            .into_iter()
            .chain((0..=MAX_OBJECTS).map(Answer::Number))
            .chain((0..COLORS.len()).map(Answer::Color))
            .chain((0..SHAPES.len()).map(Answer::Shape))
            .collect();
        for a in all {
            let c = a.canonical();
            for _ in 0..40 {
                let s = surface(&mut rng, a);
                assert_eq!(normalize_answer(&s), c, "{s:?}");
                if let Some(s) = synonym(&mut rng, a) {
                    assert_ne!(normalize_answer(&s), c, "{s:?}");
                }
                assert_ne!(wrong(&mut rng, a).canonical(), c);
            }
        }
    }

    /// The true answer scores close to, but not always, 1 under the
    /// official metric (some human forms, like "Red" or "yes!", only get the
    /// punctuation step there).
    #[test]
    fn official_accuracy_of_the_true_answers() {
        let dir = tmp("oracle");
        let sum = generate_vqa2(
            &dir,
            &Vqa2GenConfig {
                train_images: 100,
                image_size: 32,
                ..cfg(4)
            },
        )
        .unwrap();
        let anns: serde_json::Value =
            serde_json::from_slice(&fs::read(annotation_file(&dir, "train2014")).unwrap()).unwrap();
        let accs: Vec<f64> = anns["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                // The script strips the human answers before scoring.
                let humans: Vec<String> = a["answers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["answer"].as_str().unwrap().trim().to_string())
                    .collect();
                crate::metrics::vqa::question_accuracy(
                    a["multiple_choice_answer"].as_str().unwrap(),
                    &humans,
                )
            })
            .collect();
        assert_eq!(accs.len(), sum.train_questions);
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        assert!(mean > 0.97 && accs.iter().any(|&a| a < 1.0), "{mean}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_bad_sizes() {
        let dir = tmp("bad");
        let err = generate_vqa2(
            &dir,
            &Vqa2GenConfig {
                image_size: 16,
                ..cfg(1)
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("image size 16"), "{err}");
        assert!(!dir.exists());
    }
}
