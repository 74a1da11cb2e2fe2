//! Sort-of-CLEVR (Santoro et al. 2017, as generated publicly), written in
//! the CLEVR v1.0 layout with English questions so that one reader and one
//! question LSTM serve both.
//!
//! 75x75 white images; six objects, one per colour (red, green, blue,
//! orange, gray, yellow), each a 10x10 square ("rectangle") or a radius-5
//! circle with probability 1/2, centres uniform in [5, 70) and at least 10
//! px apart. Per image 10 non-relational questions (shape of X; is X on the
//! left; is X at the top) and 10 relational ones (shape of the object
//! closest to X; shape of the object furthest from X; how many objects have
//! X's shape), colour and type drawn uniformly. Answers: yes, no, rectangle,
//! circle, 1..6.

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::DataError;
use crate::data::clevr_format::{
    ProgramStep, Question, Scene, SceneObject, create_split, image_filename, write_split,
};

/// Image side in pixels.
pub const SIZE: u32 = 75;
/// Half the side of a square, and the radius of a circle.
pub const HALF: i32 = 5;
/// The six colours, one object each.
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("orange", [255, 156, 0]),
    ("gray", [128, 128, 128]),
    ("yellow", [255, 255, 0]),
];
/// Question types: the first three are non-relational, the rest relational.
pub const QUESTION_TYPES: [&str; 6] = [
    "query_shape",
    "is_left",
    "is_top",
    "closest_shape",
    "furthest_shape",
    "count_same_shape",
];
/// Questions of each kind per image.
pub const QUESTIONS_PER_KIND: usize = 10;

/// What to generate.
#[derive(Debug, Clone, Serialize)]
pub struct SortOfClevrConfig {
    pub train_images: usize,
    pub val_images: usize,
    pub seed: u64,
}

impl Default for SortOfClevrConfig {
    fn default() -> Self {
        SortOfClevrConfig {
            train_images: 9800,
            val_images: 200,
            seed: 1,
        }
    }
}

/// Whether a question type needs relations between objects.
pub fn is_relational(question_type: &str) -> bool {
    QUESTION_TYPES[3..].contains(&question_type)
}

/// (non-relational, relational): the plain means of the per-type accuracies
/// of each group, the two numbers of the public Sort-of-CLEVR results.
/// `None` unless every type is a Sort-of-CLEVR one and both groups appear.
pub fn group_means(by_type: &std::collections::BTreeMap<String, f64>) -> Option<(f64, f64)> {
    if by_type
        .keys()
        .any(|t| !QUESTION_TYPES.contains(&t.as_str()))
    {
        return None;
    }
    let mean = |rel: bool| {
        let v: Vec<f64> = by_type
            .iter()
            .filter(|(t, _)| is_relational(t) == rel)
            .map(|(_, a)| *a)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Some((mean(false)?, mean(true)?))
}

#[derive(Debug, Clone, Copy)]
struct Object {
    color: usize,
    square: bool,
    x: i32,
    y: i32,
}

fn shape_name(square: bool) -> &'static str {
    if square { "rectangle" } else { "circle" }
}

fn place_objects(rng: &mut ChaCha8Rng) -> Vec<Object> {
    let mut objects: Vec<Object> = Vec::with_capacity(COLORS.len());
    for color in 0..COLORS.len() {
        let (x, y) = loop {
            let (x, y) = (
                rng.random_range(HALF..SIZE as i32 - HALF),
                rng.random_range(HALF..SIZE as i32 - HALF),
            );
            let far = objects
                .iter()
                .all(|o| (o.x - x).pow(2) + (o.y - y).pow(2) >= (2 * HALF).pow(2));
            if far {
                break (x, y);
            }
        };
        objects.push(Object {
            color,
            square: rng.random_bool(0.5),
            x,
            y,
        });
    }
    objects
}

fn render(objects: &[Object]) -> RgbImage {
    let mut img = RgbImage::from_pixel(SIZE, SIZE, Rgb([255, 255, 255]));
    for o in objects {
        let rgb = Rgb(COLORS[o.color].1);
        for y in (o.y - HALF).max(0)..(o.y + HALF).min(SIZE as i32) {
            for x in (o.x - HALF).max(0)..(o.x + HALF).min(SIZE as i32) {
                let inside = o.square || (x - o.x).pow(2) + (y - o.y).pow(2) <= HALF * HALF;
                if inside {
                    img.put_pixel(x as u32, y as u32, rgb);
                }
            }
        }
    }
    img
}

fn answer(objects: &[Object], subject: usize, qtype: &str) -> String {
    let s = objects[subject];
    let dist = |o: &Object| (o.x - s.x).pow(2) + (o.y - s.y).pow(2);
    let others = || objects.iter().filter(|o| o.color != s.color);
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    match qtype {
        "query_shape" => shape_name(s.square).into(),
        "is_left" => yes_no(s.x < SIZE as i32 / 2),
        "is_top" => yes_no(s.y < SIZE as i32 / 2),
        // Ties (equal distances) go to the first object in colour order.
        "closest_shape" => shape_name(
            others()
                .min_by_key(|o| dist(o))
                .map_or(s.square, |o| o.square),
        )
        .into(),
        "furthest_shape" => shape_name(
            others()
                .rev()
                .max_by_key(|o| dist(o))
                .map_or(s.square, |o| o.square),
        )
        .into(),
        "count_same_shape" => objects
            .iter()
            .filter(|o| o.square == s.square)
            .count()
            .to_string(),
        other => unreachable!("unknown question type {other}"),
    }
}

fn question_text(color: &str, qtype: &str) -> String {
    match qtype {
        "query_shape" => format!("What is the shape of the {color} object?"),
        "is_left" => format!("Is the {color} object on the left of the image?"),
        "is_top" => format!("Is the {color} object at the top of the image?"),
        "closest_shape" => {
            format!("What is the shape of the object closest to the {color} object?")
        }
        "furthest_shape" => {
            format!("What is the shape of the object furthest from the {color} object?")
        }
        "count_same_shape" => {
            format!("How many objects have the same shape as the {color} object?")
        }
        other => unreachable!("unknown question type {other}"),
    }
}

fn program(color: &str, qtype: &str) -> Vec<ProgramStep> {
    vec![
        ProgramStep {
            function: "scene".into(),
            inputs: vec![],
            value_inputs: vec![],
        },
        ProgramStep {
            function: "filter_color".into(),
            inputs: vec![0],
            value_inputs: vec![color.into()],
        },
        ProgramStep {
            function: qtype.into(),
            inputs: vec![1],
            value_inputs: vec![],
        },
    ]
}

/// Counts of what was written.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateSummary {
    pub train_images: usize,
    pub val_images: usize,
    pub train_questions: usize,
    pub val_questions: usize,
}

impl GenerateSummary {
    /// Images asked for per split, questions written per split (train, val).
    pub fn new(images: [usize; 2], questions: [usize; 2]) -> Self {
        GenerateSummary {
            train_images: images[0],
            val_images: images[1],
            train_questions: questions[0],
            val_questions: questions[1],
        }
    }
}

/// Writes a Sort-of-CLEVR dataset under `out` in the CLEVR layout.
/// Deterministic for a seed (ChaCha8, one stream per split).
pub fn generate(out: &Path, cfg: &SortOfClevrConfig) -> Result<GenerateSummary, DataError> {
    let mut counts = [0usize; 2];
    for (split_id, (split, n)) in [("train", cfg.train_images), ("val", cfg.val_images)]
        .into_iter()
        .enumerate()
    {
        let paths = create_split(out, split)?;
        let mut rng = ChaCha8Rng::seed_from_u64(
            cfg.seed
                .wrapping_mul(0x9E37_79B9)
                .wrapping_add(split_id as u64),
        );
        let mut questions = Vec::with_capacity(n * 2 * QUESTIONS_PER_KIND);
        let mut scenes = Vec::with_capacity(n);
        for index in 0..n {
            let objects = place_objects(&mut rng);
            let filename = image_filename(split, index);
            let path = paths.images.join(&filename);
            render(&objects)
                .save(&path)
                .map_err(|e| DataError::image(&path, e))?;
            for kind in 0..2 {
                for _ in 0..QUESTIONS_PER_KIND {
                    let subject = rng.random_range(0..COLORS.len());
                    let family = 3 * kind + rng.random_range(0..3);
                    let qtype = QUESTION_TYPES[family];
                    let color = COLORS[subject].0;
                    questions.push(Question {
                        split: split.into(),
                        image_index: index,
                        image_filename: filename.clone(),
                        question: question_text(color, qtype),
                        answer: Some(answer(&objects, subject, qtype)),
                        question_family_index: Some(family),
                        program: Some(program(color, qtype)),
                    });
                }
            }
            scenes.push(Scene {
                split: split.into(),
                image_index: index,
                image_filename: filename,
                objects: objects
                    .iter()
                    .map(|o| SceneObject {
                        color: COLORS[o.color].0.into(),
                        shape: shape_name(o.square).into(),
                        size: "small".into(),
                        x: o.x as f32,
                        y: o.y as f32,
                    })
                    .collect(),
            });
        }
        let info = serde_json::json!({"dataset": "sort-of-clevr", "generator": "moevqa", "seed": cfg.seed, "split": split});
        counts[split_id] = write_split(&paths, info, questions, scenes)?;
    }
    Ok(GenerateSummary::new(
        [cfg.train_images, cfg.val_images],
        counts,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::clevr_format::{QuestionFile, SceneFile, read_split_files, split_paths};

    #[test]
    fn group_means_need_sort_of_clevr_types_of_both_groups() {
        let m = |pairs: &[(&str, f64)]| -> std::collections::BTreeMap<String, f64> {
            pairs.iter().map(|(t, a)| (t.to_string(), *a)).collect()
        };
        let both = m(&[
            ("is_top", 20.0),
            ("query_shape", 80.0),
            ("closest_shape", 30.0),
        ]);
        assert_eq!(group_means(&both), Some((50.0, 30.0)));
        assert_eq!(group_means(&m(&[("is_top", 20.0)])), None);
        assert_eq!(
            group_means(&m(&[
                ("is_top", 20.0),
                ("count", 1.0),
                ("closest_shape", 3.0)
            ])),
            None
        );
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        crate::data::test_dir(&format!("soc-{name}"))
    }

    fn load(dir: &Path, split: &str) -> (QuestionFile, SceneFile) {
        read_split_files(dir, split).unwrap()
    }

    #[test]
    fn writes_the_clevr_layout_deterministically() {
        let cfg = SortOfClevrConfig {
            train_images: 12,
            val_images: 3,
            seed: 5,
        };
        let (a, b) = (tmp("a"), tmp("b"));
        let sum = generate(&a, &cfg).unwrap();
        generate(&b, &cfg).unwrap();
        assert_eq!((sum.train_questions, sum.val_questions), (240, 60));
        for split in ["train", "val"] {
            let (qa, sa) = load(&a, split);
            let (qb, sb) = load(&b, split);
            assert_eq!(qa, qb);
            assert_eq!(sa, sb);
            let pa = split_paths(&a, split).images.join(image_filename(split, 0));
            let pb = split_paths(&b, split).images.join(image_filename(split, 0));
            assert_eq!(std::fs::read(pa).unwrap(), std::fs::read(pb).unwrap());
        }
        let other = tmp("c");
        generate(&other, &SortOfClevrConfig { seed: 6, ..cfg }).unwrap();
        assert_ne!(load(&a, "train").0, load(&other, "train").0);
        for d in [a, b, other] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn scenes_images_and_answers_agree() {
        let dir = tmp("agree");
        generate(
            &dir,
            &SortOfClevrConfig {
                train_images: 30,
                val_images: 1,
                seed: 2,
            },
        )
        .unwrap();
        let (qf, sf) = load(&dir, "train");
        for scene in &sf.scenes {
            assert_eq!(scene.objects.len(), 6);
            let img = image::open(
                split_paths(&dir, "train")
                    .images
                    .join(&scene.image_filename),
            )
            .unwrap()
            .to_rgb8();
            assert_eq!(img.dimensions(), (75, 75));
            for (i, o) in scene.objects.iter().enumerate() {
                assert_eq!(o.color, COLORS[i].0);
                assert!((5.0..70.0).contains(&o.x) && (5.0..70.0).contains(&o.y));
                // The centre pixel has the object's colour.
                assert_eq!(img.get_pixel(o.x as u32, o.y as u32).0, COLORS[i].1);
                for p in &scene.objects[..i] {
                    assert!((p.x - o.x).powi(2) + (p.y - o.y).powi(2) >= 100.0);
                }
            }
        }
        let mut per_image = vec![(0, 0); 30];
        for q in &qf.questions {
            let t = q.question_type().unwrap();
            let scene = &sf.scenes[q.image_index];
            let color = &q.program.as_ref().unwrap()[1].value_inputs[0];
            assert!(q.question.contains(color.as_str()));
            let subject = scene.objects.iter().find(|o| &o.color == color).unwrap();
            let a = q.answer.as_deref().unwrap();
            // Recompute the answers that need no tie rule.
            match t {
                "query_shape" => assert_eq!(a, subject.shape),
                "is_left" => assert_eq!(a, if subject.x < 37.0 { "yes" } else { "no" }),
                "is_top" => assert_eq!(a, if subject.y < 37.0 { "yes" } else { "no" }),
                "count_same_shape" => {
                    let n = scene
                        .objects
                        .iter()
                        .filter(|o| o.shape == subject.shape)
                        .count();
                    assert_eq!(a, n.to_string());
                }
                _ => assert!(a == "rectangle" || a == "circle"),
            }
            if is_relational(t) {
                per_image[q.image_index].1 += 1;
            } else {
                per_image[q.image_index].0 += 1;
            }
        }
        assert!(per_image.iter().all(|&c| c == (10, 10)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
