//! Reader for a directory in the CLEVR v1.0 layout (the real CLEVR, or the
//! generated sets). Questions are kept lean (no program beyond its last
//! function, which names the question type); images are decoded on demand,
//! resized to the model input and decoded in parallel per batch, so a
//! 700k-question split never holds its images in memory.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;
use serde::{Deserialize, Deserializer};

use crate::data::DataError;
use crate::data::clevr_format::split_paths;

/// A question as the model needs it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClevrQuestion {
    /// Index in the split's question file (absent in some files).
    #[serde(default)]
    pub question_index: Option<usize>,
    pub image_index: usize,
    pub image_filename: String,
    pub question: String,
    /// `None` in the test split.
    #[serde(default)]
    pub answer: Option<String>,
    #[serde(default)]
    pub question_family_index: Option<usize>,
    /// Last function of the program (`None` in the test split).
    #[serde(default, rename = "program", deserialize_with = "last_function")]
    pub question_type: Option<String>,
}

impl ClevrQuestion {
    /// The question type results are grouped by: the program's last
    /// function, or "unknown" where there is no program (a test split).
    pub fn family(&self) -> &str {
        self.question_type.as_deref().unwrap_or("unknown")
    }
}

fn last_function<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Step {
        function: String,
    }
    let steps: Option<Vec<Step>> = Option::deserialize(d)?;
    Ok(steps.and_then(|s| s.into_iter().last().map(|s| s.function)))
}

#[derive(Deserialize)]
struct QuestionsOnly {
    questions: Vec<ClevrQuestion>,
}

/// One split of a CLEVR-layout directory.
#[derive(Debug, Clone)]
pub struct ClevrSplit {
    pub split: String,
    pub image_dir: PathBuf,
    pub questions: Vec<ClevrQuestion>,
}

impl ClevrSplit {
    /// Opens `root` for `split`: checks the layout and reads the questions.
    pub fn open(root: &Path, split: &str) -> Result<Self, DataError> {
        let paths = split_paths(root, split);
        for (what, p) in [
            ("image directory", &paths.images),
            ("questions file", &paths.questions),
        ] {
            if !p.exists() {
                return Err(DataError::Layout {
                    root: root.to_path_buf(),
                    message: format!(
                        "missing {what} {} (expected the CLEVR v1.0 layout)",
                        p.display()
                    ),
                });
            }
        }
        let file = File::open(&paths.questions).map_err(|e| DataError::io(&paths.questions, e))?;
        let parsed: QuestionsOnly =
            serde_json::from_reader(BufReader::with_capacity(1 << 20, file)).map_err(|e| {
                DataError::Json {
                    path: paths.questions.clone(),
                    line: e.line(),
                    column: e.column(),
                    // serde_json appends the position, which the error already names.
                    message: e
                        .to_string()
                        .trim_end_matches(&format!(" at line {} column {}", e.line(), e.column()))
                        .to_string(),
                }
            })?;
        Ok(ClevrSplit {
            split: split.into(),
            image_dir: paths.images,
            questions: parsed.questions,
        })
    }

    /// Path of a question's image.
    pub fn image_path(&self, q: &ClevrQuestion) -> PathBuf {
        self.image_dir.join(&q.image_filename)
    }
}

/// Decodes an image file and resizes it to `size` x `size`, CHW floats in [0, 1].
pub fn load_image(path: &Path, size: u32) -> Result<Vec<f32>, DataError> {
    let img = image::open(path)
        .map_err(|e| DataError::image(path, e))?
        .to_rgb8();
    let img = if img.dimensions() == (size, size) {
        img
    } else {
        image::imageops::resize(&img, size, size, FilterType::Triangle)
    };
    let plane = (size * size) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px.0[c] as f32 / 255.0;
        }
    }
    Ok(out)
}

/// Decodes many images in parallel into one [N, 3, size, size] buffer.
pub fn load_images(paths: &[PathBuf], size: u32) -> Result<Vec<f32>, DataError> {
    let images: Vec<Vec<f32>> = paths
        .par_iter()
        .map(|p| load_image(p, size))
        .collect::<Result<_, _>>()?;
    Ok(images.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sort_of_clevr::{SortOfClevrConfig, generate};

    fn tmp(name: &str) -> std::path::PathBuf {
        crate::data::test_dir(&format!("reader-{name}"))
    }

    #[test]
    fn reads_a_generated_split_and_its_images() {
        let dir = tmp("ok");
        generate(
            &dir,
            &SortOfClevrConfig {
                train_images: 3,
                val_images: 1,
                seed: 1,
            },
        )
        .unwrap();
        let split = ClevrSplit::open(&dir, "train").unwrap();
        assert_eq!(split.questions.len(), 60);
        let q = &split.questions[0];
        assert!(q.answer.is_some() && q.question_type.is_some());
        let paths: Vec<_> = split.questions[..4]
            .iter()
            .map(|q| split.image_path(q))
            .collect();
        let buf = load_images(&paths, 32).unwrap();
        assert_eq!(buf.len(), 4 * 3 * 32 * 32);
        assert!(buf.iter().all(|v| (0.0..=1.0).contains(v)));
        let full = load_image(&paths[0], 75).unwrap();
        // White background in the corner.
        assert_eq!((full[0], full[75 * 75], full[2 * 75 * 75]), (1.0, 1.0, 1.0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn test_split_without_answers_loads() {
        let dir = tmp("test");
        let p = split_paths(&dir, "test");
        std::fs::create_dir_all(&p.images).unwrap();
        std::fs::create_dir_all(p.questions.parent().unwrap()).unwrap();
        std::fs::write(
            &p.questions,
            r#"{"info": {}, "questions": [{"split": "test", "image_index": 0, "image_filename": "CLEVR_test_000000.png", "question": "Is it red?", "question_index": 0}]}"#,
        )
        .unwrap();
        let s = ClevrSplit::open(&dir, "test").unwrap();
        assert_eq!(s.questions[0].answer, None);
        assert_eq!(s.questions[0].question_type, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_layout_json_and_images_name_the_file() {
        let dir = tmp("bad");
        let err = ClevrSplit::open(&dir, "train").unwrap_err().to_string();
        assert!(
            err.contains("missing image directory") && err.contains("CLEVR v1.0 layout"),
            "{err}"
        );
        let p = split_paths(&dir, "train");
        std::fs::create_dir_all(&p.images).unwrap();
        std::fs::create_dir_all(p.questions.parent().unwrap()).unwrap();
        std::fs::write(
            &p.questions,
            "{\"questions\": [\n  {\"image_index\": 0,,}]}",
        )
        .unwrap();
        let err = ClevrSplit::open(&dir, "train").unwrap_err().to_string();
        assert!(
            err.contains("CLEVR_train_questions.json") && err.contains("line 2"),
            "{err}"
        );
        let png = p.images.join("broken.png");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let err = load_image(&png, 8).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
        let err = load_image(&p.images.join("missing.png"), 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.png"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
