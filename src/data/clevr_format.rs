//! The CLEVR v1.0 file layout, shared by the generators and (later) the
//! reader: `DIR/images/{split}/CLEVR_{split}_{index:06}.png`,
//! `DIR/questions/CLEVR_{split}_questions.json` and
//! `DIR/scenes/CLEVR_{split}_scenes.json`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DataError;

/// One step of a CLEVR functional program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStep {
    pub function: String,
    #[serde(default)]
    pub inputs: Vec<usize>,
    #[serde(default)]
    pub value_inputs: Vec<String>,
}

/// One question, with the fields of CLEVR's question files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub split: String,
    pub image_index: usize,
    pub image_filename: String,
    pub question: String,
    /// Absent in the test split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_family_index: Option<usize>,
    /// Absent in the test split; the last function names the question type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<Vec<ProgramStep>>,
}

impl Question {
    /// The question type: the last function of the program.
    pub fn question_type(&self) -> Option<&str> {
        self.program.as_ref()?.last().map(|s| s.function.as_str())
    }
}

/// `CLEVR_{split}_questions.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionFile {
    pub info: serde_json::Value,
    pub questions: Vec<Question>,
}

/// One object of a generated scene (pixel coordinates of its centre).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneObject {
    pub color: String,
    pub shape: String,
    pub size: String,
    pub x: f32,
    pub y: f32,
}

/// One scene of `CLEVR_{split}_scenes.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub split: String,
    pub image_index: usize,
    pub image_filename: String,
    pub objects: Vec<SceneObject>,
}

/// `CLEVR_{split}_scenes.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneFile {
    pub info: serde_json::Value,
    pub scenes: Vec<Scene>,
}

/// File name of image `index` of `split`.
pub fn image_filename(split: &str, index: usize) -> String {
    format!("CLEVR_{split}_{index:06}.png")
}

/// Paths of one split inside a CLEVR-layout directory.
pub struct SplitPaths {
    pub images: PathBuf,
    pub questions: PathBuf,
    pub scenes: PathBuf,
}

/// The paths of `split` under `root`.
pub fn split_paths(root: &Path, split: &str) -> SplitPaths {
    SplitPaths {
        images: root.join("images").join(split),
        questions: root
            .join("questions")
            .join(format!("CLEVR_{split}_questions.json")),
        scenes: root
            .join("scenes")
            .join(format!("CLEVR_{split}_scenes.json")),
    }
}

/// Creates a directory and its parents, naming it in the error.
pub fn create_dir(path: &Path) -> Result<(), DataError> {
    fs::create_dir_all(path).map_err(|e| DataError::io(path, e))
}

/// Writes JSON atomically (temp file in the same directory, then rename).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), DataError> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(fs::File::create(&tmp)?);
        serde_json::to_writer(&mut f, value).map_err(std::io::Error::other)?;
        f.flush()?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| DataError::io(path, e))
}

/// Creates the image, question and scene directories of a split.
pub fn create_split(root: &Path, split: &str) -> Result<SplitPaths, DataError> {
    let paths = split_paths(root, split);
    create_dir(&paths.images)?;
    for file in [&paths.questions, &paths.scenes] {
        if let Some(parent) = file.parent() {
            create_dir(parent)?;
        }
    }
    Ok(paths)
}

/// Writes the question and scene files of a split; returns the number of questions.
pub fn write_split(
    paths: &SplitPaths,
    info: serde_json::Value,
    questions: Vec<Question>,
    scenes: Vec<Scene>,
) -> Result<usize, DataError> {
    let n = questions.len();
    write_json_atomic(
        &paths.questions,
        &QuestionFile {
            info: info.clone(),
            questions,
        },
    )?;
    write_json_atomic(&paths.scenes, &SceneFile { info, scenes })?;
    Ok(n)
}

/// Reads the question and scene files of a split (generated sets, tests).
pub fn read_split_files(root: &Path, split: &str) -> Result<(QuestionFile, SceneFile), DataError> {
    let paths = split_paths(root, split);
    let read = |path: &Path| -> Result<Vec<u8>, DataError> {
        fs::read(path).map_err(|e| DataError::io(path, e))
    };
    let json = |path: &Path, e: serde_json::Error| DataError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    };
    let q =
        serde_json::from_slice(&read(&paths.questions)?).map_err(|e| json(&paths.questions, e))?;
    let s = serde_json::from_slice(&read(&paths.scenes)?).map_err(|e| json(&paths.scenes, e))?;
    Ok((q, s))
}
